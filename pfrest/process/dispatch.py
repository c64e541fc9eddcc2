"""What the arbiter of ``serve --workers`` hands its workers and counts of them: each accepted
connection to the least busy worker (its descriptor over the worker's channel), a readiness probe to
one, a ``pfrest cache`` invalidation to all; and the whole service's figures, from the connections each
worker holds and the counters each reports.

Dispatcher is a part of the Arbiter (arbiter.py), split from it by job, not an object of its own: it
chooses among the workers that supervisor.py keeps, on the arbiter's loop, for the Listener, the
metrics address and the control socket, which take the arbiter as their source.
"""

import time

from pfrest.ops import health
from pfrest.ops.counters import Figures, added
from pfrest.process.listener import connection_room

INVALIDATE_TIMEOUT = 2.0   # seconds the workers get to confirm a pfrest cache drop or flush


class Dispatcher:
    """Work handed to the arbiter's workers, and their counts (a part of arbiter.Arbiter)."""

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

    # --- for the metrics address and the control socket ---------------------------------------------

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
