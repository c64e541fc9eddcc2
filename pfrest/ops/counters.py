"""Per-endpoint counters: what SIGUSR1, the exit, ``handle``'s last line, ``/metrics`` and ``pfrest stats``
show.

Counts are totals since start (kept across a reload while the endpoint keeps its name).  Latencies go
into fixed buckets rather than a list of samples, so that the counters of several worker processes add
up exactly (``merge``) and cost the same whatever the traffic; percentiles are read off the buckets (the
bucket's upper bound: an honest "at most").

``record`` runs once per answered request, on the hot path: a few dict increments and a bisect, nothing
more (no locks: one event loop per process updates its own Stats; the arbiter of ``serve --workers``
adds up the copies the workers send).
"""

import math
from bisect import bisect_left
from collections import Counter
from typing import NamedTuple, Optional

from pfrest.protocol.actions import KNOWN_WORDS
from pfrest.protocol.verdict import ACTION, PERM, REJECTED, TEMP, TIMEOUT, Failure

# Upper bounds of the latency buckets, milliseconds; the last bucket takes everything above.
BUCKETS_MS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000,
              1500, 2000, 3000, 5000, 10000, 30000, 100000, math.inf)
BUCKETS_S = tuple(bound / 1000 for bound in BUCKETS_MS)   # the same, for the backend's exchanges

# Reply classes: the verdict kinds (FOUND, NOTFOUND, TEMP, PERM, TIMEOUT; OK and FAIL for logins) and,
# for a policy action the backend chose, its verb; the values a metric label can take stay bounded
# whatever backends send (a login's user name is never one).
NUMERIC_CLASSES = {"4": "4XX", "5": "5XX"}
OTHER = "OTHER"
# The classes worth a log line under ``log-requests: problems``: failures, the policy refusals, and
# failed logins (password guessing shows there, with the user name and the client's address).
PROBLEMS = frozenset({TEMP, TIMEOUT, PERM, "REJECT", "DEFER", "DEFER_IF_PERMIT", "DEFER_IF_REJECT",
                      *NUMERIC_CLASSES.values(), REJECTED})
_ERRORS = frozenset({TEMP, TIMEOUT, PERM})


def reply_class(kind, action):
    """The class of one reply: the verdict kind, or for a policy action its verb (REJECT, DUNNO, ...;
    4XX/5XX for a numeric reply, OTHER for anything else)."""
    if kind != ACTION:
        return kind
    word = action.split(None, 1)[0].upper() if action else ""
    if word in KNOWN_WORDS:
        return word
    return NUMERIC_CLASSES.get(word[:1], OTHER) if len(word) == 3 and word.isdigit() else OTHER


def backend_error(result):
    """What the backend did wrong, for a request answered with an error (TEMP, TIMEOUT, PERM)."""
    if isinstance(result, Failure):
        return result.kind
    if result.status == 200:
        return "invalid-answer"   # not what the contract says (not JSON, CR/LF, too long, no action)
    return f"http-{result.status}"


def percentile(counts, bounds, fraction):
    """The value that ``fraction`` of what ``counts`` counted took at most, by bucket; None if none."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = max(math.ceil(fraction * total), 1), 0
    for bound, count in zip(bounds, counts):
        seen += count
        if seen >= rank:
            return bound
    return math.inf  # not reached: the counts add up to total


def _counts(counter):
    return ",".join(f"{k}:{v}" for k, v in sorted(counter.items())) or "-"


class Stats:
    """Counters for one endpoint.  Plain data: one event loop per process updates them, ``merge``
    adds another process's (the workers' of ``serve --workers``), pickle carries them.  Also the
    backend's observer (pfrest.backend.observer): ``exchange``, ``cache``, ``shared`` and ``stray``."""

    def __init__(self, mode=None):
        self.mode = mode                 # the endpoint's mode, for the metrics' labels
        self.replies = Counter()         # reply class -> count
        self.errors = Counter()          # backend error kind -> count
        self.refused = Counter()         # why a connection was refused -> count
        self.accepted = 0                # connections taken so far
        self.latency = [0] * len(BUCKETS_MS)   # request latencies, by bucket
        self.latency_ms = 0.0            # their sum
        self.exchanges = Counter()       # (target URL, outcome) -> HTTP exchanges
        self.exchange_latency = [0] * len(BUCKETS_S)
        self.exchange_seconds = 0.0
        self.cache_events = Counter()    # hit, miss, stale, eviction, drop, refresh-OUTCOME -> count
        self.cache_entries = 0           # a gauge: entries now (Services.measure sets it)
        self.shared_events = Counter()   # the shared cache's: hit, miss, error, skip, read-STORE -> count
        self.shared_up = None            # a gauge: the shared cache used now (None: there is none)
        self.strays = 0                  # backend answers refused as not their request's
        self.last_ok = 0.0               # time.monotonic() of the last fresh HTTP answer (0: none yet)
        self.last_failed = 0.0           # ... of the last request the backend failed to answer

    def record(self, verdict, ms, result, action=None, now=0.0):
        """Count one answered request (``now``: time.monotonic() at its end); returns its reply class."""
        reply = verdict.kind
        if reply == ACTION:
            reply = reply_class(reply, action)
        self.replies[reply] += 1
        if result is not None:
            if result.__class__ is Failure:
                self.last_failed = now
            elif not result.cached:
                self.last_ok = now
            elif getattr(result, "stale", False):   # an old answer, served because the backend failed
                self.last_failed = now
            if reply in _ERRORS:
                self.errors[backend_error(result)] += 1
        self.latency[bisect_left(BUCKETS_MS, ms)] += 1
        self.latency_ms += ms
        return reply

    # --- pfrest.backend.observer.Observer ---------------------------------------------------------

    def exchange(self, target, outcome, seconds):
        self.exchanges[target, outcome] += 1
        self.exchange_latency[bisect_left(BUCKETS_S, seconds)] += 1
        self.exchange_seconds += seconds

    def cache(self, event):
        self.cache_events[event] += 1

    def shared(self, event):
        self.shared_events[event] += 1

    def stray(self, target):
        self.strays += 1

    # --- adding up, reading ------------------------------------------------------------------------

    def merge(self, other):
        """Add ``other``'s counts (and its cache entries: a gauge summed over the workers; the shared
        cache is up when it is for every process that has one)."""
        self.mode = self.mode or other.mode
        for mine, theirs in ((self.replies, other.replies), (self.errors, other.errors),
                             (self.refused, other.refused), (self.exchanges, other.exchanges),
                             (self.cache_events, other.cache_events),
                             (self.shared_events, other.shared_events)):
            mine.update(theirs)
        self.accepted += other.accepted
        self.strays += other.strays
        self.latency = [a + b for a, b in zip(self.latency, other.latency)]
        self.latency_ms += other.latency_ms
        self.exchange_latency = [a + b for a, b in zip(self.exchange_latency, other.exchange_latency)]
        self.exchange_seconds += other.exchange_seconds
        self.cache_entries += other.cache_entries
        if other.shared_up is not None:
            self.shared_up = other.shared_up if self.shared_up is None else self.shared_up and other.shared_up
        self.last_ok = max(self.last_ok, other.last_ok)
        self.last_failed = max(self.last_failed, other.last_failed)
        return self

    def snapshot(self):
        """Every field as a plain copy, to tell whether anything changed."""
        return {name: value.copy() if hasattr(value, "copy") else value for name, value in vars(self).items()}

    @property
    def requests(self):
        return sum(self.replies.values())

    def percentile(self, fraction):
        """The request latency (ms) that ``fraction`` of the requests took at most; None if none."""
        return percentile(self.latency, BUCKETS_MS, fraction)

    def requests_summary(self):
        """``requests=... replies=... backend-errors=N (kind:n,...)``."""
        return (f"requests={self.requests} replies={_counts(self.replies)} "
                f"backend-errors={sum(self.errors.values())} ({_counts(self.errors)})")

    def summary(self, open_connections):
        """One log line's worth: ``connections=... requests=... replies=... backend-errors=... ms-p50=...``."""
        fmt = (lambda v: "-" if v is None else f"{v:.1f}")
        return (f"connections={open_connections} accepted={self.accepted} refused={_counts(self.refused)} "
                f"{self.requests_summary()} "
                f"ms-p50={fmt(self.percentile(0.5))} ms-p99={fmt(self.percentile(0.99))}")


def added(*parts):
    """The sum of several ``{endpoint name: Stats}`` (the arbiter's, the workers', the ended ones')."""
    totals = {}
    for part in parts:
        for name, stats in part.items():
            totals.setdefault(name, Stats()).merge(stats)
    return totals


class Figures(NamedTuple):
    """One reading of a whole service: what the SIGUSR1 lines, ``/metrics`` and ``pfrest stats`` show."""
    endpoints: dict                  # endpoint name -> Stats (endpoints no longer served included)
    connections: dict                # endpoint name -> Postfix connections open now, per endpoint served
    reloads: dict                    # "ok" / "failed" -> count
    workers: Optional[tuple] = None  # with --workers: connections open per worker
    restarts: int = 0                # with --workers: workers replaced after they died
    silent: tuple = ()               # with --workers: (index, pid, seconds) of each worker silent now

    def lines(self):
        """The counter lines: one per endpoint, and with --workers how the connections are spread."""
        lines = [f"endpoint={name} {self.endpoints.get(name, Stats()).summary(self.connections.get(name, 0))}"
                 for name in dict.fromkeys([*self.connections, *self.endpoints])]
        if self.workers is not None:
            lines.append("workers connections=" + (",".join(map(str, self.workers)) or "-"))
        return lines
