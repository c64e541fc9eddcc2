"""Listening sockets for the endpoints of ``pfrest serve``: TCP (IPv4/IPv6), unix-domain (their files:
socketfiles.py), or handed over by systemd; and the ``allow-from`` check on accepted peers.

Every failure is a BindError whose text names the endpoint, because that is what the admin reads
when the service does not start.
"""

import errno
import ipaddress
import os
import socket
import struct

# The kernel caps this at net.core.somaxconn (4096 on current kernels).  A burst of Postfix processes
# connecting at once must queue, not be refused: a refused connection costs Postfix retries (R6).
BACKLOG = 4096
# What "Address already in use" most often means when an admin starts serve by hand.
IN_USE_HINT = ("; another pfrest serve (the pfrest service?) or another program may be listening there: "
               "see ss -ltnp, or stop it first")


class BindError(Exception):
    """A listening socket could not be set up; the message names the endpoint."""


def bind_key(endpoint, inherited=()):
    """What identifies an endpoint's listening socket, across reloads and between processes: a socket
    passed by systemd (by endpoint name), a unix socket path, or a TCP address and port."""
    if endpoint.name in inherited:
        return ("fd", endpoint.name)
    if endpoint.bind_path:
        return ("unix", endpoint.bind_path)
    if endpoint.bind_port == 0:
        return ("tcp", endpoint.bind_address, 0, endpoint.name)  # every port 0 is a port of its own
    return ("tcp", endpoint.bind_address, endpoint.bind_port)


def where(endpoint) -> str:
    """The configured address of an endpoint, for messages."""
    if endpoint.bind_path:
        return endpoint.bind_path
    return show((endpoint.bind_address.strip("[]"), endpoint.bind_port))


def open_tcp(endpoint) -> socket.socket:
    host = endpoint.bind_address.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, endpoint.bind_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise BindError(f"endpoint {endpoint.name}: cannot resolve bind-address {host!r}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # a restart must not wait for old connections in TIME_WAIT; this does not allow two listeners
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        hint = IN_USE_HINT if exc.errno == errno.EADDRINUSE else ""
        raise BindError(f"endpoint {endpoint.name}: cannot listen on {where(endpoint)}: "
                        f"{exc.strerror or exc}{hint}") from None
    return sock


def adopt(fd: int, name: str) -> socket.socket:
    """A listening socket passed by systemd (``Accept=no``)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise BindError(f"endpoint {name}: passed fd {fd} is not a socket: {exc.strerror}") from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise BindError(f"endpoint {name}: passed fd {fd} is not a listening stream socket "
                        "(the socket unit needs ListenStream= and Accept=no)")
    return sock


def address(sock):
    """What a socket is bound to: ``(host, port)`` for TCP, the path for a unix socket."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return name.decode(errors="replace") if isinstance(name, bytes) else name
    return name[0], name[1]


def binds_to(endpoint, sock) -> bool:
    """Whether ``sock`` is bound where ``endpoint`` would bind: its bind-path, or bind-address:bind-port."""
    bound = address(sock)
    if endpoint.bind_path or isinstance(bound, str):
        return isinstance(bound, str) and endpoint.bind_path is not None and \
            os.path.abspath(bound) == os.path.abspath(endpoint.bind_path)
    if endpoint.bind_port is None:
        return False
    try:
        infos = socket.getaddrinfo(endpoint.bind_address.strip("[]"), endpoint.bind_port,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    return any(info[4][:2] == bound for info in infos)


def networks(allow_from):
    return tuple(ipaddress.ip_network(n) for n in allow_from)


def allowed(nets, host: str) -> bool:
    """Whether an IP peer is inside one of ``nets`` (an IPv4-mapped IPv6 peer counts as IPv4)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in nets)


def peer_credentials(sock):
    """(pid, uid) of the process at the other end of a unix socket; None when the kernel does not say."""
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    except (OSError, AttributeError):
        return None
    return pid, uid


def peer_name(sock, addr) -> str:
    """``ip:port`` for TCP; for a unix socket the client's uid and pid, which is all there is."""
    if sock.family == socket.AF_UNIX:
        credentials = peer_credentials(sock)
        return "unix" if credentials is None else f"unix:uid={credentials[1]},pid={credentials[0]}"
    return show(addr)


def show(address) -> str:
    """An address for the log: the path, ``host:port`` or ``[v6host]:port``."""
    if isinstance(address, str):
        return address
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# accept() errors that say the process or host ran out of something: pause accepting for a moment,
# or the listening socket stays readable and the accept loop spins.  Others concern one connection.
EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
