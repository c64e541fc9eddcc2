"""SMTPD policy delegation codec: ``name=value`` lines ended by an empty line, answered by
``action=VALUE LF LF``.  No I/O here.  See Postfix's SMTPD_POLICY_README.

Values are raw bytes (they come from the SMTP client: maybe not UTF-8, maybe with a stray CR) and are
kept byte for byte.  Postfix itself bounds requests (about 30 lines of at most ~2 KB); pfrest bounds
lines, requests and attribute counts well above that, and on anything it cannot trust it sends nothing
and closes, as the README asks: Postfix then retries once and applies its own default action.
"""

from pfrest.protocol.framing import Close

MAX_LINE = 16384
MAX_REQUEST = 65536
MAX_ATTRIBUTES = 1024      # Postfix's own ATTR_HASH_LIMIT
REQUEST_TYPE = b"smtpd_access_policy"


def reply(action: str) -> bytes:
    """The whole reply; ``action`` must have passed actions.problem() or actions.check()."""
    return b"action=" + action.encode("utf-8") + b"\n\n"


class Decoder:
    """``feed(bytes)`` returns requests (lists of ``(name, value)`` byte pairs, in the order sent) and a
    final Close when the input breaks the protocol or the limits."""

    def __init__(self):
        self._line = bytearray()
        self._attrs = []
        self._size = 0
        self._closed = False

    @property
    def pending(self) -> bool:
        return bool(self._line) or bool(self._attrs)

    def feed(self, data: bytes) -> list:
        items = []
        while data and not self._closed:
            end = data.find(b"\n")
            if end < 0:
                self._line += data
                self._size += len(data)
                problem = self._limits()
                if problem:
                    items.append(self._close(problem))
                break
            line = bytes(self._line + data[:end]) if self._line else data[:end]
            self._size += end + 1
            self._line.clear()
            data = data[end + 1:]
            item = self._limits() or self._take(line)
            if isinstance(item, str):
                items.append(self._close(item))
            elif item is not None:
                items.append(item)
        return items

    def _limits(self):
        if len(self._line) > MAX_LINE:
            return f"line over {MAX_LINE} bytes"
        if self._size > MAX_REQUEST:
            return f"request over {MAX_REQUEST} bytes"
        return None

    def _take(self, line):
        """Add one line; return a finished request, None, or a problem string."""
        if line in (b"", b"\r"):  # the empty line; a lone CR is a CRLF client's empty line
            attrs, self._attrs, self._size = self._attrs, [], 0
            if line == b"\r":  # a CRLF client (a person with telnet): its values end in CR too
                attrs = [(n, v[:-1] if v.endswith(b"\r") else v) for n, v in attrs]
            if not attrs:
                return "empty request"
            request = [v for n, v in attrs if n == b"request"]
            if request[:1] != [REQUEST_TYPE]:
                return "request attribute missing or not smtpd_access_policy"
            return attrs
        if len(line) > MAX_LINE:
            return f"line over {MAX_LINE} bytes"
        if b"\0" in line:  # Postfix's attributes are C strings
            return "NUL in request"
        name, sep, value = line.partition(b"=")
        if not sep or not name:
            return "line without name=value"
        if len(self._attrs) >= MAX_ATTRIBUTES:
            return f"more than {MAX_ATTRIBUTES} attributes"
        self._attrs.append((name, value))
        return None

    def _close(self, why):
        self._closed = True
        return Close(why)
