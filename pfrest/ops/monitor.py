"""The metrics address of ``pfrest serve`` (``metrics-address``, off by default): ``/metrics``, ``/healthz``,
``/readyz`` over a tiny HTTP server (httpd), for a *source* that has the figures:

- ``source.figures()``: a stats.Figures of the whole service, now;
- ``source.probe(names, done)``: probe those lookup endpoints' backends, then ``done({name: None or
  why not})`` (health.probe_all; with ``--workers`` in a worker).

The single process's Server and the arbiter of ``--workers`` are the two sources; each binds the address
with its endpoints (before dropping privileges) and closes it when it stops serving, so ``/healthz``
answers 200 exactly while the process serves.  The ``/readyz`` that come while a probe is in flight
wait for its results (at most MAX_WAITING of them): one probe at a time, however many ask.
"""

import logging
import time

from pfrest.ops import health
from pfrest.ops.httpd import ANSWER_TIMEOUT, HttpServer
from pfrest.system.sockets import show

log = logging.getLogger("pfrest")

PATHS = ("/metrics", "/healthz", "/readyz")
MAX_WAITING = 64   # /readyz waiting for one probe (httpd.MAX_CLIENTS are open at once; the others, gone)
PROBE_LOST = ANSWER_TIMEOUT   # seconds after which a probe never done is given up for a new one


class Monitor:
    """The metrics address of one process and its answers (the httpd app)."""

    def __init__(self, cfg, source):
        # prometheus-client: loaded where metrics are served only, and here, before privileges drop
        from pfrest.ops import metrics
        self.metrics, self.source = metrics, source
        self.address = cfg.metrics_address
        self.httpd = HttpServer(cfg.metrics_address, cfg.metrics_allow_from)
        self.waiting = None   # [(health.Check, respond)] of the /readyz waiting for the probe in flight
        self.probed_at = 0.0  # when it started

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
            self._ready(respond)
        else:
            respond(404, ("not found; try " + ", ".join(PATHS) + "\n").encode())

    def _ready(self, respond):
        """``/readyz``: from the counters, or from the probe in flight, or from a new one: one at a time,
        however many ask (the backends and the arbiter's pending probes stay bounded)."""
        check = health.Check(self.source.figures())
        if not check.to_probe:
            return respond(*check.answer())
        if self.waiting is not None and time.monotonic() - self.probed_at < PROBE_LOST:
            if len(self.waiting) >= MAX_WAITING:
                return respond(503, b"too many readiness checks at once\n")
            return self.waiting.append((check, respond))
        self.waiting, self.probed_at = [(check, respond)], time.monotonic()
        try:
            self.source.probe(check.to_probe, self._probed)   # may call _probed at once
        except Exception:   # a bug: the next /readyz must probe again (httpd answers this one)
            self.waiting = None
            raise

    def _probed(self, probed):
        waiting, self.waiting = self.waiting, None
        for check, respond in waiting or ():   # a probe given up for lost may still call back, after its successor
            if probed.keys() >= set(check.to_probe):
                _answer(respond, check, probed)
            else:   # it needs an endpoint this probe did not cover: the next one
                self._ready(respond)


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
