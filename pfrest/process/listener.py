"""The listening side of ``pfrest serve``: one socket per endpoint, accepting, and deciding whom to take.

A Listener owns the listening sockets (bound here, or passed by systemd) and admits each new
connection (``allow-from``, ``max-connections``, room in the open-file limit) before handing it to a
*sink*: the conversations of this process, or, with ``--workers``, the worker process the arbiter
picks.  It runs on any loop through a small *watcher* (readiness callbacks and a timer): the event
loop of a single process, or the arbiter's selector loop.

Reload: ``reload(cfg)`` opens the sockets the new config adds before anything changes (all or
nothing: a ConfigError or BindError leaves the old setup), then closes those it drops.  Sockets whose
address stays keep accepting throughout.
"""

import logging
import resource
import socket
import time

from pfrest import config
from pfrest.ops.counters import Stats
from pfrest.system import privileges, socketfiles, sockets
from pfrest.system.sockets import BindError

log = logging.getLogger("pfrest")

ACCEPT_BATCH = 64         # accepts per wake-up per socket, so that one busy endpoint cannot starve others
EXHAUSTED_PAUSE = 0.1     # seconds accepting pauses when the process is out of descriptors
WARNING_INTERVAL = 1.0    # refusals under a flood: at most one message per endpoint and reason per second
FD_RESERVE = 64           # file descriptors a process keeps for itself (listening sockets, logs, DNS)
REFUSALS = {"allow-from": "not in allow-from",
            "max-connections": "max-connections ({max}) reached",
            "open-files": "the open-file limit leaves room for {room} connections, all taken; "
                          "raise LimitNOFILE=",
            "workers": "no worker process takes connections"}


def selected(cfg, names=(), inherited=()):
    """The endpoints to serve and the names of those left out (no socket to listen on).

    Raises ConfigError for an unknown name, a named endpoint without a socket, or nothing to serve.
    """
    def servable(ep):
        return ep.binds or ep.name in inherited

    if names:
        endpoints = [cfg.endpoint(name) for name in names]
        lacking = [ep.name for ep in endpoints if not servable(ep)]
        if lacking:
            raise config.ConfigError([f"endpoint {name}: has neither bind-port nor bind-path, "
                                      "nothing to listen on" for name in lacking])
        return endpoints, []
    endpoints = [ep for ep in cfg.endpoints if servable(ep)]
    if not endpoints:
        raise config.ConfigError(["no endpoint has a bind-port or bind-path: nothing to serve"])
    return endpoints, [ep.name for ep in cfg.endpoints if not servable(ep)]


def connection_room():
    """How many Postfix connections one process's open-file limit has room for: each takes a socket and
    may take a backend socket, and the process keeps FD_RESERVE for itself.  Refusing beyond that keeps
    the connections already open served; accepting would leave their backend calls failing with EMFILE."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return float("inf")
    return max((soft - FD_RESERVE) // 2, 1)


class Slot:
    """One listening socket and the endpoint its new connections are for."""

    def __init__(self, key, sock, inherited=False, made=None):
        """``made``: the socketfiles.SocketFile of a unix socket bound here."""
        self.key, self.sock, self.inherited, self.made = key, sock, inherited, made
        self.endpoint = self.networks = None
        self.open = 0          # connections from this socket not yet closed
        sock.setblocking(False)

    def close(self):
        if self.inherited:
            return  # systemd holds the socket; a later configuration may serve it again
        self.sock.close()
        if self.made:
            socketfiles.remove(self.made)

    @property
    def address(self):
        """``(host, port)``, or the path of a unix socket (its file's: bound elsewhere, linked there)."""
        return self.made.path if self.made else sockets.address(self.sock)


class Listener:
    """The listening sockets of a Config and the admission of new connections; see the module text.

    ``sink(slot, sock, peer, host)`` takes each admitted connection (``host``: the peer's IP address,
    None on a unix socket) and returns None, or a refusal reason
    ("open-files") when it has no room; ``closed(key)`` must be called when a connection handed to the
    sink has ended.
    """

    def __init__(self, cfg, names=(), inherited=(), stats=None):
        """``inherited``: ``[(fd, name)]`` from systemd.listen_fds(), matched to endpoints by name."""
        self.names = tuple(names or ())
        self.cfg = cfg
        self.passed = list(inherited)
        self.inherited = {}         # endpoint name -> listening socket from systemd
        self.slots = {}             # bind key -> Slot
        self.stats = {} if stats is None else stats   # endpoint name -> Stats
        self.watcher = self.sink = None
        self.warned = {}            # (name, reason) -> time of the last message
        self.bound = False

    # --- setting up and reconfiguring -----------------------------------------------------------

    def bind(self):
        """Open every listening socket now (before dropping privileges, say).  Raises ConfigError or
        BindError and then leaves nothing open."""
        if not self.bound:
            self._adopt_passed()
            self._apply(self.cfg)
            self.bound = True
        return self

    def start(self, watcher, sink):
        """Accept connections: readiness through ``watcher``, admitted connections to ``sink``."""
        self.bind()
        self.watcher, self.sink = watcher, sink
        for slot in self.slots.values():
            watcher.watch(slot.sock, self._accept, slot)
        return self

    def reload(self, cfg):
        """Serve ``cfg`` from now on; on ConfigError or BindError nothing changes."""
        self._apply(cfg)
        self.cfg = cfg

    def key_of(self, endpoint):
        return sockets.bind_key(endpoint, self.inherited)

    def served(self, cfg):
        """The endpoints of ``cfg`` that this listener serves."""
        return selected(cfg, self.names, self.inherited)[0]

    def _adopt_passed(self):
        known = {ep.name for ep in self.cfg.endpoints}
        passed = self.passed
        if len(passed) == 1 and passed[0][1] not in known:
            # one unnamed socket for one endpoint: the obvious match (FileDescriptorName= not set)
            only = self.names if len(self.names) == 1 else [ep.name for ep in self.cfg.endpoints]
            if len(only) == 1:
                passed = [(passed[0][0], only[0])]
        for fd, name in passed:
            sock = sockets.adopt(fd, name)
            if name not in known:
                # not named after an endpoint (one socket unit with several ListenStream= lines, whose
                # sockets all bear the unit's name): the endpoint configured to bind that very address
                name = next((ep.name for ep in self.cfg.endpoints if sockets.binds_to(ep, sock)), name)
            self.inherited[name] = sock
            if name not in known:
                log.warning("systemd passed a socket named %r (%s) but no endpoint has that name or "
                            "address", name, sockets.show(sockets.address(sock)))

    def _open(self, key, ep):
        if key[0] == "fd":
            return Slot(key, self.inherited[ep.name], inherited=True)
        if key[0] == "unix":
            sock, made = socketfiles.listen(ep.bind_path, ep.bind_mode, f"endpoint {ep.name}",
                                            privileges.owner(self.cfg.user))
            return Slot(key, sock, made=made)
        return Slot(key, sockets.open_tcp(ep))

    def _apply(self, cfg):
        endpoints, skipped = selected(cfg, self.names, self.inherited)
        plan = self._plan(endpoints)
        for name in skipped:
            log.info("endpoint=%s has neither bind-port nor bind-path: not served here", name)
        for key, slot in list(self.slots.items()):
            if key not in plan:
                log.info("endpoint=%s no longer served: closing %s", slot.endpoint.name, self._where(slot))
                if self.watcher is not None:
                    self.watcher.unwatch(slot.sock)
                slot.close()
        for slot, ep in plan.values():
            self._update(slot, ep)
        self.slots = {key: slot for key, (slot, _) in plan.items()}

    def _plan(self, endpoints):
        """{bind key: (slot, endpoint)}, opening the sockets that are new; all or nothing."""
        plan, opened = {}, []
        try:
            for ep in endpoints:
                key = self.key_of(ep)
                if key in plan:
                    raise config.ConfigError([f"endpoints {plan[key][1].name} and {ep.name} both listen on "
                                              f"{sockets.where(ep)}"])
                slot = self.slots.get(key)
                if slot is None:
                    slot = self._open(key, ep)
                    opened.append(slot)
                plan[key] = (slot, ep)
        except Exception:
            for slot in opened:
                slot.close()
            raise
        return plan

    def _update(self, slot, ep):
        old, slot.endpoint, slot.networks = slot.endpoint, ep, sockets.networks(ep.allow_from)
        self.stats.setdefault(ep.name, Stats()).mode = ep.mode
        if old is None:
            log.info("endpoint=%s mode=%s listening on %s%s", ep.name, ep.mode, self._where(slot),
                     " (from systemd)" if slot.inherited else "")
            if self.watcher is not None:
                self.watcher.watch(slot.sock, self._accept, slot)
        elif slot.made and old.bind_mode != ep.bind_mode:   # never a chmod by path as root (socketfiles)
            log.warning("endpoint=%s bind-mode changed: the change takes effect when pfrest serve restarts",
                        ep.name)

    @staticmethod
    def _where(slot):
        return sockets.show(slot.address)

    # --- what a program or the process asks -----------------------------------------------------

    @property
    def addresses(self):
        """Endpoint name -> bound address: ``(host, port)`` for TCP, the path for a unix socket."""
        return {slot.endpoint.name: slot.address for slot in self.slots.values()}

    def socket_files(self):
        """The socket files this listener made (socketfiles.SocketFile: for the janitor to remove)."""
        return [slot.made for slot in self.slots.values() if slot.made]

    def connections(self, name):
        return sum(slot.open for slot in self.slots.values() if slot.endpoint.name == name)

    def close(self):
        """Stop accepting: every listening socket closed (systemd's stay open, with systemd)."""
        for slot in self.slots.values():
            if self.watcher is not None:
                self.watcher.unwatch(slot.sock)
            slot.close()
        self.slots = {}

    def closed(self, key, count=1):
        """``count`` connections from the socket ``key`` have ended."""
        slot = self.slots.get(key)
        if slot is not None:
            slot.open -= count

    # --- accepting ------------------------------------------------------------------------------

    def _accept(self, slot):
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = slot.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in sockets.EXHAUSTED:
                    self._warn(slot.endpoint, "exhausted", f"cannot accept connections: {exc.strerror}; "
                               "raise LimitNOFILE= or lower max-connections")
                    # the socket stays readable: without a pause, accepting would spin
                    self.watcher.unwatch(slot.sock)
                    self.watcher.later(EXHAUSTED_PAUSE, self._resume, slot)
                return
            try:
                self._admit(slot, sock, addr)
            except Exception:  # one odd connection must not end accepting for all
                log.exception("endpoint=%s cannot take a connection", slot.endpoint.name)
                sock.close()

    def _resume(self, slot):
        if self.slots.get(slot.key) is slot:
            self.watcher.watch(slot.sock, self._accept, slot)

    def _admit(self, slot, sock, addr):
        ep = slot.endpoint
        peer = sockets.peer_name(sock, addr)
        host = None if sock.family == socket.AF_UNIX else addr[0]
        if slot.networks and host is not None and not sockets.allowed(slot.networks, host):
            why = "allow-from"
        elif slot.open >= ep.max_connections:
            why = "max-connections"
        else:
            sock.setblocking(False)
            why = self.sink(slot, sock, peer, host)
        stats = self.stats[ep.name]
        if why:
            stats.refused[why] += 1
            detail = REFUSALS[why].format(max=ep.max_connections, room=connection_room())
            self._warn(ep, why, f"peer={peer} refused: {detail}")
            sock.close()
            return
        stats.accepted += 1
        slot.open += 1

    def _warn(self, ep, reason, message):
        """A warning that a flood could repeat thousands of times a second: at most one a second."""
        key, now = (ep.name, reason), time.monotonic()
        if now - self.warned.get(key, -WARNING_INTERVAL) >= WARNING_INTERVAL:
            self.warned[key] = now
            total = self.stats[ep.name].refused.get(reason)
            log.warning("endpoint=%s %s%s", ep.name, message,
                        f" ({total} refused so far)" if total and total > 1 else "")


__all__ = ["Listener", "BindError", "Slot", "selected", "connection_room"]
