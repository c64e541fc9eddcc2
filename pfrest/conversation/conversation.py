"""The conversation with one Postfix client, on the event loop: the very same code for ``pfrest handle``
(fd 0/1 from spawn(8), xinetd or systemd) and for every connection ``pfrest serve`` accepts.

Bytes in go to the mode's decoder; what comes out is answered in order, one request at a time: protocol
rejects and prompts at once, requests through the backend, each reply in one write.  A mode whose
server speaks first (dovecot-sasl) has its greeting written at connect; an answer that must end the
connection (dovecot-sasl's temporary failure) ends it once written.  Requests may arrive in pieces
or several in one read (pipelined); beyond MAX_QUEUED waiting, reading pauses.

Timeouts, all by one lazily re-armed timer (no timer churn per request):
- idle: no request for the endpoint's idle limit since the last read or reply: close quietly;
- partial request: a request not complete within the partial-request limit of its first byte (a deadline
  per request, not per read, so that a client dripping a byte at a time is dropped as surely as one that
  stops): close, with a warning;
- write: a client that takes none of our replies for WRITE_TIMEOUT (Postfix's own I/O timeout): abort.
While a request is with the backend, its request-timeout bounds the wait instead.  The limits are the
service's as of the last request (or reload), so a connection a reload disowned keeps them.

Ends: EOF after the last request (replies still owed are written first), a protocol error (``Close``),
a timeout, ``close_when_idle()`` at the next request boundary (drain), ``reconsider()`` after a reload
that disowns the connection (at once, or after the reply to the request with the backend), ``abort()``.
"""

import asyncio
import logging
import socket
import struct
import time
from collections import deque
from functools import partial

from pfrest import log as logs
from pfrest import tracing
from pfrest.backend.request import new_request_id
from pfrest.conversation import requestlog
from pfrest.protocol.framing import Close, Prompt, Reject

log = logging.getLogger("pfrest")

MAX_QUEUED = 64         # decoded items waiting to be answered before reading pauses
WRITE_TIMEOUT = 100.0   # seconds a client may leave our replies unread (Postfix's own I/O timeout)
NO_LINGER = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends a reset, not FIN (_reset)


class Conversation(asyncio.Protocol):
    """One Postfix connection.  ``services.current(origin)`` gives the service for each request;
    ``on_end(conversation)`` is called once the connection is closed and no request is in flight."""

    def __init__(self, services, origin, peer, on_end=None):
        self.loop = asyncio.get_running_loop()
        self.services, self.origin, self.peer, self.on_end = services, origin, peer, on_end
        self.service = services.current(origin)
        self.generation = services.generation
        self.mode_name = self.service.mode.name
        self.limits = self._limits(self.service)   # (partial-request, idle) seconds, kept if disowned
        self.decoder = self.service.mode.decoder()
        self.items = deque()
        self.transport = None
        self.answering = None        # the task answering the current request
        self.closing = False         # end at the next request boundary
        self.eof = self.lost = self.reading_paused = self.writing_paused = False
        self.last_io = self.loop.time()
        self.partial_since = None    # when the first byte of the request now arriving came
        self.timer = self.timer_at = self.write_timer = None
        self.span = None             # with tracing: the current request's span

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        if self.closing:   # drained or disowned before the loop got to it
            return self._end()
        greeting = self.service.mode.greeting()
        if greeting:
            self._write(greeting)
        self._arm()

    def data_received(self, data):
        now = self.last_io = self.loop.time()
        was_pending = self.decoder.pending
        items = self.decoder.feed(data)
        if not self.decoder.pending:
            self.partial_since = None
        elif items or not was_pending:  # a request began in this read
            self.partial_since = now
        if items:
            self.items.extend(items)
            self._pump()
            if len(self.items) >= MAX_QUEUED and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
        else:
            self._arm()

    def eof_received(self):
        self.eof = True
        if self.decoder.pending:
            log.warning("endpoint=%s peer=%s closed the connection in the middle of a request",
                        self.origin.endpoint, self.peer)
        self._pump()
        return True  # keep writing the replies still owed

    def connection_lost(self, exc):
        self.lost = True
        self._cancel_timers()
        if exc is not None and not self.eof:
            log.info("endpoint=%s peer=%s connection lost: %s", self.origin.endpoint, self.peer, exc)
        self._ended()

    def pause_writing(self):
        self.writing_paused = True
        self.write_timer = self.loop.call_later(WRITE_TIMEOUT, self._write_timeout)

    def resume_writing(self):
        self.writing_paused = False
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        self._pump()

    # --- for the listener -------------------------------------------------------------------------

    def close_when_idle(self):
        """End the conversation at the next request boundary: now if it is idle; after the replies
        owed for what has been received otherwise."""
        self.closing = True
        self._pump()

    def abort(self):
        """End it now, requests in flight included (a drain that ran out of time)."""
        if self.answering is not None:
            self.answering.cancel()
        if self.transport is not None:
            self.transport.abort()

    def reconsider(self):
        """After a reload: if the endpoint no longer takes this connection (removed, another protocol,
        moved, or its peer no longer allowed), end it: now, or after the reply to the request the backend
        has.  Nothing else on it would be answered: a partial request or requests still queued would
        only be closed once complete or due, so they are closed now."""
        if self._service() is None:
            self.items.clear()
            self.closing = True
            if self.answering is None:
                self._disowned()

    # --- answering --------------------------------------------------------------------------------

    def _pump(self):
        """Answer what has been received, in order, as far as possible now."""
        if self.transport is not None and self.transport.is_closing():   # Answer.close or abort() ended it
            return
        while self.items and self.answering is None and not self.writing_paused and not self.lost:
            item = self.items.popleft()
            if isinstance(item, Close):
                log.warning("endpoint=%s peer=%s protocol error, closing: %s", self.origin.endpoint,
                            self.peer, item.why)
                return self._end()
            if isinstance(item, Prompt):
                self._write(item.reply)
                continue
            if isinstance(item, Reject):
                log.warning("endpoint=%s peer=%s bad request: %s", self.origin.endpoint, self.peer, item.why)
                refusal = self.service.mode.refusal if self.service is not None else None
                if refusal is not None:
                    self.service.stats.record(refusal, 0.0, None, now=time.monotonic())
                self._write(item.reply)
                continue
            service = self._service()
            if service is None:
                return self._disowned()
            self._start(service, item)
        if self.reading_paused and len(self.items) < MAX_QUEUED // 2 and not self.lost:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.answering is None and not self.items:
            if self.closing and self.service is None:
                self._disowned()
            elif self.eof or (self.closing and not self.decoder.pending):
                self._end()
            else:
                self._arm()

    def _disowned(self):
        if self.transport is None or not self.transport.is_closing():   # said once
            log.info("endpoint=%s peer=%s closing: the endpoint no longer takes this connection",
                     self.origin.endpoint, self.peer)
        self._end()

    def _service(self):
        """The service for the next request: the same unless a reload happened since the last one."""
        if self.generation != self.services.generation:
            self.generation = self.services.generation
            svc = self.services.current(self.origin)
            self.service = svc if svc is not None and svc.mode.name == self.mode_name else None
            self.limits = self._limits(self.service) or self.limits
        return self.service

    @staticmethod
    def _limits(service):
        return service and (service.endpoint.partial_limit, service.endpoint.idle_limit)

    def _start(self, service, request):
        # time.monotonic, not loop.time: uvloop's clock ticks in milliseconds
        request_id, started = new_request_id(), time.monotonic()
        cached = service.answer_cached(request, request_id)
        token = None
        if tracing.tracer is not None:   # the span is current while the task asking the backend is made
            self.span, token = tracing.start_request(service, request_id, "local" if cached is not None else
                                                     "miss" if hasattr(service.backend, "peek") else "none")
        try:
            if cached is not None:  # no backend request: answered without a task
                self._finish(service, request, cached[0], cached[1], request_id, started)
                return
            stored = service.answer_stored(request)
            if stored is None:
                self.answering = self.loop.create_task(self._ask(service, request, request_id, started))
            else:  # the shared cache may have it: still no task until it turns out not to
                self.answering = stored
                stored.add_done_callback(partial(self._stored, service, request, request_id, started))
        finally:
            if token is not None:
                tracing.current_done(token)

    def _stored(self, service, request, request_id, started, stored):
        self.answering = None
        if stored.cancelled():   # abort(): the connection is gone already
            return self._ended()
        result = stored.result()[0]
        if self.lost:
            return self._ended()
        if result is not None and self.span is not None:
            self.span.set_attribute("pfrest.cache", "shared")
        if result is None:   # not there fresh: the backend, with what the store had for a stale answer
            self.answering = self.loop.create_task(self._ask(service, request, request_id, started,
                                                             stored.result()))
            return
        self._finish(service, request, result, service.mode.answer(request, result, request_id), request_id,
                     started)
        self._pump()

    async def _ask(self, service, request, request_id, started, stored=None):
        try:
            result, answer = await service.answer(request, request_id, stored)
        except asyncio.CancelledError:  # abort(): the connection is gone already
            self.answering = None
            self._ended()
            raise
        self.answering = None
        self._finish(service, request, result, answer, request_id, started)
        if self.lost:
            self._ended()
        else:
            self._pump()

    def _finish(self, service, request, result, answer, request_id, started):
        now = time.monotonic()
        ms = (now - started) * 1000
        reply = service.stats.record(answer.verdict, ms, result, answer.action, now)
        if self.span is not None:
            tracing.end_request(self.span, reply)
            self.span = None
        if service.log_all or service.worth_logging(reply, result):
            warning = requestlog.warns(result, answer)
            if log.isEnabledFor(logging.WARNING if warning else logging.INFO):
                logs.request(requestlog.line(service.endpoint.name, request_id, service.mode.subject(request),
                                             result, answer, ms), warning)
        if answer.reply:
            self._write(answer.reply)
        if answer.close:
            self._reset()

    def _write(self, reply):
        if not self.lost and not self.transport.is_closing():
            self.transport.write(reply)
            self.last_io = self.loop.time()

    # --- timeouts and the end ---------------------------------------------------------------------

    def _deadline(self):
        partial_limit, idle_limit = self.limits
        if self.decoder.pending:
            return self.partial_since + partial_limit
        if self.answering is not None or self.items:
            return None  # the backend's request-timeout bounds the wait
        return self.last_io + idle_limit

    def _arm(self):
        deadline = self._deadline()
        if deadline is None or self.lost or (self.timer is not None and self.timer_at <= deadline):
            return  # a timer that fires earlier re-checks then
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at, self.timer = deadline, self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self):
        self.timer = None
        deadline = self._deadline()
        if deadline is None:
            return
        if deadline > self.loop.time():
            return self._arm()
        if self.decoder.pending:
            log.warning("endpoint=%s peer=%s closing: timeout with a partial request",
                        self.origin.endpoint, self.peer)
        self._end()

    def _write_timeout(self):
        log.warning("endpoint=%s peer=%s closing: replies not read for %.0f s", self.origin.endpoint,
                    self.peer, WRITE_TIMEOUT)
        self.abort()

    def _end(self):
        """Close after the replies already written have gone out."""
        self.items.clear()
        self._cancel_timers()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _reset(self):
        """End the connection so that the client's next write fails (an Answer that closes: a dovecot-sasl
        temporary failure).  Over TCP that takes a reset: Postfix before 3.7.15, 3.8.10, 3.9.4 and 3.10.2
        keeps an auth connection the server ended with FIN, writes its next AUTH into it (which succeeds)
        and reads the end again, failing a second login; after a reset its read fails with an error, and
        a connection with an error is replaced at the next login.  A unix socket needs none: a write to
        a closed peer fails at once."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, NO_LINGER)
            except OSError:
                pass   # the connection is gone already
        self._end()

    def _cancel_timers(self):
        for timer in (self.timer, self.write_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.write_timer = None

    def _ended(self):
        if self.lost and self.answering is None and self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end(self)
