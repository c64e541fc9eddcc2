"""Per-endpoint counters of the listener, logged on SIGUSR1 and at exit.

Counts are totals since start (kept across a reload while the endpoint keeps its name); latency
percentiles are over the last WINDOW requests, so that they describe now rather than last week.
"""

import math
import threading
from collections import Counter, deque

from pfrest.protocol.verdict import Failure

WINDOW = 10000


def backend_error(result):
    """What went wrong with the backend for this answer, or None if nothing did."""
    if result is None:
        return None
    if isinstance(result, Failure):
        return result.kind
    if result.status not in (200, 404):
        return f"http-{result.status}"
    return None


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = math.ceil(fraction * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def _counts(counter):
    return ",".join(f"{k}:{v}" for k, v in sorted(counter.items())) or "-"


class Stats:
    """Thread-safe counters for one endpoint; ``record`` is a Responder observer."""

    def __init__(self):
        self._lock = threading.Lock()
        self.replies = Counter()     # verdict kind -> count
        self.errors = Counter()      # backend error kind -> count
        self.refused = Counter()     # why a connection was refused -> count
        self.connections = 0         # accepted so far
        self._ms = deque(maxlen=WINDOW)

    def record(self, verdict, ms, result):
        error = backend_error(result)
        with self._lock:
            self.replies[verdict.kind] += 1
            if error:
                self.errors[error] += 1
            self._ms.append(ms)

    def accepted(self):
        with self._lock:
            self.connections += 1

    def refuse(self, why):
        with self._lock:
            self.refused[why] += 1

    def summary(self, open_connections):
        """One log line's worth: ``requests=... replies=... backend-errors=... ms-p50=...``."""
        with self._lock:
            ms = sorted(self._ms)
            replies, errors, refused = Counter(self.replies), Counter(self.errors), Counter(self.refused)
            accepted = self.connections
        p50, p99 = percentile(ms, 0.50), percentile(ms, 0.99)
        fmt = (lambda v: "-" if v is None else f"{v:.1f}")
        return (f"connections={open_connections} accepted={accepted} refused={_counts(refused)} "
                f"requests={sum(replies.values())} replies={_counts(replies)} "
                f"backend-errors={sum(errors.values())} ({_counts(errors)}) "
                f"ms-p50={fmt(p50)} ms-p99={fmt(p99)}")
