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


def _whole_request(data: bytes):
    """The attributes when ``data`` is exactly one plain request, decoded in a few passes (Postfix
    writes a request at once and waits for the answer); None for anything else, which the general
    path then takes, limits, CRLF clients and errors included."""
    if len(data) > MAX_LINE or not data.endswith(b"\n\n") or b"\r" in data or b"\0" in data:
        return None
    parts = [line.partition(b"=") for line in data[:-2].split(b"\n")]
    if len(parts) > MAX_ATTRIBUTES or not all(name and sep for name, sep, _ in parts):
        return None
    attrs = [(name, value) for name, _, value in parts]
    if attrs[0] != (b"request", REQUEST_TYPE) and [v for n, v in attrs if n == b"request"][:1] != [REQUEST_TYPE]:
        return None
    return attrs


class Decoder:
    """``feed(bytes)`` returns requests (lists of ``(name, value)`` byte pairs, in the order sent) and a
    final Close when the input breaks the protocol or the limits."""

    def __init__(self):
        self._line = b""      # the line being received, without its LF yet
        self._attrs = []
        self._size = 0        # bytes of the request so far, in complete lines
        self._closed = False

    @property
    def pending(self) -> bool:
        return bool(self._line) or bool(self._attrs)

    def feed(self, data: bytes) -> list:
        items = []
        if self._closed or not data:
            return items
        if not self._line and not self._attrs:
            whole = _whole_request(data)
            if whole is not None:
                return [whole]
        lines = (self._line + data if self._line else data).split(b"\n")
        self._line = lines.pop()  # what follows the last LF: part of a line still to come
        attrs = self._attrs
        for line in lines:
            self._size += len(line) + 1
            if line and self._size <= MAX_REQUEST and len(line) <= MAX_LINE and b"\0" not in line \
                    and len(attrs) < MAX_ATTRIBUTES and line[-1:] != b"\r":
                name, sep, value = line.partition(b"=")
                if sep and name:  # the common case, decided here without a call
                    attrs.append((name, value))
                    continue
            item = self._limits(line) or self._take(line)
            attrs = self._attrs
            if isinstance(item, str):
                items.append(self._close(item))
                return items
            if item is not None:
                items.append(item)
        problem = self._limits(self._line, len(self._line))
        if problem:
            items.append(self._close(problem))
        return items

    def _limits(self, line, pending=0):
        if len(line) > MAX_LINE:
            return f"line over {MAX_LINE} bytes"
        if self._size + pending > MAX_REQUEST:
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
