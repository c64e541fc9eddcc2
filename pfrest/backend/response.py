"""Reads one HTTP/1.1 response from bytes fed to it, after any interim 1xx ones; and a proxy's reply to
CONNECT (TunnelReply).  Sans-I/O.

httptools (llhttp) does the framing; this reader adds pfrest's rules on top:
- 1xx interim responses (RFC 9110 15.2: 100, 102, 103, ...) are read past wherever the bytes are
  split; 101 is a protocol failure (no upgrade was asked for), and so is a 1xx with content;
- the head is bounded by MAX_HEAD (headers dripping in forever must not grow memory) and MAX_FIELDS,
  everything after it that is not body (chunk-size lines, chunk extensions, trailer fields) by
  MAX_FRAMING: counted from the bytes fed, so that a trailer value httptools collects without ever
  reporting it counts too; bodies by MAX_BODY before and after Content-Encoding is undone, inflating
  incrementally so that a gzip bomb costs neither its memory nor its CPU;
- an answer is its request's: when it carries ``X-Request-Id`` (a backend echoing the request's),
  the id must be the request's own, else it is a failure of kind "stray" (a copy of an earlier answer,
  read as this one's); with ``require`` an answer without it is one too;
- a body without Content-Length or chunked framing ends at EOF (httptools has no finish(), so the
  headers tell), any other early EOF is a failure;
- bytes after the final response in the same read (a copy of the answer, an unsolicited response, a
  Content-Length lie) are bytes no request asked for: a failure of kind "stray".  Bare CR/LF between
  messages are skipped by the parser (RFC 9112 2.2).

Only APIs that httptools 0.1.1 already had are used (Debian 12's).

A proxy's reply to CONNECT is a status line and headers, bounded in size; 200 opens the tunnel.  The TLS
server behind it says nothing before our ClientHello, so any byte after the header block is a failure.
"""

import re
import zlib

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from pfrest.protocol.verdict import Failure, HttpResult

MAX_BODY = 1 << 20   # bytes; more than any Postfix reply can carry, even JSON-escaped
MAX_HEAD = 1 << 16   # bytes of status lines and headers (interim responses included) before the body
MAX_FIELDS = 256     # header and trailer fields of a response, interim ones included
MAX_FRAMING = 1 << 16   # bytes after the final head that are not body: chunk lines, extensions, trailers
MAX_CONNECT_REPLY = 16384   # bytes of a proxy's status line and headers to CONNECT; proxies send a few hundred
NO_BODY_STATUSES = (204, 304)
_KEPT = frozenset((b"content-length", b"transfer-encoding", b"content-encoding", b"cache-control",
                   b"location", b"x-request-id", b"content-type", b"www-authenticate"))
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)", re.I)
_STALE_IF_ERROR = re.compile(r"(?:^|,)\s*stale-if-error\s*=\s*\"?(\d+)", re.I)
_STALE_WHILE_REVALIDATE = re.compile(r"(?:^|,)\s*stale-while-revalidate\s*=\s*\"?(\d+)", re.I)
_NO_STORE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache|private)\b", re.I)


class _Stop(Exception):
    """Raised from a parser callback to stop parsing once the reader has failed."""


def max_age(cache_control):
    """Seconds from Cache-Control max-age, -1 for no-store/no-cache/private, None when absent."""
    if not cache_control:
        return None
    if _NO_STORE.search(cache_control):
        return -1
    return _seconds(_MAX_AGE, cache_control)


def stale_if_error(cache_control):
    """Seconds from Cache-Control stale-if-error (RFC 5861), None when absent.  no-store/no-cache
    forbid keeping the answer at all, and so this too (max_age says -1)."""
    return _seconds(_STALE_IF_ERROR, cache_control)


def stale_while_revalidate(cache_control):
    """Seconds from Cache-Control stale-while-revalidate (RFC 5861), None when absent (no-store and
    no-cache forbid it as they forbid stale-if-error)."""
    return _seconds(_STALE_WHILE_REVALIDATE, cache_control)


def _seconds(directive, cache_control):
    match = directive.search(cache_control)
    return int(match.group(1)) if match else None


def inflater(encoding: bytes):
    """A decompressor for the Content-Encoding, None for identity, False for one pfrest cannot undo."""
    encoding = encoding.strip().lower()
    if encoding in (b"", b"identity"):
        return None
    if encoding in (b"gzip", b"x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == b"deflate":
        return zlib.decompressobj()
    return False


class ResponseReader:
    """Feed it the bytes of a connection; ``done`` turns True once ``result`` (an HttpResult or a
    Failure) is known.  ``keep_alive`` says whether the connection may carry another request as far
    as this response goes: complete, length-framed, keep-alive, nothing after it.  ``request_id``: the
    request's X-Request-Id (bytes), that an echoed one must be; ``require``: an answer must echo it.
    ``echoed`` tells that the answer did."""
    __slots__ = ("done", "result", "keep_alive", "started", "echoed", "_request_id", "_require", "_fed",
                 "_base", "_horizon", "_fields", "_head_done", "_parser", "_status", "_length", "_transfer", "_encoding",
                 "_cache_control", "_location", "_echo", "_until_eof", "_size", "_chunks", "_inflater",
                 "_inflated", "_type", "_challenge")

    def __init__(self, request_id: bytes = None, require: bool = False):
        self.done, self.result, self.keep_alive, self.started = False, None, False, False
        self.echoed, self._request_id, self._require = False, request_id, require
        # bytes fed in all; where this message began (a stream of answers, pipeline.py, starts the next
        # one at _horizon); and with the read being parsed
        self._fed = self._base = self._horizon = 0
        self._fields = 0        # header and trailer fields seen
        self._head_done = False  # the final head is complete: MAX_FRAMING counts from then on
        self._parser = HttpResponseParser(self)
        self._new_message()

    @property
    def unanswered(self) -> bool:
        """The connection ended before any byte of a response: the request may never have arrived."""
        return not self.started and isinstance(self.result, Failure) and self.result.kind == "reset"

    def feed(self, data: bytes):
        self.started = True
        parser = self._parser
        if parser is None:   # fed after it was done
            self.fail("stray", "bytes after the response")
            return
        self._parse(parser, data)
        if self.done:
            # the parser refers to this reader (its callbacks): a cycle that kept the body until a GC ran
            self._parser = None

    def _parse(self, parser, data: bytes):
        """``data`` through the parser, and the bounds of the message's head and framing, counted from
        ``_base`` (0 but for a stream of answers: where the current one began)."""
        self._horizon = self._fed + len(data)
        try:
            parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            if self.done:   # bytes no request asked for
                self.fail("stray", f"bytes after the response: {exc}")
            else:
                self.fail("protocol", f"malformed response: {exc}")
        self._fed = self._horizon
        if not self.done:
            fed = self._fed - self._base
            if not self._head_done:   # everything fed so far was head
                if fed > MAX_HEAD:
                    self.fail("too-large", f"response head over {MAX_HEAD} bytes")
            elif fed - self._size > MAX_HEAD + MAX_FRAMING:   # fed, less the body: head and framing
                self.fail("too-large", f"over {MAX_FRAMING} bytes of chunk framing and trailers")

    def eof(self):
        """The peer closed the connection: the end of an EOF-delimited body, or a failure."""
        self._parser = None
        if self.done:
            return
        if self._until_eof:
            self.finish(False)
        else:
            self.fail("reset", "connection closed before the response was complete" if self.started
                       else "connection closed without an answer")

    def abort(self, failure: Failure):
        """The connection broke (reset, TLS error): whatever was read is incomplete."""
        self._parser = None
        if not self.done:
            self.fail(*failure)

    def fail(self, kind: str, detail: str) -> _Stop:
        """The answer is a failure (the first one counts); raised from a parser callback, the _Stop ends
        the parse.  ``fail`` and ``finish`` are how a reader ends: a reader of several answers in a row
        (pipeline.py) extends them."""
        if not isinstance(self.result, Failure):  # the first failure is the one to report
            self.result = Failure(kind, detail)
        self.done, self.keep_alive = True, False
        return _Stop()

    # --- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self):
        if self.done:
            raise self.fail("stray", "bytes after the response: another response")
        if self._status is not None:   # an interim response came first: forget its headers
            self._new_message()

    def _new_message(self):
        self._status = self._length = self._transfer = self._encoding = None
        self._cache_control = self._location = self._echo = self._inflater = self._type = None
        self._challenge = False
        self._until_eof, self._size, self._chunks, self._inflated = False, 0, [], 0

    def on_header(self, name: bytes, value: bytes):
        self._fields += 1
        if self._fields > MAX_FIELDS:
            raise self.fail("too-large", f"over {MAX_FIELDS} header fields")
        name = name.lower()
        if name not in _KEPT:
            return
        if name == b"content-length":
            self._length = int(value)   # llhttp has checked it is digits, and not given twice
        elif name == b"transfer-encoding":
            self._transfer = value if self._transfer is None else self._transfer + b"," + value
        elif name == b"content-encoding":
            self._encoding = value if self._encoding is None else self._encoding + b"," + value
        elif name == b"cache-control":
            self._cache_control = value if self._cache_control is None \
                else self._cache_control + b"," + value
        elif name == b"location":
            self._location = value
        elif name == b"x-request-id":
            self._echo = value if self._echo is None else self._echo + b"," + value
        elif name == b"content-type":
            self._type = value
        elif name == b"www-authenticate":   # oauth2: a 401 that says the bearer token was refused
            self._challenge = self._challenge or b"bearer" in value.lower()

    def on_headers_complete(self):
        self._status = status = self._parser.get_status_code()
        if status < 200:
            self._check_interim(status)
        else:
            self._head_done = True
            self._check_request_id()
            self._check_framing(status)

    def on_body(self, data: bytes):
        self._size += len(data)
        if self._size > MAX_BODY:
            raise self.fail("too-large", f"body over {MAX_BODY} bytes")
        if self._inflater is not None:
            data = self._inflate(data)
        self._chunks.append(data)   # MAX_BODY bytes in all, checked above

    def on_message_complete(self):
        if self._status >= 200:
            self.finish(self._parser.should_keep_alive())
        # an interim response ends here; the next message begins with on_message_begin

    # --- rules ----------------------------------------------------------------------------------

    def _check_interim(self, status: int):
        if status == 101:
            raise self.fail("protocol", "101 Switching Protocols, but no upgrade was asked for")
        if self._length or self._transfer is not None:
            raise self.fail("protocol", f"interim response {status} with content")

    def _check_request_id(self):
        """An answer echoing another request's id is a copy of an earlier answer: HTTP/1.1 cannot tell
        it from this request's, only the id can."""
        echo = self._echo
        if echo is None:
            if self._require and self._request_id is not None:
                raise self.fail("stray", "answer without X-Request-Id (require-request-id)")
        elif echo == self._request_id:
            self.echoed = True
        elif self._request_id is not None:
            raise self.fail("stray", "answer with the X-Request-Id of another request")

    def _check_framing(self, status: int):
        if self._transfer is not None and self._transfer.strip().lower() != b"chunked":
            raise self.fail("protocol", "Transfer-Encoding other than chunked: %r" % self._transfer)
        if self._length is not None and self._length > MAX_BODY:
            raise self.fail("too-large", f"Content-Length {self._length}")
        if self._encoding is not None:
            self._inflater = inflater(self._encoding)
            if self._inflater is False:
                raise self.fail("protocol", "unsupported Content-Encoding: %r" % self._encoding)
        self._until_eof = self._length is None and self._transfer is None \
            and status not in NO_BODY_STATUSES

    def _inflate(self, data: bytes) -> bytes:
        """At most MAX_BODY + 1 bytes of output in all: more is a failure, whatever the input holds."""
        try:
            data = self._inflater.decompress(data, MAX_BODY + 1 - self._inflated)
        except zlib.error as exc:
            raise self.fail("protocol", f"body does not inflate: {exc}") from None
        self._inflated += len(data)
        if self._inflated > MAX_BODY or self._inflater.unconsumed_tail:
            raise self.fail("too-large", f"inflated body over {MAX_BODY} bytes")
        return data

    def finish(self, keep_alive: bool):
        """The final answer is complete: its HttpResult."""
        if self._inflater is not None and not self._inflater.eof:
            self.fail("protocol", "compressed body is truncated")
            return
        cache_control, location, body = self._cache_control, self._location, b"".join(self._chunks)
        if location is not None:
            location = location.decode("latin-1")
        kind = self._type   # bytes: only pfrest query shows it, for a malformed answer
        if cache_control is None and not self._challenge:   # most answers
            self.result = HttpResult(self._status, body, location, content_type=kind)
        else:
            text = cache_control.decode("latin-1") if cache_control is not None else None
            self.result = HttpResult(self._status, body, location, max_age(text),
                                     stale_if_error=stale_if_error(text) if text else None, content_type=kind,
                                     bearer_challenge=self._challenge,
                                     stale_while_revalidate=stale_while_revalidate(text) if text else None)
        self.done, self.keep_alive = True, keep_alive and not self._until_eof


class TunnelReply:
    """``done`` once the reply is read; ``result`` is then None (tunnel open) or a Failure."""
    __slots__ = ("done", "result", "_head")
    keep_alive = True   # as connection.py asks of a reader: the connection goes on, to the TLS handshake

    def __init__(self):
        self.done, self.result, self._head = False, None, b""

    def feed(self, data: bytes):
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_CONNECT_REPLY:
                self._end(Failure("protocol", "proxy reply to CONNECT too long"))
        elif end + 4 < len(self._head):
            self._end(Failure("protocol", "bytes after the proxy's reply to CONNECT"))
        else:
            self._end(_status_failure(self._head.split(b"\r\n", 1)[0]))

    def eof(self):
        self._end(Failure("reset", "proxy closed the connection before answering CONNECT"))

    def abort(self, failure: Failure):
        self._end(failure)

    def _end(self, failure):
        if not self.done:
            self.done, self.result = True, failure


def _status_failure(line: bytes):
    """None for ``HTTP/1.x 200 ...``, else the Failure to report."""
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return Failure("protocol", "proxy reply to CONNECT is not HTTP")
    if parts[1] != b"200":
        return Failure("refused", f"proxy answered CONNECT with HTTP {parts[1].decode()}")
    return None
