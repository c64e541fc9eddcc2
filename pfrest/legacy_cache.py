"""An answer cache for lookup endpoints, in front of the backend seam (off unless configured).

Mail traffic repeats itself (the same domains, senders and recipients), so a short-lived cache removes
most backend requests.  Rules:
- found answers live ``cache-ttl`` seconds, not-found answers ``cache-negative-ttl``; errors, timeouts
  and anything that is not a clean found/not-found are never cached, so a flapping backend cannot pin
  a temporary failure (or a wrong answer) in place;
- the backend may shorten that with ``Cache-Control: max-age=N`` or forbid it with ``no-store``;
- at most ``cache-max-entries`` entries, least recently used evicted first;
- identical lookups in flight at the same time are coalesced into one backend request;
- policy requests are never cached (each one is about one message).
"""

import threading
import time
from collections import OrderedDict

from pfrest.protocol import verdict


class _Flight:
    """One backend request in progress that other identical lookups wait for."""
    __slots__ = ("done", "result")

    def __init__(self):
        self.done = threading.Event()
        self.result = None


class CachingBackend:
    """Wraps a backend; same seam (``lookup``, ``policy``)."""

    def __init__(self, backend, ttl: float, negative_ttl: float, max_entries: int, separator=",",
                 clock=time.monotonic):
        self.backend = backend
        self.ttl, self.negative_ttl, self.max_entries = ttl, negative_ttl, max_entries
        self.separator = separator
        self.clock = clock
        self._entries = OrderedDict()   # key -> (expires, result)
        self._flights = {}              # key -> _Flight
        self._lock = threading.Lock()
        self.timeout = getattr(getattr(backend, "endpoint", None), "timeout", 100.0)

    def policy(self, pairs, request_id):
        return self.backend.policy(pairs, request_id)

    def close(self):
        self.backend.close()

    def lookup(self, params, request_id):
        key = tuple(params)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if entry[0] > self.clock():
                    self._entries.move_to_end(key)
                    return entry[1]._replace(cached=True)
                del self._entries[key]
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if not leader:
            # bounded by the leader's own request-timeout; a little slack for its bookkeeping
            if flight.done.wait(self.timeout + 1.0) and flight.result is not None:
                return flight.result._replace(cached=True) \
                    if isinstance(flight.result, verdict.HttpResult) else flight.result
            return verdict.Failure("timeout", "coalesced lookup did not complete")
        try:
            result = flight.result = self.backend.lookup(params, request_id)
            self._store(key, result)
            return result
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    def _lifetime(self, result):
        if not isinstance(result, verdict.HttpResult) or result.max_age == -1:
            return 0
        kind = verdict.lookup(result, self.separator).kind
        ttl = self.ttl if kind == verdict.FOUND else self.negative_ttl if kind == verdict.NOTFOUND else 0
        if result.max_age is not None:
            ttl = min(ttl, result.max_age)
        return ttl

    def _store(self, key, result):
        ttl = self._lifetime(result)
        if ttl <= 0:
            return
        with self._lock:
            self._entries[key] = (self.clock() + ttl, result)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self):
        return len(self._entries)
