"""Lookups pipelined to one target (``pipelining``): several requests in one write on a proven keep-alive
connection, their answers read in order.  Fewer system calls per lookup under load: the lookups that
Postfix's connections start in one turn of the event loop go out in one write, and their answers come
back in one or a few reads.

Only lookups (GET, idempotent) are pipelined; a policy request or a login never shares a connection
(config refuses the key for those modes).  The guarantees of the single path hold:
- an answer is only its own request's.  HTTP/1.1 matches answers to requests by their order alone, so
  only a connection whose last answer echoed its request's X-Request-Id is *proven* and taken, and
  every answer on it must echo its own request's id: a copy of an earlier answer, answers out of order
  and an answer without the echo are "stray" (the request it came for gets the Failure, the connection
  is closed);
- a request that did not get its answer on the pipeline (the connection closed, broke or stalled
  behind another) resolves to None, and the caller sends it once more on a connection of its own,
  within its own deadline: lookups are idempotent;
- one slow key does not hold the others: when the oldest request on a connection has had no complete
  answer for the stall time (min(STALL_MAX, request-timeout * STALL_SHARE)), those behind it are sent
  again elsewhere at once, and the connection takes no more;
- a request whose caller stopped waiting (its deadline passed, Postfix was answered) before the write is
  never written; one already written has its answer read and dropped;
- after a stall, a stray answer or a connection ended with requests unanswered, the target is asked one
  request at a time for PIPELINE_OFF seconds (a WARNING line when it turns off), as without the key.
Bounds: PIPELINE_DEPTH requests in flight per connection, MAX_PIPELINED connections per target; each
answer has response.py's limits.
"""

from collections import deque

from pfrest.backend.pool import IDLE_REUSE_LIMIT
from pfrest.backend.response import ResponseReader
from pfrest.protocol.verdict import Failure, HttpResult

PIPELINE_DEPTH = 16     # requests in flight on one connection at most
MAX_PIPELINED = 8       # proven connections a target keeps pipelining on; more requests go one at a time
PIPELINE_OFF = 60.0     # seconds a target is asked one request at a time after its pipeline failed
STALL_MAX = 1.0         # seconds the oldest request may wait with others queued behind it ...
STALL_SHARE = 0.1       # ... or this share of request-timeout, if less
REUSABLE_STATUSES = (200, 404)   # as the client's: after any other answer, the connection is closed


class _Request:
    __slots__ = ("request_id", "future", "data")

    def __init__(self, request_id: bytes, future, data: bytes):
        self.request_id, self.future, self.data = request_id, future, data


class _Answers(ResponseReader):
    """ResponseReader's rules for each answer of a stream, one after the other with one parser, each
    required to echo its request's X-Request-Id.  The owner (Pipelined) hears of each answer
    (``answered``) and of the end (``broken``: a Failure, and whether an answer was expected)."""
    __slots__ = ("_owner", "_armed", "_broken")

    def __init__(self, owner):
        super().__init__(None, True)
        self._owner = owner
        self._armed = self._broken = False
        self.done = True   # until armed: nothing is expected, and a byte is stray

    def arm(self, request_id: bytes):
        """The next answer is ``request_id``'s.  Its head and framing are counted from the end of the
        read in progress (the bytes of that read before it belong to earlier answers): a head may so
        grow by one read past MAX_HEAD before it fails, still a bound."""
        self.done, self.result, self.keep_alive, self.started, self.echoed = False, None, False, False, False
        self._request_id, self._fields, self._head_done = request_id, 0, False
        self._base, self._armed = self._horizon, True
        self._new_message()

    def feed(self, data: bytes):
        if self._parser is not None and not self._broken:
            self._parse(self._parser, data)

    def on_message_begin(self):
        self.started = True
        super().on_message_begin()

    def _check_request_id(self):
        if self._echo != self._request_id:
            raise self.fail("stray", "pipelined answer with the X-Request-Id of another request"
                            if self._echo is not None else "pipelined answer without X-Request-Id")
        self.echoed = True

    def finish(self, keep_alive: bool):
        super().finish(keep_alive)
        if self.result.__class__ is HttpResult:
            self._armed = False
            self._owner.answered(self.result, self.keep_alive)   # arms the next answer, if one is awaited

    def fail(self, kind: str, detail: str):
        stop = super().fail(kind, detail)
        if not self._broken:
            self._broken = True
            # once the owner ended with requests written on it (after an answer it closes after: a 500,
            # Connection: close, the head of a stalled connection), the bytes still in this read are
            # their answers: not stray, and no reason to turn pipelining off
            if not self._owner.abandoned:
                self._owner.broken(self.result, self._armed and self.started)
        return stop


class Pipelined:
    """The reader of one proven connection for as long as it lives (Connection.carry): the requests in
    flight on it, in order, and those to be written at the end of this turn of the loop.  ``done``
    turns True once it ended (the Connection then forgets it)."""
    __slots__ = ("conn", "done", "keep_alive", "closing", "idle_since", "abandoned", "_pipe", "_loop",
                 "_answers", "_flight", "_out", "_head_since", "_timer", "_answered", "_stalled")

    def __init__(self, pipe, conn, loop, now: float):
        self.conn, self._pipe, self._loop = conn, pipe, loop
        self.done, self.keep_alive, self.closing = False, True, False
        self.idle_since, self.abandoned = now, False   # abandoned: ended with requests written on it
        self._answers = _Answers(self)
        self._flight = deque()   # written, their answers awaited, oldest first
        self._out = []           # to be written in this turn's one write
        self._head_since = now   # when the oldest request in flight began to wait for its answer
        self._timer = None       # the stall check, while requests are in flight
        self._answered = 0       # answers since the connection was last idle
        self._stalled = False    # its head passed the stall time: those behind it were sent again
        conn.carry(self)

    def room(self) -> bool:
        return not self.closing and len(self._flight) + len(self._out) < PIPELINE_DEPTH

    def load(self) -> int:
        return len(self._flight) + len(self._out)

    def send(self, data: bytes, request_id: bytes):
        """A future for the answer (HttpResult or Failure), or None if the request must go on its own."""
        future = self._loop.create_future()
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(_Request(request_id, future, data))
        return future

    def _flush(self):
        out, self._out = self._out, []
        if self._pipe.filling is self:
            self._pipe.filling = None
        if self.done or self.closing:
            _resend(out)
            return
        out = [r for r in out if not r.future.done()]   # a caller that stopped waiting: never written
        if not out:
            return
        flight = self._flight
        if not flight:
            self._answers.arm(out[0].request_id)
            self._head_since, self._answered = self._loop.time(), 0
        flight.extend(out)
        self.conn.transport.write(b"".join([r.data for r in out]) if len(out) > 1 else out[0].data)
        if self._timer is None:
            self._timer = self._loop.call_at(self._head_since + self._pipe.stall, self._check_stall)

    # --- told by _Answers -----------------------------------------------------------------------

    def answered(self, result: HttpResult, keep_alive: bool):
        flight = self._flight
        request = flight.popleft()
        if not request.future.done():   # else its caller stopped waiting: the answer is dropped
            request.future.set_result(result)
        self._answered += 1
        now = self._head_since = self._loop.time()
        if not keep_alive or result.status not in REUSABLE_STATUSES:
            self.end()   # its answer is sound: the others are sent again, pipelining stays on
        elif flight:
            if self.closing and all(r.future.done() for r in flight):
                self.end()
            else:
                self._answers.arm(flight[0].request_id)
        else:
            self.idle_since = now
            if self.closing or self._pipe.closed:
                self.end()

    def broken(self, failure: Failure, its_own: bool):
        """The stream failed: the oldest request gets ``failure`` if it was about its answer (a malformed or
        stray one, or a connection that broke in the middle of it); the others are sent again."""
        flight = self._flight
        if its_own and flight:
            request = flight.popleft()
            if not request.future.done():
                request.future.set_result(failure)
        elif failure.kind == "stray":
            self._pipe.on_stray()   # bytes that no request asked for, on an idle connection
        unanswered = sum(1 for r in flight if not r.future.done())
        answered = self._answered or its_own
        self.end()
        if failure.kind == "stray":
            self._pipe.off(failure.detail, self._loop.time())
        elif unanswered and answered:   # (a close before any answer: a server dropping an idle connection)
            self._pipe.off(f"{failure.kind}: {failure.detail}, with {unanswered} pipelined requests unanswered",
                           self._loop.time())

    # --- the Connection's reader interface ------------------------------------------------------

    def feed(self, data: bytes):
        self._answers.feed(data)

    def eof(self):
        if not self.done:
            self._answers.eof()   # an answer ending at EOF is answered, one in the middle is broken
            self.end()

    def abort(self, failure: Failure):
        if not self.done:
            self._answers.abort(failure)
            self.end()

    # --- the end --------------------------------------------------------------------------------

    def _check_stall(self):
        """Runs while requests are in flight, at the stall time of the oldest."""
        self._timer = None
        flight = self._flight
        if self.done or not flight:
            return
        now, stall = self._loop.time(), self._pipe.stall
        if not self._stalled:   # (closing already, when pipelining turned off: those behind are sent all the same)
            due = self._head_since + stall
            if now < due:
                self._timer = self._loop.call_at(due, self._check_stall)
                return
            behind = [r for r in list(flight)[1:] if not r.future.done()]
            self.closing = self._stalled = True
            self._pipe.forget(self)
            _resend(behind)
            if behind:
                self._pipe.off(f"an answer took over {stall:g} s; the {len(behind)} requests behind it were "
                               "sent again", now)
        if flight[0].future.done():   # nobody waits for the oldest any more: nothing comes after it
            self.end()
        else:   # the oldest keeps the connection until its answer comes or its caller stops waiting
            self._timer = self._loop.call_at(now + stall, self._check_stall)

    def end(self):
        """Closed, and every request still on it sent again elsewhere."""
        if self.done:
            return
        self.done, self.keep_alive, self.closing = True, False, True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pipe.forget(self)
        self.conn.abort()
        flight, out = self._flight, self._out
        self._flight, self._out, self.abandoned = deque(), [], bool(flight)
        _resend(flight)
        _resend(out)


def _resend(requests):
    for request in requests:
        if not request.future.done():
            request.future.set_result(None)


class Pipeline:
    """The proven connections of one target that carry lookups several at a time, and whether
    pipelining is on for it."""
    __slots__ = ("stall", "filling", "closed", "off_until", "_conns", "_warn", "_stray")

    def __init__(self, timeout: float, warn, on_stray):
        self.stall = min(STALL_MAX, timeout * STALL_SHARE)
        self.filling = None    # the connection this turn's requests go to: its write is pending
        self.closed = False
        self.off_until = 0.0   # loop time until which it is off (0: on)
        self._conns = []       # Pipelined, at most MAX_PIPELINED
        self._warn, self._stray = warn, on_stray

    def send(self, loop, data: bytes, request_id: bytes):
        """A future for the answer of ``data`` on a pipeline (HttpResult, Failure, or None if it must go
        on its own), or None if no proven connection has room (it goes on its own now)."""
        conn = self.filling
        if conn is None or not conn.room():
            now = loop.time()
            if self.off_until:
                if now < self.off_until:
                    return None
                self.off_until = 0.0
            conn = self._pick(now)
            if conn is None:
                return None
            self.filling = conn
        return conn.send(data, request_id)

    def adopt(self, conn, loop, now: float) -> bool:
        """Take a connection whose answer echoed its request's id, if pipelining is on and there is room."""
        if self.closed or len(self._conns) >= MAX_PIPELINED or (self.off_until and now < self.off_until):
            return False
        self._conns.append(Pipelined(self, conn, loop, now))
        return True

    def _pick(self, now: float):
        """The live connection with the fewest requests in flight; those idle too long are closed (a
        server drops idle keep-alive connections on its own schedule: pool.IDLE_REUSE_LIMIT)."""
        best = None
        for conn in list(self._conns):
            if conn.load() == 0 and now - conn.idle_since >= IDLE_REUSE_LIMIT:
                conn.end()
            elif conn.room() and (best is None or conn.load() < best.load()):
                best = conn
        return best

    def forget(self, conn):
        if conn in self._conns:
            self._conns.remove(conn)
        if self.filling is conn:
            self.filling = None

    def off(self, reason: str, now: float):
        """Off for PIPELINE_OFF seconds: its connections take no more requests (idle ones close now)."""
        was_on = not self.off_until or now >= self.off_until
        self.off_until = now + PIPELINE_OFF
        self._let_go()
        if was_on:
            self._warn(PIPELINE_OFF, reason)

    def on_stray(self):
        self._stray()

    def close(self):
        """Idle connections close now, busy ones once their requests are answered."""
        self.closed = True
        self._let_go()

    def _let_go(self):
        conns, self._conns, self.filling = self._conns, [], None
        for conn in conns:
            conn.closing = True
            if conn.load() == 0:
                conn.end()
