"""The shared cache (``cache-url``): a Redis or Valkey that the pfrest processes of a site share, behind
each process's own cache (cache/local.py).  An answer one host fetched from the backend is there for every
other host and worker, so that the backend sees each miss about once for the whole fleet.

It must never make pfrest less available than it is without it:
- every call a lookup waits for is bounded by ``cache-timeout``, ended by cancellation on the event
  loop (one timer for all, deadline.Deadlines); a lookup waits for one call at most, its GET: entries
  are written after the answer went to Postfix, in the background;
- the calls go over one connection, pipelined (redispipe.Pipe): a call given up on at its deadline
  leaves the connection as it was, and connecting (TCP, TLS, AUTH, SELECT: several round trips) is
  never on a lookup's clock: a *probe*, in the background within PROBE_TIMEOUT, connects and writes
  PROBE_KEY before lookups use the store, at the start and after each outage (a write, so that a store
  that refuses writes stays skipped); lookups that come while the first probe is under way (a
  handle's first, often its only one) wait for it, within their cache-timeout, and writes are held
  for it; ``close`` lets the last writes finish (each within cache-timeout), so that what a handle
  fetched reaches the store before it exits;
- a store whose calls keep failing, or that refuses, is *skipped*: lookups go straight to the backend,
  as without it, until a probe after a back-off finds it answering again (sharedhealth.py says when);
- what it returns is never taken on trust: an entry names its key (sharedformat), so that a reply
  meant for another request (a connection out of step) is a failure, never an answer; the connection
  is then dropped.

Batching: a call through redis-py costs some 50 us of CPU, even pipelined (measured: 19 us for the
same bytes over a bare asyncio stream), more than a whole lookup answered from the local cache.  So
the GETs of one turn of the event loop go out as one MGET, and the writes of WRITE_DELAY as one script
call (sharedformat.WRITE_SCRIPT).  Beside it: the invalidation channel (invalidation.py); with Sentinel,
the primary the sentinels name (sentinel.py); with cache-read-url, a replica for the reads (replica.py).
"""

import asyncio
import logging
import time

from pfrest.backend.deadline import Deadlines, uncancel
from pfrest.backend.observer import NOBODY
from pfrest.cache import invalidation, redisclient, replica, sentinel, sharedformat
from pfrest.cache.redispipe import Lost, Pipe
from pfrest.cache.sharedformat import Mismatch
from pfrest.cache.sharedhealth import BACKOFF_MAX, Failed, StoreHealth
from pfrest.config import sentinelurl

log = logging.getLogger("pfrest")

MAX_BATCH = 256        # keys per MGET, per write
# seconds writes wait, so that those of many lookups go out as one call (a call costs as much CPU as
# a whole lookup; nobody waits for a write: the answer went to Postfix already)
WRITE_DELAY = 0.002
PROBE_KEY = "probe"    # NAMESPACE:probe, never a lookup's key (those are NAMESPACE:name=...)
PROBE_TTL_MS = 1000
PROBE_TIMEOUT = 2.0    # seconds a probe may take: connecting over TLS, on another host of the site
RECANCEL = 0.02        # seconds between cancellations of the background tasks at the end


class SharedStore:
    """The shared cache of one endpoint in one process.  ``get`` and ``put`` are for the local cache
    (cache.CachingClient), which ``start`` tells of invalidations."""

    def __init__(self, endpoint, observer=NOBODY, clock=time.time):
        self.name, self.url = endpoint.name, endpoint.cache_url
        self.where = redisclient.where(endpoint.cache_url)
        # with Sentinel, the server is the primary the sentinels name, asked again by each probe
        self.locator = sentinel.Locator(self.url, self.name, self.where) if sentinelurl.is_sentinel(self.url) \
            else None
        self.server_url = None if self.locator else self.url   # where the connections go (a secret)
        self.replica = endpoint.cache_read_url and replica.ReadReplica(self.name, endpoint.cache_read_url, observer)
        try:
            self.namespace = sharedformat.namespace(endpoint)
        except OSError as exc:   # the client-cert (TLS to the backend fails too, unless it is a link)
            self.namespace = sharedformat.alone(endpoint)
            log.warning("endpoint=%s shared cache: cannot read client-cert %s without following a link (%s): "
                        "this process shares no answers", self.name, endpoint.client_cert, exc.strerror)
        self.timeout_ms = endpoint.cache_timeout
        self.observer = observer
        self.clock = clock                  # wall clock: entries carry instants every host reads alike
        # used or skipped, and when to probe again: with Sentinel, soon (a new primary may be named)
        self.health = StoreHealth(self.name, self.where, sentinel.BACKOFF_MAX if self.locator else BACKOFF_MAX)
        self.ready = False                  # a probe has succeeded since the start
        self.on_invalidation = None         # f(params list, or None for all): the local cache's
        self.closed = False
        self._loop = self._pipe = self._deadlines = self._background = self._up = None
        # reads waiting for the end of this turn, writes for WRITE_DELAY: at most one per lookup in flight
        # (bounded by every endpoint's max-connections), sent MAX_BATCH a call
        self._gets, self._puts = [], []
        self._reads_scheduled, self._write_timer = False, None
        self._tasks = set()
        self._writes = set()                # the tasks of _write among them

    # --- for the local cache ------------------------------------------------------------------------

    def start(self, on_invalidation):
        """Hear invalidations from now on (at once when called on the event loop, as serve and handle
        do; else from the first lookup)."""
        self.on_invalidation = on_invalidation
        try:
            self._bind(asyncio.get_running_loop())
        except RuntimeError:
            pass

    @property
    def up(self) -> bool:
        """Used now: probed, and not skipped."""
        return self.ready and not self.health.down_until

    @property
    def starting(self) -> bool:
        """The first probe is under way: lookups wait for it (within cache-timeout), writes are held."""
        return not self.ready and not self.health.down_until and not self.closed and self._loop is not None

    async def until_up(self):
        """Return once the store is used (at once if it is), or closed."""
        while not self.up and not self.closed:
            await self._up.wait()

    def key(self, params) -> bytes:
        return sharedformat.key(self.namespace, params)

    def get(self, rkey: bytes):
        """A future of the Entry for ``rkey`` (None: there is none, or the store failed), or None at
        once while the store is skipped."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        if self.starting:
            # the first probe is under way: a handle's first lookup comes at once, and is often its
            # only one (postmap -q through spawn), so it waits for the probe, within cache-timeout
            future = loop.create_future()
            self._gets.append((rkey, future))
            loop.call_later(self.timeout_ms / 1000, _give_up, future)
            return future
        if not self.up or self.closed:
            if self.health.down_until and not self.closed and self.health.usable(loop.time()):
                self._spawn(self._probe())
            self.observer.shared("skip")
            return None
        if self.replica is not None and self.replica.due(loop.time()):
            self._spawn(self.replica.probe())
        future = loop.create_future()
        self._gets.append((rkey, future))
        self._schedule_reads()
        return future

    def put(self, rkey: bytes, result, fresh: float, stale: float, revalidate: float = 0.0):
        """Keep ``result`` for ``fresh`` seconds, ``stale`` more as a stale answer, ``revalidate`` more
        answered at once while refreshed; with all 0, remove what is kept for ``rkey`` (the backend's
        last word is not to be contradicted)."""
        if self.closed or self._loop is None or not (self.up or self.starting):
            return
        if fresh <= 0 and stale <= 0 and revalidate <= 0:
            self._puts.append((rkey, None, 0))
        else:
            self._puts.append((rkey, *sharedformat.entry(rkey, result, self.now_ms(), fresh, stale, revalidate)))
        self._schedule_writes()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def close(self):
        """No more calls (those in flight end); returns the task that closes the connections, or None
        when there is nothing to close."""
        if self.closed or self._loop is None or self._loop.is_closed():
            self.closed = True
            return None
        self.closed = True
        self._up.set()   # until_up returns
        return self._loop.create_task(self._close())

    async def _close(self):
        # the writes of the last answers first (a handle ends right after its answer): each is bounded
        # by cache-timeout already
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._send_writes()
        if self._writes:
            await asyncio.wait(self._writes)
        # cancelled again every RECANCEL seconds: a library may swallow a cancellation (async-timeout
        # 4.0.2, under redis-py 4.3's reads, does when its own timer fires in the same turn; a handle
        # then hung at its exit).  They also end at their next look at ``closed`` (invalidation.POLL,
        # sentinel.RECHECK).
        deadline = self._loop.time() + redisclient.CLOSE_TIMEOUT
        while not self._background.done() and self._loop.time() < deadline:
            self._background.cancel()
            await asyncio.wait([self._background], timeout=RECANCEL)
        if self._pipe is not None:
            await redisclient.quietly(self._pipe.close())
        if self.replica is not None:
            await self.replica.close()

    def reprobe(self):
        """Probe now (sentinel.watch: another primary); lookups use the old one until it succeeds."""
        return None if self.closed or self._loop is None else self._spawn(self._probe())

    # --- for the invalidation channel ---------------------------------------------------------------

    def invalidated(self, lookups):
        """An invalidation heard (params tuples, or None: every answer); writes not sent yet go too."""
        if lookups is None:
            self._puts.clear()
        elif self._puts:
            dropped = {self.key(params) for params in lookups}
            self._puts = [put for put in self._puts if put[0] not in dropped]
        if self.on_invalidation is not None:
            self.on_invalidation(lookups)

    # --- the calls ----------------------------------------------------------------------------------

    def _bind(self, loop):
        """Work on ``loop``; connections made on another one (a parent's, before a fork) are left to it."""
        self._loop, self._pipe = loop, None
        self._deadlines = Deadlines(self.timeout_ms / 1000)
        if self._write_timer is not None:
            self._write_timer.cancel()
        self._gets, self._puts, self._reads_scheduled, self._write_timer = [], [], False, None
        self.ready = False
        self._up = asyncio.Event()      # set while up
        if self._background is not None:
            self._background.cancel()
        if not self.closed:
            # the invalidation channel and, with Sentinel, a watch on the primary they name
            self._background = asyncio.gather(invalidation.listen(self),
                                              *([sentinel.watch(self)] if self.locator else []),
                                              *([replica.watch(self)] if self.replica else []))
            # (a gathering future logs its children's cancellation at close as an exception not retrieved)
            self._background.add_done_callback(lambda future: future.cancelled() or future.exception())
            self._spawn(self._probe())
            if self.replica is not None:
                self.replica.bind(self._spawn)

    def _schedule_reads(self):
        if not self._reads_scheduled:
            self._reads_scheduled = True
            self._spawn(self._send_reads())   # its first step comes after the other gets of this turn

    def _schedule_writes(self):
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(WRITE_DELAY, self._send_writes)

    async def _send_reads(self):
        """The reads of this turn of the loop: one MGET per MAX_BATCH keys (the first in this task).
        Held while the first probe is under way (it sends them when it ends); given up while the store
        is skipped."""
        self._reads_scheduled = False
        if self.starting:
            return
        gets, self._gets = self._gets, []
        if not self.up:
            for _, future in gets:
                _give_up(future)
            return
        for start in range(MAX_BATCH, len(gets), MAX_BATCH):
            self._spawn(self._read(gets[start:start + MAX_BATCH]))
        await self._read(gets[:MAX_BATCH])

    def _send_writes(self):
        """The writes of the last WRITE_DELAY: one call per MAX_BATCH keys.  Held and dropped as reads."""
        self._write_timer = None
        if self.starting:
            return
        puts, self._puts = self._puts, []
        if self.up:
            for start in range(0, len(puts), MAX_BATCH):
                self._writes.add(self._spawn(self._write(puts[start:start + MAX_BATCH])))

    def _spawn(self, coroutine):
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._writes.discard)
        return task

    async def _read(self, batch):
        """One MGET: on the read replica while it is used (its failures are its own), else the primary."""
        keys = [rkey for rkey, _ in batch]
        entries = [None] * len(batch)
        replica = self.replica if self.replica is not None and self.replica.up else None
        pipe, failed = (self._pipe, self._failed) if replica is None else (replica.pipe, replica.failed)
        try:
            values = await self.call("MGET", *keys, pipe=pipe)
            if not isinstance(values, list) or len(values) != len(keys):
                raise Mismatch(f"a reply of {type(values).__name__} to an MGET of {len(keys)} keys")
            entries = [sharedformat.decode(rkey, value) for rkey, value in zip(keys, values)]
        except Failed as exc:
            failed(str(exc), exc.at_once)
        except Mismatch as exc:
            self._drop(pipe) if replica is None else replica.drop()
            failed(f"a reply that is not for the request: {exc}", at_once=True)
        else:
            (self.health if replica is None else replica.health).call_succeeded()
            for _ in keys:   # metrics: reads by store
                self.observer.shared("read-primary" if replica is None else "read-replica")
        finally:   # every lookup gets its answer, whatever happened (a cancellation at exit included)
            for (_, future), entry in zip(batch, entries):
                if not future.done():
                    future.set_result(entry)

    async def _write(self, batch):
        keys, args = [], []
        for rkey, value, milliseconds in batch:
            keys.append(rkey)
            args += [value or b"", milliseconds]
        try:
            await self.call("EVAL", sharedformat.WRITE_SCRIPT, len(keys), *keys, *args)
        except Failed as exc:
            self._failed(str(exc), exc.at_once)
        else:
            self._succeeded()

    async def _probe(self):
        """A new connection (the one of before an outage may be to a server that is gone), and a write;
        then the lookups use it."""
        pipe, url = None, self.url
        try:
            if self.locator is not None:
                url = await asyncio.wait_for(self.locator.primary(), PROBE_TIMEOUT)
            pipe = await asyncio.wait_for(Pipe.open(url, self._lost), PROBE_TIMEOUT)
            await asyncio.wait_for(pipe.call("SET", f"{self.namespace}:{PROBE_KEY}", b"1", "PX", PROBE_TTL_MS),
                                   PROBE_TIMEOUT)
        except (asyncio.TimeoutError, *redisclient.ERRORS, Lost) as exc:
            why = f"no reply to a probe within {PROBE_TIMEOUT:g} s" if isinstance(exc, asyncio.TimeoutError) \
                else redisclient.describe(exc)
            self._failed(why if self.locator is None else self.locator.primary_failed(why), probe=True)
        except sentinel.NoPrimary as exc:
            self._failed(str(exc), probe=True)
        else:
            if not self.closed:
                self._drop(self._pipe, self.timeout_ms / 1000)   # a primary's before a failover, say
                self._pipe, pipe, self.server_url = pipe, None, url
                self._succeeded(probe=True)
        finally:
            if not self.closed:   # what waited for the first probe: sent, or given up
                if self._gets:
                    self._schedule_reads()
                if self._puts:
                    self._schedule_writes()
            if pipe is not None:
                await redisclient.quietly(pipe.close())

    async def call(self, *args, pipe=None):
        """The reply to a command on the connection (the primary's, unless ``pipe`` is given), within
        cache-timeout; Failed when none comes in time, or it is an error.  refresh.py's lock too."""
        pipe = pipe or self._pipe
        if pipe is None:   # dropped in this turn of the loop; a probe makes a new one
            raise Failed("no connection", at_once=True)
        deadline = self._deadlines.start(self._loop, asyncio.current_task())
        try:
            return await pipe.call(*args)
        except asyncio.CancelledError:
            if not deadline.expired:
                raise   # the process is ending
            uncancel(deadline.task)
            raise Failed(f"no reply within cache-timeout ({self.timeout_ms} ms)") from None
        except Lost as exc:
            raise Failed(f"connection lost: {exc}", at_once=True) from None
        except redisclient.ERRORS as exc:
            raise Failed(redisclient.describe(exc), isinstance(exc, redisclient.REFUSALS)) from None
        finally:
            self._deadlines.finish(deadline)

    def _lost(self, pipe, why):
        """The connection ``pipe`` is gone (reset, closed by the server): skipped until a probe makes a
        new one."""
        if pipe is self._pipe:
            self._failed(f"connection lost: {why}", at_once=True)

    def _drop(self, pipe, grace=0.0):
        """Close ``pipe``, at once or after ``grace`` seconds (a pipe replaced: its calls end first)."""
        if pipe is not None:
            if pipe is self._pipe:
                self._pipe = None
            self._loop.call_later(grace, lambda: self._spawn(redisclient.quietly(pipe.close())))

    # --- health -------------------------------------------------------------------------------------

    def _succeeded(self, probe=False):
        """A call that worked (sharedhealth: only a probe ends a skip); after a probe, lookups use it."""
        self.health.call_succeeded(probe)
        if probe:
            self.ready = True
            self._up.set()

    def _failed(self, why, at_once=False, probe=False):
        """A call that failed (sharedhealth: when it skips the store).  Once closed, calls still under
        way fail as their connections close: that says nothing about the store."""
        if self.closed:
            return
        self.observer.shared("error")
        if self.health.call_failed(self._loop.time(), why, at_once, probe):
            self._up.clear()


def _give_up(future):
    """A lookup's read of the store ends without an entry (its cache-timeout passed, or the store is
    skipped): the lookup goes to the backend."""
    if not future.done():
        future.set_result(None)
