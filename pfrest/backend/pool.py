"""Idle keep-alive connections of one client, most recently used first (LIFO).

A connection comes back only after a clean exchange (the client decides: complete, well framed,
keep-alive, 200 or 404); anything else is aborted.  LIFO keeps the hot few connections warm and lets
the rest age out.  An idle connection older than IDLE_REUSE_LIMIT is closed instead of reused: servers
drop idle keep-alive connections on their own schedule (gunicorn after 2 s, uvicorn and Apache after
5 s), and a request written just as the server closes is lost.  1.5 s stays under the shortest of
those with half a second to spare, and costs a new connection only on a quiet endpoint.
"""

from collections import deque

IDLE_REUSE_LIMIT = 1.5   # seconds
MAX_IDLE = 256           # idle connections kept at most; more were only needed for a burst


class Pool:
    __slots__ = ("_idle", "closed")

    def __init__(self):
        self._idle = deque()   # oldest on the left, most recently used on the right
        self.closed = False

    def take(self, now: float, look: bool = False):
        """The most recently used live connection, or None.  A look at its socket makes sure that
        nothing arrived on it that the event loop has not read yet: a copy of the last answer (a
        backend answering twice), that the next request would read as its own, or the FIN of a backend
        that closes after every answer.  ``look``: always, for a request that must never be sent
        twice (a policy request is not sent again on a new connection when a reused one turns out
        closed); else only where the last answer did not echo its X-Request-Id: where it did, the id
        check of the next answer catches a copy (a lookup is sent again after a FIN), and the
        look's system call is saved."""
        self._expire(now)
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.dead:   # the server closed it while idle: it is gone already
                continue
            if (look or not conn.echoes) and not conn.quiet():
                conn.abort()
                continue
            return conn
        return None

    def put(self, conn, now: float):
        """Keep ``conn`` for another request, unless it died or the pool is closed or full."""
        if conn.dead or self.closed or len(self._idle) >= MAX_IDLE:
            conn.abort()
            return
        conn.idle_since = now
        self._idle.append(conn)
        self._expire(now)

    def close(self):
        """Close the idle connections; connections in use are aborted when they are put back."""
        self.closed = True
        while self._idle:
            self._idle.pop().abort()

    def _expire(self, now: float):
        idle = self._idle
        while idle and now - idle[0].idle_since >= IDLE_REUSE_LIMIT:
            idle.popleft().abort()
