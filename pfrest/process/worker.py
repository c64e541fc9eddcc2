"""One worker process of ``serve --workers``: the conversations of the connections the arbiter passes
it, on the worker's own event loop.  It listens on nothing itself.

Its channel to the arbiter (control.py) brings connections, the config after each reload (applied at
once, to the connections already open too), readiness probes to run (health.py), invalidations of its
cache (``pfrest cache`` through the control socket) and the order to stop; it takes back word of every
connection that ended (the arbiter keeps the counts: max-connections, balance), the probes' results,
how many answers each invalidation dropped, and the counters at the end and every STATS_INTERVAL
seconds (or ``("alive",)`` when they did not change): the arbiter's heartbeat, by which it replaces a
worker that went silent.  Sending never blocks the loop (control.Channel); the little the arbiter has
not taken yet goes out when the channel has room, and before the worker exits (up to FLUSH_TIMEOUT).
An arbiter that takes nothing until MAX_BACKLOG messages wait is stuck: the worker drains and exits
rather than lose word of a connection that ended.  The channel closing means the arbiter is gone: the
worker then drains and exits.  SIGTERM/SIGINT sent to the worker itself (Ctrl-C to the process group;
systemd's default KillMode, which the shipped unit replaces with mixed) drain it too; a second one exits
at once.
"""

import asyncio
import logging
import os
import signal
import socket

from pfrest import log, tracing
from pfrest.conversation.services import Origin, Services
from pfrest.ops import health
from pfrest.process import control
from pfrest.process.listener import selected
from pfrest.process.serving import Conversations
from pfrest.system.sockets import bind_key

logger = logging.getLogger("pfrest")

STATS_INTERVAL = 1.0   # seconds between heartbeats to the arbiter: the counters, when anything changed
FLUSH_TIMEOUT = 2.0    # seconds an exiting worker waits for the arbiter to take its last messages


class Worker:
    def __init__(self, index, channel, cfg, options, inherited_names):
        self.index, self.channel, self.options = index, channel, options   # channel: a control.Channel
        self.inherited = frozenset(inherited_names)
        self.services = Services()
        self.conversations = Conversations(self.services, on_closed=self._closed)
        self.stop = None
        self.probing = set()   # readiness probes running
        self.cfg = cfg         # applied once the event loop runs: a shared cache subscribes on it
        self.loop = None
        self.flushed = None    # a future while messages wait for room on the channel

    def _apply(self, cfg):
        tracing.configure(cfg.tracing)
        endpoints = selected(cfg, self.options.names, self.inherited)[0]
        self.services.apply(endpoints, cfg.user_agent, lambda ep: bind_key(ep, self.inherited))
        self.conversations.reconsider()

    async def run(self) -> int:
        loop = self.loop = asyncio.get_running_loop()
        self.stop = loop.create_future()
        self._apply(self.cfg)
        self._signals(loop)
        loop.add_reader(self.channel.fileno(), self._receive)
        self._send(("ready",))
        reporter = loop.create_task(self._report())
        why = await self.stop
        loop.remove_reader(self.channel.fileno())
        logger.info("worker %d: %s; letting requests in progress finish (up to %.1f s)", self.index, why,
                    self.options.drain_timeout)
        await self.conversations.drain(self.options.drain_timeout)
        reporter.cancel()
        self._send(("stats", self.services.stats))   # the last word: the arbiter keeps these counts
        if self.flushed is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.flushed), FLUSH_TIMEOUT)
            except asyncio.TimeoutError:   # the arbiter counts our connections as ended when it reaps us
                logger.warning("worker %d: the arbiter took not all of its last messages", self.index)
        tracing.shutdown()   # the spans still in the batch go out
        return 0

    def _signals(self, loop):
        signals = []

        def on_stop(signum):
            if signals:
                logging.shutdown()
                os._exit(1)
            signals.append(signum)
            self._stopping(signal.Signals(signum).name)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_stop, signum)
        for signum in (signal.SIGHUP, signal.SIGUSR1):  # the arbiter's business
            loop.add_signal_handler(signum, lambda: None)

    def _stopping(self, why):
        if not self.stop.done():
            self.stop.set_result(why)

    def _receive(self):
        while True:
            try:
                message, fds = self.channel.receive()
            except BlockingIOError:
                return
            except OSError as exc:
                message, fds = None, []
                logger.error("worker %d: channel to the arbiter failed: %s", self.index, exc)
            if message is None:
                return self._stopping("the arbiter is gone")
            self._dispatch(message, fds)

    def _dispatch(self, message, fds):
        kind = message[0]
        if kind == "connection":
            _, key, name, peer, host = message
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            if self.conversations.take(sock, Origin(name, key, host), peer):
                sock.close()  # no room: the arbiter counted it, so say it ended
                self._closed(key)
        elif kind == "config":
            _, cfg, generation = message
            if self.options.log_file and not self.options.use_syslog:
                log.for_foreground(False, self.options.log_file)  # the arbiter reopened it too
            if cfg is not None:
                self._apply(cfg)
                self._send(("applied", generation))
        elif kind == "probe":
            task = asyncio.get_running_loop().create_task(self._probe(message[1], message[2]))
            self.probing.add(task)
            task.add_done_callback(self.probing.discard)
        elif kind == "invalidate":
            _, number, name, lookups = message
            self._send(("invalidated", number, self.services.invalidate(name, lookups)))
        elif kind == "stop":
            self._stopping("stopping")

    async def _probe(self, number, names):
        self._send(("probed", number, await health.probe_all(self.services, names)))

    def _closed(self, key):
        self._send(("closed", key))

    def _send(self, message):
        try:
            if not self.channel.send(message):
                logger.error("worker %d: %d messages wait for the arbiter, which takes none; stopping",
                             self.index, control.MAX_BACKLOG)
                return self._stopping("the arbiter is stuck")
        except OSError:
            return  # the arbiter is gone; the channel's EOF stops this worker
        if self.channel.backlog and self.flushed is None:
            self.flushed = self.loop.create_future()
            self.loop.add_writer(self.channel.fileno(), self._flush)

    def _flush(self):
        try:
            done = self.channel.flush()
        except OSError:
            done = True   # the arbiter is gone
        if done:
            self.loop.remove_writer(self.channel.fileno())
            self.flushed.set_result(None)
            self.flushed = None

    async def _report(self):
        last = None
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            if self.channel.backlog:
                continue   # the arbiter has not taken the last one yet
            self.services.measure()
            now = {name: s.snapshot() for name, s in self.services.stats.items()}
            if now != last:
                self._send(("stats", self.services.stats))
                last = now
            else:
                self._send(("alive",))
