"""``pfrest serve``: the long-running process around a Listener.

Signal handlers only queue the signal; the main loop acts on it (as gunicorn's arbiter does):

- SIGTERM, SIGINT: stop accepting, let requests in flight finish (``--drain-timeout``), close idle
  connections, exit 0.  A second one exits at once, with status 1: the handler itself does that, since
  the main loop is then busy waiting for the drain.
- SIGHUP: re-read the config file.  A valid one applies to new connections; an invalid one (or one
  whose new sockets cannot be bound) is logged and the old one kept.  A ``--log-file`` is reopened.
- SIGUSR1: log the counters of every endpoint (also logged at exit).

Started as root, the process binds first and then becomes the config's ``user`` for good.
"""

import logging
import os
import queue
import signal
import sys
import threading
import time

from pfrest import config, log, systemd
from pfrest.binding import BindError
from pfrest.listener import DRAIN_TIMEOUT, FD_RESERVE, Listener

logger = logging.getLogger("pfrest")

EX_CONFIG = 78
# Connection threads run the dialogue, a backend call and JSON decoding; 256 KiB was measured to be
# enough for json's deepest recursion, so this leaves room while a thousand threads stay cheap.
STACK_SIZE = 512 * 1024
_STOP = (signal.SIGTERM, signal.SIGINT)


class PrivilegeError(Exception):
    pass


def run(config_path, names=(), use_syslog=False, log_file=None, drain_timeout=DRAIN_TIMEOUT,
        workers=1) -> int:
    log.for_foreground(use_syslog, log_file)
    to_stderr_too = use_syslog or bool(log_file)
    events = _install_signal_handlers()
    try:
        cfg = config.load(config_path)
    except config.ConfigError as exc:
        return _fatal(exc.problems, EX_CONFIG, to_stderr_too)
    for warning in config.warnings(cfg):
        logger.warning("%s", warning)
    _raise_fd_limit(cfg)
    threading.stack_size(STACK_SIZE)
    listener = Listener(cfg, names, systemd.listen_fds())
    try:
        listener.bind()
        _drop_privileges(cfg.user, listener.unix_paths())
    except config.ConfigError as exc:
        return _fatal(exc.problems, EX_CONFIG, to_stderr_too)
    except (BindError, PrivilegeError, OSError) as exc:
        listener.stop(0)
        return _fatal([str(exc)], 1, to_stderr_too)
    def serve(parent=None):
        listener.start()
        return _serve(listener, events, config_path, use_syslog, log_file, drain_timeout, parent)

    if workers > 1:
        from pfrest.workers import supervise
        return supervise(workers, listener, serve, events, systemd.notify, _STOP)
    count = len(listener.addresses)
    systemd.notify(f"READY=1\nSTATUS=serving {count} endpoint(s)")
    logger.info("ready: serving %d endpoint(s), pid %d", count, os.getpid())
    return serve()


def _serve(listener, events, config_path, use_syslog, log_file, drain_timeout, parent=None):
    """The main loop of the process (or of a worker: ``parent`` is then the supervisor's pid, and
    its disappearance is a stop signal too)."""
    signum = None
    while signum not in _STOP:
        try:
            signum = events.get(timeout=None if parent is None else 1.0)
        except queue.Empty:
            if os.getppid() != parent:
                logger.error("the supervising process is gone; stopping")
                signum = signal.SIGTERM
            continue
        if signum == signal.SIGHUP:
            _reload(listener, config_path, use_syslog, log_file)
        elif signum == signal.SIGUSR1:
            _log_counters(listener)
    logger.info("%s: no longer accepting; letting requests in progress finish (up to %.1f s)",
                signal.Signals(signum).name, drain_timeout)
    systemd.notify("STOPPING=1")
    listener.stop(drain_timeout)
    _log_counters(listener)
    logger.info("stopped")
    return 0


def _install_signal_handlers():
    events = queue.SimpleQueue()  # put() is safe from a signal handler
    stopping = []

    def on_signal(signum, frame):
        if signum in _STOP:
            if stopping:
                logger.warning("second %s: exiting at once", signal.Signals(signum).name)
                os._exit(1)
            stopping.append(signum)
        events.put(signum)

    for signum in (*_STOP, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, on_signal)
    return events


def _fatal(problems, status, to_stderr_too):
    for problem in problems:
        logger.error("%s", problem)
        if to_stderr_too:  # the admin starting it by hand looks at the terminal, not at syslog
            print(f"pfrest serve: {problem}", file=sys.stderr)
    return status


def _log_counters(listener):
    for line in listener.summary():
        logger.info("stats %s", line)


def _reload(listener, config_path, use_syslog, log_file):
    systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    if log_file and not use_syslog:
        try:
            log.for_foreground(False, log_file)  # after logrotate moved it away
        except OSError as exc:
            logger.error("cannot reopen %s, logging on to the old file: %s", log_file, exc.strerror)
    try:
        cfg = config.load(config_path)
        listener.reload(cfg)
    except config.ConfigError as exc:
        logger.error("reload: keeping the old configuration; %s is not valid:", config_path)
        for problem in exc.problems:
            logger.error("%s", problem)
    except (BindError, OSError) as exc:
        logger.error("reload: keeping the old configuration: %s", exc)
    else:
        for warning in config.warnings(cfg):
            logger.warning("%s", warning)
        logger.info("reloaded %s", config_path)
    systemd.notify("READY=1")


def _raise_fd_limit(cfg):
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


def _drop_privileges(user, unix_paths):
    """As root: hand the unix sockets to ``user`` and become it (groups, gid, uid, in that order, so
    that no way back to root remains).  Otherwise nothing, with a word when that is worth knowing."""
    if os.geteuid() != 0:
        return
    if not user:
        logger.warning("running as root: set \"user\" in the config to drop privileges after binding")
        return
    import pwd
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise PrivilegeError(f"user: no such user {user!r}") from None
    for path in unix_paths:
        os.chown(path, pw.pw_uid, pw.pw_gid)
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    logger.info("running as user %s (uid %d, gid %d)", pw.pw_name, pw.pw_uid, pw.pw_gid)
