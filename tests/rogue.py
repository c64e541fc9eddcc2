"""A misbehaving HTTP backend on 127.0.0.1:0, scripted per request by the lookup key.

Each connection reads one request head, takes ``key`` (lookups) or ``recipient`` (policy) from it, and
plays the behaviour of that name from BEHAVIOURS: a raw socket, so it can do what no well-behaved
server library would (reset mid-answer, drip bytes, lie about lengths).
"""

import gzip
import json
import socket
import struct
import threading
import time
from urllib.parse import parse_qsl, urlsplit


def _response(status, body=b"", headers=None, reason="X"):
    head = [f"HTTP/1.1 {status} {reason}"]
    headers = dict(headers or {})
    if "Transfer-Encoding" not in headers:
        headers.setdefault("Content-Length", str(len(body)))
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


FOUND = json.dumps(["ok"]).encode()


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
    "unknown": _response(404),
    "found": _response(200, FOUND, {"Content-Type": "application/json"}),
    "policy-ok": _response(200, b"DUNNO"),
    "redirect-same": _response(307, b"", {"Location": "/found?key=found"}),
    "no-content": _response(204),
    "partial": _response(206, FOUND),
    "teapot": _response(418, b"short and stout"),
    "status-600": _response(600, FOUND),
    "status-99": _response(99, FOUND),
    "gzip": _response(200, gzip.compress(FOUND), {"Content-Encoding": "gzip"}),
    "bad-gzip": _response(200, b"not gzip at all", {"Content-Encoding": "gzip"}),
    "chunked": _response(200, _chunked(FOUND, 3), {"Transfer-Encoding": "chunked"}),
    "text-plain": _response(200, FOUND, {"Content-Type": "text/plain"}),
    "html": _response(200, b"<html>Internal error</html>", {"Content-Type": "text/html"}),
    "object": _response(200, b'{"value": "x"}'),
    "nested": _response(200, b'[["a", "b"]]'),
    "numbers": _response(200, b"[1, 2.5, null, true]"),
    "deep": _response(200, b"[" * 100000 + b"]" * 100000),
    "bad-utf8": _response(200, b'["\xff\xfe"]'),
    "surrogate": _response(200, b'["\\ud800"]'),
    "crlf": _response(200, b'["a\\r\\nb"]'),
    "nul": _response(200, b'["a\\u0000b"]'),
    "lf-action": _response(200, b"DUNNO\n\naction=OK"),
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
        conn.sendall(b"HTTP/1.1 102 Processing\r\n\r\n" + _response(200, FOUND))

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
