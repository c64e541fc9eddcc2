"""What each endpoint's requests are answered with, now: its config, protocol mode, backend client and
counters; replaced as a whole on reload.

Connections look their service up again for every request (``Services.current``), so a reload applies
to connections that were already open too: Postfix keeps a ``tcp:`` connection for the life of its
process, and a rotated token or a moved target must take effect.  A connection whose endpoint is gone,
changed its protocol, moved to another socket or no longer allows its peer gets None: it is closed at
once, or after the reply to the request it has with the backend (conversation.py).
"""

import logging
from typing import NamedTuple, Optional

from pfrest.config import LOG_ALL, LOG_PROBLEMS
from pfrest.log import add_secret
from pfrest.ops.counters import PROBLEMS, Stats
from pfrest.protocol.answers import mode_for
from pfrest.system import sockets

log = logging.getLogger("pfrest")


class Origin(NamedTuple):
    """Where a connection came from: its endpoint, the listening socket's bind key (None for
    ``pfrest handle``) and the peer's IP address (None for unix sockets and stdin)."""
    endpoint: str
    key: Optional[tuple] = None
    host: Optional[str] = None


class Service:
    """One endpoint, as configured now.  ``backend``: what answers its requests (anything with the
    coroutines ``lookup`` and ``policy`` and ``close``); by default the HTTP client for its target."""

    def __init__(self, endpoint, user_agent, key=None, stats=None, backend=None):
        self.endpoint, self.user_agent, self.key = endpoint, user_agent, key
        self.mode = mode_for(endpoint)
        self.networks = sockets.networks(endpoint.allow_from)
        # whatever a library puts in an exception text, these never reach a log line
        for secret in endpoint.secrets():
            add_secret(secret)
        self.stats = Stats() if stats is None else stats
        self.stats.mode = endpoint.mode
        level = endpoint.log_requests or LOG_ALL   # None: an Endpoint made in code
        self.log_all, self.log_problems = level == LOG_ALL, level == LOG_PROBLEMS
        if backend is None:
            from pfrest.cache import for_endpoint  # the HTTP side only where requests are answered
            backend = for_endpoint(endpoint, user_agent, observer=self.stats)
        self.backend = backend

    def answer_cached(self, request, request_id):
        """(result, Answer) when the backend has the answer at hand (a cache hit), else None."""
        peek = getattr(self.backend, "peek", None)
        call = self.mode.call(request) if peek is not None else None
        if call is None or call.kind != "lookup":
            return None
        result = peek(call.params)
        return None if result is None else (result, self.mode.answer(request, result, request_id))

    def answer_stored(self, request):
        """After ``answer_cached`` gave None: a future of (result, entry) from the shared store (see
        CachingClient.stored), or None when there is none to ask."""
        stored = getattr(self.backend, "stored", None)
        call = self.mode.call(request) if stored is not None else None
        if call is None or call.kind != "lookup":
            return None
        return stored(call.params)

    async def answer(self, request, request_id, stored=None):
        """(the backend's result or None, the Answer) for one decoded request; ``stored``: what
        ``answer_stored`` gave when the shared store had no fresh answer.  Never raises, but for a
        cancellation: a bug in pfrest must still give Postfix a temporary answer."""
        call, result = self.mode.call(request), None
        try:
            if call is not None:
                if stored is not None:
                    result = await self.backend.lookup(call.params, request_id, stored=stored)
                else:
                    # policy requests and logins: sent exactly once, never cached
                    ask = self.backend.lookup if call.kind == "lookup" else self.backend.policy
                    result = await ask(call.params, request_id)
            return result, self.mode.answer(request, result, request_id)
        except Exception:
            log.exception("endpoint=%s id=%s internal error; answering with a temporary error",
                          self.endpoint.name, request_id)
            return result, self.mode.internal_error(request_id)

    def worth_logging(self, reply, result) -> bool:
        """Under ``log-requests: problems``, whether a request gets its log line: failures, policy
        refusals (``reply``: its class, see stats.reply_class) and stale answers do."""
        return self.log_problems and (reply in PROBLEMS or getattr(result, "stale", False))

    def same(self, endpoint, user_agent, key) -> bool:
        return (self.endpoint, self.user_agent, self.key) == (endpoint, user_agent, key)

    def admits(self, origin) -> bool:
        if origin.key != self.key:
            return False
        return origin.host is None or not self.networks or sockets.allowed(self.networks, origin.host)

    def close(self):
        """No new backend connections are kept; requests in flight still finish.  Returns what the
        backend's ``close`` does: None, or a task that closes a shared cache's connections."""
        return self.backend.close()


class Services:
    """The services of one process, by endpoint name.  ``generation`` changes with every ``apply``, so
    that a connection re-checks its service only after a reload."""

    def __init__(self, backend_for=None):
        self.backend_for = backend_for   # endpoint -> backend, instead of its HTTP client (tests, embedding)
        self.by_name = {}
        self.stats = {}        # endpoint name -> Stats, kept across reloads
        self.generation = 0
        self.closing = set()   # tasks closing a retired shared cache's connections

    def apply(self, endpoints, user_agent, key_of=lambda ep: None):
        """Serve ``endpoints`` from now on; unchanged ones keep their service (and its backend
        connections).  ``key_of(endpoint)`` gives the bind key connections must have come through."""
        current = {}
        for ep in endpoints:
            key, svc = key_of(ep), self.by_name.get(ep.name)
            if svc is None or not svc.same(ep, user_agent, key):
                backend = self.backend_for(ep) if self.backend_for else None
                svc = Service(ep, user_agent, key, self.stats.setdefault(ep.name, Stats()), backend)
            current[ep.name] = svc
        retired = [svc for name, svc in self.by_name.items() if current.get(name) is not svc]
        self.by_name = current
        self.generation += 1
        for svc in retired:
            closing = svc.close()
            if closing is not None:   # held until done: the loop keeps only a weak reference
                self.closing.add(closing)
                closing.add_done_callback(self.closing.discard)

    def measure(self):
        """Set the gauges of every endpoint's Stats to now (cache entries, the shared cache's state),
        for a report or a scrape."""
        for name, stats in self.stats.items():
            svc = self.by_name.get(name)
            stats.cache_entries = len(svc.backend) if svc is not None and hasattr(svc.backend, "__len__") else 0
            stats.shared_up = getattr(svc.backend, "shared_up", None) if svc is not None else None

    def invalidate(self, name, lookups):
        """``pfrest cache`` through the control socket: drop the answers to ``lookups`` (params), or
        all for None, from the endpoint's cache; how many went, or None when it keeps no cache here."""
        svc = self.by_name.get(name)
        invalidate = getattr(svc.backend, "invalidate", None) if svc is not None else None
        return None if invalidate is None else invalidate(lookups)

    def current(self, origin) -> Optional[Service]:
        svc = self.by_name.get(origin.endpoint)
        return svc if svc is not None and svc.admits(origin) else None

    def close(self):
        """Close every service; returns the tasks still closing connections (to await at exit)."""
        return [task for task in (svc.close() for svc in self.by_name.values()) if task is not None]
