"""The backend client of one endpoint, on the event loop of the process.

Each call is one HTTP/1.1 exchange, bounded as a whole (DNS, connect, TLS, proxy CONNECT, write,
headers, body) by ``request-timeout``, ended by cancellation: whatever step is running stops, its
connection is aborted (nothing of that request is written after), and the caller gets a timeout.
Calls return an HttpResult or a Failure and never raise; only a cancellation from outside propagates.

A lookup whose reused connection ends before any byte of an answer (the backend closed it while idle
as the request went out) is sent once more on a new connection, within the same deadline.  Policy
requests are never sent twice: a rate-limiting backend must not count a message twice.
"""

import asyncio
from collections import deque

from pfrest.backend import route as routes
from pfrest.backend.connect import open_connection
from pfrest.backend.errors import Failed, failure_for
from pfrest.backend.pool import Pool
from pfrest.backend.request import Template
from pfrest.backend.response import ResponseReader
from pfrest.protocol.verdict import Failure

REUSABLE_STATUSES = (200, 404)   # the answers a healthy backend gives; after any other, a new connection


class _Deadline:
    __slots__ = ("when", "task", "expired")

    def __init__(self, when, task):
        self.when, self.task, self.expired = when, task, False


class Deadlines:
    """The deadlines of one client's calls.  All last request-timeout, so they come due in the order
    they were set: one timer, for the oldest, cancels each call whose deadline has passed.  The same
    ending by cancellation as ``asyncio.timeout`` gives, without its timer per call (a third of the
    client's CPU per request, measured)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self._queue = deque()
        self._timer = None

    def start(self, loop, task) -> _Deadline:
        deadline = _Deadline(loop.time() + self.seconds, task)
        self._queue.append(deadline)
        if self._timer is None:
            self._timer = loop.call_at(deadline.when, self._expire, loop)
        return deadline

    def finish(self, deadline: _Deadline):
        deadline.task = None
        queue = self._queue
        while queue and queue[0].task is None:  # calls end mostly in order: the queue stays short
            queue.popleft()

    def _expire(self, loop):
        self._timer, queue, now = None, self._queue, loop.time()
        while queue and (queue[0].task is None or queue[0].when <= now):
            deadline = queue.popleft()
            if deadline.task is not None:
                deadline.expired = True
                deadline.task.cancel()
        if queue:
            self._timer = loop.call_at(queue[0].when, self._expire, loop)


class Client:
    """Talks to one endpoint's target; one per endpoint and process.  Built outside the loop if need
    be: the running loop is looked up at each call."""

    def __init__(self, endpoint, user_agent: str):
        self.endpoint = endpoint
        self._timeout = endpoint.timeout
        self._user_agent = user_agent
        self._pool, self._loop = Pool(), None
        self._deadlines = Deadlines(self._timeout)
        try:
            self._route = routes.for_endpoint(endpoint)
        except UnicodeError as exc:   # a host name IDNA cannot encode: every call fails alike
            self._route, self._where = None, endpoint.name
            self._template = _Unusable(Failure("dns", f"host name cannot be encoded: {exc}"))
        else:
            self._where = self._route.first_hop.authority   # for failure details: no secrets in it
            self._template = Template(endpoint, user_agent, self._route)

    async def lookup(self, params, request_id: str):
        """GET target?name=value&... for (str, bytes) params; HttpResult or Failure."""
        return await self._call(self._template.lookup, params, request_id, retry=True)

    async def policy(self, pairs, request_id: str):
        """The policy attributes as a form body, sent exactly once; HttpResult or Failure."""
        return await self._call(self._template.policy, pairs, request_id, retry=False)

    def close(self):
        """Idempotent: idle connections close now, busy ones when their exchange ends."""
        self._pool.close()

    async def _call(self, build, items, request_id: str, retry: bool):
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._new_loop(loop)
        deadline = self._deadlines.start(loop, asyncio.current_task())
        try:
            return await self._exchange(loop, build(items, request_id), retry)
        except asyncio.CancelledError:
            if not deadline.expired:
                raise  # the caller's own cancellation
            uncancel = getattr(deadline.task, "uncancel", None)  # 3.11+: the cancellation was ours
            if uncancel is not None:
                uncancel()
            return Failure("timeout", f"no complete answer within {self._timeout:g} s")
        except Exception as exc:   # a failed step (DNS, connect, TLS, proxy) or a bug
            return failure_for(exc, self._where)
        finally:
            self._deadlines.finish(deadline)

    async def _exchange(self, loop, request: bytes, retry: bool):
        conn = self._pool.take(loop.time())
        while True:
            fresh = conn is None
            if fresh:
                conn = await open_connection(loop, self._route, self.endpoint.ca_file,
                                             self._user_agent)
            reader = ResponseReader()
            try:
                await conn.exchange(request, reader)
            except BaseException:   # cancelled: the deadline, or the caller
                conn.abort()
                raise
            self._release(conn, reader, loop.time())
            if fresh or not (retry and reader.unanswered):
                return reader.result
            conn = None   # a reused connection the backend had closed: once more on a new one

    def _new_loop(self, loop):
        """Connections pooled on another loop (a previous asyncio.run, or the parent of a forked
        worker) are forgotten, never touched: their transports belong to that loop."""
        closed = self._pool.closed
        self._pool, self._loop = Pool(), loop
        self._pool.closed = closed
        self._deadlines = Deadlines(self._timeout)

    def _release(self, conn, reader, now: float):
        if reader.keep_alive and reader.result.status in REUSABLE_STATUSES:
            self._pool.put(conn, now)
        else:
            conn.abort()


class _Unusable:
    """Stands in for the request template of an endpoint whose target cannot be used."""

    def __init__(self, failure: Failure):
        self.failure = failure

    def lookup(self, items, request_id):
        raise Failed(self.failure)

    policy = lookup
