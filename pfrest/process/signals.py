"""The signals of ``pfrest serve``, the same for one process (commands/serve.py) and for the arbiter of
``serve --workers`` (arbiter.py), handled in the event loop, never in between two statements of the
request path:

- SIGTERM, SIGINT: stop accepting, close idle connections, let requests in flight finish
  (``--drain-timeout``), exit 0.  A second one exits at once, with status 1.
- SIGHUP: re-read the config file (``reload``).  A valid one applies to every request from now on, on
  connections already open too; endpoints may be added, removed or moved.  An invalid one (or one whose
  new sockets cannot be bound) is logged and the old one kept.  A ``--log-file`` is reopened.
- SIGUSR1: log the counters of every endpoint (also logged at exit).
"""

import asyncio
import logging
import os
import signal
import sys
import time

from pfrest import config, log
from pfrest.config import checks
from pfrest.system import systemd
from pfrest.system.sockets import BindError

logger = logging.getLogger("pfrest")

EX_CONFIG = 78
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_queue(loop):
    """The signals of the process, queued in the event loop; a second stop signal exits at once."""
    events = asyncio.Queue()
    stopping = []

    def on_signal(signum):
        if signum in STOP_SIGNALS:
            if stopping:
                logger.warning("second %s: exiting at once", signal.Signals(signum).name)
                logging.shutdown()
                os._exit(1)
            stopping.append(signum)
        events.put_nowait(signum)

    for signum in (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1):
        loop.add_signal_handler(signum, on_signal, signum)
    return events


def fatal(problems, status, to_stderr_too):
    for problem in problems:
        logger.error("%s", problem)
        if to_stderr_too:  # the admin starting it by hand looks at the terminal, not at syslog
            print(f"pfrest serve: {problem}", file=sys.stderr)
    return status


def log_counters(lines):
    for line in lines:
        logger.info("stats %s", line)


def reload(apply, options, reloads):
    """SIGHUP: reopen the log file, re-read the config and ``apply(cfg)`` it; on any problem keep the
    old one (and say so).  Returns the new Config, or None; ``reloaded()`` completes a success.
    ``reloads`` (a Counter) counts the outcome: "ok" or "failed"."""
    systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    if options.log_file and not options.use_syslog:
        try:
            log.for_foreground(False, options.log_file)  # after logrotate moved it away
        except OSError as exc:
            logger.error("cannot reopen %s, logging on to the old file: %s", options.log_file, exc.strerror)
    try:
        cfg = checks.load(options.config_path)
        apply(cfg)
    except config.ConfigError as exc:
        # the lines that follow say why: a problem in the file, or that it cannot be read at all
        logger.error("reload: keeping the old configuration; %s is refused:", options.config_path)
        for problem in exc.problems:
            logger.error("%s", problem)
    except (BindError, OSError) as exc:
        logger.error("reload: keeping the old configuration: %s", exc)
    else:
        for warning in checks.warnings(cfg):
            logger.warning("%s", warning)
        reloads["ok"] += 1
        return cfg
    reloads["failed"] += 1
    systemd.notify("READY=1")
    return None


def reloaded(options, note=""):
    logger.info("reloaded %s%s", options.config_path, note)
    systemd.notify("READY=1")
