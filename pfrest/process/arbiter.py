"""``pfrest serve --workers N``: one arbiter process that accepts, N worker processes that answer.

Why processes: Python runs one thread at a time, so one process uses one core; N workers use N.

The arbiter binds every socket (before dropping privileges), forks the workers, and then accepts every
connection itself: it admits it (allow-from, max-connections for the whole service) and passes it to
the worker with the fewest open connections, over that worker's channel (control.py, SCM_RIGHTS).  So
connections are spread evenly whatever the burst, on TCP, unix and systemd sockets alike, and a
reload is the single-process reload: the arbiter opens and closes the sockets the new config adds and
drops, and sends the config to every worker, which applies it at once to the connections it has.

A worker that dies, or goes silent, is replaced (supervisor.py: forking, channels, heartbeat,
reaping).  The workers send their counters every second and at exit, which the arbiter adds up
(SIGUSR1, at exit, and the metrics address, which it serves: monitor.py; the counts are dispatch.py's,
which also chooses the worker of each connection).  The arbiter alone talks to systemd (the main PID).
A stop lets the workers drain for the drain timeout and STOP_GRACE more at most, and kills a silent
one at once.

This module is the arbiter's run, its loop, its signals, reload and stop; the Arbiter is made of
Supervisor and Dispatcher too, which work on its state (one loop, one process).

The arbiter runs a plain selector loop, not asyncio: it forks while running, and a child must start
its own event loop from a clean slate.
"""

import heapq
import logging
import os
import selectors
import signal
import socket
import time
from collections import Counter

from pfrest import config
from pfrest.process import signals
from pfrest.ops import controlsocket, monitor
from pfrest.process.dispatch import Dispatcher
from pfrest.process.listener import Listener
from pfrest.process.supervisor import READY_TIMEOUT, SIGNALS, Supervisor, kill
from pfrest.system import privileges, systemd
from pfrest.system.sockets import BindError

logger = logging.getLogger("pfrest")

RELOAD_TIMEOUT = 5.0   # seconds the workers get to confirm a reload before it is called done anyway
STOP_GRACE = 3.0       # seconds past the drain timeout a worker gets to exit on stop before it is killed


class Arbiter(Supervisor, Dispatcher):
    """The arbiter process.  Its state is all here, in one place: for its own methods and for those of
    Supervisor (workers, restarts, ended_stats) and Dispatcher (probes, invalidations)."""

    def __init__(self, options, cfg, inherited):
        self.options = options
        self.stats = {}              # endpoint name -> the arbiter's own counters (accepted, refused)
        self.ended_stats = {}        # endpoint name -> counters of workers that have ended
        self.listener = Listener(cfg, options.names, inherited, stats=self.stats)
        self.workers = {}            # pid -> supervisor.WorkerHandle
        self.timers = []             # heap of (when, sequence, callback, args)
        self.selector = self.wake = None
        self.stopping = None
        self.stop_signals = 0
        self.generation = 0          # counts reloads: workers confirm each one
        self.confirming = None       # the generation whose confirmations are awaited
        self.reloads = Counter()     # "ok" / "failed" -> count
        self.restarts = 0            # workers replaced after they died
        self.monitor = monitor.for_config(cfg, self)
        self.probes = {}             # probe number -> (names, done): readiness probes out with a worker
        self.probe_number = 0
        self.control = controlsocket.ControlSocket(cfg, self)
        self.invalidations = {}      # number -> (done, {pid: count}, pids asked): pfrest cache, with the workers

    # --- the process ------------------------------------------------------------------------------

    def run(self) -> int:
        to_stderr_too = self.options.use_syslog or bool(self.options.log_file)
        try:
            self.listener.bind()
            if self.monitor is not None:
                self.monitor.bind()
            self.control.bind()
            privileges.drop(self.listener.cfg.user, self.listener.socket_files() + self.control.socket_files())
        except config.ConfigError as exc:
            return signals.fatal(exc.problems, signals.EX_CONFIG, to_stderr_too)
        except (BindError, privileges.PrivilegeError, OSError) as exc:
            self.listener.close()
            return signals.fatal([str(exc)], 1, to_stderr_too)
        self.selector = selectors.DefaultSelector()
        self._catch_signals()
        for index in range(self.options.workers):
            self._fork(index)
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready for w in self.workers.values()) and time.monotonic() < deadline:
            self._turn(deadline - time.monotonic())
        self._watchdog()
        self.listener.start(self, self._pass)
        if self.monitor is not None:
            self.monitor.start(self)
        self.control.start(self)
        count = len(self.listener.addresses)
        systemd.notify(f"READY=1\nSTATUS=serving {count} endpoint(s) with {len(self.workers)} workers")
        logger.info("ready: serving %d endpoint(s), %d workers, pid %d", count, len(self.workers), os.getpid())
        while self.workers or not self.stopping:
            self._turn()
        signals.log_counters(self.summary())
        logger.info("stopped")
        privileges.finish()
        return 0

    def _turn(self, timeout=None):
        """One round of the loop: wait for sockets or the next timer, then act."""
        if self.timers:
            wait = max(self.timers[0][0] - time.monotonic(), 0)
            timeout = wait if timeout is None else min(timeout, wait)
        for key, _ in self.selector.select(timeout):
            callback, args = key.data
            callback(*args)
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, callback, args = heapq.heappop(self.timers)
            callback(*args)

    # the Listener's watcher: readiness and timers on this loop

    def watch(self, sock, callback, *args):
        self.selector.register(sock, selectors.EVENT_READ, (callback, args))

    def watch_writable(self, sock, callback, *args):
        self.selector.register(sock, selectors.EVENT_WRITE, (callback, args))

    def unwatch(self, sock):
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def later(self, seconds, callback, *args):
        heapq.heappush(self.timers, (time.monotonic() + seconds, id(args), callback, args))

    # --- signals ------------------------------------------------------------------------------------

    def _catch_signals(self):
        """Signal numbers arrive as bytes on a socket pair (set_wakeup_fd) and are handled in the loop;
        the Python-level handler only counts stop signals, so that a second one exits at once even
        while the loop waits for workers that drain."""
        self.wake, writer = socket.socketpair()
        self.wake.setblocking(False)
        writer.setblocking(False)
        self._wake_writer = writer
        signal.set_wakeup_fd(writer.fileno())
        for signum in SIGNALS:
            signal.signal(signum, self._on_signal)
        self.watch(self.wake, self._signals)

    def _on_signal(self, signum, frame):
        if signum in signals.STOP_SIGNALS:
            self.stop_signals += 1
            if self.stop_signals > 1:
                logger.warning("second %s: exiting at once", signal.Signals(signum).name)
                for pid in self.workers:
                    kill(pid, signal.SIGKILL)
                logging.shutdown()
                os._exit(1)

    def _signals(self):
        try:
            received = self.wake.recv(4096)
        except BlockingIOError:
            return
        for signum in received:
            if signum in signals.STOP_SIGNALS:
                self._stop(signal.Signals(signum).name)
            elif signum == signal.SIGHUP and not self.stopping:
                self._reload()
            elif signum == signal.SIGUSR1:
                signals.log_counters(self.summary())
            elif signum == signal.SIGCHLD:
                self._reap()

    def _reload(self):
        """The listener takes the new config here (sockets opened and closed); every worker gets it to
        apply to its connections, and confirms; "reloaded" is logged (and systemd told) once all have."""
        cfg = signals.reload(self.listener.reload, self.options, self.reloads)
        if cfg is None:
            self._broadcast(("config", None, self.generation))  # still: reopen the log file
            return
        monitor.reconfigure(self.monitor, cfg)
        controlsocket.reconfigure(self.control, cfg)
        self.generation += 1
        self.confirming = self.generation
        self._broadcast(("config", cfg, self.generation))
        self.later(RELOAD_TIMEOUT, self._confirmed, self.generation, True)
        self._confirmed(self.generation)

    def _confirmed(self, generation, late=False):
        if self.confirming != generation:
            return
        slow = [w for w in self.workers.values() if w.generation < generation]
        if slow and not late:
            return
        self.confirming = None
        note = f" (workers {', '.join(str(w.index) for w in slow)} did not confirm)" if slow else ""
        signals.reloaded(self.options, note)

    def _stop(self, name):
        if self.stopping:
            return
        self.stopping = name
        systemd.notify("STOPPING=1")
        logger.info("%s: stopping %d workers", name, len(self.workers))
        self.listener.close()
        if self.monitor is not None:
            self.monitor.close()
        self.control.close()
        self._broadcast(("stop",))
        self.later(self.options.drain_timeout + STOP_GRACE, self._overdue)

    def _overdue(self):
        for handle in self.workers.values():
            self._kill(handle, "still running %.0f s after the drain timeout" % STOP_GRACE)
