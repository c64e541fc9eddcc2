"""The lives of the workers of ``serve --workers``: forking them, their channels, their heartbeat,
killing one that went silent, and reaping and replacing one that ended.

A worker that dies is replaced, after RESTART_DELAY, by a fork of the arbiter: with the arbiter's
current config, never the startup one.  The workers send their counters every second (a word even
when nothing changed) and at exit; the counters of a worker that ended are kept (dispatch.py adds
them up).

Every word of a worker is its heartbeat: one silent for SILENT_AFTER seconds (stopped, or its loop
stuck) gets no new connections and makes ``/readyz`` say so; after KILL_AFTER it is killed (SIGKILL),
and so replaced.  So is a worker that leaves control.MAX_BACKLOG messages untaken.

Supervisor is a part of the Arbiter (arbiter.py), split from it by job, not an object of its own: a
fork, a worker's last word and a stop each touch the arbiter's loop, listener, sockets and reload at
once, so it works on the arbiter's state (``workers``, ``selector``, ``stopping``, ``generation``...).
"""

import logging
import os
import selectors
import signal
import time
from collections import Counter

from pfrest.ops.counters import added
from pfrest.process import control
from pfrest.system import eventloop

logger = logging.getLogger("pfrest")

RESTART_DELAY = 1.0    # seconds before replacing a worker that died, so that a crash cannot spin
READY_TIMEOUT = 10.0   # seconds the workers get to start before the service says it is ready
WATCH_INTERVAL = 0.5   # seconds between two looks at how long each worker has been silent
SILENT_AFTER = 3.0     # seconds without a word (3 heartbeats missed) before a worker gets no new connections
KILL_AFTER = 6.0       # seconds without a word before a worker is killed and replaced
# the arbiter's signals (handled in its loop); a new worker sets them back to their defaults
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)


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


class Supervisor:
    """The arbiter's workers, from fork to reaping (a part of arbiter.Arbiter)."""

    # --- the heartbeat -------------------------------------------------------------------------------

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
            kill(handle.pid, signal.SIGKILL)

    # --- forking, and a worker's channel -------------------------------------------------------------

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
        for signum in SIGNALS:
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

    # --- reaping, and writing to the workers ----------------------------------------------------------

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


def kill(pid, signum):
    """Signal ``pid``, which may have ended already (reaping follows)."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
