"""Refresh ahead (RFC 5861 stale-while-revalidate): an answer past its lifetime but within its
revalidate window (``cache-stale-while-revalidate``, or the backend's ``Cache-Control:
stale-while-revalidate=N``) is answered from the cache at once, and refreshed in the background, so
that a hot key never makes a lookup wait for the backend (local.py decides when; this module refreshes).

Bounded:
- a refresh starts only from a lookup of the key (none for a key nobody asks for), one per key at a
  time in a process, and at most MAX_REFRESHES per endpoint and process: a lookup that finds them all
  busy is answered from the cache all the same, and a later one refreshes;
- with the shared cache, one refresh per key for the whole fleet: the refresh reads the store first
  (another process may have refreshed it already: its entry is taken), then takes a short lock in the
  store (``SET NAMESPACE:lock:QUERY 1 NX PX``, for the backend's request-timeout and LOCK_MARGIN_MS);
  a process that finds the lock taken answers from its cache for REFRESH_HOLD more seconds, then looks
  at the store again;
- a refresh that fails (the backend fails, or answers 5xx) keeps the old answer only as stale-if-error
  allows: its revalidate window ends where its stale window ends, here and in the store's entry (which
  the other processes read), so that lookups then wait for the backend and get the stale answer only
  within stale-if-error.  Either way the lock is given back in
  the same call to the store as the refreshed entry's write (the store's writes of WRITE_DELAY): the
  next process to look finds the entry, or may try at once.

The observer hears ``cache("refresh-" + outcome)`` for each refresh: OUTCOMES.
"""

import asyncio

from pfrest.backend.request import new_request_id
from pfrest.cache import sharedformat
from pfrest.cache.sharedhealth import Failed

MAX_REFRESHES = 4       # in flight per endpoint and process: a refresh holds one backend connection
REFRESH_HOLD = 0.25     # seconds a key another process refreshes is answered from here before looking again
LOCK_MARGIN_MS = 1000   # the lock outlives the refresh's request-timeout by this (its write follows it)
LOCK_MS = 2000 + LOCK_MARGIN_MS   # for the default request-timeout (config.DEFAULT_TIMEOUT_MS)
# refreshed: asked the backend and kept its answer; failed: the backend failed (the old answer then
# only as stale-if-error allows); elsewhere: another process refreshed it or holds its lock; busy: not
# started, MAX_REFRESHES were in flight
OUTCOMES = ("refreshed", "failed", "elsewhere", "busy")


class Refresher:
    """The refreshes of one endpoint's cache (local.CachingClient) in one process."""

    def __init__(self, cache, lock_ms: int):
        self.cache, self.lock_ms = cache, lock_ms
        self.flights = {}   # key -> its refresh task

    def start(self, key, params):
        """Refresh ``key`` in the background, unless it is being refreshed already or MAX_REFRESHES are
        (then a later lookup will); the caller answers from the cache either way."""
        if key in self.flights:
            return
        if len(self.flights) >= MAX_REFRESHES:
            self.cache.observer.cache("refresh-busy")
            return
        try:
            task = asyncio.get_running_loop().create_task(self._refresh(key, params))
        except RuntimeError:   # no event loop (a caller outside one): the next lookup on one refreshes
            return
        self.flights[key] = task
        task.add_done_callback(lambda _: self.flights.pop(key, None))

    async def _refresh(self, key, params):
        cache, shared = self.cache, self.cache.shared
        generation, rkey, entry, locked = cache.generation, None, None, None
        if shared is not None:
            rkey = shared.key(params)
            waiting = shared.get(rkey)
            entry = None if waiting is None else await waiting
            if entry is not None and entry.fresh_until > shared.now_ms():   # another process refreshed it
                if generation == cache.generation:
                    cache.keep_shared(key, entry)
                return cache.observer.cache("refresh-elsewhere")
            locked = await _lock(shared, rkey, self.lock_ms) if shared.up else None
            if locked is False:
                cache.hold(key, REFRESH_HOLD)
                return cache.observer.cache("refresh-elsewhere")
        result = await cache.client.lookup(params, new_request_id())
        failed = cache.failed(result)
        if failed:
            cache.refresh_failed(key)
            if entry is not None and generation == cache.generation:   # the fleet reads the store's entry
                _cut(shared, rkey, entry)
        elif generation == cache.generation:   # else fetched before an invalidation: kept nowhere
            cache.store(key, result, rkey)
        if locked:   # ours to release (never another host's): in the entry's write, the entry there first
            shared.put(sharedformat.lock_key(shared.namespace, rkey), None, 0, 0)
        cache.observer.cache("refresh-failed" if failed else "refresh-refreshed")

    def close(self):
        for task in list(self.flights.values()):
            task.cancel()


def _cut(shared, rkey, entry):
    """Write the store's ``entry`` again with its revalidate window ended where its stale window ends (a
    refresh of it failed): no process answers it at once any more, but as stale-if-error allows; with no
    stale window left, it is removed."""
    now = shared.now_ms()
    revalidate = max(min(entry.revalidate_until, entry.stale_until) - entry.fresh_until, 0)
    shared.put(rkey, entry.result, (entry.fresh_until - now) / 1000,
               max(entry.stale_until - entry.fresh_until, 0) / 1000, revalidate / 1000)


async def _lock(shared, rkey, milliseconds):
    """Whether this process may refresh ``rkey``: True when it took the lock for ``milliseconds``, False
    when another holds it, None when the store failed (then any process may: at worst a few ask the
    backend; and there is no lock of ours to release)."""
    try:
        return await shared.call("SET", sharedformat.lock_key(shared.namespace, rkey), b"1", "NX", "PX",
                                 milliseconds) is not None
    except Failed:
        return None
