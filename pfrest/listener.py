"""The engine of ``pfrest serve``: every endpoint on a listening socket, a thread per Postfix connection,
each thread running the very dialogue of ``pfrest handle``.

Programmatic use (the demo, tests)::

    listener = Listener(cfg).start()   # binds every endpoint that has a bind-port or bind-path
    listener.addresses                 # {"name": ("127.0.0.1", 40123), "other": "/run/pfrest.sock"}
    listener.reload(new_cfg)           # raises ConfigError or BindError and then keeps the old setup
    listener.summary()                 # one counters line per endpoint
    listener.stop()                    # stop accepting, let requests finish (10 s), cut the rest

``Listener(cfg, names)`` serves only the endpoints named.  Config files may not say ``bind-port: 0``
(an admin never means it), but the Listener binds whatever the Endpoint says: for an ephemeral port
use ``dataclasses.replace(endpoint, bind_port=0)`` and read the port from ``addresses``.

Why a thread per connection: Postfix holds its connections for minutes (policy, socketmap) or for the
life of its processes (tcp), mostly idle.  An idle thread costs a little memory and nothing else, and
it can never keep a busy connection waiting, which a bounded worker pool would.  ``pfrest serve``
shrinks thread stacks so that a thousand of them stay cheap.

Signals, privileges and sd_notify belong to the process (pfrest.serve), not here: a Listener never
touches process-wide state and can run inside any program.
"""

import logging
import os
import resource
import selectors
import socket
import struct
import threading
import time
from collections import Counter

from pfrest import binding, config
from pfrest.binding import BindError
from pfrest.dialogue import serve
from pfrest.stats import Stats

log = logging.getLogger("pfrest")

DRAIN_TIMEOUT = 10.0      # seconds that requests in progress get to finish on stop()
WRITE_TIMEOUT = 100.0     # Postfix's own I/O timeout; a client that does not read is gone (R3)
ACCEPT_BATCH = 64         # accepts per wake-up per socket, so that one busy endpoint cannot starve others
WARNING_INTERVAL = 1.0    # refusals under a flood: at most one message per endpoint and reason per second
FD_RESERVE = 64           # file descriptors the process keeps for itself (listening sockets, logs, DNS)

__all__ = ["Listener", "BindError", "DRAIN_TIMEOUT", "selected"]


def selected(cfg, names=(), inherited=()):
    """The endpoints to serve and the names of those left out (no socket to listen on).

    Raises ConfigError for an unknown name, a named endpoint without a socket, or nothing to serve.
    """
    def servable(ep):
        return bool(ep.bind_path) or ep.bind_port is not None or ep.name in inherited

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
    """How many Postfix connections the open-file limit has room for: each takes a socket and may take
    a backend socket, and the process keeps FD_RESERVE for itself.  Refusing beyond that keeps the
    connections already open served; accepting would leave their backend calls failing with EMFILE."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return float("inf")
    return max((soft - FD_RESERVE) // 2, 1)


class _Service:
    """What new connections of one endpoint are answered with.  A reload that changes the endpoint
    makes a new one; connections keep the one they were accepted with."""

    def __init__(self, endpoint, user_agent, stats):
        from pfrest.legacy_backend import for_endpoint
        from pfrest.responder import Responder
        self.endpoint, self.user_agent, self.stats = endpoint, user_agent, stats
        # as many pooled backend connections as Postfix connections may ask at once; made lazily
        self.backend = for_endpoint(endpoint, user_agent, concurrency=endpoint.max_connections)
        self.responder = Responder(endpoint, self.backend, observer=stats.record)
        self.networks = binding.networks(endpoint.allow_from)
        self.connections = 0
        self.retired = False

    def same(self, endpoint, user_agent):
        return self.endpoint == endpoint and self.user_agent == user_agent


class _Slot:
    """One listening socket and the service its new connections get."""

    def __init__(self, key, sock, inherited=False, path=None):
        self.key, self.sock, self.inherited, self.path = key, sock, inherited, path
        self.inode = os.stat(path).st_ino if path else None
        self.service = None
        self.open = 0
        sock.setblocking(False)

    @property
    def name(self):
        return self.service.endpoint.name

    def close(self):
        if self.inherited:
            return  # systemd holds the socket; a later configuration may serve it again
        self.sock.close()
        if self.path:
            try:
                if os.stat(self.path).st_ino == self.inode:  # never remove a successor's socket
                    os.unlink(self.path)
            except OSError:
                pass


def _timeval(seconds):
    """A struct timeval for SO_RCVTIMEO/SO_SNDTIMEO; never zero, which would mean no timeout."""
    micro = max(int(seconds * 1e6), 1)
    return struct.pack("ll", micro // 1000000, micro % 1000000)


class _Connection:
    """One Postfix connection.  It knows whether a request is half received, so that closing can tell
    an idle connection (wake it up now) from a busy one (let it finish and reply)."""

    __slots__ = ("sock", "peer", "slot", "service", "lock", "pending", "closing", "read_timeout")

    def __init__(self, sock, peer, slot, service):
        self.sock, self.peer, self.slot, self.service = sock, peer, slot, service
        self.lock = threading.Lock()
        self.pending = self.closing = False
        self.read_timeout = None

    def before_read(self, pending, timeout):
        """Called by the dialogue before each read: apply its timeout (idle limit, or what is left of
        the partial-request limit), or end the conversation if it is closing and no request is under way."""
        with self.lock:
            self.pending = pending
            if self.closing and not pending:
                self._shut(socket.SHUT_RD)
        if timeout != self.read_timeout:  # the idle limit stays the same from request to request
            self.read_timeout = timeout
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))

    def read1(self, size):
        """The dialogue's input.  The socket is in blocking mode with kernel timeouts (SO_RCVTIMEO,
        SO_SNDTIMEO): a Python socket timeout costs a poll() before every recv and send and an
        ioctl per settimeout(), each a GIL handover among busy threads; this way a request costs
        one recv and one send."""
        try:
            return self.sock.recv(size)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            raise TimeoutError("timed out") from None

    def close_when_idle(self):
        """End the conversation at the next request boundary.  Only the read side is shut: a thread
        waiting for a request sees EOF at once, a thread answering one still writes its reply, and
        requests already received stay readable (Linux keeps the receive queue)."""
        with self.lock:
            self.closing = True
            if not self.pending:
                self._shut(socket.SHUT_RD)

    def abort(self):
        self._shut(socket.SHUT_RDWR)  # the thread itself closes the socket: no fd reuse races

    def _shut(self, how):
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def write(self, data):
        """The dialogue's output: one reply, with Postfix's own timeout rather than the idle one."""
        self.sock.sendall(data)
        return len(data)


class Listener:
    """Serves the endpoints of a Config on their sockets; see the module docstring."""

    def __init__(self, cfg, names=(), inherited=()):
        """``inherited``: ``[(fd, name)]`` from systemd.listen_fds(), matched to endpoints by name."""
        self.names = tuple(names or ())
        self._cfg = cfg
        self._passed = list(inherited)
        self._inherited = {}                # endpoint name -> listening socket from systemd
        self._slots = {}                    # bind key -> _Slot
        self._stats = {}                    # endpoint name -> Stats, kept across reloads
        self._connections = set()
        self._lock = threading.Lock()
        self._quiet = threading.Condition(self._lock)   # notified when a connection ends
        self._reload_lock = threading.Lock()
        # pfrest.workers.Balance when pre-forked workers share the sockets: which one takes a connection
        self.gate = None
        self._warned = {}                   # (name, reason) -> time of the last message
        self._wake_r, self._wake_w = self._wake_pair()
        self._thread = None
        self._bound = self._stopping = False

    # --- setting up and reconfiguring -----------------------------------------------------------

    def bind(self):
        """Open every listening socket now (before dropping privileges, say).  Raises ConfigError or
        BindError and then leaves nothing open."""
        if not self._bound:
            self._adopt_passed()
            self._apply(self._cfg)
            self._bound = True
        return self

    @staticmethod
    def _wake_pair():
        pair = socket.socketpair()
        for sock in pair:
            sock.setblocking(False)
        return pair

    def start(self):
        """Bind (if not done yet) and accept connections on a background thread; returns self."""
        self.bind()
        if self.gate is not None:
            # a pre-forked worker: the pair made before the fork is shared with the siblings, one of
            # which could swallow this worker's wake-up (its stop() would then wait forever)
            self._wake_r.close()
            self._wake_w.close()
            self._wake_r, self._wake_w = self._wake_pair()
        self._thread = threading.Thread(target=self._accept_loop, name="pfrest-accept", daemon=True)
        self._thread.start()
        return self

    def reload(self, cfg):
        """Serve ``cfg`` from now on.  Unchanged endpoints keep their sockets and connections; changed
        ones apply to new connections; removed or moved ones stop accepting and their connections close
        at the next request boundary.  On ConfigError or BindError nothing changes."""
        with self._reload_lock:
            self._apply(cfg)
            self._cfg = cfg

    def _adopt_passed(self):
        known = {ep.name for ep in self._cfg.endpoints}
        passed = self._passed
        if len(passed) == 1 and passed[0][1] not in known:
            # one unnamed socket for one endpoint: the obvious match (FileDescriptorName= not set)
            only = self.names if len(self.names) == 1 else [ep.name for ep in self._cfg.endpoints]
            if len(only) == 1:
                passed = [(passed[0][0], only[0])]
        for fd, name in passed:
            sock = binding.adopt(fd, name)
            if name not in known:
                # not named after an endpoint (one socket unit with several ListenStream= lines, whose
                # sockets all bear the unit's name): the endpoint configured to bind that very address
                name = next((ep.name for ep in self._cfg.endpoints if binding.binds_to(ep, sock)), name)
            self._inherited[name] = sock
            if name not in known:
                log.warning("systemd passed a socket named %r (%s) but no endpoint has that name or "
                            "address", name, binding.show(binding.address(sock)))

    def _key(self, ep):
        if ep.name in self._inherited:
            return ("fd", ep.name)
        if ep.bind_path:
            return ("unix", ep.bind_path)
        if ep.bind_port == 0:
            return ("tcp", ep.bind_address, 0, ep.name)  # every port 0 is a port of its own
        return ("tcp", ep.bind_address, ep.bind_port)

    def _open(self, key, ep):
        if key[0] == "fd":
            return _Slot(key, self._inherited[ep.name], inherited=True)
        if key[0] == "unix":
            return _Slot(key, binding.open_unix(ep), path=ep.bind_path)
        return _Slot(key, binding.open_tcp(ep))

    def _apply(self, cfg):
        endpoints, skipped = selected(cfg, self.names, self._inherited)
        if self.gate is not None and self._bound and {self._key(ep) for ep in endpoints} != set(self._slots):
            # the workers share the sockets bound before they were forked; one of them alone cannot
            # add one for all, nor take one away from the others
            raise BindError("with --workers, a reload cannot add, move or remove listening sockets; "
                            "restart pfrest serve for that")
        plan = self._plan(endpoints, cfg.user_agent)
        for name in skipped:
            log.info("endpoint=%s has neither bind-port nor bind-path: not served here", name)
        with self._lock:
            retired = self._commit(plan)
            finished = [svc for svc in retired if self._retire(svc)]
        for svc in finished:
            svc.backend.close()
        self._wake()

    def _plan(self, endpoints, user_agent):
        """{bind key: (slot, endpoint, service)}, opening the sockets that are new; all or nothing."""
        plan, opened = {}, []
        try:
            for ep in endpoints:
                key = self._key(ep)
                if key in plan:
                    raise config.ConfigError([f"endpoints {plan[key][1].name} and {ep.name} both listen on "
                                              f"{binding.where(ep)}"])
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._open(key, ep)
                    opened.append(slot)
                keep = slot.service if slot.service and slot.service.same(ep, user_agent) else None
                plan[key] = (slot, ep, keep or _Service(ep, user_agent, self._stats.setdefault(ep.name, Stats())))
        except Exception:
            for slot in opened:
                slot.close()
            raise
        return plan

    def _commit(self, plan):
        """Make ``plan`` the current setup (under the lock); returns the services new connections no
        longer get.  The accept thread closes the sockets of removed slots."""
        retired = []
        for key, slot in self._slots.items():
            if key not in plan:
                log.info("endpoint=%s no longer served: closing %s", slot.name, self._where(slot))
                self._close_idle(slot, lambda conn: True)
                retired.append(slot.service)
        for slot, ep, service in plan.values():
            old, slot.service = slot.service, service
            if old is None:
                log.info("endpoint=%s mode=%s listening on %s%s", ep.name, ep.mode, self._where(slot),
                         " (from systemd)" if slot.inherited else "")
            elif old is not service:
                log.info("endpoint=%s reconfigured; new connections get the new settings", ep.name)
                retired.append(old)
                identity = (ep.name, ep.mode)
                if (old.endpoint.name, old.endpoint.mode) != identity:
                    # connections that speak for an endpoint no longer here: close them when idle
                    self._close_idle(slot, lambda conn: (conn.service.endpoint.name,
                                                         conn.service.endpoint.mode) != identity)
                if slot.path and old.endpoint.bind_mode != ep.bind_mode:
                    try:
                        os.chmod(slot.path, ep.bind_mode)
                    except OSError as exc:
                        log.error("endpoint=%s cannot change the mode of %s: %s", ep.name, slot.path,
                                  exc.strerror)
        self._slots = {key: slot for key, (slot, _, _) in plan.items()}
        return retired

    def _retire(self, service):
        """Mark a service as no longer given to new connections; True if nothing uses it any more."""
        service.retired = True
        return service.connections == 0

    def _close_idle(self, slot, which):
        for conn in self._connections:
            if conn.slot is slot and which(conn):
                conn.close_when_idle()

    @staticmethod
    def _where(slot):
        return binding.show(binding.address(slot.sock))

    # --- what a program or the process asks -----------------------------------------------------

    @property
    def addresses(self):
        """Endpoint name -> bound address: ``(host, port)`` for TCP, the path for a unix socket."""
        with self._lock:
            return {slot.name: binding.address(slot.sock) for slot in self._slots.values()}

    def unix_paths(self):
        """The socket files this listener created (to hand them to the unprivileged user)."""
        with self._lock:
            return [slot.path for slot in self._slots.values() if slot.path]

    def connection_count(self):
        with self._lock:
            return len(self._connections)

    def summary(self):
        """One counters line per endpoint served now."""
        with self._lock:
            services = [slot.service for slot in self._slots.values()]
            open_now = Counter(conn.service.endpoint.name for conn in self._connections)
        return [f"endpoint={svc.endpoint.name} {svc.stats.summary(open_now[svc.endpoint.name])}"
                for svc in services]

    def stop(self, drain_timeout=DRAIN_TIMEOUT):
        """Stop accepting, close idle connections, give requests in progress up to ``drain_timeout``
        seconds to be answered, then cut what is left.  Returns how many connections were cut."""
        with self._lock:
            self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join()
        else:
            for slot in self._slots.values():
                slot.close()
        with self._lock:
            for conn in self._connections:
                conn.close_when_idle()
            deadline = time.monotonic() + drain_timeout
            while self._connections and deadline > time.monotonic():
                self._quiet.wait(deadline - time.monotonic())
            left = list(self._connections)
            services = {slot.service for slot in self._slots.values()}
        for conn in left:
            conn.abort()
        if left:
            log.warning("%d connection(s) still busy after %.1f s: cut", len(left), drain_timeout)
        for svc in services:
            svc.backend.close()  # its threads end once their current call is done
        self._wake_r.close()
        self._wake_w.close()
        return len(left)

    # --- accepting ------------------------------------------------------------------------------

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def _accept_loop(self):
        """The only place that registers and closes listening sockets, so none is closed under a
        select() that still watches it."""
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        watched = set()
        try:
            while True:
                with self._lock:
                    wanted = set() if self._stopping else set(self._slots.values())
                for slot in watched - wanted:
                    selector.unregister(slot.sock)
                    slot.close()
                for slot in wanted - watched:
                    selector.register(slot.sock, selectors.EVENT_READ, slot)
                watched = wanted
                if self._stopping:
                    return
                for key, _ in selector.select():
                    if key.data is None:
                        self._drain_wakeups()
                    else:
                        self._accept(key.data)
        except Exception:
            log.exception("the accept loop failed; no new connections are accepted")
        finally:
            selector.close()

    def _drain_wakeups(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self, slot):
        for _ in range(ACCEPT_BATCH):
            if self.gate is not None and not self.gate.may_accept(len(self._connections)):
                return
            try:
                sock, addr = slot.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in binding.EXHAUSTED:
                    self._warn(slot.service, "exhausted", f"cannot accept connections: {exc.strerror}; "
                               "raise LimitNOFILE= or lower max-connections")
                    time.sleep(0.1)  # the socket stays readable: without a pause this loop spins
                return
            try:
                self._admit(slot, sock, addr)
            except Exception:  # one odd connection must not end accepting for all
                log.exception("endpoint=%s cannot take a connection", slot.name)
                sock.close()

    def _admit(self, slot, sock, addr):
        service = slot.service
        ep = service.endpoint
        peer = binding.peer_name(sock, addr)
        why = conn = None
        room = connection_room()
        if service.networks and sock.family != socket.AF_UNIX and not binding.allowed(service.networks, addr[0]):
            why = "allow-from"
        else:
            with self._lock:
                if slot.open >= ep.max_connections:
                    why = "max-connections"
                elif len(self._connections) >= room:
                    why = "open-files"  # one more would leave a connection without a backend socket
                else:
                    conn = _Connection(sock, peer, slot, service)
                    slot.open += 1
                    service.connections += 1
                    self._connections.add(conn)
        if why:
            service.stats.refuse(why)
            detail = {"allow-from": "not in allow-from",
                      "max-connections": f"max-connections ({ep.max_connections}) reached",
                      "open-files": f"the open-file limit leaves room for {room} connections, all taken; "
                                    "raise LimitNOFILE="}[why]
            self._warn(service, why, f"peer={peer} refused: {detail}")
            sock.close()
            return
        service.stats.accepted()
        try:
            threading.Thread(target=self._converse, args=(conn,), name="pfrest-conn", daemon=True).start()
        except RuntimeError as exc:  # "can't start new thread": out of memory or a tasks limit
            self._warn(service, "thread", f"peer={peer} dropped: {exc}")
            self._forget(conn)
            sock.close()

    def _warn(self, service, reason, message):
        """A warning that a flood could repeat thousands of times a second: at most one a second."""
        key, now = (service.endpoint.name, reason), time.monotonic()
        if now - self._warned.get(key, -WARNING_INTERVAL) >= WARNING_INTERVAL:
            self._warned[key] = now
            total = service.stats.refused.get(reason)
            log.warning("endpoint=%s %s%s", service.endpoint.name, message,
                        f" ({total} refused so far)" if total and total > 1 else "")

    # --- one connection -------------------------------------------------------------------------

    def _converse(self, conn):
        try:
            if conn.sock.family != socket.AF_UNIX:  # replies are single writes: never hold one back
                try:
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass  # already reset by the peer: the dialogue will see it
            conn.sock.settimeout(None)  # blocking, with kernel timeouts: see _Connection.read1
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(WRITE_TIMEOUT))
            serve(conn, conn, conn.service.responder, conn.before_read, conn.peer)
        except Exception:  # serve() handles I/O errors; this is a bug, and must not kill the process
            log.exception("endpoint=%s peer=%s connection failed", conn.service.endpoint.name, conn.peer)
        finally:
            conn.sock.close()
            self._forget(conn)

    def _forget(self, conn):
        with self._lock:
            self._connections.discard(conn)
            conn.slot.open -= 1
            service = conn.service
            service.connections -= 1
            done = service.retired and service.connections == 0
            self._quiet.notify_all()
            if self.gate is not None:
                self.gate.count(len(self._connections))
        if done:
            service.backend.close()
