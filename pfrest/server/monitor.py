"""The metrics address of ``pfrest serve`` (``metrics-address``, off by default): ``/metrics``, ``/healthz``,
``/readyz`` over a tiny HTTP server (httpd), for a *source* that has the figures:

- ``source.figures()``: a stats.Figures of the whole service, now;
- ``source.probe(names, done)``: probe those lookup endpoints' backends, then ``done({name: None or
  why not})`` (health.probe_all; with ``--workers`` in a worker).

The single process's Server and the arbiter of ``--workers`` are the two sources; each binds the address
with its endpoints (before dropping privileges) and closes it when it stops serving, so ``/healthz``
answers 200 exactly while the process serves.
"""

import logging

from pfrest.server import health
from pfrest.server.httpd import HttpServer
from pfrest.server.sockets import show

log = logging.getLogger("pfrest")

PATHS = ("/metrics", "/healthz", "/readyz")


class Monitor:
    """The metrics address of one process and its answers (the httpd app)."""

    def __init__(self, cfg, source):
        # prometheus-client: loaded where metrics are served only, and here, before privileges drop
        from pfrest.server import metrics
        self.metrics, self.source = metrics, source
        self.address = cfg.metrics_address
        self.httpd = HttpServer(cfg.metrics_address, cfg.metrics_allow_from)

    def bind(self):
        self.httpd.bind()
        return self

    def start(self, watcher):
        self.httpd.start(watcher, self)
        log.info("metrics on http://%s/metrics (also /healthz, /readyz)", show(self.address))
        return self

    def close(self):
        self.httpd.close()

    def __call__(self, method, path, body, respond):
        if path == "/metrics":
            respond(200, self.metrics.exposition(self.source.figures()), self.metrics.CONTENT_TYPE)
        elif path == "/healthz":
            respond(200, b"ok\n")
        elif path == "/readyz":
            check = health.Check(self.source.figures())
            if check.to_probe:
                self.source.probe(check.to_probe, lambda probed: _answer(respond, check, probed))
            else:
                respond(*check.answer())
        else:
            respond(404, ("not found; try " + ", ".join(PATHS) + "\n").encode())


def _answer(respond, check, probed):
    """``/readyz`` once the probes are in, called from the loop (the arbiter's, too): a bug must not
    escape into it."""
    try:
        respond(*check.answer(probed))
    except Exception:
        log.exception("metrics-address: cannot answer /readyz")
        respond(503, b"internal error\n")


def for_config(cfg, source):
    """The Monitor the config asks for (not bound yet), or None."""
    return Monitor(cfg, source) if cfg.metrics_address else None


def reconfigure(monitor, cfg):
    """After a reload: a new metrics-allow-from applies at once; a new metrics-address at the next start."""
    if cfg.metrics_address != (monitor.address if monitor else None):
        log.warning("metrics-address changed: the change takes effect when pfrest serve restarts")
    if monitor is not None:
        monitor.httpd.allow(cfg.metrics_allow_from)
