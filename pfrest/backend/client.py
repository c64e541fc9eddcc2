"""The backend client of one endpoint, on the event loop of the process.

Each call is one HTTP/1.1 exchange, bounded as a whole (DNS, connect, TLS, proxy CONNECT, write,
headers, body) by ``request-timeout``, ended by cancellation: whatever step is running stops, its
connection is aborted (nothing of that request is written after), and the caller gets a timeout.
Calls return an HttpResult or a Failure and never raise; only a cancellation from outside propagates.

An answer is its request's: one that echoes another request's X-Request-Id (or none, with
``require-request-id``), bytes after an answer, and bytes on an idle connection are stray: the request
gets a Failure of kind "stray", the connection is closed, and the observer hears ``stray`` (with a log
line: once per connection, since it is closed).  A pooled connection is looked at before its reuse
(pool.take) unless its last answer echoed the id.

A lookup whose reused connection ends before any byte of an answer (the backend closed it while idle
as the request went out) is sent once more on a new connection, within the same deadline.  Policy
requests are never sent twice: a rate-limiting backend must not count a message twice.

Several targets (``target`` as a list), each with its own route, request template and connections:
- a target is *down* after a failure of the connection itself (DOWN_KINDS: refused, reset, timeout,
  DNS, TLS), for BACKOFF_FIRST seconds, doubling up to BACKOFF_MAX while retries fail, until a
  success.  An HTTP answer, a 5xx too, is an answer: it goes to Postfix as it is (and to the cache's
  stale answers), and so does a malformed one;
- a call asks the targets in order, skipping those in back-off; one request at a time retries a
  target whose back-off ran out, the others go on elsewhere meanwhile.  When every other target has
  failed, those in back-off are asked too: a call never fails only because all are in back-off;
- a lookup moves on to the next target after a DOWN_KINDS failure; a policy request only when it was
  never sent, i.e. the failure came before its first byte was written (DNS, connect, TLS handshake,
  proxy CONNECT): once written, its outcome is final, whatever it is;
- all within the one deadline.  An attempt with another target still left gets ATTEMPT_SHARE of the
  time left (a policy request: for connecting only), so that a target that drops SYNs or never
  answers costs a wait, not the call.
Every attempt is told to the observer: ``exchange(url, "ok" or the Failure kind, seconds)``.  A call
cancelled by its caller is not an outcome of the target, and is not told.  A target that goes down,
and one that is up again, gets a WARNING line: once per change, not per request (its failed retries
in back-off are not changes).

With ``oauth2``, a ``bearer`` (pfrest/identity/'s TokenSource) gives each request its Authorization
line: at hand, but for the first request (or one after every token expired), which waits for a fetch
within its deadline.  A 401 that refuses the token (any 401 in the lookup and policy modes, whose
answers are never 401; in dovecot-sasl, where a 401 is a wrong password, only one with a Bearer
``WWW-Authenticate``: RFC 6750 3) drops it, and a new one is fetched, once.  A lookup is sent again
with it, within the same deadline; a policy request or a login is not: nothing proves that the
backend did not count it (a rate limit, a failed-login counter) before it looked at the token, so it
gets a temporary answer (a "token" Failure) and Postfix asks again later, with the new token.
"""

import asyncio
import logging
from functools import partial

from pfrest import tracing
from pfrest.backend import route as routes
from pfrest.backend import tls
from pfrest.backend.backoff import Backoff
from pfrest.backend.connect import open_connection
from pfrest.backend.deadline import Deadline, Deadlines, uncancel
from pfrest.backend.errors import Failed, failure_for
from pfrest.backend.observer import NOBODY
from pfrest.backend.pipeline import Pipeline
from pfrest.backend.pool import Pool
from pfrest.backend.request import Template
from pfrest.backend.response import ResponseReader
from pfrest.protocol.modes import SASL
from pfrest.protocol.verdict import Failure, HttpResult

log = logging.getLogger("pfrest")

REUSABLE_STATUSES = (200, 404)   # the answers a healthy backend gives; after any other, a new connection
# Failures of the connection to a target, not of its answer: they mark it down, and a lookup moves on.
DOWN_KINDS = frozenset(("refused", "reset", "timeout", "dns", "tls"))
BACKOFF_FIRST = 5.0    # seconds a target is skipped after it failed
BACKOFF_MAX = 60.0     # the back-off doubles while retries fail, up to this
ATTEMPT_SHARE = 0.5    # of the time left, for an attempt while another target is left to try


class _Cutoff:
    """Ends one attempt, not the call, when another target is left to try: its timer cancels the
    call's task, and the attempt becomes a timeout of that target.  If the call's deadline came
    first, that one counts.  For an attempt after the first (the first attempts of all calls share
    a FIFO queue instead, see Client._cutoff)."""
    __slots__ = ("expired", "_deadline", "_timer")

    def __init__(self, loop, seconds: float, deadline: Deadline):
        self.expired, self._deadline = False, deadline
        self._timer = loop.call_later(seconds, self._fire)

    def _fire(self):
        deadline = self._deadline
        if deadline is not None and not deadline.expired and deadline.task is not None:
            self.expired = True
            deadline.task.cancel()

    def disarm(self):
        """From now on it never cancels, even had its timer come due in this very turn of the loop."""
        self._deadline = None
        self._timer.cancel()


class _Target(Backoff):
    """One URL of the endpoint's ``target`` list: its route, request template, idle connections and
    health (Backoff: up, or down until ``down_until``)."""
    __slots__ = ("url", "route", "template", "where", "pool", "on_stray", "pipeline")

    def __init__(self, url: str, endpoint, user_agent: str):
        super().__init__(BACKOFF_FIRST, BACKOFF_MAX)
        self.url, self.pool = url, Pool()
        try:
            self.route = routes.for_target(url, endpoint.proxy)
        except UnicodeError as exc:   # a host name IDNA cannot encode: every call to it fails alike
            self.route, self.where = None, endpoint.name
            self.template = _Unusable(Failure("dns", f"host name cannot be encoded: {exc}"))
        else:
            self.where = self.route.first_hop.authority   # for failure details: no secrets in it
            self.template = Template(endpoint, user_agent, self.route)


class Client:
    """Talks to one endpoint's targets; one per endpoint and process.  Built outside the loop if need
    be: the running loop is looked up at each call."""

    def __init__(self, endpoint, user_agent: str, observer=NOBODY, bearer=None):
        self.endpoint = endpoint
        self.bearer = bearer   # the endpoint's oauth2 TokenSource, or None
        self._any_401_refuses = endpoint.mode != SASL
        self._timeout = endpoint.timeout
        self._user_agent = user_agent
        self._observer = observer
        self._files = tls.Files.of(endpoint)
        self._require_id = endpoint.require_request_id
        self._targets = tuple(_Target(url, endpoint, user_agent) for url in endpoint.targets)
        for target in self._targets:
            target.on_stray = partial(self._stray, target, "bytes came on an idle connection")
            target.pipeline = self._pipeline(target)
        self._loop = None
        self._deadlines = Deadlines(self._timeout)
        self._first_cutoffs = Deadlines(self._timeout * ATTEMPT_SHARE)

    async def lookup(self, params, request_id: str):
        """GET target?name=value&... for (str, bytes) params; HttpResult or Failure."""
        return await self._call(True, params, request_id)

    async def policy(self, pairs, request_id: str):
        """The policy attributes as a form body, sent exactly once; HttpResult or Failure."""
        return await self._call(False, pairs, request_id)

    def close(self):
        """Idempotent: idle connections close now, busy ones when their exchange ends."""
        for target in self._targets:
            target.pool.close()
            if target.pipeline is not None:
                target.pipeline.close()

    async def _call(self, idempotent: bool, items, request_id: str):
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._new_loop(loop)
        deadline = self._deadlines.start(loop, asyncio.current_task())
        try:
            if self.bearer is not None:
                return await self._authorized(loop, deadline, idempotent, items, request_id)
            if len(self._targets) == 1:   # the common case, without failover's bookkeeping
                result, _ = await self._attempt(loop, deadline, self._targets[0], idempotent, items,
                                                request_id, None)
                return result
            return await self._failover(loop, deadline, idempotent, items, request_id)
        except asyncio.CancelledError:
            if not deadline.expired:
                raise  # the caller's own cancellation
            uncancel(deadline.task)
            return Failure("timeout", f"no complete answer within {self._timeout:g} s")
        except Exception as exc:   # a bug: still a Failure, never an exception for the caller
            return failure_for(exc, self.endpoint.name)
        finally:
            self._deadlines.finish(deadline)

    async def _authorized(self, loop, deadline, idempotent: bool, items, request_id: str):
        """The request with the bearer token; a refused token replaced once (see the module's notes)."""
        bearer, auth = self.bearer, self.bearer.line(loop)
        for again in (False, True):
            if auth is None:
                auth = await bearer.fetched(loop)   # a Failure when the token endpoint failed
                if auth.__class__ is Failure:
                    return auth
            if len(self._targets) == 1:
                result, _ = await self._attempt(loop, deadline, self._targets[0], idempotent, items,
                                                request_id, None, auth, 2 if again else 1)
            else:
                result = await self._failover(loop, deadline, idempotent, items, request_id, auth)
            if result.__class__ is not HttpResult or result.status != 401 \
                    or not (self._any_401_refuses or result.bearer_challenge):
                return result
            renewed = bearer.refused(auth)
            if not renewed:
                return Failure("token", "the backend refused a token just fetched (HTTP 401): check the "
                                        "client's scope and audience")
            if not idempotent or again:
                return Failure("token", "the backend refused the bearer token (HTTP 401); a new one is "
                                        "fetched" + ("" if idempotent else ", the request is not sent twice"))
            auth = None
        return result   # not reached: the second pass returns

    async def _failover(self, loop, deadline, idempotent: bool, items, request_id: str, auth=b""):
        """The first result that must not move on to the next target (see the module's notes), or
        the last target's."""
        last = len(self._targets)
        for tried, target in enumerate(self._candidates(loop), 1):
            cutoff = None if tried == last else self._cutoff(loop, deadline, tried)
            result, move_on = await self._attempt(loop, deadline, target, idempotent, items,
                                                  request_id, cutoff, auth, tried)
            if not move_on:
                return result
        return result

    def _cutoff(self, loop, deadline, tried: int):
        """When an attempt with another target left gives up: after ATTEMPT_SHARE of the time left.
        The first attempts of all calls start with the call, so theirs come due in that order, as
        deadlines do: one queue and its one timer, not a timer per request."""
        if tried == 1:
            return self._first_cutoffs.start(loop, deadline.task)
        return _Cutoff(loop, (deadline.when - loop.time()) * ATTEMPT_SHARE, deadline)

    def _candidates(self, loop):
        """The usable targets in order, then those in back-off.  Lazy: a target due for a retry is
        claimed only when it is about to be asked."""
        waiting = []
        for target in self._targets:
            if target.usable(loop.time()):
                yield target
            else:
                waiting.append(target)
        yield from waiting

    async def _traced(self, loop, deadline, target, idempotent: bool, items, request_id: str, cutoff,
                      auth: bytes, attempt: int):
        """_attempt in a span of its own, its traceparent sent to the backend (a request sampled out:
        no span, its context sent on)."""
        if not tracing.sampled():
            return await self._attempt(loop, deadline, target, idempotent, items, request_id, cutoff,
                                       auth + tracing.headers(), attempt, True)
        method = "GET" if idempotent else self.endpoint.method
        span, token = tracing.start_exchange(method, target.where, attempt, len(self._targets) > 1)
        outcome, status = "cancelled", None
        try:
            result, move_on = await self._attempt(loop, deadline, target, idempotent, items, request_id, cutoff,
                                                  auth + tracing.headers(), attempt, True)
            if result.__class__ is HttpResult:
                outcome, status = "ok", result.status
            else:
                outcome = result.kind
            return result, move_on
        finally:
            tracing.end_exchange(span, token, outcome, status)

    async def _attempt(self, loop, deadline, target, idempotent: bool, items, request_id: str,
                       cutoff, auth=b"", attempt=1, traced=False):
        """One target asked: (result, whether the next target may be asked); the outcome is told to
        the observer and to the target's health.  (One coroutine, not two: this is every request's
        path.)  Until the request is written, only building it (an unusable target) and
        open_connection raise; after, only a cancellation.  With tracing, in a span (_traced)."""
        if tracing.tracer is not None and not traced:
            return await self._traced(loop, deadline, target, idempotent, items, request_id, cutoff, auth, attempt)
        started = loop.time()
        try:
            build = target.template.lookup if idempotent else target.template.policy
            request, echo = build(items, request_id, auth), request_id.encode("ascii")
            pipeline = target.pipeline if idempotent else None
            answer = None if pipeline is None else pipeline.send(loop, request, echo)
            if answer is not None:   # on a pipeline (a cancellation: it drops the answer, or never writes it)
                result = await answer   # None: not answered there, and sent on its own below
            if answer is None or result is None:
                conn = target.pool.take(started, look=not idempotent)
                while True:
                    fresh = conn is None
                    if fresh:
                        conn = await open_connection(loop, target.route, self._files, self._user_agent)
                        conn.on_stray = target.on_stray
                    if cutoff is not None and not idempotent:
                        cutoff.disarm()   # once written, a policy request waits out the rest of the deadline
                    reader = ResponseReader(echo, self._require_id)
                    try:
                        await conn.exchange(request, reader)
                    except BaseException:   # cancelled: the deadline, a cutoff, or the caller
                        conn.abort()
                        raise
                    self._release(loop, target, conn, reader)
                    if fresh or not (idempotent and reader.unanswered):
                        break
                    conn = None   # a reused connection the backend had closed: once more on a new one
                result = reader.result
                held = fresh or not reader.unanswered   # a reused connection closed while idle: no sign
            else:
                held = True
            move_on = idempotent and held and result.__class__ is Failure and result.kind in DOWN_KINDS
            ended = loop.time()
        except asyncio.CancelledError:
            result = self._cut_off(loop, target, deadline, cutoff, started)
            if result is None:
                raise
            move_on, held, ended = True, True, loop.time()
        except Exception as exc:   # raised before any byte of the request was written
            result, move_on, held, ended = failure_for(exc, target.where), True, True, loop.time()
        finally:
            if cutoff is not None:
                cutoff.disarm()
        outcome = "ok" if result.__class__ is HttpResult else result.kind
        self._observer.exchange(target.url, outcome, ended - started)
        if target.down_until or outcome in DOWN_KINDS:
            self._health(target, result, ended, held)
        if outcome == "stray":
            self._stray(target, f"request {request_id}: {result.detail}")
        return result, move_on

    def _stray(self, target, what: str):
        """An answer that was not its request's: counted, and logged once per connection (it is
        closed)."""
        self._observer.stray(target.url)
        log.warning("endpoint=%s backend %s: %s; connection closed", self.endpoint.name, target.where,
                    what)

    def _cut_off(self, loop, target, deadline, cutoff, started: float):
        """The Failure of an attempt its cutoff ended, or None for a cancellation that ends the call:
        the deadline's (a timeout of this target too) or the caller's."""
        target.probing = False
        if cutoff is not None and cutoff.expired:
            uncancel(deadline.task)
            if not deadline.expired:
                return Failure("timeout", f"{target.where}: no answer in its share of the "
                                          "request-timeout; the next target is asked")
        if deadline.expired:
            ended = loop.time()
            self._observer.exchange(target.url, "timeout", ended - started)
            self._down(target, ended, f"no answer within {self._timeout:g} s")
        return None

    def _health(self, target, result, ended: float, held: bool):
        """Down after a failure of its connection (``held`` against it: not the race with a backend
        closing an idle one), up after anything else."""
        if result.__class__ is not Failure or result.kind not in DOWN_KINDS:
            if target.down_until:
                log.warning("endpoint=%s backend %s is up again", self.endpoint.name, target.where)
            target.succeeded()
        elif held:
            self._down(target, ended, f"{result.kind}: {result.detail}")
        else:
            target.probing = False

    def _down(self, target, ended: float, why: str):
        """``target`` failed: down, with a WARNING line if it was up (a change, not every failure)."""
        if not target.down_until:
            others = "; the other targets are asked meanwhile" if len(self._targets) > 1 else ""
            log.warning("endpoint=%s backend %s is down (%s); retried in %g s%s", self.endpoint.name,
                        target.where, why, target.first, others)
        target.failed(ended)

    def _new_loop(self, loop):
        """Connections pooled on another loop (a previous asyncio.run, or the parent of a forked
        worker) are forgotten, never touched: their transports belong to that loop."""
        for target in self._targets:
            closed = target.pool.closed
            target.pool = Pool()
            target.pool.closed = closed
            target.pipeline = self._pipeline(target)
            if closed and target.pipeline is not None:
                target.pipeline.close()
        self._loop = loop
        self._deadlines = Deadlines(self._timeout)
        self._first_cutoffs = Deadlines(self._timeout * ATTEMPT_SHARE)

    def _pipeline(self, target):
        """The target's Pipeline with ``pipelining``, else None."""
        if not self.endpoint.pipelining:
            return None
        where = f"endpoint={self.endpoint.name} backend {target.where}"
        return Pipeline(self._timeout, partial(log.warning, "%s: pipelining off for %g s (%s)", where), target.on_stray)

    @staticmethod
    def _release(loop, target, conn, reader):
        if reader.keep_alive and reader.result.status in REUSABLE_STATUSES:
            now = loop.time()
            conn.echoes = reader.echoed
            pipeline = target.pipeline
            if pipeline is None or not reader.echoed or not pipeline.adopt(conn, loop, now):
                target.pool.put(conn, now)
        else:
            conn.abort()


class _Unusable:
    """Stands in for the request template of a target that cannot be used."""

    def __init__(self, failure: Failure):
        self.failure = failure

    def lookup(self, items, request_id, auth=b""):
        raise Failed(self.failure)

    policy = lookup
