"""Whether the shared cache (shared.py) is used or skipped: the count of failed calls that skips it, the
back-off after which a probe tries it again, and the one log line for each outage and for its end.

A store whose calls all fail for SKIP_AFTER seconds, FAILURES_TO_SKIP of them at least (no answer in
time, LOADING while it restarts), or that refuses once (OOM when it is full, READONLY from a replica, a
wrong password), or whose connection is lost or gives a reply that is not for the request, is
*skipped*: lookups go straight to the backend, as without it.  After BACKOFF_FIRST seconds the next
lookup sends a probe out beside it, and the wait doubles up to BACKOFF_MAX while probes fail
(backoff.Backoff); only a probe ends a skip.  One log line when it is skipped, one when it answers
again.
"""

import logging

from pfrest.backend.backoff import Backoff

log = logging.getLogger("pfrest")

FAILURES_TO_SKIP = 3   # failed calls in a row that make the store skipped, if they span SKIP_AFTER:
SKIP_AFTER = 0.25      # seconds; calls that fail together (this process stalled, not the store) do not
BACKOFF_FIRST = 1.0    # seconds the store is skipped, then probed
BACKOFF_MAX = 10.0     # the wait doubles while probes fail, up to this


class Failed(Exception):
    """A call to the store that gave no usable reply; the text says why, for the log.  ``at_once``: the
    store refused (redisclient.REFUSALS) or the connection is gone, which skips it at once."""

    def __init__(self, why, at_once=False):
        super().__init__(why)
        self.at_once = at_once


class StoreHealth(Backoff):
    """The health of one endpoint's shared store in one process: up, or skipped (down) until
    ``down_until`` (Backoff), with the failed calls in a row that lead there."""

    __slots__ = ("name", "where", "instead", "failures", "failing_since", "outage")

    def __init__(self, name, where, backoff_max=BACKOFF_MAX, instead="lookups go to the backend"):
        super().__init__(BACKOFF_FIRST, backoff_max)
        self.name, self.where, self.instead = name, where, instead   # for the log lines
        self.failures = 0                   # failed calls in a row
        self.failing_since = 0.0            # loop time of the first of them
        self.outage = False                 # a skip has been logged, and not its end yet

    def call_succeeded(self, probe=False):
        """A call that worked.  Only a probe ends a skip: a call begun before it (an MGET that came
        back while the store refused a write, say) says nothing about the store now."""
        self.failures = 0
        if probe:
            self.succeeded()
            if self.outage:
                self.outage = False
                log.info("endpoint=%s shared cache %s answers again", self.name, self.where)

    def call_failed(self, now, why, at_once=False, probe=False) -> bool:
        """A call that failed at loop time ``now``; True when the store is skipped (now or still): after
        FAILURES_TO_SKIP in a row over SKIP_AFTER, at once for a refusal or a lost connection, or a failed
        probe (at the start: lookups never used it yet)."""
        self.failures += 1
        if self.failures == 1:
            self.failing_since = now
        if not (self.down_until or at_once or probe or (
                self.failures >= FAILURES_TO_SKIP and now - self.failing_since >= SKIP_AFTER)):
            return False
        self.failed(now)
        if not self.outage:
            self.outage = True
            log.warning("endpoint=%s shared cache %s skipped: %s; %s meanwhile (tried again in %g s, then "
                        "less often while it fails)", self.name, self.where, why, self.instead, self.backoff)
        return True
