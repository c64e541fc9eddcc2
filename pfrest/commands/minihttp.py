"""A small, fast HTTP/1.1 server for the demo backend, tests and benchmarks (standard library only).

``serve_app(app)`` starts a threaded server on 127.0.0.1 (port 0 by default) that calls
``app(request) -> (status, headers, body)`` for each request.  Each response goes out in one write with
TCP_NODELAY set: the classic http.server pattern of writing headers and body separately stalls 40 ms
per keep-alive request (Nagle's algorithm meeting delayed ACKs).
"""

import http.server
import socket
import socketserver
import threading
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

REASONS = {s.value: s.phrase for s in __import__("http").HTTPStatus}


class Request(NamedTuple):
    method: str
    path: str
    query: list       # [(name, value)] as str, decoded (UTF-8 with surrogateescape)
    raw_query: str
    headers: dict     # lower-case names
    body: bytes

    def form(self):
        """The body as form pairs (bytes), in order."""
        return parse_qsl(self.body.decode("latin-1"), keep_blank_values=True, encoding="latin-1")


def form_bytes(request):
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in request.form()]


def query_bytes(request):
    return [(n.encode("latin-1"), v.encode("latin-1"))
            for n, v in parse_qsl(request.raw_query, keep_blank_values=True, encoding="latin-1")]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pfrest-minihttp"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):  # quiet
        pass

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        request = Request(self.command, parts.path,
                          parse_qsl(parts.query, keep_blank_values=True, errors="surrogateescape"),
                          parts.query, {k.lower(): v for k, v in self.headers.items()}, body)
        status, headers, payload = self.server.app(request)
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(payload)))
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)

    do_GET = do_POST = do_PUT = do_DELETE = _serve


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address, app):
        self.app = app
        super().__init__(address, _Handler)

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self):
        self.shutdown()
        self.server_close()


def serve_app(app, host="127.0.0.1", port=0) -> Server:
    server = Server((host, port), app)
    threading.Thread(target=server.serve_forever, daemon=True, name="minihttp").start()
    return server
