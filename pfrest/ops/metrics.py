"""``/metrics``: the Figures of a serving process (stats.Figures) in Prometheus' text format 0.0.4, and
back (``read``, for ``pfrest stats``).

The figures are the whole service's: with ``--workers`` the arbiter builds them from its own counters,
the workers' last reports and those of the workers that ended.  prometheus-client writes the text (a
Collector yielding metric families from one reading, no metric objects on the request path); this
module is imported only where metrics are served or read, never by ``pfrest handle``.

Names follow Prometheus' conventions: ``pfrest_`` prefix, base units (seconds), ``_total`` counters.
Label values stay bounded: endpoints and targets come from the config, reply classes and error kinds
from fixed lists (stats.reply_class), refusal reasons from the listener's.
"""

import platform
from urllib.parse import urlsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from pfrest import __version__
from pfrest.ops.counters import BUCKETS_S, Figures, Stats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RELOAD_RESULTS = ("ok", "failed")
# the cache's events (pfrest.backend.observer) -> (metric, what it counts)
CACHE_EVENTS = {"hit": ("pfrest_cache_hits", "lookups answered from the answer cache"),
                "miss": ("pfrest_cache_misses", "lookups the answer cache did not hold"),
                "stale": ("pfrest_cache_stale_answers", "expired answers served because the backend failed"),
                "eviction": ("pfrest_cache_evictions", "cache entries dropped to stay within cache-max-entries"),
                "drop": ("pfrest_cache_drops", "cache entries dropped by pfrest cache drop or flush")}
# refreshes ahead by outcome: events "refresh-OUTCOME" (cache/refresh.py's OUTCOMES, said again here:
# ops never imports the cache, which would bring the HTTP side into pfrest stats)
REFRESH_OUTCOMES = ("refreshed", "failed", "elsewhere", "busy")
# the shared cache's reads, by store: events "read-primary", "read-replica" (cache-read-url)
READ_STORES = ("primary", "replica")
# the shared cache's events (cache-url) -> (metric, what it counts)
SHARED_EVENTS = {"hit": ("pfrest_shared_cache_hits", "local cache misses the shared cache answered"),
                 "miss": ("pfrest_shared_cache_misses", "local cache misses the shared cache had no fresh "
                          "answer for"),
                 "error": ("pfrest_shared_cache_errors", "calls to the shared cache that failed or timed out"),
                 "skip": ("pfrest_shared_cache_skipped", "local cache misses that went to the backend without "
                          "asking the shared cache, skipped after it failed")}
_LE = [floatToGoString(bound) for bound in BUCKETS_S]


def origin(target: str) -> str:
    """A target URL as a label: scheme, host and port only (a query string may hold a key)."""
    parts = urlsplit(target)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def exposition(figures: Figures) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reading(figures))
    return generate_latest(registry)


class _Reading:
    """A prometheus-client Collector over one Figures."""

    def __init__(self, figures):
        self.figures = figures

    def collect(self):
        return families(self.figures)


def _histogram(name, text, labels):
    return HistogramMetricFamily(name, text, labels=labels)


def _add_histogram(family, labels, counts, total):
    cumulative, running = [], 0
    for le, count in zip(_LE, counts):
        running += count
        cumulative.append((le, running))
    family.add_metric(labels, cumulative, total)


def families(figures: Figures):
    """The metric families, every one always present (with no samples when nothing was counted)."""
    build = GaugeMetricFamily("pfrest_build_info", "pfrest's version and Python's, as labels",
                              labels=["version", "python"])
    build.add_metric([__version__, platform.python_version()], 1)
    info = GaugeMetricFamily("pfrest_endpoint_info", "each endpoint's mode, as a label",
                             labels=["endpoint", "mode"])
    requests = CounterMetricFamily("pfrest_requests", "Postfix requests answered, by reply class "
                                   "(found, notfound, temp, perm, timeout; for policy the action's verb; for "
                                   "dovecot-sasl ok, fail, temp, timeout: logins by result)",
                                   labels=["endpoint", "mode", "reply"])
    latency = _histogram("pfrest_request_duration_seconds", "time from a complete Postfix request to "
                         "its reply", ["endpoint"])
    exchanges = CounterMetricFamily("pfrest_backend_exchanges", "HTTP exchanges with the backend, by "
                                    "target and outcome (ok: an HTTP answer came, whatever its status)",
                                    labels=["endpoint", "target", "outcome"])
    exchange_latency = _histogram("pfrest_backend_exchange_duration_seconds", "time one HTTP exchange "
                                  "with the backend took", ["endpoint"])
    errors = CounterMetricFamily("pfrest_backend_errors", "requests answered with an error because of "
                                 "the backend, by kind (timeout, refused, ..., http-NNN, invalid-answer)",
                                 labels=["endpoint", "kind"])
    strays = CounterMetricFamily("pfrest_backend_stray_answers", "backend answers refused as not their "
                                 "request's (another request's X-Request-Id, or bytes on an idle "
                                 "connection), each closing its connection", labels=["endpoint"])
    cache = {event: CounterMetricFamily(name, text, labels=["endpoint"])
             for event, (name, text) in CACHE_EVENTS.items()}
    entries = GaugeMetricFamily("pfrest_cache_entries", "answers in the cache now (all workers)",
                                labels=["endpoint"])
    shared = {event: CounterMetricFamily(name, text, labels=["endpoint"])
              for event, (name, text) in SHARED_EVENTS.items()}
    refreshes = CounterMetricFamily("pfrest_cache_refreshes", "refreshes ahead (stale-while-revalidate), by "
                                    "outcome: refreshed, failed, elsewhere (another process did), busy (not "
                                    "started: the most were in flight)", labels=["endpoint", "outcome"])
    reads = CounterMetricFamily("pfrest_shared_cache_reads", "keys read from the shared cache, by store: "
                                "primary (cache-url) or replica (cache-read-url)", labels=["endpoint", "store"])
    shared_up = GaugeMetricFamily("pfrest_shared_cache_up", "1 while every process uses the shared cache, 0 "
                                  "while one skips it after it failed", labels=["endpoint"])
    open_now = GaugeMetricFamily("pfrest_open_connections", "Postfix connections open now",
                                 labels=["endpoint"])
    accepted = CounterMetricFamily("pfrest_connections_accepted", "Postfix connections accepted",
                                   labels=["endpoint"])
    refused = CounterMetricFamily("pfrest_connections_refused", "Postfix connections refused, by reason",
                                  labels=["endpoint", "reason"])
    reloads = CounterMetricFamily("pfrest_reloads", "configuration reloads (SIGHUP), by result",
                                  labels=["result"])
    for result in RELOAD_RESULTS:
        reloads.add_metric([result], figures.reloads.get(result, 0))
    for name, stats in sorted(figures.endpoints.items()):
        mode = stats.mode or "unknown"
        info.add_metric([name, mode], 1)
        for reply, count in sorted(stats.replies.items()):
            requests.add_metric([name, mode, reply.lower()], count)
        _add_histogram(latency, [name], stats.latency, stats.latency_ms / 1000)
        by_origin = {}
        for (target, outcome), count in stats.exchanges.items():
            key = (origin(target), outcome)
            by_origin[key] = by_origin.get(key, 0) + count
        for (target, outcome), count in sorted(by_origin.items()):
            exchanges.add_metric([name, target, outcome], count)
        _add_histogram(exchange_latency, [name], stats.exchange_latency, stats.exchange_seconds)
        for kind, count in sorted(stats.errors.items()):
            errors.add_metric([name, kind], count)
        strays.add_metric([name], stats.strays)
        if stats.cache_events or stats.cache_entries:
            for event, family in cache.items():
                family.add_metric([name], stats.cache_events.get(event, 0))
            entries.add_metric([name], stats.cache_entries)
            for outcome in REFRESH_OUTCOMES:
                refreshes.add_metric([name, outcome], stats.cache_events.get(f"refresh-{outcome}", 0))
        if stats.shared_events or stats.shared_up is not None:
            for event, family in shared.items():
                family.add_metric([name], stats.shared_events.get(event, 0))
            for store in READ_STORES:
                reads.add_metric([name, store], stats.shared_events.get(f"read-{store}", 0))
            if stats.shared_up is not None:
                shared_up.add_metric([name], int(stats.shared_up))
        accepted.add_metric([name], stats.accepted)
        for reason, count in sorted(stats.refused.items()):
            refused.add_metric([name, reason], count)
    for name, count in sorted(figures.connections.items()):
        open_now.add_metric([name], count)
    found = [build, info, requests, latency, exchanges, exchange_latency, errors, strays, *cache.values(),
             entries, refreshes, *shared.values(), reads, shared_up, open_now, accepted, refused, reloads]
    if figures.workers is not None:
        workers = GaugeMetricFamily("pfrest_worker_open_connections", "Postfix connections open per worker "
                                    "process (serve --workers)", labels=["worker"])
        for index, count in enumerate(figures.workers):
            workers.add_metric([str(index)], count)
        restarts = CounterMetricFamily("pfrest_worker_restarts", "worker processes replaced after they "
                                       "ended unexpectedly")
        restarts.add_metric([], figures.restarts)
        silent = GaugeMetricFamily("pfrest_workers_silent", "worker processes silent now (stopped or stuck): "
                                   "they get no new connections and are replaced if they stay silent")
        silent.add_metric([], len(figures.silent))
        found += [workers, restarts, silent]
    return found


def read(text: str) -> Figures:
    """The Figures behind a ``/metrics`` text (targets as their origins): what ``pfrest stats`` shows."""
    endpoints, connections, reloads, workers, restarts, silent = {}, {}, {}, None, 0, ()
    index = {bound: i for i, bound in enumerate(BUCKETS_S)}
    events = {f"{name}_total": event for event, (name, _) in CACHE_EVENTS.items()}
    shared_events = {f"{name}_total": event for event, (name, _) in SHARED_EVENTS.items()}

    def of(labels):
        return endpoints.setdefault(labels["endpoint"], Stats())

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            count = int(value) if value == int(value) else value
            if name == "pfrest_endpoint_info":
                of(labels).mode = labels["mode"]
            elif name == "pfrest_requests_total":
                of(labels).replies[labels["reply"].upper()] += count
            elif name in ("pfrest_request_duration_seconds_bucket",
                          "pfrest_backend_exchange_duration_seconds_bucket"):
                stats = of(labels)
                counts = stats.latency if name.startswith("pfrest_request") else stats.exchange_latency
                counts[index[float(labels["le"])]] = count   # cumulative here; made per bucket below
            elif name == "pfrest_request_duration_seconds_sum":
                of(labels).latency_ms = value * 1000
            elif name == "pfrest_backend_exchange_duration_seconds_sum":
                of(labels).exchange_seconds = value
            elif name == "pfrest_backend_exchanges_total":
                of(labels).exchanges[labels["target"], labels["outcome"]] += count
            elif name == "pfrest_backend_errors_total":
                of(labels).errors[labels["kind"]] += count
            elif name == "pfrest_backend_stray_answers_total":
                of(labels).strays += count
            elif name in events:
                of(labels).cache_events[events[name]] += count
            elif name == "pfrest_cache_entries":
                of(labels).cache_entries = count
            elif name in shared_events:
                of(labels).shared_events[shared_events[name]] += count
            elif name == "pfrest_cache_refreshes_total":
                of(labels).cache_events[f"refresh-{labels['outcome']}"] += count
            elif name == "pfrest_shared_cache_reads_total":
                of(labels).shared_events[f"read-{labels['store']}"] += count
            elif name == "pfrest_shared_cache_up":
                of(labels).shared_up = bool(value)
            elif name == "pfrest_open_connections":
                connections[labels["endpoint"]] = count
                of(labels)
            elif name == "pfrest_connections_accepted_total":
                of(labels).accepted = count
            elif name == "pfrest_connections_refused_total":
                of(labels).refused[labels["reason"]] += count
            elif name == "pfrest_reloads_total":
                reloads[labels["result"]] = count
            elif name == "pfrest_worker_open_connections":
                workers = workers or {}
                workers[int(labels["worker"])] = count
            elif name == "pfrest_worker_restarts_total":
                restarts = count
            elif name == "pfrest_workers_silent":
                silent = ((None, None, None),) * int(value)   # how many only: /readyz says which
    for stats in endpoints.values():
        for counts in (stats.latency, stats.exchange_latency):
            for i in range(len(counts) - 1, 0, -1):
                counts[i] -= counts[i - 1]
    return Figures(endpoints, connections, reloads,
                   None if workers is None else tuple(count for _, count in sorted(workers.items())), restarts,
                   silent)
