"""``pfrest serve`` in one process: the Listener's connections become Conversations on this process's
event loop.  Also what ``serve --workers`` runs in each worker, with connections passed in by the
arbiter instead of accepted here (``take``).

Programmatic use (the demo, tests), inside a running event loop::

    server = Server(cfg).start()      # binds every endpoint that has a bind-port or bind-path
    server.addresses                  # {"name": ("127.0.0.1", 40123), "other": "/run/pfrest.sock"}
    server.reload(new_cfg)            # raises ConfigError or BindError and then keeps the old setup
    server.summary()                  # one counters line per endpoint
    server.figures()                  # the counters as stats.Figures (/metrics, when metrics-address is set)
    server.invalidate(name, lookups, done)   # pfrest cache, through the control socket
    await server.stop(drain_timeout)  # stop accepting, let requests finish, cut the rest

Config files may not say ``bind-port: 0`` (an admin never means it), but the Server binds whatever the
Endpoint says: for an ephemeral port use ``dataclasses.replace(endpoint, bind_port=0)``.
"""

import asyncio
import logging
import socket
from collections import Counter

from pfrest import tracing
from pfrest.conversation.conversation import Conversation
from pfrest.conversation.services import Origin, Services
from pfrest.ops import controlsocket, health, monitor
from pfrest.ops.counters import Figures
from pfrest.process.listener import Listener, connection_room

log = logging.getLogger("pfrest")

DRAIN_TIMEOUT = 10.0   # seconds that requests in progress get to finish on stop()


class LoopWatcher:
    """The Listener's (and the metrics address's) readiness callbacks and timer on an asyncio event loop."""

    def __init__(self, loop):
        self.loop = loop

    def watch(self, sock, callback, *args):
        self.loop.add_reader(sock.fileno(), callback, *args)

    def watch_writable(self, sock, callback, *args):
        self.loop.add_writer(sock.fileno(), callback, *args)

    def unwatch(self, sock):
        self.loop.remove_reader(sock.fileno())
        self.loop.remove_writer(sock.fileno())

    def later(self, seconds, callback, *args):
        self.loop.call_later(seconds, callback, *args)


class Conversations:
    """The conversations of one process, on its event loop, answered by its Services."""

    def __init__(self, services, on_closed=None):
        self.services = services
        self.on_closed = on_closed       # on_closed(bind key) once a connection has ended
        self.open = set()
        self.room = connection_room()
        self._quiet = None               # set when the last conversation ends, during stop()

    def take(self, sock, origin, peer):
        """Serve a connected socket; returns "open-files" instead when there is no room for it."""
        if len(self.open) >= self.room:
            return "open-files"
        if sock.family != socket.AF_UNIX:
            try:  # replies are single writes: never hold one back
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # already reset by the peer: the conversation will see it
        conversation = Conversation(self.services, origin, peer, on_end=self._ended)
        self.open.add(conversation)
        asyncio.get_running_loop().create_task(self._connect(conversation, sock))
        return None

    async def _connect(self, conversation, sock):
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: conversation, sock)
        except Exception as exc:
            log.warning("endpoint=%s peer=%s cannot serve the connection: %s", conversation.origin.endpoint,
                        conversation.peer, exc)
            sock.close()
            self._ended(conversation)

    def _ended(self, conversation):
        if conversation in self.open:
            self.open.discard(conversation)
            if self.on_closed is not None:
                self.on_closed(conversation.origin.key)
            if not self.open and self._quiet is not None:
                self._quiet.set()

    def reconsider(self):
        for conversation in list(self.open):
            conversation.reconsider()

    def count(self, name):
        return sum(1 for conv in self.open if conv.origin.endpoint == name)

    async def drain(self, timeout):
        """Close idle conversations, let the others answer what they have received, cut what is left
        after ``timeout`` seconds; returns how many were cut."""
        self._quiet = asyncio.Event()
        for conversation in list(self.open):
            conversation.close_when_idle()
        if self.open:
            try:
                await asyncio.wait_for(self._quiet.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        left = list(self.open)
        for conversation in left:
            conversation.abort()
        if left:
            log.warning("%d connection(s) still busy after %.1f s: cut", len(left), timeout)
        await asyncio.sleep(0)  # let the aborted ones see connection_lost
        closing = self.services.close()
        if closing:   # a shared cache's connections, closed before the loop is
            await asyncio.wait(closing)
        return len(left)


class Server:
    """A Listener and the Conversations of its connections, in the running event loop."""

    def __init__(self, cfg, names=(), inherited=()):
        self.services = Services()
        self.listener = Listener(cfg, names, inherited, stats=self.services.stats)
        self.conversations = Conversations(self.services, on_closed=self.listener.closed)
        self.reloads = Counter()         # "ok" / "failed" -> count (signals.reload counts them)
        self.monitor = monitor.for_config(cfg, self)
        self.control = controlsocket.ControlSocket(cfg, self)
        self.probing = set()             # readiness probes running

    def bind(self):
        self.listener.bind()
        if self.monitor is not None:
            self.monitor.bind()
        self.control.bind()
        return self

    def start(self):
        self.bind()
        self._apply(self.listener.cfg)
        watcher = LoopWatcher(asyncio.get_running_loop())
        self.listener.start(watcher, self._take)
        if self.monitor is not None:
            self.monitor.start(watcher)
        self.control.start(watcher)
        return self

    def _take(self, slot, sock, peer, host):
        return self.conversations.take(sock, Origin(slot.endpoint.name, slot.key, host), peer)

    def _apply(self, cfg):
        tracing.configure(cfg.tracing)
        self.services.apply(self.listener.served(cfg), cfg.user_agent, self.listener.key_of)

    def reload(self, cfg):
        """Serve ``cfg`` from now on, on connections already open too; raises ConfigError or
        BindError and then keeps the old setup."""
        self.listener.reload(cfg)
        self._apply(cfg)
        self.conversations.reconsider()
        monitor.reconfigure(self.monitor, cfg)
        controlsocket.reconfigure(self.control, cfg)

    @property
    def addresses(self):
        return self.listener.addresses

    def socket_files(self):
        return self.listener.socket_files() + self.control.socket_files()

    def connection_count(self):
        return len(self.conversations.open)

    def figures(self):
        """The counters now, as stats.Figures (the lines of ``summary``, ``/metrics``)."""
        self.services.measure()
        open_now = {name: self.conversations.count(name) for name in self.services.by_name}
        return Figures(self.services.stats, open_now, self.reloads)

    def summary(self):
        """One counters line per endpoint."""
        return self.figures().lines()

    def probe(self, names, done):
        """Probe these endpoints' backends (health.probe_all), then ``done(results)``."""
        task = asyncio.get_running_loop().create_task(health.probe_all(self.services, names))
        self.probing.add(task)

        def finished(task):
            self.probing.discard(task)
            if not task.cancelled():
                done(task.result())
        task.add_done_callback(finished)

    def invalidate(self, name, lookups, done):
        """``pfrest cache`` (controlsocket): drop answers from this process's cache, then ``done``."""
        done([self.services.invalidate(name, lookups)])

    async def stop(self, drain_timeout=DRAIN_TIMEOUT):
        """Stop accepting, close idle connections, give requests in progress up to ``drain_timeout``
        seconds to be answered, then cut what is left.  Returns how many connections were cut."""
        self.listener.close()
        if self.monitor is not None:
            self.monitor.close()
        self.control.close()
        return await self.conversations.drain(drain_timeout)
