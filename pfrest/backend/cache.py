"""An answer cache for lookup endpoints, in front of a Client (off unless configured).

Mail traffic repeats itself (the same domains, senders and recipients), so a short-lived cache removes
most backend requests.  Rules:
- found answers live ``cache-ttl`` seconds, not-found answers ``cache-negative-ttl``; errors, timeouts
  and anything that is not a clean found/not-found are never cached, so a flapping backend cannot pin
  a temporary failure (or a wrong answer) in place;
- the backend may shorten that with ``Cache-Control: max-age=N`` or forbid it with ``no-store``;
- at most ``cache-max-entries`` entries, least recently used evicted first;
- identical lookups in flight at the same time share one backend request: the first miss starts it as
  a task of its own and every caller awaits it shielded, so a caller that gives up (its Postfix client
  left, its own deadline) never cancels the answer the others wait for;
- policy requests are never cached (each one is about one message).
"""

import asyncio
import time
from collections import OrderedDict

from pfrest.protocol import verdict


class CachingClient:
    """Wraps a Client; same interface (``lookup``, ``policy``, ``close``)."""

    def __init__(self, client, ttl: float, negative_ttl: float, max_entries: int, separator=",",
                 clock=time.monotonic):
        self.client = client
        self.ttl, self.negative_ttl, self.max_entries = ttl, negative_ttl, max_entries
        self.separator = separator
        self.clock = clock
        self._entries = OrderedDict()   # key -> (expires, result)
        self._flights = {}              # key -> the task asking the backend

    async def policy(self, pairs, request_id: str):
        return await self.client.policy(pairs, request_id)

    def close(self):
        self.client.close()

    def peek(self, params):
        """The cached answer for ``params`` (marked ``cached``), or None: a hit needs no coroutine."""
        key = tuple(params)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] > self.clock():
            self._entries.move_to_end(key)
            return entry[1]
        del self._entries[key]
        return None

    async def lookup(self, params, request_id: str):
        hit = self.peek(params)
        if hit is not None:
            return hit
        key = tuple(params)
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = asyncio.get_running_loop().create_task(
                self._fetch(key, params, request_id))
            return await asyncio.shield(flight)
        result = await asyncio.shield(flight)
        return result._replace(cached=True) if isinstance(result, verdict.HttpResult) else result

    async def _fetch(self, key, params, request_id):
        try:
            result = await self.client.lookup(params, request_id)
            self._store(key, result)
            return result
        finally:
            del self._flights[key]

    def _lifetime(self, result) -> float:
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
        self._entries[key] = (self.clock() + ttl, result._replace(cached=True))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self):
        return len(self._entries)
