"""``pfrest stats -c FILE``: the figures of a running ``pfrest serve`` as a table, for admins without
Prometheus.  It reads them where Prometheus would, ``/metrics`` on the config's ``metrics-address``
(the whole service's, workers added up), and turns the text back into figures (ops.metrics.read),
so the table and the metrics can never disagree.
"""

import http.client
import os
import sys

from pfrest.commands import localhttp
from pfrest.ops.counters import BUCKETS_MS, percentile
from pfrest.system.sockets import show

FETCH_TIMEOUT = 5.0   # seconds for the whole exchange: the metrics address answers at once or not at all
MAX_METRICS = 16 << 20   # bytes of /metrics: a few KiB per endpoint and backend target
# a wildcard listening address is reached on loopback
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def run(cfg) -> int:
    if cfg.metrics_address is None:
        print(f"pfrest stats: {cfg.path} sets no metrics-address, where pfrest serve would show its "
              "figures (e.g. \"metrics-address\": \"127.0.0.1:9100\")", file=sys.stderr)
        return os.EX_UNAVAILABLE
    host, port = cfg.metrics_address
    url = f"http://{show((WILDCARDS.get(host, host), port))}/metrics"
    try:
        text = fetch(WILDCARDS.get(host, host), port)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        print(f"pfrest stats: no figures from {url}: {exc or type(exc).__name__} (is pfrest serve running "
              "with this config, and does metrics-allow-from let this host in?)", file=sys.stderr)
        return os.EX_UNAVAILABLE
    from pfrest.ops import metrics  # prometheus-client, for this command only
    print(table(metrics.read(text), url))
    return 0


def fetch(host, port) -> str:
    status, reason, body = localhttp.exchange((host, port), "GET", "/metrics", seconds=FETCH_TIMEOUT,
                                              max_body=MAX_METRICS)
    if status != 200:
        raise ValueError(f"HTTP {status} {reason}")
    return body.decode("utf-8")


def _ms(value):
    return "-" if value is None else f"{value:g}"


def _counts(counter, lower=False):
    return ", ".join(f"{k.lower() if lower else k} {v}" for k, v in sorted(counter.items())) or "-"


def _columns(rows):
    """Rows of cells as aligned text: numbers (and "-") to the right, words to the left."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = [all(row[i].replace(".", "").isdigit() or row[i] == "-" for row in rows[1:])
               for i in range(len(widths))]
    return "\n".join("  ".join(cell.rjust(w) if num else cell.ljust(w)
                               for cell, w, num in zip(row, widths, numeric)).rstrip() for row in rows)


def table(figures, url) -> str:
    """The figures as the admin reads them: a line about the service, then requests and backend tables."""
    reloads = f"reloads {figures.reloads.get('ok', 0)} ok, {figures.reloads.get('failed', 0)} failed"
    head = f"{url}: "
    if figures.workers is not None:
        head += (f"{len(figures.workers)} workers (connections {','.join(map(str, figures.workers)) or '-'}; "
                 f"{figures.restarts} replaced{f', {len(figures.silent)} silent' if figures.silent else ''}), ")
    names = sorted(figures.endpoints)
    requests = [["endpoint", "mode", "open", "accepted", "refused", "requests", "replies", "p50 ms", "p99 ms"]]
    backend = [["endpoint", "exchanges", "errors", "p50 ms", "p99 ms", "cache hits", "misses", "stale",
                "evictions", "entries", "dropped"]]
    shared = [["endpoint", "shared cache", "hits", "misses", "errors", "skipped"]]
    for name in names:
        s = figures.endpoints[name]
        requests.append([name, s.mode or "-", str(figures.connections.get(name, "-")), str(s.accepted),
                         _counts(s.refused), str(s.requests), _counts(s.replies, lower=True),
                         _ms(s.percentile(0.5)), _ms(s.percentile(0.99))])
        outcomes = {}
        for (_, outcome), count in s.exchanges.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
        cache = [str(s.cache_events.get(event, 0)) for event in ("hit", "miss", "stale", "eviction")]
        backend.append([name, _counts(outcomes), _counts(s.errors),
                        _ms(percentile(s.exchange_latency, BUCKETS_MS, 0.5)),
                        _ms(percentile(s.exchange_latency, BUCKETS_MS, 0.99)),
                        *(cache + [str(s.cache_entries), str(s.cache_events.get("drop", 0))]
                          if s.cache_events or s.cache_entries else ["-"] * 6)])
        if s.shared_up is not None or s.shared_events:
            shared.append([name, {True: "used", False: "SKIPPED", None: "-"}[s.shared_up],
                           *(str(s.shared_events.get(event, 0)) for event in ("hit", "miss", "error", "skip"))])
    tables = [requests, backend] + ([shared] if len(shared) > 1 else [])
    return f"{head}{reloads}\n\n" + "\n\n".join(_columns(rows) for rows in tables)
