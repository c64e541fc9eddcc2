"""Reads one HTTP/1.1 request from bytes fed to it, within bounds: the request side of httpd.py (the
metrics address, the control socket).  Sans-I/O.

httptools (llhttp) does the framing (request line, headers, Content-Length or chunked body, trailers);
this reader adds the bounds a server facing any local user needs, whatever the bytes say:
- every byte that is not body (request line, headers, chunk sizes and their extensions, trailers)
  counts against MAX_HEAD, checked after each feed (a feed is at most the driver's read size);
- at most MAX_FIELDS header and trailer fields;
- a body of at most ``max_body`` bytes, by its Content-Length before it comes, and as it comes.
A request over a bound is refused with the status that says so (``error``); anything httptools cannot
parse with 400.  Bytes after the request (a pipelined one) are ignored: one request per connection.

Only APIs that httptools 0.1.1 already had are used (Debian 12's).
"""

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

MAX_HEAD = 8192      # bytes of a request that are not body; a scraper sends a few hundred
MAX_FIELDS = 64      # header and trailer fields; a scraper sends a handful
MAX_BODY = 1 << 20   # bytes of a body, where one is taken (pfrest cache drop with many keys)


class _Stop(Exception):
    """Raised from a parser callback to stop parsing once the request is refused or complete."""


class RequestReader:
    """Feed it the bytes of a connection until ``done``; then either ``error`` is (status, text) or the
    request is in ``method`` (str), ``target`` (str) and ``body`` (bytes)."""
    __slots__ = ("done", "error", "method", "target", "body", "_parser", "_url", "_fields", "_length",
                 "_chunks", "_size", "_framing", "_max_body")

    def __init__(self, max_body=MAX_BODY):
        self.done, self.error, self.method, self.target, self.body = False, None, None, None, b""
        self._max_body = max_body
        self._url = b""        # bounded by MAX_HEAD, as every byte of the head
        self._fields = 0
        self._length = None    # the Content-Length
        self._chunks = []      # of the body: at most max_body bytes
        self._size = 0         # bytes of body so far
        self._framing = 0      # bytes fed that were not body
        self._parser = HttpRequestParser(self)

    def feed(self, data: bytes) -> bool:
        """Parse what came; True once the request is read or refused."""
        if self.done:
            return True
        size = self._size
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:   # Upgrade or CONNECT: a complete request is answered as HTTP/1.1
            if not self.done:
                self._refuse(400, "an upgrade or CONNECT request")
        except (HttpParserError, _Stop) as exc:   # _Stop: httptools may raise it as it is, or wrapped
            if not self.done:
                self._refuse(400, f"not an HTTP/1.1 request ({type(exc).__name__})")
        self._framing += len(data) - (self._size - size)
        if self._framing > MAX_HEAD and not self.done:
            self._refuse(431, f"request head, chunk framing and trailers over {MAX_HEAD} bytes")
        if self.done:
            self.close()
        return self.done

    def close(self):
        """Let the parser go (it holds this reader: a cycle would keep a body until the garbage collector
        ran) and what was read of a body not complete; the request read in full stays."""
        self._parser, self._chunks = None, []

    def _refuse(self, status, text) -> _Stop:
        if not self.done:
            self.done, self.error = True, (status, text)
        return _Stop()

    # --- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self):
        if self.done:   # a second request on the connection: not read
            raise _Stop()

    def on_url(self, url: bytes):
        self._url += url   # called in pieces when the request line comes in pieces

    def on_header(self, name: bytes, value: bytes):
        self._fields += 1
        if self._fields > MAX_FIELDS:
            raise self._refuse(431, f"over {MAX_FIELDS} header fields")
        if name.lower() == b"content-length":
            self._length = int(value)   # llhttp has checked it is digits, and not given twice

    def on_headers_complete(self):
        if self._length is not None and self._length > self._max_body:
            raise self._refuse(413, f"a body over {self._max_body} bytes")
        if self._parser.get_http_version() not in ("1.0", "1.1"):
            raise self._refuse(400, "not an HTTP/1.x request")

    def on_body(self, data: bytes):
        self._size += len(data)
        if self._size > self._max_body:
            raise self._refuse(413, f"a body over {self._max_body} bytes")
        self._chunks.append(data)

    def on_message_complete(self):
        self.method = self._parser.get_method().decode("latin-1")
        self.target = self._url.decode("latin-1")
        self.body, self._chunks = b"".join(self._chunks), []
        self.done = True
