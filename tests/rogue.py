"""A misbehaving HTTP backend on 127.0.0.1:0, scripted per request by the lookup key.

Each connection reads one request head, takes ``key`` (lookups) or ``recipient`` (policy) from it, and
plays the behaviour of that name from BEHAVIOURS: a raw socket, so it can do what no well-behaved
server library would (reset mid-answer, drip bytes, lie about lengths).

Also here, for the event-loop client's tests: ``Scripted``, a raw keep-alive server whose answers a
test writes step by step (several requests per connection, connections counted), and ``restarted``,
one started again where a stopped one listened; ``Proxy``, a forward proxy that records what it sees;
``Dns``, a name server that answers each question once only; and ``fill_backlog``, which makes a
listening socket drop further SYNs.
"""

import gzip
import json
import select
import socket
import struct
import threading
import time
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit


def _response(status, body=b"", headers=None, reason="X"):
    head = [f"HTTP/1.1 {status} {reason}"]
    headers = dict(headers or {})
    if "Transfer-Encoding" not in headers:
        headers.setdefault("Content-Length", str(len(body)))
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


FOUND = json.dumps(["ok"]).encode()


def _once(status, body=b"", headers=None):
    """A response of the Rogue server, which answers one request per connection and then closes it:
    it says so (``Connection: close``), as RFC 9112 asks of a server that does not keep connections."""
    return _response(status, body, dict(headers or {}, Connection="close"))


def _chunked(body, size=1000):
    out = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


HUGE = b"[\"" + b"x" * (10 << 20) + b"\"]"  # 10 MB: pfrest must stop reading long before the end


def _send_until_cut(conn, data):
    try:
        conn.sendall(data)
    except OSError:  # pfrest hung up once it had read enough: the point of the test
        pass


FIXED = {  # key -> the whole answer; the other behaviours are the do_* methods below
    "unknown": _once(404),
    "found": _once(200, FOUND, {"Content-Type": "application/json"}),
    "policy-ok": _once(200, b"DUNNO"),
    "redirect-same": _once(307, b"", {"Location": "/found?key=found"}),
    "no-content": _once(204),
    "partial": _once(206, FOUND),
    "teapot": _once(418, b"short and stout"),
    "status-600": _once(600, FOUND),
    "status-99": _once(99, FOUND),
    "gzip": _once(200, gzip.compress(FOUND), {"Content-Encoding": "gzip"}),
    "bad-gzip": _once(200, b"not gzip at all", {"Content-Encoding": "gzip"}),
    "chunked": _once(200, _chunked(FOUND, 3), {"Transfer-Encoding": "chunked"}),
    "text-plain": _once(200, FOUND, {"Content-Type": "text/plain"}),
    "html": _once(200, b"<html>Internal error</html>", {"Content-Type": "text/html"}),
    "object": _once(200, b'{"value": "x"}'),
    "nested": _once(200, b'[["a", "b"]]'),
    "numbers": _once(200, b"[1, 2.5, null, true]"),
    "deep": _once(200, b"[" * 100000 + b"]" * 100000),
    "bad-utf8": _once(200, b'["\xff\xfe"]'),
    "surrogate": _once(200, b'["\\ud800"]'),
    "crlf": _once(200, b'["a\\r\\nb"]'),
    "nul": _once(200, b'["a\\u0000b"]'),
    "lf-action": _once(200, b"DUNNO\n\naction=OK"),
}


class Rogue:
    def __init__(self, host="127.0.0.1"):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.heads = []        # request heads received
        self.stopping = threading.Event()
        self.redirect_to = "http://127.0.0.2:9/elsewhere"
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self):
        self.stopping.set()
        self.sock.close()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            head, _, body = head.partition(b"\r\n\r\n")
            self.heads.append(head)
            lines = head.decode("latin-1").split("\r\n")
            length = next((int(l.split(":", 1)[1]) for l in lines if l.lower().startswith("content-length:")), 0)
            while len(body) < length:
                body += conn.recv(65536)
            path = lines[0].split(" ")[1]
            params = dict(parse_qsl(urlsplit(path).query))
            params.update(parse_qsl(body.decode("latin-1")))
            name = params.get("key") or params.get("recipient") or ""
            if name in FIXED:
                conn.sendall(FIXED[name])
            else:
                getattr(self, "do_" + name.replace("-", "_"), lambda c: c.sendall(FIXED["unknown"]))(conn)

    # --- behaviours: the method name is the key -----------------------------------------------

    def do_redirect(self, conn):  # the target is set per test
        conn.sendall(_response(302, b"", {"Location": self.redirect_to}))

    def do_reset(self, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n[\"par")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def do_close_early(self, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n[\"par")

    def do_no_answer_close(self, conn):
        pass

    def do_silent(self, conn):
        self.stopping.wait(30)

    def do_slow(self, conn):
        time.sleep(2.5)  # well past the tests' request-timeout
        try:
            conn.sendall(_response(200, FOUND))
        except OSError:
            pass

    def do_drip(self, conn):
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n[\"")
            for _ in range(200):  # 1 byte every 50 ms: 10 s in all, each byte well within any read timeout
                if self.stopping.wait(0.05):
                    return
                conn.sendall(b"x")
        except OSError:
            pass

    def do_drip_headers(self, conn):
        try:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 200:
                if self.stopping.wait(0.05):
                    return
                conn.sendall(bytes([byte]))
        except OSError:
            pass

    def do_interim(self, conn):
        conn.sendall(b"HTTP/1.1 102 Processing\r\n\r\n" + _once(200, FOUND))

    def do_garbage(self, conn):
        conn.sendall(b"SMTP/1.0 hello\r\n\r\n")

    def do_gzip_bomb(self, conn):
        bomb = gzip.compress(b"[\"" + b"0" * (20 << 20) + b"\"]")
        conn.sendall(_response(200, bomb, {"Content-Encoding": "gzip"}))

    def do_huge(self, conn):
        _send_until_cut(conn, _response(200, HUGE))

    def do_huge_chunked(self, conn):
        _send_until_cut(conn, _response(200, _chunked(HUGE, 65536), {"Transfer-Encoding": "chunked"}))

    def do_length_lie(self, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + FOUND)
        self.stopping.wait(5)


# --- raw keep-alive server, scripted step by step --------------------------------------------------

response, chunked = _response, _chunked   # the bytes of a response; a chunked body


CLOSE = object()   # a step of an answer: close the connection here


def _wake(sock):
    """End whatever another thread does with ``sock`` without closing it: a closed descriptor's number
    is soon reused (by an event loop's own pipes, say), and a thread still holding it would then read
    or write someone else's file.  The thread that owns the socket closes it."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)   # the plain socket's, even for TLS
    except OSError:
        pass


class Request(NamedTuple):
    connection: int   # 1 for the first connection accepted, 2 for the next...
    head: bytes
    body: bytes
    key: str          # the lookup key, or the policy recipient


def _key(head, body):
    path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
    params = dict(parse_qsl(urlsplit(path).query))
    params.update(parse_qsl(body.decode("latin-1")))
    return params.get("key") or params.get("recipient") or ""


def _read_request(conn, buffer):
    """(head, body, rest of buffer), or None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(buffer) < length:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    return head, buffer[:length], buffer[length:]


class Scripted:
    """A raw HTTP/1.1 keep-alive server.  ``answer(request)`` returns the steps of the answer: bytes
    to write, numbers of seconds to wait (cut short by stop()), functions to call, CLOSE; or None to say
    nothing.

    ``connections`` counts accepted connections, ``requests`` records every request read, ``ended``
    maps a connection number to "eof" or "reset" once its client went away.  ``pause()`` leaves new
    connections in the backlog until ``resume()``; with ``mute`` set, new connections are accepted
    but never read from or written to (a TLS server that never answers the handshake).
    """

    def __init__(self, answer, host="127.0.0.1", backlog=64, tls=None, port=0, restartable=False):
        self.answer, self.tls = answer, tls
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if restartable:   # its connections' sockets lingering after stop() do not keep the port: restarted()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(backlog)
        self.address = self.sock.getsockname()[:2]
        self.port = self.address[1]
        self.url = f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{self.port}"
        self.connections, self.requests, self.ended = 0, [], {}
        self.accepting, self.parked, self.stopping = (threading.Event() for _ in range(3))
        self.accepting.set()
        self.mute = False
        self._sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def keys(self, connection=None):
        return [r.key for r in self.requests if connection in (None, r.connection)]

    def pause(self):
        """Returns once nothing is accepted any more."""
        self.accepting.clear()
        self.parked.wait()

    def resume(self):
        self.parked.clear()
        self.accepting.set()

    def stop(self):
        self.stopping.set()
        for sock in [self.sock] + self._sockets:
            _wake(sock)

    def _accept(self):
        with self.sock:
            while not self.stopping.is_set():
                if not self.accepting.is_set():
                    self.parked.set()
                    self.stopping.wait(0.01)
                    continue
                try:
                    if not select.select([self.sock], [], [], 0.02)[0]:
                        continue
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                self.connections += 1
                self._sockets.append(conn)
                threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, conn, number):
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.mute:
                self.stopping.wait()
                return
            if self.tls:
                conn = self.tls.wrap_socket(conn, server_side=True)   # the same descriptor
                self._sockets.append(conn)
            self.ended[number] = self._converse(conn, number)
        except OSError:
            self.ended[number] = "reset"
        finally:
            conn.close()

    def _converse(self, conn, number):
        buffer = b""
        while True:
            request = _read_request(conn, buffer)
            if request is None:
                return "eof"
            head, body, buffer = request
            request = Request(number, head, body, _key(head, body))
            self.requests.append(request)
            steps = self.answer(request)
            for step in [steps] if isinstance(steps, bytes) else steps or ():
                if step is CLOSE:
                    return "closed"
                if isinstance(step, bytes):
                    conn.sendall(step)
                elif callable(step):
                    step()
                elif self.stopping.wait(step):
                    return "stopped"


def restarted(server, answer=None, seconds=2.0):
    """A new Scripted server on the address of ``server``, made ``restartable`` and stopped (its accept
    thread closes the listening socket within a select timeout: until then the port is taken)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return Scripted(answer or server.answer, host=server.address[0], tls=server.tls,
                            port=server.port, restartable=True)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def fill_backlog(address, attempts=16):
    """Connect to a listening socket that does not accept until a connection stays pending: from then
    on its full accept queue makes the kernel drop new SYNs (Linux).  Returns the sockets to close."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sockets = []
    for _ in range(attempts):
        sock = socket.socket(family)
        sock.setblocking(False)
        sock.connect_ex(address)
        sockets.append(sock)
        if not select.select([], [sock], [], 0.1)[1]:
            return sockets
    raise RuntimeError(f"the backlog of {address} does not fill up")


# --- a forward proxy ---------------------------------------------------------------------------------

class Proxy:
    """An HTTP forward proxy on 127.0.0.1:0: absolute-form requests go on to their host as they are,
    CONNECT opens a tunnel.  ``heads`` holds the first request head of each connection, ``seen``
    every byte clients sent (tunnelled TLS included)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.heads, self.seen = [], bytearray()
        self._sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self):
        for sock in [self.sock] + self._sockets:
            _wake(sock)

    def _accept(self):
        with self.sock:
            while True:
                try:
                    client, _ = self.sock.accept()
                except OSError:
                    return
                self._sockets.append(client)
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        with client:
            upstream = self._open(client)
            if upstream is None:
                return
            with upstream:
                self._sockets.append(upstream)
                back = threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True)
                back.start()
                self._pipe(client, upstream, True)
                back.join()

    def _open(self, client):
        """The upstream connection for the client's first request (forwarded), or None."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(65536)
            if not chunk:
                return None
            data += chunk
        self.seen += data
        head = data.split(b"\r\n\r\n", 1)[0]
        self.heads.append(head)
        method, target = head.split(b" ", 2)[:2]
        if method == b"CONNECT":
            host, port = target.decode().rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            return upstream
        url = urlsplit(target.decode())
        upstream = socket.create_connection((url.hostname, url.port))
        upstream.sendall(data)
        return upstream

    def _pipe(self, source, sink, record):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if record:
                    self.seen += data
                sink.sendall(data)
        except OSError:
            pass
        _wake(source)
        _wake(sink)


# --- a name server that answers each question once ------------------------------------------------

class Dns:
    """A DNS server on UDP ``host``:53 that answers the first A and AAAA question for each name of
    ``names`` (name -> IPv4 address; AAAA gets an empty answer) and is silent from then on: a resolver
    that stops answering, without the ICMP "port unreachable" that would end the wait at once."""

    def __init__(self, host, names):
        self.names = {name.lower().encode(): socket.inet_aton(ip) for name, ip in names.items()}
        self.answered, self.ignored = set(), 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 53))
        threading.Thread(target=self._serve, daemon=True).start()

    def stop(self):
        _wake(self.sock)   # on Linux this wakes a reader even of an unconnected UDP socket

    def _serve(self):
        with self.sock:
            while True:
                try:
                    query, peer = self.sock.recvfrom(512)
                    if not query:
                        return
                    self._answer(query, peer)
                except OSError:
                    return

    def _answer(self, query, peer):
        name, qtype, end = _question(query)
        if name not in self.names or (name, qtype) in self.answered:
            self.ignored += 1
            return
        self.answered.add((name, qtype))
        answers = b""
        if qtype == 1:   # A
            answers = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 0, 4) + self.names[name]
        header = query[:2] + struct.pack(">HHHHH", 0x8180, 1, 1 if answers else 0, 0, 0)
        self.sock.sendto(header + query[12:end] + answers, peer)


def _question(query):
    """(lower-case name, type, end offset of the question) of a DNS query."""
    labels, i = [], 12
    while query[i]:
        labels.append(query[i + 1:i + 1 + query[i]])
        i += 1 + query[i]
    qtype = struct.unpack(">H", query[i + 1:i + 3])[0]
    return b".".join(labels).lower(), qtype, i + 5
