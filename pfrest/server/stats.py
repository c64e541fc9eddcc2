"""Per-endpoint counters, logged on SIGUSR1 and at exit.

Counts are totals since start (kept across a reload while the endpoint keeps its name).  Latencies go
into fixed buckets rather than a list of samples, so that the counters of several worker processes add
up exactly (``merge``) and cost the same whatever the traffic; percentiles are read off the buckets (the
bucket's upper bound: an honest "at most").
"""

import math
from bisect import bisect_left
from collections import Counter

from pfrest.protocol.verdict import Failure

# Upper bounds of the latency buckets, milliseconds; the last bucket takes everything above.
BUCKETS_MS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000,
              1500, 2000, 3000, 5000, 10000, 30000, 100000, math.inf)


def backend_error(result):
    """What went wrong with the backend for this answer, or None if nothing did."""
    if result is None:
        return None
    if isinstance(result, Failure):
        return result.kind
    if result.status not in (200, 404):
        return f"http-{result.status}"
    return None


def _counts(counter):
    return ",".join(f"{k}:{v}" for k, v in sorted(counter.items())) or "-"


class Stats:
    """Counters for one endpoint.  Plain data: one event loop per process updates them, and ``merge``
    adds another process's (the workers' of ``serve --workers``).  Also the backend's observer
    (pfrest.backend.observer)."""

    def __init__(self):
        self.replies = Counter()     # verdict kind -> count
        self.errors = Counter()      # backend error kind -> count
        self.refused = Counter()     # why a connection was refused -> count
        self.accepted = 0            # connections taken so far
        self.latency = [0] * len(BUCKETS_MS)

    def record(self, verdict, ms, result):
        self.replies[verdict.kind] += 1
        error = backend_error(result)
        if error:
            self.errors[error] += 1
        self.latency[bisect_left(BUCKETS_MS, ms)] += 1

    def merge(self, other):
        self.replies.update(other.replies)
        self.errors.update(other.errors)
        self.refused.update(other.refused)
        self.accepted += other.accepted
        self.latency = [a + b for a, b in zip(self.latency, other.latency)]
        return self

    def exchange(self, target, outcome, seconds):
        pass  # counted by the metrics (issue 10)

    def cache(self, event):
        pass

    def snapshot(self):
        """The counters as plain values, to tell whether anything changed."""
        return dict(self.replies), dict(self.errors), dict(self.refused), self.accepted, tuple(self.latency)

    def percentile(self, fraction):
        """The latency (ms) that ``fraction`` of the requests took at most, by bucket; None if none."""
        total = sum(self.latency)
        if not total:
            return None
        rank, seen = max(math.ceil(fraction * total), 1), 0
        for bound, count in zip(BUCKETS_MS, self.latency):
            seen += count
            if seen >= rank:
                return bound
        return math.inf  # not reached: the counts add up to total

    def summary(self, open_connections):
        """One log line's worth: ``connections=... requests=... replies=... backend-errors=... ms-p50=...``."""
        fmt = (lambda v: "-" if v is None else f"{v:.1f}")
        return (f"connections={open_connections} accepted={self.accepted} refused={_counts(self.refused)} "
                f"requests={sum(self.replies.values())} replies={_counts(self.replies)} "
                f"backend-errors={sum(self.errors.values())} ({_counts(self.errors)}) "
                f"ms-p50={fmt(self.percentile(0.5))} ms-p99={fmt(self.percentile(0.99))}")
