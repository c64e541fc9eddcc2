"""The control socket of ``pfrest serve``: where ``pfrest cache drop`` and ``pfrest cache flush`` reach a
running serve, for an endpoint without a shared cache (with one, they go through the shared cache's
channel to every process of the fleet instead: invalidation.py).

HTTP/1.1 on a unix socket (httpd.py, the metrics address's server): ``POST /cache/ENDPOINT``, the body
an invalidation as the shared cache's channel carries it (sharedformat: ``drop`` and the lookups'
query strings, or ``flush``).  The answer: 200 and ``{"processes": N, "dropped": M}`` (JSON: the
processes whose cache it reached, with ``--workers`` each worker, and the answers they dropped); 404
for an endpoint this serve does not cache for; 400 for a body that is no invalidation; 413 for one of
over MAX_KEYS keys (or over httprequest.MAX_BODY bytes).

Where: ``control-socket``, by default DEFAULT_CONTROL_SOCKET (pfrest.service's ``RuntimeDirectory=``
makes /run/pfrest; elsewhere serve makes it, mode 0700, when it may, and removes it at the end if it
is still the one it made and empty: a serve started by hand leaves nothing behind).  The socket is made before
privileges are dropped, mode 0600, removed at the end, and only processes of root or of the user serve
runs as are answered.  The default is a convenience: when it cannot be had (another serve holds it, no
right to make /run/pfrest), serve says so and runs without it; a control-socket the config names must
be had, as an endpoint's socket must.

The *source* of the answers: the single process's Server, or the arbiter of ``--workers``, which passes
the invalidation to every worker and adds up their counts: ``source.invalidate(name, lookups, done)``
calls ``done([count or None per process])`` (None: that process keeps no cache for the endpoint).
"""

import json
import logging
import os

from pfrest.cache import sharedformat
from pfrest.config import DEFAULT_CONTROL_SOCKET
from pfrest.ops.httpd import HttpServer
from pfrest.ops.httprequest import MAX_BODY
from pfrest.system import privileges
from pfrest.system.sockets import BindError

log = logging.getLogger("pfrest")

PATH_PREFIX = "/cache/"
DIRECTORY_MODE = 0o700   # of the default socket's directory, when serve makes it
# keys in one request: parsed, a body of short keys takes 30 times its size (1 MiB: 30 MiB); pfrest cache
# sends more in several requests
MAX_KEYS = 10000


def path_of(cfg) -> str:
    return cfg.control_socket or DEFAULT_CONTROL_SOCKET


class ControlSocket:
    """One process's control socket and its answers (the httpd app)."""

    def __init__(self, cfg, source):
        self.source = source
        self.path = path_of(cfg)
        self.user = cfg.user
        self.required = cfg.control_socket is not None
        self.httpd = HttpServer(self.path, methods=("POST",), name="control-socket", max_body=MAX_BODY)
        self.bound = self.tried = False

    def bind(self):
        """Listen now (before dropping privileges), once; BindError only for a configured control-socket."""
        if self.tried:
            return self
        self.tried = True
        directory, made_directory = os.path.dirname(self.path), False
        try:
            if not self.required and not os.path.isdir(directory):
                os.mkdir(directory, DIRECTORY_MODE)
                made_directory = True
            self.httpd.bind(privileges.owner(self.user))
            self.bound = True
            if made_directory and self.httpd.made is not None:   # removed with the socket, if empty
                self.httpd.made = self.httpd.made._replace(own_directory=True)
        except (BindError, OSError) as exc:
            if made_directory:
                _remove_empty(directory)
            if self.required:
                raise
            log.warning("%s; this serve runs without a control socket (pfrest cache reaches it only "
                        "through a shared cache)", exc if isinstance(exc, BindError) else
                        f"control-socket: cannot make {os.path.dirname(self.path)}: {exc.strerror}")
        return self

    def start(self, watcher):
        if self.bound:
            self.httpd.start(watcher, self)
        return self

    def close(self):
        self.httpd.close()

    def socket_files(self):
        return self.httpd.socket_files()

    def all_sockets(self):
        return self.httpd.all_sockets()

    def __call__(self, method, path, body, respond):
        name = path[len(PATH_PREFIX):] if path.startswith(PATH_PREFIX) else ""
        if not name or "/" in name:
            return respond(404, b"POST /cache/ENDPOINT\n")
        if body.count(b"\n") > MAX_KEYS:
            return respond(413, f"over {MAX_KEYS} keys in one request\n".encode())
        try:
            lookups = sharedformat.read_message(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return respond(400, f"{exc}\n".encode())

        def done(counts):
            reached = [count for count in counts if count is not None]
            if not reached:
                return respond(404, f"endpoint {name} keeps no cache in this pfrest serve\n".encode())
            log.info("endpoint=%s cache: dropped %d answer(s) in %d process(es), as pfrest cache asked",
                     name, sum(reached), len(reached))
            respond(200, json.dumps({"processes": len(reached), "dropped": sum(reached)}).encode(),
                    "application/json")
        self.source.invalidate(name, lookups, done)


def _remove_empty(directory):
    """The directory bind made, when binding in it failed: nothing of serve's is in it."""
    try:
        os.rmdir(directory)
    except OSError:
        pass


def reconfigure(control, cfg):
    """After a reload: a new control-socket takes effect at the next start."""
    if path_of(cfg) != control.path:
        log.warning("control-socket changed: the change takes effect when pfrest serve restarts")
