"""``pfrest serve``: the long-running process (or, with ``--workers``, the arbiter and its workers).

Signals, handled in the event loop (never in between two statements of the request path):

- SIGTERM, SIGINT: stop accepting, close idle connections, let requests in flight finish
  (``--drain-timeout``), exit 0.  A second one exits at once, with status 1.
- SIGHUP: re-read the config file.  A valid one applies to every request from now on, on connections
  already open too; endpoints may be added, removed or moved (a connection its endpoint no longer
  takes is closed: conversation.py).  An invalid one (or one whose new
  sockets cannot be bound) is logged and the old one kept.  A ``--log-file`` is reopened.
- SIGUSR1: log the counters of every endpoint (also logged at exit).

Started as root, the process binds first and then becomes the config's ``user`` (privileges.py).
"""

import asyncio
import logging
import os
import signal
import sys

from pfrest import config, log, tracing
from pfrest.config import checks
from pfrest.process.listener import FD_RESERVE
from pfrest.system import eventloop, privileges, systemd
from pfrest.system.sockets import BindError
from pfrest.process.signals import (EX_CONFIG, STOP_SIGNALS, fatal, log_counters, reload, reloaded,
                                   signal_queue)

logger = logging.getLogger("pfrest")

class Options:
    """What the command line says about the process (the config file says the rest)."""

    def __init__(self, config_path, names=(), use_syslog=False, log_file=None, drain_timeout=10.0, workers=1):
        self.config_path, self.names = config_path, tuple(names)
        self.use_syslog, self.log_file = use_syslog, log_file
        self.drain_timeout, self.workers = drain_timeout, workers


def run(options) -> int:
    try:
        log.for_foreground(options.use_syslog, options.log_file)
    except OSError as exc:   # the log file (open_log_file); nowhere to log but the terminal
        print(f"pfrest serve: cannot open --log-file {options.log_file}: {exc.strerror}", file=sys.stderr)
        return 1
    to_stderr_too = options.use_syslog or bool(options.log_file)
    try:
        cfg = checks.load(options.config_path)   # refused as `pfrest check` refuses it
    except config.ConfigError as exc:
        return fatal(exc.problems, EX_CONFIG, to_stderr_too)
    for warning in checks.warnings(cfg):
        logger.warning("%s", warning)
    raise_fd_limit(cfg)
    preload(cfg)
    inherited = systemd.listen_fds()
    if options.workers > 1:
        from pfrest.process.arbiter import Arbiter
        return Arbiter(options, cfg, inherited).run()
    from pfrest.process.serving import Server
    server = Server(cfg, options.names, inherited)
    try:
        server.bind()
        privileges.drop(cfg.user, server.socket_files())
    except config.ConfigError as exc:
        return fatal(exc.problems, EX_CONFIG, to_stderr_too)
    except (BindError, privileges.PrivilegeError, OSError) as exc:
        server.listener.close()
        return fatal([str(exc)], 1, to_stderr_too)
    status = eventloop.run(serve(server, options))
    privileges.finish()
    return status


async def serve(server, options) -> int:
    """The main loop of a single ``pfrest serve`` process."""
    events = signal_queue(asyncio.get_running_loop())
    server.start()
    count = len(server.addresses)
    systemd.notify(f"READY=1\nSTATUS=serving {count} endpoint(s)")
    logger.info("ready: serving %d endpoint(s), pid %d", count, os.getpid())
    while True:
        signum = await events.get()
        if signum in STOP_SIGNALS:
            break
        if signum == signal.SIGHUP and reload(server.reload, options, server.reloads):
            reloaded(options)
        elif signum == signal.SIGUSR1:
            log_counters(server.summary())
    logger.info("%s: no longer accepting; letting requests in progress finish (up to %.1f s)",
                signal.Signals(signum).name, options.drain_timeout)
    systemd.notify("STOPPING=1")
    await server.stop(options.drain_timeout)
    tracing.shutdown()   # the spans still in the batch go out
    log_counters(server.summary())
    logger.info("stopped")
    return 0


def preload(cfg):
    """Import now, as root, all that serving may need later: once privileges are dropped, a Python
    whose library the service account cannot read (one under /root, say) could not import it, and a
    reload that adds an https endpoint would fail.  redis-py only when an endpoint has a shared cache."""
    import encodings.idna  # noqa: F401 (host names in getaddrinfo)
    import ssl  # noqa: F401
    import pfrest.backend  # noqa: F401
    import pfrest.cache  # noqa: F401
    import pfrest.process.arbiter  # noqa: F401
    import pfrest.process.serving  # noqa: F401
    import pfrest.process.worker  # noqa: F401
    if any(ep.cache_url for ep in cfg.endpoints):
        import pfrest.cache.shared  # noqa: F401
    if any(ep.oauth2 for ep in cfg.endpoints):
        import pfrest.identity  # noqa: F401
    if cfg.tracing is not None:
        try:
            import opentelemetry.sdk.trace  # noqa: F401
            import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        except ImportError:
            pass   # tracing.configure says it
    eventloop.new_loop().close()  # uvloop, where installed


def raise_fd_limit(cfg):
    """Each connection takes a socket, and may take a backend connection: lift the soft limit (1024 on
    most systems, below one endpoint's default max-connections) to the hard one."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    need = 2 * sum(ep.max_connections for ep in cfg.endpoints) + FD_RESERVE  # see listener.connection_room
    if soft != resource.RLIM_INFINITY and soft < need:
        logger.warning("the open-file limit (%d) is below what max-connections may need (%d); "
                       "raise it (LimitNOFILE= in the unit)", soft, need)
