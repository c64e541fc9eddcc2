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

from pfrest.backend import route as routes
from pfrest.backend.connect import open_connection
from pfrest.backend.errors import Failed, failure_for
from pfrest.backend.pool import Pool
from pfrest.backend.request import Template
from pfrest.backend.response import ResponseReader
from pfrest.protocol.verdict import Failure

REUSABLE_STATUSES = (200, 404)   # the answers a healthy backend gives; after any other, a new connection

_asyncio_timeout = getattr(asyncio, "timeout", None)   # 3.11+: a deadline without a task of its own


class Client:
    """Talks to one endpoint's target; one per endpoint and process.  Built outside the loop if need
    be: the running loop is looked up at each call."""

    def __init__(self, endpoint, user_agent: str):
        self.endpoint = endpoint
        self._timeout = endpoint.timeout
        self._user_agent = user_agent
        self._pool, self._loop = Pool(), None
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
        try:
            request = build(items, request_id)
            if _asyncio_timeout is None:
                return await asyncio.wait_for(self._exchange(request, retry), self._timeout)
            async with _asyncio_timeout(self._timeout):
                return await self._exchange(request, retry)
        except asyncio.TimeoutError:
            return Failure("timeout", f"no complete answer within {self._timeout:g} s")
        except Exception as exc:   # a failed step (DNS, connect, TLS, proxy) or a bug
            return failure_for(exc, self._where)

    async def _exchange(self, request: bytes, retry: bool):
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._new_loop(loop)
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
