"""The channel between the arbiter of ``serve --workers`` and one worker: a SOCK_SEQPACKET socket pair,
one message per packet (so no framing to get wrong), a message being a pickled tuple whose first item
says what it is, optionally with one file descriptor (an accepted connection) passed along.

Pickle is safe here: both ends are the same program, forked from one process, and the pair is
reachable by nobody else.

Sending never blocks either loop: a message that finds the socket full waits in the Channel's backlog,
in order, and goes out when the socket is writable again (the owner calls ``flush`` then).  Nothing is
ever dropped: a backlog at MAX_BACKLOG means the other end takes nothing, and ``send`` says so (False)
for its owner to act on (the arbiter kills such a worker; a worker stops), never a message lost silently
while the books (open connections) go wrong.

Arbiter -> worker: ``("connection", key, endpoint, peer, host)`` + fd, ``("config", cfg or None,
generation)`` (None: the reload failed, only reopen the log file), ``("probe", number, [endpoint])``
(readiness, health.py), ``("invalidate", number, endpoint, [params] or None)`` (``pfrest cache``,
controlsocket.py), ``("stop",)``.
Worker -> arbiter: ``("ready",)``, ``("applied", generation)``, ``("closed", key)``,
``("stats", {endpoint: Stats})`` or ``("alive",)`` (the worker's heartbeat, every second),
``("probed", number, {endpoint: None or why not})``, ``("invalidated", number, answers dropped or None:
no cache for that endpoint)``.
"""

import pickle
import socket
from collections import deque

MAX_MESSAGE = 1 << 20   # a Config or a set of counters is a few KiB; a SEQPACKET longer is cut
# messages waiting for room on one channel: one per connection passed or ended, at most a few per
# second else; the socket itself holds some hundreds more.  Beyond, the other end is stuck.
MAX_BACKLOG = 8192


def pair():
    """(arbiter's end, worker's end), as Channels."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return Channel(ours), Channel(theirs)


class Channel:
    """One end of the channel: non-blocking sends with a bounded backlog, and receiving."""

    def __init__(self, sock):
        sock.setblocking(False)
        self.sock = sock
        self.backlog = deque()   # (pickled message, socket whose descriptor goes with it, or None)

    def fileno(self):
        return self.sock.fileno()

    def send(self, message, passed=None) -> bool:
        """Send ``message`` (with the descriptor of the socket ``passed``, which the Channel then owns
        and closes once sent) now or, when the socket is full, once ``flush`` finds room.  False when
        the backlog is full: nothing was taken (``passed`` is still the caller's).  Raises OSError when
        the other end is gone (nothing taken either)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if not self.backlog:
            try:
                self._send(data, passed)
                return True
            except BlockingIOError:
                pass
        if len(self.backlog) >= MAX_BACKLOG:
            return False
        self.backlog.append((data, passed))
        return True

    def flush(self) -> bool:
        """Send what waits, as far as the socket has room; True when nothing waits any more.  Raises
        OSError when the other end is gone."""
        while self.backlog:
            try:
                self._send(*self.backlog[0])
            except BlockingIOError:
                return False
            self.backlog.popleft()
        return True

    def _send(self, data, passed):
        if passed is None:
            self.sock.send(data)
        else:
            socket.send_fds(self.sock, [data], [passed.fileno()])
            passed.close()   # the other end has its own copy now

    def receive(self):
        """The next message and the descriptors that came with it; (None, []) at the end of the channel.
        Raises BlockingIOError when nothing waits."""
        data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
        if not data:
            for fd in fds:
                socket.close(fd)
            return None, []
        return pickle.loads(data), fds

    def close(self):
        """Close the socket and the connections still waiting to be passed."""
        for _, passed in self.backlog:
            if passed is not None:
                passed.close()
        self.backlog.clear()
        self.sock.close()
