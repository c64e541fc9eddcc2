"""Netstrings (``LEN ":" DATA ","``), the framing of socketmap_table(5).  No I/O here.

Postfix writes canonical netstrings and reads leniently; pfrest writes canonical ones and, as a server
facing whoever reaches its socket, reads strictly: a length that is empty, not decimal, has a leading
zero or more than 10 digits, or data not followed by ``,`` means the stream cannot be trusted.  The
declared length is never allocated up front: data is collected as it arrives, and a length beyond the
hard limit is refused before any of it is read.
"""


class NetstringError(ValueError):
    """The stream is not a valid netstring; nothing after this point can be trusted."""


class BadLength(NetstringError):
    pass


class TooLong(NetstringError):
    pass


class BadTerminator(NetstringError):
    pass


MAX_DIGITS = 10


def encode(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


class Skipped:
    """Stands for a netstring whose data was discarded because it was over the soft limit."""

    def __init__(self, length: int):
        self.length = length

    def __repr__(self):
        return f"Skipped({self.length})"


class Decoder:
    """Incremental decoder: ``feed(bytes)`` returns whole payloads (bytes) and Skipped markers.

    When the input turns invalid, the payloads decoded before that point are returned followed by the
    NetstringError itself, as the last item; the decoder is unusable after that.
    Payloads longer than ``soft_limit`` are read and thrown away (so the sender's write completes) and
    reported as ``Skipped``; a declared length over ``hard_limit`` raises TooLong at once.
    """

    def __init__(self, soft_limit: int = 65536, hard_limit: int = 1 << 20):
        self.soft_limit, self.hard_limit = soft_limit, hard_limit
        self._digits = bytearray()
        self._length = None      # declared length once the ':' was seen
        self._data = bytearray()
        self._got = 0            # data bytes consumed for the current netstring
        self._keep = True        # False while discarding an oversized payload

    @property
    def pending(self) -> bool:
        return bool(self._digits) or self._length is not None

    def feed(self, data: bytes) -> list:
        if self._length is None and not self._digits and data.__class__ is bytes:
            whole = self._whole(data)
            if whole is not None:
                return [whole]
        items = []
        try:
            self._feed(data, items)
        except NetstringError as exc:
            items.append(exc)
        return items

    def _whole(self, data: bytes):
        """The payload when ``data`` is exactly one valid netstring within the soft limit (a Postfix
        client writes a request at once and waits for its reply), else None: the general path then
        takes it, its errors and limits included."""
        colon = data.find(b":", 0, MAX_DIGITS + 1)
        if colon < 1:
            return None
        head = data[:colon]
        if not head.isdigit() or (colon > 1 and head[:1] == b"0"):
            return None
        length = int(head)
        end = colon + 1 + length
        if length > self.soft_limit or length > self.hard_limit or len(data) != end + 1 or data[end] != 0x2C:
            return None   # a payload to skip, an error, a part of one or more than one: the general path
        return data[colon + 1:end]

    def _feed(self, data, items):
        view = memoryview(data)
        while len(view):
            if self._length is None:
                view = self._read_length(view)
                continue
            need = self._length - self._got
            if need > 0:
                chunk = view[:need]
                if self._keep:
                    self._data += chunk
                self._got += len(chunk)
                view = view[len(chunk):]
                continue
            if view[0] != 0x2C:  # ','
                raise BadTerminator("netstring not terminated by ','")
            view = view[1:]
            items.append(bytes(self._data) if self._keep else Skipped(self._length))
            self._length, self._got, self._keep = None, 0, True
            self._data = bytearray()

    def _read_length(self, view):
        colon = bytes(view[:MAX_DIGITS + 1 - len(self._digits)]).find(b":")
        head = bytes(view if colon < 0 else view[:colon])
        digits = self._digits + head
        if not head.isdigit() and head or len(digits) > MAX_DIGITS:
            raise BadLength("netstring length is not 1 to 10 decimal digits")
        if colon < 0:
            self._digits = digits
            return view[len(view):]
        if not digits or (len(digits) > 1 and digits[:1] == b"0"):
            raise BadLength("netstring length is empty or has a leading zero")
        length = int(digits)
        if length > self.hard_limit:
            raise TooLong(f"netstring length {length} over the limit of {self.hard_limit}")
        self._digits = bytearray()
        self._length, self._got, self._keep = length, 0, length <= self.soft_limit
        return view[colon + 1:]
