"""A tiny HTTP/1.1 server for the metrics address (``/metrics``, ``/healthz``, ``/readyz``) and the control
socket (``pfrest cache``, controlsocket.py), on whatever loop the process runs: the event loop of a
single ``serve`` process, or the plain selector loop of the arbiter of ``serve --workers``, which must
stay responsive for the connections it passes on.  So it never blocks and does little: through the
same *watcher* as the Listener (readiness callbacks, a timer; and ``watch_writable``), one request per
connection, only the methods it is given, the request head at most MAX_REQUEST bytes, a body (by
Content-Length) at most MAX_BODY, both within READ_TIMEOUT seconds, the reply written as the socket
takes it, then the connection closed.

It listens on TCP (``(host, port)``: peers checked against ``allow_from``) or on a unix socket (a
path: mode 0600, and only peers running as root or as this process's user are answered, whatever the
file's mode).

The *app* answers: ``app(method, path, body, respond)`` calls ``respond(status, body, content_type)``,
at once or later (``/readyz`` may wait for a probe, ``pfrest cache`` for the workers); a connection
gone by then is simply not answered.
"""

import logging
import os
import socket
import time

from pfrest.server import socketfiles, sockets
from pfrest.server.sockets import BindError

log = logging.getLogger("pfrest")

MAX_REQUEST = 8192      # bytes of request line and headers; a scraper sends a few hundred
MAX_BODY = 1 << 20      # bytes of a request body (pfrest cache drop with many keys)
UNIX_MODE = 0o600       # a unix socket's file mode
READ_TIMEOUT = 5.0      # seconds from connect to the end of the request head
ANSWER_TIMEOUT = 110.0  # seconds the app may take (a probe is bounded by request-timeout, at most 99 s)
WRITE_TIMEOUT = 10.0    # seconds the client may take to read the reply
MAX_CLIENTS = 32        # connections at once; more are closed at once
ACCEPT_BATCH = 16       # accepts per wake-up
EXHAUSTED_PAUSE = 0.1   # seconds accepting pauses when the process is out of descriptors
BACKLOG = 64
WARNING_INTERVAL = 60.0  # seconds between two warnings about refused peers
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           413: "Content Too Large", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}
TEXT = "text/plain; charset=utf-8"


class _Exchange:
    """One connection: its request, then its reply."""

    def __init__(self, sock):
        self.sock = sock
        self.head = b""       # what has been read: the head, then the body
        self.out = None       # the reply still to write
        self.phase = "read"   # read, answer, write, done
        self.method = None
        self.writing = False  # watched for room to write


class HttpServer:
    """Listens on ``address`` ((host, port), taking peers in ``allow_from``: networks, empty for any; or
    a unix socket's path), answers ``methods``; ``name`` (the config key) is in its messages."""

    def __init__(self, address, allow_from=(), methods=("GET", "HEAD"), name="metrics-address"):
        self.address, self.methods, self.name = address, tuple(methods), name
        self.networks = sockets.networks(allow_from)
        self.sock = self.watcher = self.app = None
        self.made = None      # the unix socket's file (socketfiles.SocketFile)
        self.open = set()
        self.warned = -WARNING_INTERVAL

    def bind(self, owner=None):
        """Listen now (before dropping privileges); BindError naming the address if it cannot.  Once:
        ``pfrest serve`` binds before dropping privileges, and its Server's ``start`` binds what is not.
        ``owner``: (uid, gid) a unix socket's file is handed to (privileges.owner)."""
        if self.sock is not None:
            return self
        if isinstance(self.address, str):
            self.sock, self.made = socketfiles.listen(self.address, UNIX_MODE, self.name, owner)
            self.sock.setblocking(False)
            return self
        host, port = self.address
        where = sockets.show((host, port))
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            self.sock = socket.socket(family, kind, proto)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(address)
            self.sock.listen(BACKLOG)
        except OSError as exc:   # socket.gaierror too
            if self.sock is not None:
                self.sock.close()
            raise BindError(f"{self.name}: cannot listen on {where}: {exc.strerror or exc}") from None
        self.sock.setblocking(False)
        return self

    def start(self, watcher, app):
        self.watcher, self.app = watcher, app
        watcher.watch(self.sock, self._accept)
        return self

    def allow(self, allow_from):
        """Take peers from these networks from now on (a reload)."""
        self.networks = sockets.networks(allow_from)

    def all_sockets(self):
        """Every socket it holds: a forked child closes them (a client's connection must end when
        this process closes it, not when the child exits)."""
        return ([self.sock] if self.sock is not None else []) + [exchange.sock for exchange in self.open]

    def socket_files(self):
        """The unix socket file it made (socketfiles.SocketFile), for the janitor (privileges.drop)."""
        return [self.made] if self.made is not None else []

    def close(self):
        if self.sock is None:
            return
        if self.watcher is not None:
            self.watcher.unwatch(self.sock)
        self.sock.close()
        self.sock = None
        if self.made is not None:
            socketfiles.remove(self.made)
        for exchange in list(self.open):
            self._end(exchange)

    # --- the connections ----------------------------------------------------------------------------

    def _accept(self):
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.sock.accept()
            except OSError as exc:   # nothing more waits, a connection already reset, or no descriptors
                if exc.errno in sockets.EXHAUSTED:   # the socket stays readable: without a pause, a spin
                    self.watcher.unwatch(self.sock)
                    self.watcher.later(EXHAUSTED_PAUSE, self._resume)
                return
            peer = self._refusal(sock, addr)
            if peer is not None:
                self._refused(peer)
                sock.close()
                continue
            if len(self.open) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            exchange = _Exchange(sock)
            self.open.add(exchange)
            self.watcher.watch(sock, self._read, exchange)
            self.watcher.later(READ_TIMEOUT, self._expire, exchange, "read")

    def _resume(self):
        if self.sock is not None:
            self.watcher.watch(self.sock, self._accept)

    def _refusal(self, sock, addr):
        """None for a peer to answer, else how to name the refused one: a TCP peer outside
        ``allow_from``, on a unix socket a process neither root's nor this process's user's."""
        if sock.family == socket.AF_UNIX:
            credentials = sockets.peer_credentials(sock)
            if credentials is not None and credentials[1] in (0, os.geteuid()):
                return None
            return "of user " + ("unknown" if credentials is None else str(credentials[1]))
        if self.networks and not sockets.allowed(self.networks, addr[0]):
            return addr[0]
        return None

    def _refused(self, peer):
        now = time.monotonic()
        if now - self.warned >= WARNING_INTERVAL:
            self.warned = now
            why = "not in metrics-allow-from" if isinstance(self.address, tuple) else \
                "only root and the user pfrest runs as may use it"
            log.warning("%s: peer %s refused: %s", self.name, peer, why)

    def _read(self, exchange):
        try:
            data = exchange.sock.recv(MAX_REQUEST + MAX_BODY + 1 - len(exchange.head))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._end(exchange)
        exchange.head += data
        end, separator = exchange.head.find(b"\r\n\r\n"), 4
        if end < 0 and b"\n\n" in exchange.head:
            end, separator = exchange.head.find(b"\n\n"), 2
        if end < 0 or end > MAX_REQUEST:
            if len(exchange.head) > MAX_REQUEST:
                self.watcher.unwatch(exchange.sock)
                self._respond(exchange, 431, b"request head too large\n")
            return
        head = exchange.head[:end]
        length = _content_length(head)
        if length is None or length > MAX_BODY:
            self.watcher.unwatch(exchange.sock)
            return self._respond(exchange, 413 if length else 400, b"bad or too large Content-Length\n")
        if len(exchange.head) < end + separator + length:
            return   # more of the body to come
        self.watcher.unwatch(exchange.sock)
        exchange.phase = "answer"
        self.watcher.later(ANSWER_TIMEOUT, self._expire, exchange, "answer")
        self._dispatch(exchange, head, exchange.head[end + separator:end + separator + length])

    def _dispatch(self, exchange, head, body):
        words = head.split(b"\n", 1)[0].strip().split(b" ")
        if len(words) != 3 or not words[2].startswith(b"HTTP/1."):
            return self._respond(exchange, 400, b"not an HTTP/1.x request\n")
        method, target = words[0].decode("latin-1"), words[1].decode("latin-1")
        exchange.method = method
        if method not in self.methods:
            allowed = ", ".join(self.methods)
            return self._respond(exchange, 405, f"{' or '.join(self.methods)} only\n".encode(),
                                 extra=f"Allow: {allowed}\r\n")
        try:
            self.app(method, target.split("?", 1)[0], body,
                     lambda status, body, content_type=TEXT: self._respond(exchange, status, body, content_type))
        except Exception:  # a bug must not take the serving loop down
            log.exception("%s: cannot answer %s %s", self.name, method, target[:100])
            self._respond(exchange, 503, b"internal error\n")

    def _respond(self, exchange, status, body, content_type=TEXT, extra=""):
        if exchange.phase in ("write", "done"):
            return
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Cache-Control: no-store\r\nConnection: close\r\n\r\n")
        exchange.out = memoryview(head.encode("latin-1") + (b"" if exchange.method == "HEAD" else body))
        exchange.phase = "write"
        self.watcher.later(WRITE_TIMEOUT, self._expire, exchange, "write")
        self._write(exchange)

    def _write(self, exchange):
        try:
            sent = exchange.sock.send(exchange.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            return self._end(exchange)
        exchange.out = exchange.out[sent:]
        if not exchange.out:
            self._end(exchange)
        elif not exchange.writing:
            exchange.writing = True
            self.watcher.watch_writable(exchange.sock, self._write, exchange)

    def _expire(self, exchange, phase):
        if exchange.phase == phase:
            self._end(exchange)

    def _end(self, exchange):
        if exchange.phase == "done":
            return
        exchange.phase = "done"
        self.open.discard(exchange)
        self.watcher.unwatch(exchange.sock)
        exchange.sock.close()


def _content_length(head):
    """The Content-Length of a request head (0 without one), or None when it is not a number."""
    for line in head.split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            value = value.strip()
            return int(value) if value.isdigit() else None
    return 0
