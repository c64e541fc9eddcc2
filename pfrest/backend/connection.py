"""One connection to the backend (or to the proxy in front of it), as an asyncio Protocol.

An exchange writes one request and waits for the reader it was given (response.ResponseReader, or
the proxy's CONNECT reply) to be done; ``data_received`` feeds the reader, EOF and connection loss end
it.  Between exchanges the connection is idle, and anything arriving then (bytes, EOF) makes it dead:
a well-behaved backend says nothing unasked, and stale bytes must never be read as the next answer.
Bytes that came unasked (a backend answering twice) are told to ``on_stray``, once.  A connection that
carries pipelined lookups (pipeline.py) has one reader for the rest of its life instead (``carry``).
"""

import asyncio
import fcntl
import select
import struct
import termios

from pfrest.backend.errors import failure_for


class Connection(asyncio.Protocol):
    __slots__ = ("transport", "dead", "idle_since", "echoes", "on_stray", "_loop", "_reader", "_done")

    def __init__(self, loop):
        self._loop = loop
        self.transport = None
        self.dead = False          # closed, or must never carry another request
        self.idle_since = 0.0      # loop.time() when it last became idle (set by the pool)
        self.echoes = False        # its last answer echoed its request's X-Request-Id (set by the client)
        self.on_stray = None       # called once when bytes came that no request asked for
        self._reader = None        # the reader of the exchange in progress; None while idle
        self._done = None          # the future that exchange waits on

    def exchange(self, request: bytes, reader) -> "asyncio.Future":
        """Write ``request`` in one write; the future resolves once ``reader.done``.  A caller that
        stops waiting (cancelled, timed out) must ``abort()``: the connection is in an unknown state."""
        self._reader, self._done = reader, self._loop.create_future()
        if self.dead:
            reader.eof()
            return self._settle()
        self.transport.write(request)
        return self._done

    def carry(self, reader):
        """From now on ``reader`` reads everything that comes, and ``exchange`` is not used: it writes its
        requests itself (a pipeline)."""
        self._reader, self._done = reader, None

    def quiet(self) -> bool:
        """Nothing waits to be read on the socket (one poll, no wait): it can carry a request.  When
        something does, bytes and not only a FIN (the rare case: one more call to tell), they are
        stray."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            fd = sock.fileno()
            if not select.select([fd], [], [], 0)[0]:
                return True
            unread = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            return False
        # Over TLS the bytes may be the backend's close_notify before its FIN (TLS 1.3 encrypts alerts:
        # they cannot be told from data without reading them): the connection is dropped all the same,
        # and only a plain connection tells its idle bytes as stray.  The X-Request-Id check still
        # catches, over TLS too, a copy that comes after the next request went out.
        if unread and self.transport.get_extra_info("ssl_object") is None:
            self._stray()
        return False

    def _stray(self):
        told, self.on_stray = self.on_stray, None
        if told is not None:
            told()

    def abort(self):
        """Close at once, dropping anything not yet sent: a late request must never go out."""
        self.dead = True
        if self.transport is not None:
            self.transport.abort()

    def _settle(self):
        done, self._reader, self._done = self._done, None, None
        if done is not None and not done.done():
            done.set_result(None)
        return done

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        reader = self._reader
        if reader is None:
            self.abort()   # unasked bytes while idle
            self._stray()
            return
        reader.feed(data)
        if reader.done:
            if not reader.keep_alive:
                self.on_stray = None   # it closes after this exchange: bytes still coming are not told
            self._settle()

    def eof_received(self):
        self.dead = True
        reader = self._reader
        if reader is not None:
            reader.eof()
            self._settle()
        # returning None lets the transport close itself

    def connection_lost(self, exc):
        self.dead = True
        reader = self._reader
        if reader is not None:
            if exc is None:
                reader.eof()
            else:
                reader.abort(failure_for(exc, "connection lost"))
            self._settle()
