"""The proxy's reply to CONNECT, read as a connection reader (see connection.py).  Sans-I/O.

A status line and headers, bounded in size; 200 opens the tunnel.  The TLS server behind it says
nothing before our ClientHello, so any byte after the header block is a protocol failure.
"""

from pfrest.protocol.verdict import Failure

MAX_REPLY = 16384   # bytes of status line and headers; proxies send a few hundred


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
            if len(self._head) > MAX_REPLY:
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
