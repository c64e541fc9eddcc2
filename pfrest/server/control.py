"""The channel between the arbiter of ``serve --workers`` and one worker: a SOCK_SEQPACKET socket pair,
one message per packet (so no framing to get wrong), a message being a pickled tuple whose first item
says what it is, optionally with one file descriptor (an accepted connection) passed along.

Pickle is safe here: both ends are the same program, forked from one process, and the pair is
reachable by nobody else.

Arbiter -> worker: ``("connection", key, endpoint, peer, host)`` + fd, ``("config", cfg or None,
generation)`` (None: the reload failed, only reopen the log file), ``("probe", number, [endpoint])``
(readiness, health.py), ``("invalidate", number, endpoint, [params] or None)`` (``pfrest cache``,
controlsocket.py), ``("stop",)``.
Worker -> arbiter: ``("ready",)``, ``("applied", generation)``, ``("closed", key)``,
``("stats", {endpoint: Stats})``, ``("probed", number, {endpoint: None or why not})``,
``("invalidated", number, answers dropped or None: no cache for that endpoint)``.
"""

import pickle
import select
import socket

MAX_MESSAGE = 1 << 20   # a Config or a set of counters is a few KiB; a SEQPACKET longer is cut
SEND_TIMEOUT = 2.0      # seconds the arbiter waits for a worker to take a message: it is stuck after that


def pair():
    """(arbiter's end, worker's end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock, message, fd=None):
    """Send on a non-blocking channel, waiting up to SEND_TIMEOUT for room; TimeoutError after that."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    for attempt in range(2):
        try:
            if fd is None:
                sock.send(data)
            else:
                socket.send_fds(sock, [data], [fd])
            return
        except BlockingIOError:
            if attempt or not select.select([], [sock], [], SEND_TIMEOUT)[1]:
                raise TimeoutError("the other end takes no messages") from None


def receive(sock):
    """The next message and the descriptors that came with it; (None, []) at the end of the channel.
    Raises BlockingIOError when nothing waits on a non-blocking socket."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None, []
    return pickle.loads(data), fds
