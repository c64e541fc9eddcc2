"""Where something listens and where Postfix connects, as values that can be compared.

Two config lines may name one socket in different words: ``localhost`` and ``127.0.0.1`` are the same
listener when the name resolves to that address, ``0.0.0.0`` takes every IPv4 address of the port (and
``::`` every address, IPv4 too where the kernel makes IPv6 sockets dual-stack), and ``private/NAME`` in
Postfix is a path relative to its queue directory.  So names are resolved here, as ``pfrest serve``
and Postfix resolve them, and the kernel's rules for who may bind beside whom are applied.

Standard library only, no asyncio: ``pfrest check`` stays cheap.
"""

import ipaddress
import os
import socket
from typing import FrozenSet, NamedTuple, Optional, Union

# 0 (Linux's default): a socket bound to :: also takes IPv4 connections, so it excludes 0.0.0.0
BINDV6ONLY = "/proc/sys/net/ipv6/bindv6only"
WILDCARDS = frozenset({ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")})


class Inet(NamedTuple):
    ips: FrozenSet[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]   # empty: did not resolve
    port: int


class Unix(NamedTuple):
    path: str   # absolute and normalised


Address = Union[Inet, Unix]


def _ip(text: str):
    return ipaddress.ip_address(text.split("%", 1)[0])   # a scope (fe80::1%eth0) does not matter here


def bound_by(endpoint) -> Optional[Address]:
    """Where ``pfrest serve`` listens for ``endpoint``: the first address getaddrinfo gives for its
    bind-address, as sockets.open_tcp binds, or its bind-path; None when it is not served.  Raises
    socket.gaierror when the bind-address does not resolve."""
    if endpoint.bind_path:
        return Unix(os.path.abspath(endpoint.bind_path))
    if endpoint.bind_port is None:
        return None
    info = socket.getaddrinfo(endpoint.bind_address.strip("[]"), endpoint.bind_port,
                              type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return Inet(frozenset({_ip(info[4][0])}), endpoint.bind_port)


def port_number(text: str) -> Optional[int]:
    """A port as Postfix takes it: a number or a service name (``smtp``); None when it is neither."""
    if text.isdigit():
        return int(text) if 0 < int(text) < 65536 else None
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        return None


def resolved(host: str, port: Optional[int]) -> Optional[Inet]:
    """Every address ``host`` resolves to (as a client connecting would try them all), with ``port``;
    None without a usable port.  A name that does not resolve gives an empty set: it reaches nothing."""
    if port is None:
        return None
    host = host.strip("[]")
    try:
        return Inet(frozenset({_ip(host)}), port)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return Inet(frozenset(), port)
    return Inet(frozenset(_ip(info[4][0]) for info in infos), port)


def everywhere(port: int) -> Inet:
    """A listener on every address of ``port`` (a master.cf inet service named by its port alone)."""
    return Inet(WILDCARDS, port)


def unix(path: str, base: str) -> Unix:
    """A unix socket path as a process whose working directory is ``base`` reaches it (Postfix's
    daemons run in the queue directory: ``private/NAME`` is below it)."""
    return Unix(os.path.normpath(os.path.join(base, path)))


def dual_stack() -> bool:
    try:
        with open(BINDV6ONLY) as f:
            return f.read().strip() == "0"
    except OSError:
        return True   # not Linux, or no IPv6: assume the common default


def _takes(wildcard, ip) -> bool:
    """Whether a socket bound to the unspecified address ``wildcard`` takes connections for ``ip``."""
    return wildcard.version == ip.version or (wildcard.version == 6 and dual_stack())


def collide(a: Address, b: Address) -> bool:
    """Whether two listening sockets cannot both be bound: one path, or one port with the same
    address, or with a wildcard that covers the other's address."""
    if isinstance(a, Unix) or isinstance(b, Unix):
        return a == b
    if a.port != b.port:
        return False
    return any(x == y or (x.is_unspecified and _takes(x, y)) or (y.is_unspecified and _takes(y, x))
               for x in a.ips for y in b.ips)


def is_local(ip) -> bool:
    """Whether ``ip`` is an address of this host: loopback, or one a socket can bind to."""
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
        return True
    except OSError:
        return False


def reaches(target: Address, listener: Address) -> bool:
    """Whether a client connecting to ``target`` gets to ``listener``."""
    if isinstance(target, Unix) or isinstance(listener, Unix):
        return target == listener
    if target.port != listener.port:
        return False
    return any(ip == bound or (bound.is_unspecified and _takes(bound, ip) and is_local(ip))
               for ip in target.ips for bound in listener.ips)

