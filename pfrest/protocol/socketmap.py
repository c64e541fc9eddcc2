"""socketmap_table(5) codec: netstring requests ``NAME SP KEY`` and status-word replies.  No I/O here.

Postfix splits the request at the first space only, so keys may hold spaces; the key is raw bytes.
Reply status words are case-sensitive; ``OK`` must carry data (``OK`` alone is "not found" on old Postfix
and an error on new ones), and the payload is at most ``socketmap_max_reply_size`` (100000) bytes.

Try it:  postmap -q 'some key' socketmap:inet:127.0.0.1:9002:mapname
"""

from pfrest.protocol import netstring
from pfrest.protocol.framing import Close, Reject

MAX_REPLY = 100000           # payload bytes, Postfix's socketmap_max_reply_size default
SOFT_REQUEST_LIMIT = 65536   # longer requests are read, discarded and answered NOTFOUND
HARD_REQUEST_LIMIT = 1 << 20 # a longer declared length closes the connection


def reply(payload: bytes) -> bytes:
    return netstring.encode(payload)


def ok(value: bytes) -> bytes:
    if len(value) + 3 > MAX_REPLY:
        return temp(b"value too long for socketmap")
    return reply(b"OK " + value)


def temp(text: bytes) -> bytes:
    return reply(b"TEMP " + text)


def timeout(text: bytes) -> bytes:
    return reply(b"TIMEOUT " + text)


def perm(text: bytes) -> bytes:
    return reply(b"PERM " + text)


NOTFOUND = reply(b"NOTFOUND ")
TOO_LONG = Reject(NOTFOUND, "request over the size limit")
MALFORMED = Reject(perm(b"malformed request: expected NAME SP KEY"), "request without a space")
NUL = Reject(perm(b"malformed request: NUL in request"), "NUL in request")  # Postfix sends C strings


class Decoder:
    """``feed(bytes)`` returns ``(name, key)`` tuples, Rejects, and a final Close on a bad netstring."""

    def __init__(self):
        self._netstrings = netstring.Decoder(SOFT_REQUEST_LIMIT, HARD_REQUEST_LIMIT)
        self._closed = False

    @property
    def pending(self) -> bool:
        return self._netstrings.pending

    def feed(self, data: bytes) -> list:
        if self._closed:
            return []
        return [self._request(p) for p in self._netstrings.feed(data)]

    def _request(self, payload):
        if isinstance(payload, netstring.NetstringError):
            self._closed = True
            return Close(str(payload))
        if isinstance(payload, netstring.Skipped):
            return TOO_LONG
        if b"\0" in payload:
            return NUL
        name, sep, key = payload.partition(b" ")
        return (name, key) if sep else MALFORMED
