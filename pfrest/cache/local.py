"""An answer cache for lookup endpoints, in front of a Client (off unless configured).

Mail traffic repeats itself (the same domains, senders and recipients), so a short-lived cache removes
most backend requests.  Rules:
- found answers live ``cache-ttl`` seconds, not-found answers ``cache-negative-ttl``; errors, timeouts
  and anything that is not a clean found/not-found are never cached, so a flapping backend cannot pin
  a temporary failure (or a wrong answer) in place;
- the backend may shorten that with ``Cache-Control: max-age=N`` or forbid it with ``no-store``;
- stale answers (RFC 5861 stale-if-error): an entry is kept ``cache-stale-if-error`` seconds past its
  lifetime (the backend's ``Cache-Control: stale-if-error=N`` overrides that per answer; no-store and
  no-cache forbid it, as they forbid keeping the answer at all).  In that window it is no hit: the
  backend is asked, and only when it fails temporarily (any Failure, or a 5xx) is the entry the answer,
  marked ``stale``.  Any other answer replaces the entry, or removes it when it is not to be kept;
- refresh ahead (RFC 5861 stale-while-revalidate): an entry is also kept ``cache-stale-while-revalidate``
  seconds past its lifetime (the backend's ``Cache-Control: stale-while-revalidate=N`` overrides that per
  answer); in that window it is answered at once, as a hit, and refreshed in the background
  (refresh.py: bounded, one per key for the fleet with a shared store);
- at most ``cache-max-entries`` entries, stale ones included, least recently used evicted first;
- identical lookups in flight at the same time share one backend request: the first miss starts it as
  a task of its own and every caller awaits it shielded, so a caller that gives up (its Postfix client
  left, its own deadline) never cancels the answer the others wait for;
- policy requests are never cached (each one is about one message).

With a shared cache (``cache-url``, shared.py) there are two levels: this one in front, keeping each
answer ``cache-local-ttl`` seconds at most (so that a change shows fleet-wide within seconds), the
shared store behind it.  A local miss asks the store first (within the same shared flight, so that
concurrent misses of one process still make one request), and the backend only when the store has no
fresh entry, is skipped or fails; the backend's answer then goes to both levels, with its lifetimes.
While the backend fails, an entry of either level within its stale window is the stale answer, so a
host can answer with what another host fetched.  ``peek`` stays what it was: the local level only.

Invalidations (``pfrest cache``, through the shared store's channel or a serve's control socket)
drop answers here with ``invalidate``; a fetch begun before an invalidation keeps its answer to the
callers that waited for it but stores it nowhere (``generation``), since it may predate the change.

The observer hears, per lookup, "hit" (answered without a backend request of its own: a fresh entry,
or another caller's request in flight) or "miss", then "stale" for each stale answer given,
"eviction" for each entry dropped to stay within cache-max-entries, "drop" for each one dropped
by an invalidation and "refresh-OUTCOME" for each refresh ahead (refresh.OUTCOMES); with a shared
store, per local miss, ``shared("hit")`` (a fresh entry there, or one to revalidate) or
``shared("miss")``.
"""

import asyncio
import time
from collections import OrderedDict

from pfrest.backend.observer import NOBODY
from pfrest.cache.refresh import LOCK_MS, Refresher
from pfrest.protocol import verdict

SERVER_ERRORS = range(500, 600)   # with any Failure: the backend failed temporarily


class CachingClient:
    """Wraps a Client; same interface (``lookup``, ``policy``, ``close``)."""

    def __init__(self, client, ttl: float, negative_ttl: float, max_entries: int, separator=",",
                 clock=time.monotonic, stale_if_error: float = 0.0, observer=NOBODY, shared=None,
                 local_ttl: float = 0.0, stale_while_revalidate: float = 0.0, refresh_lock_ms: int = LOCK_MS):
        self.client = client
        self.ttl, self.negative_ttl, self.max_entries = ttl, negative_ttl, max_entries
        self.stale_if_error, self.stale_while_revalidate = stale_if_error, stale_while_revalidate
        self.refresher = Refresher(self, refresh_lock_ms)   # refresh ahead (stale-while-revalidate)
        self.separator = separator
        self.clock = clock
        self.observer = observer
        # key -> (fresh until, usable stale until, result, its lifetime's end, revalidated until or 0); the
        # first is the lifetime's end too, but with a shared store (cache-local-ttl at most)
        self._entries = OrderedDict()
        self._flights = {}              # key -> the task asking the backend
        self.shared = shared            # the shared store behind (shared.SharedStore), or None
        self.local_ttl = local_ttl      # with it: the most seconds an answer is kept here
        self.generation = 0             # counts invalidations
        if shared is not None:
            shared.start(self.invalidate)

    async def policy(self, pairs, request_id: str):
        return await self.client.policy(pairs, request_id)

    def close(self):
        """The client's ``close``; with a shared store, the task closing its connections (to await
        at exit, so that they close before the event loop does)."""
        self.client.close()
        self.refresher.close()
        return None if self.shared is None else self.shared.close()

    @property
    def shared_up(self):
        """None without a shared store; else whether it is used now (not skipped)."""
        return None if self.shared is None else self.shared.up

    def invalidate(self, lookups) -> int:
        """Forget the answers to ``lookups`` (params), or every answer for None; returns how many went."""
        self.generation += 1
        if lookups is None:
            dropped = len(self._entries)
            self._entries.clear()
        else:
            dropped = sum(self._entries.pop(tuple(params), None) is not None for params in lookups)
        for _ in range(dropped):
            self.observer.cache("drop")
        return dropped

    def peek(self, params):
        """The fresh cached answer for ``params`` (marked ``cached``), or None: a hit needs no
        coroutine.  An expired entry stays while it may still serve as a stale answer."""
        key = tuple(params)
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self.clock()
        if entry[0] > now or entry[3] <= now < entry[4]:   # fresh, or past its life but to be revalidated
            if entry[0] <= now:
                self.refresher.start(key, params)   # in the background: this answer now
            self._entries.move_to_end(key)
            self.observer.cache("hit")
            return entry[2]
        if entry[1] <= now and entry[4] <= now:
            del self._entries[key]
        return None

    def stored(self, params):
        """After a local miss (``peek``): a future of the shared store's answer, without a coroutine (a
        lookup the store answers costs little more than a local hit that way): ``(result, None)`` for a
        fresh entry, kept here too; ``(None, entry or None)`` when it has none fresh, for ``lookup``'s
        ``stored``.  None at once when there is no store, or it is skipped."""
        shared = self.shared
        waiting = None if shared is None else shared.get(shared.key(params))
        if waiting is None:
            return None
        key, generation, found = tuple(params), self.generation, waiting.get_loop().create_future()

        def read(waiting):
            entry = waiting.result()
            if self._answers(key, params, entry, generation):
                self.observer.cache("miss")     # a local miss, answered without a backend request
                self.observer.shared("hit")
                answer = (entry.result, None)
            else:
                self.observer.shared("miss")
                answer = (None, entry)
            if not found.done():   # the caller may have cancelled it (its connection is gone)
                found.set_result(answer)
        waiting.add_done_callback(read)
        return found

    async def lookup(self, params, request_id: str, stored=None):
        """The answer for ``params``; ``stored``: what ``stored`` gave, ``(None, entry or None)``, when
        the shared store was asked already, so that it is not asked again."""
        hit = self.peek(params)
        if hit is not None:
            return hit
        key = tuple(params)
        flight = self._flights.get(key)
        if flight is None:
            self.observer.cache("miss")
            flight = self._flights[key] = asyncio.get_running_loop().create_task(
                self._fetch(key, params, request_id, stored))
            return await asyncio.shield(flight)
        self.observer.cache("hit")
        result = await asyncio.shield(flight)
        if not isinstance(result, verdict.HttpResult):
            return result
        if result.stale:
            self.observer.cache("stale")
        return result._replace(cached=True)

    async def _fetch(self, key, params, request_id, stored):
        try:
            generation, shared, rkey, entry = self.generation, self.shared, None, None
            if shared is not None:
                rkey = shared.key(params)
                waiting = shared.get(rkey) if stored is None else None
                entry = None if stored is None else stored[1]
                if waiting is not None:
                    entry = await waiting
                    if self._answers(key, params, entry, generation):
                        self.observer.shared("hit")
                        return entry.result
                    self.observer.shared("miss")
            result = await self.client.lookup(params, request_id)
            if self.failed(result):
                return self._stale(key) or self._stale_shared(entry) or result
            if generation == self.generation:
                self.store(key, result, rkey)
            return result
        finally:
            del self._flights[key]

    def _answers(self, key, params, entry, generation) -> bool:
        """Whether the shared store's ``entry`` is the answer: fresh, or past its lifetime but within its
        revalidate window (then refreshed in the background); kept here too, unless an invalidation came
        since ``generation``."""
        now = self.shared.now_ms()
        if entry is None or not (entry.fresh_until > now or entry.revalidate_until > now):
            return False
        if generation == self.generation:
            self.keep_shared(key, entry, now)
        if entry.fresh_until <= now:
            self.refresher.start(key, params)
        return True

    def _stale(self, key):
        """The entry for ``key`` marked stale, if it is still within its stale window; else None."""
        entry = self._entries.get(key)
        if entry is None or entry[1] <= self.clock():
            return None
        self.observer.cache("stale")
        return entry[2]._replace(stale=True)

    def _stale_shared(self, entry):
        """The shared store's entry (as got before asking the backend) marked stale, if it is still
        within its stale window; else None."""
        if entry is None or entry.stale_until <= self.shared.now_ms():
            return None
        self.observer.cache("stale")
        return entry.result._replace(stale=True)

    def _lifetimes(self, result):
        """(fresh, stale, revalidate) seconds to keep ``result``: all 0 for what is never kept."""
        if not isinstance(result, verdict.HttpResult) or result.max_age == -1:
            return 0, 0, 0
        kind = verdict.lookup(result, self.separator).kind
        ttl = self.ttl if kind == verdict.FOUND else self.negative_ttl if kind == verdict.NOTFOUND else 0
        if ttl <= 0:
            return 0, 0, 0
        if result.max_age is not None:
            ttl = min(ttl, result.max_age)
        return (ttl, self.stale_if_error if result.stale_if_error is None else result.stale_if_error,
                self.stale_while_revalidate if result.stale_while_revalidate is None
                else result.stale_while_revalidate)

    def store(self, key, result, rkey=None):
        """Keep ``result`` for its lifetimes (here at most cache-local-ttl with a shared store, and there
        too, as ``rkey``), or forget what was kept for ``key``: the backend's last word is never to be
        contradicted by an older stale answer."""
        ttl, stale, revalidate = self._lifetimes(result)
        if rkey is not None:
            self.shared.put(rkey, result, ttl, stale, revalidate)
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        now = self.clock()
        expires = now + ttl
        fresh_until = expires if rkey is None else now + min(ttl, self.local_ttl)
        self._put(key, fresh_until, expires + stale, result._replace(cached=True), expires,
                  expires + revalidate if revalidate > 0 else 0)

    def keep_shared(self, key, entry, now_ms=None):
        """Keep an entry of the shared store here too, fresh cache-local-ttl at most."""
        now, now_ms = self.clock(), self.shared.now_ms() if now_ms is None else now_ms

        def at(ms):
            return now + (ms - now_ms) / 1000
        self._put(key, min(now + self.local_ttl, at(entry.fresh_until)), at(entry.stale_until), entry.result,
                  at(entry.fresh_until), at(entry.revalidate_until) if entry.revalidate_until else 0)

    def hold(self, key, seconds):
        """Answer ``key`` from here ``seconds`` more, within its revalidate window (refresh.py: another
        process refreshes it)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (max(entry[0], min(self.clock() + seconds, entry[4])), *entry[1:])

    def refresh_failed(self, key):
        """A refresh of ``key`` failed: its revalidate window ends where its stale-if-error window ends."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (*entry[:4], min(entry[4], entry[1]))

    @staticmethod
    def failed(result) -> bool:
        """The backend failed temporarily: the case for a stale answer."""
        return not isinstance(result, verdict.HttpResult) or result.status in SERVER_ERRORS

    def _put(self, key, fresh_until, stale_until, result, expires=None, revalidate_until=0):
        self._entries[key] = (fresh_until, stale_until, result, fresh_until if expires is None else expires,
                              revalidate_until)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.observer.cache("eviction")

    def __len__(self):
        return len(self._entries)

