"""fd 0 and fd 1 as one asyncio transport, whatever started ``pfrest handle``.

spawn(8), xinetd and systemd (``Accept=yes``) give one connected socket as fd 0, 1 and 2: it is served
like any accepted connection.  A shell or a test gives pipes, a terminal or files: fd 0 is read and fd 1
written by a small transport of our own, which tells the conversation the end of its input (EOF) apart
from the end of the connection (fd 1 closed, or done writing).
"""

import asyncio
import os
import socket
import stat

READ_SIZE = 65536


def _redirect_to_devnull(*fds):
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        os.dup2(devnull, fd)
    os.close(devnull)


async def attach(protocol):
    """Make fd 0/1 the transport of ``protocol`` (an asyncio.Protocol)."""
    loop = asyncio.get_running_loop()
    in_stat, out_stat = os.fstat(0), os.fstat(1)
    if stat.S_ISSOCK(in_stat.st_mode) and (in_stat.st_dev, in_stat.st_ino) == (out_stat.st_dev, out_stat.st_ino):
        sock = socket.socket(fileno=os.dup(0))
        # Only the transport's descriptor may keep the connection open, so that closing it ends the
        # conversation for Postfix; and nothing else may ever write into it.
        _redirect_to_devnull(0, 1)
        sock.setblocking(False)
        await loop.connect_accepted_socket(lambda: protocol, sock)
        return
    transport = StdioTransport(loop, protocol)
    await transport.open(in_stat, out_stat)


class _ReadSide(asyncio.Protocol):
    def __init__(self, owner):
        self.owner = owner

    def data_received(self, data):
        self.owner.protocol.data_received(data)

    def eof_received(self):
        self.owner.protocol.eof_received()

    def connection_lost(self, exc):
        if exc is not None:  # a read error, not the end of the input
            self.owner.lost(exc)


class _WriteSide(asyncio.BaseProtocol):
    def __init__(self, owner):
        self.owner = owner

    def pause_writing(self):
        self.owner.protocol.pause_writing()

    def resume_writing(self):
        self.owner.protocol.resume_writing()

    def connection_lost(self, exc):
        self.owner.lost(exc)


class StdioTransport(asyncio.Transport):
    """Reads fd 0, writes fd 1.  Pipes, terminals and sockets go through the event loop; regular files
    (``pfrest handle ... < requests > replies``) are read and written directly, as they never block."""

    def __init__(self, loop, protocol):
        super().__init__()
        self.loop, self.protocol = loop, protocol
        self.reader = self.writer = None
        self.file_in = self.file_out = None
        self.paused = self.closing = self.done = False

    async def open(self, in_stat, out_stat):
        if stat.S_ISREG(in_stat.st_mode):
            self.file_in = 0
        else:
            self.reader, _ = await self.loop.connect_read_pipe(lambda: _ReadSide(self),
                                                               open(0, "rb", buffering=0, closefd=False))
        if stat.S_ISREG(out_stat.st_mode):
            self.file_out = os.dup(1)
        else:
            self.writer, _ = await self.loop.connect_write_pipe(lambda: _WriteSide(self),
                                                                open(os.dup(1), "wb", buffering=0))
        _redirect_to_devnull(1)  # fd 1 is the writer's copy now: nothing else may write into it
        self.protocol.connection_made(self)
        if self.file_in is not None:
            self.loop.call_soon(self._read_file)

    def _read_file(self):
        if self.paused or self.closing:
            return
        data = os.read(self.file_in, READ_SIZE)
        if data:
            self.protocol.data_received(data)
            self.loop.call_soon(self._read_file)
        else:
            self.file_in = None
            self.protocol.eof_received()

    # --- what the conversation uses -----------------------------------------------------------

    def write(self, data):
        if self.writer is not None:
            self.writer.write(data)
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self.file_out, view):]

    def pause_reading(self):
        self.paused = True
        if self.reader is not None:
            self.reader.pause_reading()

    def resume_reading(self):
        self.paused = False
        if self.reader is not None:
            self.reader.resume_reading()
        elif self.file_in is not None:
            self.loop.call_soon(self._read_file)

    def is_closing(self):
        return self.closing

    def close(self):
        """Stop reading; the connection ends once fd 1 has taken every reply."""
        if self.closing:
            return
        self.closing = True
        if self.reader is not None:
            self.reader.close()
        if self.writer is not None:
            self.writer.close()  # its connection_lost, once flushed, ends the conversation
        else:
            os.close(self.file_out)
            self.loop.call_soon(self.lost, None)

    def abort(self):
        self.closing = True
        for side in (self.reader, self.writer):
            if side is not None:
                side.abort()
        if self.writer is None:
            self.loop.call_soon(self.lost, None)

    def lost(self, exc):
        if not self.done:
            self.done = self.closing = True
            if self.reader is not None:
                self.reader.close()
            self.protocol.connection_lost(exc)
