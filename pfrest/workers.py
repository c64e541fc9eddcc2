"""``pfrest serve --workers N``: pre-forked worker processes sharing the listening sockets.

Why: a Python process runs one thread at a time (the GIL), so one ``pfrest serve`` process answers
at most about 2,400 lookups/s on this machine's backend path, with one core busy and the others idle.
N processes use N cores.

The parent binds every socket (before dropping privileges), forks the workers, and then only
supervises: it passes SIGTERM/SIGINT (drain), SIGHUP (reload) and SIGUSR1 (counters) on to them,
replaces a worker that dies, and exits once they have all stopped.  It alone talks to systemd (the
main PID).  A reload applies to every worker; it may change anything but the set of listening
sockets, which are the ones bound before the fork (that takes a restart).

Balance: every worker waits on the same sockets, and the kernel gives a new connection to whichever
worker calls accept() first; in a burst that is often the same one (measured: 31 of 32 connections
on one worker).  Postfix holds its connections for minutes, so that imbalance would last.  Each
worker therefore publishes how many connections it has in a shared page, and one that has more than
another accepting worker leaves a new connection to it (for at most ACCEPT_GRACE, so that a sibling
that is slow to accept never stalls anyone).
"""

import logging
import mmap
import os
import signal
import time

logger = logging.getLogger("pfrest")

ACCEPT_GRACE = 0.02     # seconds a busier worker leaves a waiting connection to a less busy one
RESTART_DELAY = 1.0     # seconds before replacing a worker that died, so that a crash cannot spin
STOP = signal.SIGUSR2   # from the supervisor to its workers: drain and stop (never "exit at once")
_NOT_ACCEPTING = -1


class Balance:
    """Connection counts of the workers, in memory shared across fork()."""

    def __init__(self, workers: int):
        self._page = mmap.mmap(-1, 8 * workers)
        self._counts = memoryview(self._page).cast("q")
        for i in range(workers):
            self._counts[i] = _NOT_ACCEPTING
        self.index = None
        self._declined = None

    def join(self, index: int):
        """In a worker, after fork: this is worker ``index``, accepting."""
        self.index = index
        self._counts[index] = 0

    def leave(self, index=None):
        """Worker ``index`` (default: this one) accepts no more."""
        self._counts[self.index if index is None else index] = _NOT_ACCEPTING

    def wait_joined(self, timeout: float):
        """In the parent: until every worker accepts (or ``timeout`` seconds have passed)."""
        deadline = time.monotonic() + timeout
        while _NOT_ACCEPTING in self._counts.tolist() and time.monotonic() < deadline:
            time.sleep(0.005)

    def may_accept(self, open_connections: int) -> bool:
        """Whether this worker should accept the connection waiting now (called by the Listener)."""
        counts = self._counts
        counts[self.index] = open_connections
        others = [c for i, c in enumerate(counts) if i != self.index and c != _NOT_ACCEPTING]
        if not others or open_connections <= min(others):
            self._declined = None
            counts[self.index] = open_connections + 1  # what it will be once accepted
            return True
        now = time.monotonic()
        if self._declined is None:
            self._declined = now
        elif now - self._declined > ACCEPT_GRACE:  # the less busy one is not taking it
            self._declined = None
            return True
        time.sleep(0.001)  # the socket stays readable: give the sibling a moment
        return False

    def count(self, open_connections: int):
        """Publish this worker's count after a connection ended."""
        if self.index is not None and self._counts[self.index] != _NOT_ACCEPTING:
            self._counts[self.index] = open_connections


def supervise(count, listener, serve_worker, events, notify, stop_signals):
    """Fork ``count`` workers that each run ``serve_worker()`` (returning an exit status) on the bound
    ``listener``, and supervise them until they have stopped.  ``events`` is the parent's signal
    queue; ``notify`` sends a state to systemd."""
    balance = Balance(count)
    listener.gate = balance
    parent = os.getpid()
    children = {}  # pid -> worker index
    signal.signal(signal.SIGCHLD, lambda signum, frame: events.put(signum))

    def fork(index):
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's loop
            status = 1
            try:
                os.environ.pop("NOTIFY_SOCKET", None)  # systemd listens to the main PID only
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(STOP, lambda signum, frame: events.put(stop_signals[0]))
                balance.join(index)
                status = serve_worker(parent)
            except BaseException:
                logger.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(status)
        children[pid] = index

    for index in range(count):
        fork(index)
    balance.wait_joined(10.0)  # "ready" means that every worker takes connections
    notify(f"READY=1\nSTATUS=serving {len(listener.addresses)} endpoint(s) with {count} workers")
    logger.info("ready: serving %d endpoint(s), %d workers, pid %d", len(listener.addresses), count, parent)

    stopping = None

    def on_stop(signum, frame):
        if stopping is not None and signum in stop_signals:  # a second one: everybody out, now
            _send(children, signal.SIGKILL)
            os._exit(1)
        events.put(signum)

    for signum in stop_signals:
        signal.signal(signum, on_stop)
    while children:
        signum = events.get()
        if signum == signal.SIGCHLD:
            for pid, index, status in _reap(children):
                balance.leave(index)
                if stopping is None:
                    logger.error("worker %d (pid %d) ended with status %s; replacing it in %.0f s",
                                 index, pid, status, RESTART_DELAY)
                    time.sleep(RESTART_DELAY)
                    fork(index)
            continue
        if signum in stop_signals:
            if stopping is None:
                stopping = signum
                notify("STOPPING=1")
                logger.info("%s: stopping %d workers", signal.Signals(signum).name, len(children))
        elif signum == signal.SIGHUP:
            notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            logger.info("reload: passed on to %d workers", len(children))
        # A stop goes on as STOP: the workers may have had the SIGTERM or SIGINT already (systemd's
        # default KillMode=control-group signals every process of the unit, Ctrl-C the whole process
        # group), and a second one of those tells a process to exit at once, without draining.
        _send(children, STOP if signum in stop_signals else signum)
        if signum == signal.SIGHUP:
            notify("READY=1")
    logger.info("stopped")
    return 0


def _send(children, signum):
    for pid in list(children):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _reap(children):
    """(pid, index, status) of every worker that has ended."""
    ended = []
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in children:
            ended.append((pid, children.pop(pid), os.waitstatus_to_exitcode(status)))
    return ended
