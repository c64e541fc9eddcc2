"""Readiness (``/readyz``): does every endpoint's backend answer?

With ``--workers``, a worker that has gone silent (process/supervisor.py) makes the service not ready
too, named ``worker N``, until it is replaced or speaks again.

Per endpoint served, from its counters first (stats.Stats.last_ok / last_failed), so that a busy
service answers without sending anything:
- its backend gave a fresh HTTP answer (any status: it is up and speaks HTTP; a 404 is the usual one)
  within the last READY_WINDOW seconds, and no request failed after it: ready;
- otherwise a lookup endpoint is probed now: a lookup of PROBE_KEY, a key that cannot exist, sent past
  the cache to the endpoint's own client (its targets, token, TLS, proxy and request-timeout); any HTTP
  answer makes it ready;
- a policy endpoint is never probed: a policy request may be counted (rate limits) or acted upon by the
  backend; nor is a dovecot-sasl one: a probe would be a login attempt, counted against an account
  (lockouts, failed-login alerts) or a source address.  Such an endpoint is not ready while its last
  request in the window failed, and ready otherwise (no recent request says nothing against it).

The checking is pure (``Check``); the probing runs on an event loop (``probe_all``): the process's own,
or with ``--workers`` a worker's, which the arbiter asks over its channel.
"""

import asyncio
import time

from pfrest.backend.request import new_request_id
from pfrest.config import POLICY, SASL, TCP
from pfrest.ops.counters import Stats
from pfrest.protocol.verdict import Failure

READY_WINDOW = 30.0    # seconds a backend's last answer vouches for it
PROBE_KEY = b"pfrest-readiness-probe.invalid"   # .invalid: a name that never exists (RFC 2606)
PROBE_SLACK = 1.0      # seconds a probe may take beyond the longest request-timeout (the arbiter's wait)
# Modes whose requests the backend acts upon: never sent a probe; what they are called in /readyz.
NEVER_PROBED = {POLICY: "policy", SASL: "login"}


class Check:
    """One ``/readyz``: what the counters say of each endpoint served, and which ones need a probe."""

    def __init__(self, figures, now=None):
        now = time.monotonic() if now is None else now
        self.found = {}     # name -> (ready, why); None for those a probe decides
        for name in figures.connections:   # the endpoints served now
            stats = figures.endpoints.get(name) or Stats()
            if stats.last_ok and now - stats.last_ok <= READY_WINDOW and stats.last_ok >= stats.last_failed:
                self.found[name] = (True, f"the backend answered {now - stats.last_ok:.1f} s ago")
            elif stats.mode not in NEVER_PROBED:
                self.found[name] = None
            elif stats.last_failed and now - stats.last_failed <= READY_WINDOW:
                ago = now - stats.last_failed
                self.found[name] = (False, f"the last {NEVER_PROBED[stats.mode]} request ({ago:.1f} "
                                           f"s ago) got no answer from the backend ({stats.mode} endpoints are "
                                           "never probed)")
            else:
                self.found[name] = (True, f"no failed {NEVER_PROBED[stats.mode]} request in the last "
                                          f"{READY_WINDOW:.0f} s ({stats.mode} endpoints are never probed)")
        for index, pid, seconds in figures.silent:   # serve --workers: supervisor.SILENT_AFTER
            self.found[f"worker {index}"] = (False, f"pid {pid} silent for {seconds:.1f} s: it gets no new "
                                                    "connections, and is replaced if it stays silent")

    @property
    def to_probe(self):
        return [name for name, state in self.found.items() if state is None]

    def answer(self, probed=None):
        """(HTTP status, body) once ``probed`` ({name: None, or why the probe failed}) is in."""
        probed = probed or {}
        states = {}
        for name, state in self.found.items():
            if state is None:
                why = probed.get(name, "not probed")
                state = (True, "answered a probe") if why is None else (False, f"a probe failed: {why}")
            states[name] = state
        failing = [name for name, (ready, _) in states.items() if not ready]
        head = f"not ready: {', '.join(failing)}" if failing else "ready"
        body = [head] + [f"{name}: {'ready' if ready else 'NOT READY'}: {why}"
                         for name, (ready, why) in states.items()]
        return (503 if failing else 200), ("\n".join(body) + "\n").encode()


async def probe(service):
    """None when the endpoint's backend answers a lookup of PROBE_KEY (any HTTP answer), else why not."""
    client = getattr(service.backend, "client", service.backend)   # past the cache: a hit proves nothing
    request = PROBE_KEY if service.mode.name == TCP else (service.endpoint.name.encode(), PROBE_KEY)
    result = await client.lookup(service.mode.call(request).params, new_request_id())
    if isinstance(result, Failure):
        return f"{result.kind} ({result.detail})" if result.detail else result.kind
    service.stats.last_ok = time.monotonic()
    return None


async def probe_all(services, names):
    """{name: None or why not} for the named lookup endpoints of ``services`` (a Services), all at once."""
    known = [services.by_name[name] for name in names if name in services.by_name]
    results = await asyncio.gather(*(probe(service) for service in known))
    found = {name: "no longer served" for name in names}
    found.update((service.endpoint.name, why) for service, why in zip(known, results))
    return found


def probe_wait(endpoints):
    """How long a probe of these endpoints may take: their longest request-timeout, and some slack."""
    return max((ep.timeout for ep in endpoints), default=0) + PROBE_SLACK
