"""``pfrest serve --workers N``: one arbiter process that accepts, N worker processes that answer.

Why processes: Python runs one thread at a time, so one process uses one core; N workers use N.

The arbiter binds every socket (before dropping privileges), forks the workers, and then accepts every
connection itself: it admits it (allow-from, max-connections for the whole service) and passes it to
the worker with the fewest open connections, over that worker's channel (control.py, SCM_RIGHTS).  So
connections are spread evenly whatever the burst, on TCP, unix and systemd sockets alike, and a
reload is the single-process reload: the arbiter opens and closes the sockets the new config adds and
drops, and sends the config to every worker, which applies it at once to the connections it has.

A worker that dies is replaced, after RESTART_DELAY, by a fork of the arbiter: with the arbiter's
current config, never the startup one.  The workers send their counters every second (a word even
when nothing changed) and at exit, which the arbiter adds up (SIGUSR1, at exit, and the metrics address,
which it serves: monitor.py); the counters of a worker that ended are kept.  The arbiter alone talks to
systemd (the main PID).

Every word of a worker is its heartbeat: one silent for SILENT_AFTER seconds (stopped, or its loop
stuck) gets no new connections and makes ``/readyz`` say so; after KILL_AFTER it is killed (SIGKILL),
and so replaced.  So is a worker that leaves control.MAX_BACKLOG messages untaken.  A stop lets the
workers drain for the drain timeout and STOP_GRACE more at most, and kills a silent one at once.

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
from pfrest.ops import controlsocket, health, monitor
from pfrest.ops.counters import Figures, added
from pfrest.process import control
from pfrest.process.listener import Listener, connection_room
from pfrest.system import eventloop, privileges, systemd
from pfrest.system.sockets import BindError

logger = logging.getLogger("pfrest")

RESTART_DELAY = 1.0    # seconds before replacing a worker that died, so that a crash cannot spin
READY_TIMEOUT = 10.0   # seconds the workers get to start before the service says it is ready
RELOAD_TIMEOUT = 5.0   # seconds the workers get to confirm a reload before it is called done anyway
INVALIDATE_TIMEOUT = 2.0   # seconds the workers get to confirm a pfrest cache drop or flush
WATCH_INTERVAL = 0.5   # seconds between two looks at how long each worker has been silent
SILENT_AFTER = 3.0     # seconds without a word (3 heartbeats missed) before a worker gets no new connections
KILL_AFTER = 6.0       # seconds without a word before a worker is killed and replaced
STOP_GRACE = 3.0       # seconds past the drain timeout a worker gets to exit on stop before it is killed
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)


class WorkerHandle:
    """What the arbiter knows of one worker."""

    def __init__(self, index, pid, channel):
        self.index, self.pid, self.channel = index, pid, channel
        self.ready = False
        self.generation = 0      # the last config it confirmed
        self.open = Counter()    # bind key -> connections passed to it and not ended yet
        self.stats = {}          # endpoint name -> Stats, as it last reported them
        self.heard = time.monotonic()   # when its last message came
        self.quiet = False       # said to be silent (logged once)
        self.ending = False      # its channel closed, or SIGKILL sent: only reaping is left
        self.writing = False     # its channel is watched for room too (messages wait in its backlog)

    @property
    def connections(self):
        return sum(self.open.values())

    def silent(self, now):
        return now - self.heard >= SILENT_AFTER


class Arbiter:
    def __init__(self, options, cfg, inherited):
        self.options = options
        self.stats = {}              # endpoint name -> the arbiter's own counters (accepted, refused)
        self.ended_stats = {}        # endpoint name -> counters of workers that have ended
        self.listener = Listener(cfg, options.names, inherited, stats=self.stats)
        self.workers = {}            # pid -> WorkerHandle
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
        for signum in _SIGNALS:
            signal.signal(signum, self._on_signal)
        self.watch(self.wake, self._signals)

    def _on_signal(self, signum, frame):
        if signum in signals.STOP_SIGNALS:
            self.stop_signals += 1
            if self.stop_signals > 1:
                logger.warning("second %s: exiting at once", signal.Signals(signum).name)
                for pid in self.workers:
                    _kill(pid, signal.SIGKILL)
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

    def _watchdog(self):
        """Every WATCH_INTERVAL: a worker silent too long gets no connections, then is killed; while
        stopping, a silent one is killed at once (it cannot be draining)."""
        now = time.monotonic()
        for handle in self.workers.values():
            quiet = now - handle.heard
            if quiet >= (KILL_AFTER if handle.ready else READY_TIMEOUT) or (self.stopping and handle.silent(now)):
                self._kill(handle, "silent for %.1f s" % quiet)
            elif handle.silent(now) and not handle.quiet:
                handle.quiet = True
                logger.error("worker %d (pid %d) silent for %.1f s: it gets no new connections (killed after "
                             "%.0f s)", handle.index, handle.pid, quiet, KILL_AFTER)
        self.later(WATCH_INTERVAL, self._watchdog)

    def _kill(self, handle, why):
        if not handle.ending:
            handle.ending = True
            logger.error("worker %d (pid %d) %s; killing it", handle.index, handle.pid, why)
            _kill(handle.pid, signal.SIGKILL)

    # --- workers ------------------------------------------------------------------------------------

    def _fork(self, index):
        if self.stopping:
            return
        ours, theirs = control.pair()
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                self._become_worker(index, theirs)
            finally:
                os._exit(1)
        theirs.close()
        handle = self.workers[pid] = WorkerHandle(index, pid, ours)
        handle.generation = self.generation  # forked with the current config
        self.watch(ours.sock, self._channel, handle)

    def _become_worker(self, index, channel):
        """In the child: drop everything of the arbiter's, then serve; never returns."""
        from pfrest.process.worker import Worker
        signal.set_wakeup_fd(-1)
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        self.selector.close()
        for sock in [self.wake, self._wake_writer, *(w.channel for w in self.workers.values()),
                     *(slot.sock for slot in self.listener.slots.values()), *self.listener.inherited.values(),
                     *(self.monitor.httpd.all_sockets() if self.monitor is not None else ()),
                     *self.control.all_sockets()]:
            sock.close()  # a metrics client's connection too: it must end when the arbiter closes it
        os.environ.pop("NOTIFY_SOCKET", None)  # systemd listens to the main PID only
        status = 1
        try:
            worker = Worker(index, channel, self.listener.cfg, self.options, self.listener.inherited)
            status = eventloop.run(worker.run())
        except BaseException:
            logger.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(status)

    def _channel(self, handle):
        """The worker's channel is readable or has room again."""
        self._from_worker(handle)
        if handle.writing:
            self._flush(handle)

    def _from_worker(self, handle):
        while True:
            try:
                message, fds = handle.channel.receive()
            except BlockingIOError:
                return
            except OSError:
                message, fds = None, []
            for fd in fds:  # workers pass none; never leak one
                os.close(fd)
            if message is None:
                self.unwatch(handle.channel.sock)  # it is ending: SIGCHLD follows
                handle.ending = True
                return
            handle.heard = time.monotonic()
            if handle.quiet:
                handle.quiet = False
                logger.warning("worker %d (pid %d) speaks again", handle.index, handle.pid)
            kind = message[0]
            if kind == "ready":
                handle.ready = True
            elif kind == "applied":
                handle.generation = message[1]
                self._confirmed(message[1])
            elif kind == "closed":
                handle.open[message[1]] -= 1
                self.listener.closed(message[1])
            elif kind == "stats":
                handle.stats = message[1]
            elif kind == "probed":
                self._probed(message[1], message[2])
            elif kind == "invalidated":
                self._invalidated(message[1], handle.pid, message[2])

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = self.workers.pop(pid, None)
            if handle is None:
                continue  # not a worker (the janitor never ends before us)
            self._from_worker(handle)  # its last word: the final counters
            self.unwatch(handle.channel.sock)
            handle.channel.close()   # connections still waiting to be passed to it close too
            for key, count in handle.open.items():
                self.listener.closed(key, count)
            for stats in handle.stats.values():
                stats.cache_entries, stats.shared_up = 0, None   # its cache is gone; its counts stay
            self.ended_stats = added(self.ended_stats, handle.stats)
            if self.confirming:
                self._confirmed(self.confirming)
            if not self.stopping:
                self.restarts += 1
                logger.error("worker %d (pid %d) ended with status %s; replacing it in %.0f s", handle.index,
                             pid, os.waitstatus_to_exitcode(status), RESTART_DELAY)
                self.later(RESTART_DELAY, self._fork, handle.index)

    def _broadcast(self, message):
        for handle in list(self.workers.values()):
            self._send(handle, message)

    def _send(self, handle, message, passed=None):
        """Send (or queue) ``message`` to a worker, with the socket ``passed`` (then the channel's);
        False, and the worker killed, when it takes no more."""
        if handle.ending:
            return False
        try:
            if handle.channel.send(message, passed):
                self._flush(handle)
                return True
            why = f"{control.MAX_BACKLOG} messages wait"
        except OSError as exc:
            why = str(exc)
        self._kill(handle, f"does not take messages ({why})")
        return False

    def _flush(self, handle):
        """Watch the channel for room while messages wait in its backlog, and only then."""
        try:
            done = handle.channel.flush()
        except OSError:
            done = True   # the worker is gone: SIGCHLD follows
        if done == handle.writing and not handle.ending:
            handle.writing = not done
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if handle.writing else 0)
            self.selector.modify(handle.channel.sock, events, (self._channel, (handle,)))

    # --- connections --------------------------------------------------------------------------------

    def _pass(self, slot, sock, peer, host):
        """The Listener's sink: the admitted connection goes to the least busy worker."""
        now = time.monotonic()
        ready = [w for w in self.workers.values() if w.ready and not w.ending and not w.silent(now)]
        if not ready:
            return "workers"
        handle = min(ready, key=lambda w: (bool(w.channel.backlog), w.connections, w.index))
        if handle.connections >= connection_room():
            return "open-files"
        if not self._send(handle, ("connection", slot.key, slot.endpoint.name, peer, host), sock):
            return "workers"
        handle.open[slot.key] += 1   # the channel closes sock once the worker has its own copy
        return None

    def figures(self):
        """The whole service's: the arbiter's counters, the ended workers' and the workers' last reports."""
        totals = added(self.stats, self.ended_stats, *(w.stats for w in self.workers.values()))
        workers = sorted(self.workers.values(), key=lambda w: w.index)
        connections = {slot.endpoint.name: sum(w.open[slot.key] for w in workers)
                       for slot in self.listener.slots.values()}
        now = time.monotonic()
        silent = tuple((w.index, w.pid, now - w.heard) for w in workers if w.silent(now))
        return Figures(totals, connections, self.reloads, tuple(w.connections for w in workers), self.restarts,
                       silent)

    def summary(self):
        """Counter lines for the whole service."""
        return self.figures().lines()

    def probe(self, names, done):
        """Readiness: a worker probes these endpoints' backends (it has the event loop and the clients);
        ``done(results)`` when it answers, or with every probe failed after health.probe_wait."""
        now = time.monotonic()
        ready = sorted((w for w in self.workers.values() if w.ready and not w.ending and not w.silent(now)),
                       key=lambda w: w.connections)
        self.probe_number += 1
        self.probes[self.probe_number] = (names, done)
        if not ready or not self._send(ready[0], ("probe", self.probe_number, names)):
            return self._probed(self.probe_number, {name: "no worker process to probe from" for name in names})
        wait = health.probe_wait(ep for ep in self.listener.cfg.endpoints if ep.name in names)
        self.later(wait, self._probed, self.probe_number, None)

    def _probed(self, number, results):
        names, done = self.probes.pop(number, (None, None))
        if done is not None:
            done(results if results is not None else {name: "the worker did not answer in time" for name in names})


    def invalidate(self, name, lookups, done):
        """``pfrest cache`` (controlsocket): every worker drops the answers from its cache; ``done``
        with their counts once all have said, or after INVALIDATE_TIMEOUT with those that have."""
        self.probe_number += 1
        number, asked = self.probe_number, set()
        self.invalidations[number] = (done, {}, asked)
        for handle in list(self.workers.values()):
            if handle.ready and self._send(handle, ("invalidate", number, name, lookups)):
                asked.add(handle.pid)
        self.later(INVALIDATE_TIMEOUT, self._invalidations_due, number)
        self._invalidated(number, None, None)

    def _invalidated(self, number, pid, count):
        """A worker's count (``pid`` None: none, only see whether all have answered)."""
        done, counts, asked = self.invalidations.get(number, (None, None, None))
        if done is None:
            return
        if pid is not None:
            counts[pid] = count
        if asked <= counts.keys():
            self._invalidations_due(number)

    def _invalidations_due(self, number):
        done, counts, _ = self.invalidations.pop(number, (None, None, None))
        if done is not None:
            done(list(counts.values()))


def _kill(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
