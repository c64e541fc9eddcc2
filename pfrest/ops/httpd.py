"""A tiny HTTP/1.1 server for the metrics address (``/metrics``, ``/healthz``, ``/readyz``) and the control
socket (``pfrest cache``, controlsocket.py), on whatever loop the process runs: the event loop of a
single ``serve`` process, or the plain selector loop of the arbiter of ``serve --workers``, which must
stay responsive for the connections it passes on.  So it never blocks and does little: through the
same *watcher* as the Listener (readiness callbacks, a timer; and ``watch_writable``), one request per
connection, read by httprequest.RequestReader (httptools, and its bounds: head, fields, body), only the
methods it is given, the reply written as the socket takes it, then the connection closed.

Every wait has a deadline (the request READ_TIMEOUT from connect, the app ANSWER_TIMEOUT, the client
WRITE_TIMEOUT to take the reply and LINGER_TIMEOUT to close after it), kept on the connection and
checked by one timer while any is open, and a connection that ends keeps nothing: its request goes to
the app, its reply is dropped.  At most MAX_CLIENTS connections at once; when all are taken, a new one
takes the slot of the oldest connection of the peer that holds the most: slow-drip clients cannot lock
out a health check that sends its request at once, and a peer that opens many cannot push another
peer's out.

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
from collections import Counter

from pfrest.ops.httprequest import RequestReader
from pfrest.system import socketfiles, sockets
from pfrest.system.sockets import BindError

log = logging.getLogger("pfrest")

READ_SIZE = 1 << 16     # bytes per read: what the request reader may take in at once beyond its bounds
UNIX_MODE = 0o600       # a unix socket's file mode
READ_TIMEOUT = 5.0      # seconds from connect to the end of the request
ANSWER_TIMEOUT = 110.0  # seconds the app may take (a probe is bounded by request-timeout, at most 99 s)
WRITE_TIMEOUT = 10.0    # seconds the client may take to read the reply
LINGER_TIMEOUT = 2.0    # seconds the client may take to close once it has the reply
TICK = 0.25             # seconds between two checks of the deadlines, while a connection is open
MAX_CLIENTS = 32        # connections at once, each holding at most one request (httprequest); see _make_room
ACCEPT_BATCH = 16       # accepts per wake-up
EXHAUSTED_PAUSE = 0.1   # seconds accepting pauses when the process is out of descriptors
BACKLOG = 64            # connections the kernel holds until they are accepted
WARNING_INTERVAL = 60.0  # seconds between two warnings of a kind (refused peers, bad requests, slow ones)
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           413: "Content Too Large", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}
TEXT = "text/plain; charset=utf-8"


class _Exchange:
    """One connection: its request, then its reply."""
    __slots__ = ("sock", "peer", "reader", "out", "phase", "method", "writing", "since", "deadline")

    def __init__(self, sock, peer, reader):
        self.sock, self.peer, self.reader = sock, peer, reader
        self.out = None       # the reply still to write
        self.phase = "read"   # read, answer, write, linger, done
        self.method = None
        self.writing = False  # watched for room to write
        self.since = time.monotonic()
        self.deadline = self.since + READ_TIMEOUT


class HttpServer:
    """Listens on ``address`` ((host, port), taking peers in ``allow_from``: networks, empty for any; or
    a unix socket's path), answers ``methods`` with a body of at most ``max_body`` bytes (none by
    default); ``name`` (the config key) is in its messages."""

    def __init__(self, address, allow_from=(), methods=("GET", "HEAD"), name="metrics-address", max_body=0):
        self.address, self.methods, self.name, self.max_body = address, tuple(methods), name, max_body
        self.networks = sockets.networks(allow_from)
        self.sock = self.watcher = self.app = None
        self.made = None      # the unix socket's file (socketfiles.SocketFile)
        self.open = set()     # at most MAX_CLIENTS
        self.ticking = False  # the deadlines' timer is set
        self.warned = {}      # kind -> when it was last warned of

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
            peer, allowed = self._peer(sock, addr)
            if not allowed:
                self._warn("refused", "peer %s refused: %s", peer,
                           "not in metrics-allow-from" if isinstance(self.address, tuple) else
                           "only root and the user pfrest runs as may use it")
                sock.close()
                continue
            if len(self.open) >= MAX_CLIENTS:
                self._make_room()
            sock.setblocking(False)
            exchange = _Exchange(sock, peer, RequestReader(self.max_body))
            self.open.add(exchange)
            self.watcher.watch(sock, self._read, exchange)
            if not self.ticking:
                self.ticking = True
                self.watcher.later(TICK, self._tick)

    def _resume(self):
        if self.sock is not None:
            self.watcher.watch(self.sock, self._accept)

    def _peer(self, sock, addr):
        """(the peer as its messages name it, whether it is answered): a TCP peer by its address, answered
        when in ``allow_from``; on a unix socket by its user, answered when root or this process's user."""
        if sock.family == socket.AF_UNIX:
            credentials = sockets.peer_credentials(sock)
            uid = None if credentials is None else credentials[1]
            return f"of user {'unknown' if uid is None else uid}", uid in (0, os.geteuid())
        return addr[0], not self.networks or sockets.allowed(self.networks, addr[0])

    def _make_room(self):
        """Close the oldest connection of the peer holding the most: a client that sends its request at
        once and takes its answer is never the oldest for long, a slow one gives its slot up."""
        held = Counter(exchange.peer for exchange in self.open)
        most = max(held.values())
        victim = min((exchange for exchange in self.open if held[exchange.peer] == most),
                     key=lambda exchange: exchange.since)
        self._warn("slow", "%d connections at once: closed the oldest of peer %s (%.1f s, %s)", MAX_CLIENTS,
                   victim.peer, time.monotonic() - victim.since, "waiting for its answer" if
                   victim.phase == "answer" else "slow to send its request or to take its answer")
        self._end(victim)

    def _warn(self, kind, text, *args):
        """A warning, at most one of each kind per WARNING_INTERVAL: peers cannot flood the log."""
        now = time.monotonic()
        if now - self.warned.get(kind, -WARNING_INTERVAL) >= WARNING_INTERVAL:
            self.warned[kind] = now
            log.warning("%s: " + text, self.name, *args)

    def _tick(self):
        """End the connections past their deadline; again in TICK seconds while any is open."""
        now = time.monotonic()
        for exchange in [exchange for exchange in self.open if exchange.deadline <= now]:
            self._end(exchange)
        self.ticking = bool(self.open)
        if self.ticking:
            self.watcher.later(TICK, self._tick)

    def _read(self, exchange):
        try:
            data = exchange.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._end(exchange)
        reader = exchange.reader
        if not reader.feed(data):
            return
        self.watcher.unwatch(exchange.sock)
        exchange.reader = None   # the request goes to the app: the connection keeps none of it
        if reader.error is not None:
            status, text = reader.error
            self._warn("bad", "bad request from peer %s: %d %s", exchange.peer, status, text)
            return self._respond(exchange, status, f"{text}\n".encode())
        exchange.method = reader.method
        exchange.phase = "answer"
        exchange.deadline = time.monotonic() + ANSWER_TIMEOUT
        self._dispatch(exchange, reader.method, reader.target, reader.body)

    def _dispatch(self, exchange, method, target, body):
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
        if exchange.phase not in ("read", "answer"):
            return
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Cache-Control: no-store\r\nConnection: close\r\n\r\n")
        exchange.out = memoryview(head.encode("latin-1") + (b"" if exchange.method == "HEAD" else body))
        exchange.phase = "write"
        exchange.deadline = time.monotonic() + WRITE_TIMEOUT
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
            self._linger(exchange)
        elif not exchange.writing:
            exchange.writing = True
            self.watcher.watch_writable(exchange.sock, self._write, exchange)

    def _linger(self, exchange):
        """The reply is out: close once the client has, reading (and dropping) what it still sends for
        LINGER_TIMEOUT seconds at most.  A close with unread bytes would reset the connection, and the
        reset may destroy the reply before the client reads it (a 413 to a request still being sent)."""
        self.watcher.unwatch(exchange.sock)
        exchange.out, exchange.writing = None, False
        try:
            exchange.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self._end(exchange)
        exchange.phase = "linger"
        exchange.deadline = time.monotonic() + LINGER_TIMEOUT
        self.watcher.watch(exchange.sock, self._drain, exchange)

    def _drain(self, exchange):
        try:
            if exchange.sock.recv(READ_SIZE):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._end(exchange)

    def _end(self, exchange):
        if exchange.phase == "done":
            return
        exchange.phase = "done"
        if exchange.reader is not None:   # ended before its request was read
            exchange.reader.close()
        exchange.reader = exchange.out = None   # whoever still holds the exchange holds nothing big
        self.open.discard(exchange)
        self.watcher.unwatch(exchange.sock)
        exchange.sock.close()
