"""tcp_table(5) codec: ``get SP key LF`` requests and ``NNN SP text LF`` replies.  No I/O here.

Postfix hex-quotes the key (hex_quote.c): ``%``, white space, and every byte that is not printable ASCII
become ``%XX``.  Replies are hex-unquoted by Postfix, in the text of 400/500 replies too, so every reply
text is quoted the same way.  A reply is at most 4096 bytes including the LF (dict_tcp.c), or Postfix
retries it 10 times.

Try it:  postmap -q 'some key' tcp:127.0.0.1:9001
"""

from pfrest.protocol.framing import Close, Reject

FOUND, NOT_FOUND, TEMPORARY = b"200", b"500", b"400"
MAX_REPLY = 4096            # bytes, including the LF (dict_tcp.c DICT_TCP_MAXLEN)
SOFT_REQUEST_LIMIT = 65536  # a longer line is read through to its LF and answered "not found"
HARD_REQUEST_LIMIT = 1 << 20  # no LF within this many bytes: the peer is not Postfix, close

# Bytes Postfix sends unquoted: printable ASCII except space and '%'.
_RAW = frozenset(range(0x21, 0x7F)) - {0x25}
_RAW_BYTES = bytes(sorted(_RAW))
_QUOTED = [bytes([b]) if b in _RAW else b"%%%02X" % b for b in range(256)]
_DIGITS = "0123456789abcdefABCDEF"
_HEX = {(a + b).encode(): int(a + b, 16) for a in _DIGITS for b in _DIGITS}


def quote(data: bytes) -> bytes:
    """Quote bytes the way Postfix's hex_quote() does."""
    if not data.translate(None, _RAW_BYTES):  # nothing to quote (the common case), found at C speed
        return data
    return b"".join(_QUOTED[b] for b in data)


def unquote(data: bytes) -> bytes:
    """Undo hex_quote(); raises ValueError on a bad escape or on %00 (keys are C strings)."""
    if b"%" not in data:
        return data
    parts = data.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        value = _HEX.get(part[:2])
        if value is None:
            raise ValueError("bad %XX escape")
        if value == 0:
            raise ValueError("%00 in key")
        out.append(bytes((value,)))
        out.append(part[2:])
    return b"".join(out)


def reply(code: bytes, text: bytes) -> bytes:
    """One reply line; the text is quoted and must fit, or a 400 saying so is returned instead."""
    line = code + b" " + quote(text) + b"\n"
    if len(line) > MAX_REPLY:
        return reply(TEMPORARY, b"value too long for tcp_table")
    return line


TOO_LONG = Reject(reply(NOT_FOUND, b"request too long"), "request over the size limit")


def parse_line(line: bytes):
    """One request line (without its LF): the key as bytes, or a Reject for anything but ``get``."""
    if line.endswith(b"\r"):  # Postfix never sends CR (it would be %0D); tolerate CRLF test clients
        line = line[:-1]
    verb, sep, arg = line.partition(b" ")
    if verb == b"get" and sep:
        try:
            if b"\0" in arg:  # Postfix's keys are C strings; what sends a NUL is not Postfix
                raise ValueError("NUL in key")
            return unquote(arg)
        except ValueError as exc:
            return Reject(reply(TEMPORARY, b"malformed request: " + str(exc).encode()), str(exc))
    if verb == b"put":
        return Reject(reply(NOT_FOUND, b"update rejected: table is read-only"), "put request")
    return Reject(reply(TEMPORARY, b"malformed request: expected get SP key"), "unknown command")


class Decoder:
    """Incremental request framer: ``feed(bytes)`` returns keys (bytes), Rejects and a final Close."""

    def __init__(self):
        self._buf = bytearray()
        self._skipped = 0  # bytes dropped so far from an oversized line, or 0

    @property
    def pending(self) -> bool:
        """True while part of a request has been received."""
        return bool(self._buf) or self._skipped > 0

    def feed(self, data: bytes) -> list:
        items = []
        while data:
            end = data.find(b"\n")
            if self._skipped:  # inside an oversized line: keep reading so Postfix's write completes
                if end < 0:
                    self._skipped += len(data)
                    if self._skipped > HARD_REQUEST_LIMIT:
                        items.append(Close(f"request over {HARD_REQUEST_LIMIT} bytes without a newline"))
                    return items
                self._skipped = 0
                items.append(TOO_LONG)
            elif end < 0:
                self._buf += data
                if len(self._buf) > SOFT_REQUEST_LIMIT:
                    self._skipped = len(self._buf)
                    self._buf.clear()
                return items
            else:
                line = bytes(self._buf + data[:end]) if self._buf else data[:end]
                self._buf.clear()
                items.append(TOO_LONG if len(line) > SOFT_REQUEST_LIMIT else parse_line(line))
            data = data[end + 1:]
        return items
