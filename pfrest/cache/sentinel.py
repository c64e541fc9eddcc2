"""The primary of a service that Redis Sentinel watches (a ``redis+sentinel://`` cache-url,
config/sentinelurl.py): asked of the sentinels with ``SENTINEL get-master-addr-by-name``, over the same
kind of connection as the store's own calls (redispipe.Pipe), each sentinel within ASK_TIMEOUT.

Why not redis-py's ``redis.sentinel.Sentinel``: its connections find the primary within a call, on a
lookup's clock (several round trips to sentinels, then to the primary), and retry there; pfrest asks
the sentinels only in the shared store's probe (shared.py), in the background, never while a lookup
waits.  When the primary fails (its connection lost, no answer, ``-READONLY`` from a server demoted to
a replica), the store is skipped at once and its next probe asks the sentinels again, so that it
follows a failover as soon as the sentinels name the new primary, with no restart and no reload.

While the store is used, a watch asks the sentinels every RECHECK seconds too, and probes the primary
they name when it is another one: a primary demoted by a failover (a manual one, or a partition that
heals) lives on and answers until the sentinels reconfigure it, seconds later.

The sentinels are asked in turn, the one that answered last first; a primary that then fails its probe
sends that sentinel to the back (it may not have heard of the failover yet).  Each change of the
primary's address is logged (one line), never the URL's password.
"""

import asyncio
import ipaddress
import logging
import socket

from pfrest.cache import redisclient
from pfrest.cache.redispipe import Lost, Pipe
from pfrest.config import sentinelurl

log = logging.getLogger("pfrest")

ASK_TIMEOUT = 0.5       # seconds for one sentinel to connect (TLS included) and answer, on loopback or LAN
MAX_HOST = 255          # bytes of a host name in a sentinel's answer
# the longest back-off of a store found through sentinels (sharedhealth's is 10 s): a failover names a
# new primary within seconds (down-after-milliseconds, then an election), which a probe should find soon
BACKOFF_MAX = 2.0
# seconds between the watch's questions to the sentinels while the store is used: a primary demoted by
# a failover lives on, and answers, until the sentinels reconfigure it (some 10 s later)
RECHECK = 1.0


class NoPrimary(Exception):
    """No sentinel named a primary (or a replica to read from); the text says what each said, for the
    log."""


class Locator:
    """The sentinels of one cache-url and what they said last."""

    def __init__(self, url: str, name=None, where=None):
        self.service = sentinelurl.parse(url)
        self.name, self.where_service = name, where   # the endpoint's, to log each new primary (a store's)
        self.order = list(self.service.sentinels)   # asked in this order
        self.address = None                          # (host, port) of the primary they named last

    async def primary(self) -> str:
        """The URL of the service's primary (with the cache-url's password and database), as the first
        sentinel that answers names it; NoPrimary when none does."""
        address = await self._first("primary", "get-master-addr-by-name", _address)
        if address != self.address and self.name:
            log.info("endpoint=%s shared cache %s: the sentinels name %s as the primary", self.name,
                     self.where_service, _where(address))
        self.address = address
        return sentinelurl.server_url(self.service, *address)

    async def replica(self) -> str:
        """The URL of a replica of the service to read from (cache-read-url): one the first sentinel
        that answers lists as up, this host's first (_replica); NoPrimary when none is."""
        return sentinelurl.server_url(self.service, *await self._first("replica", "replicas", _replica))

    async def _first(self, what, question, answer):
        """``answer(reply, service)`` of the first sentinel that gives a usable reply to ``SENTINEL
        question SERVICE``, which is asked first from then on."""
        said = []
        for sentinel in list(self.order):
            try:
                found = await asyncio.wait_for(self._ask(*sentinel, question, answer), ASK_TIMEOUT)
            except asyncio.TimeoutError:
                said.append(f"{_where(sentinel)}: no answer within {ASK_TIMEOUT:g} s")
                continue
            except (*redisclient.ERRORS, Lost, ValueError) as exc:
                said.append(f"{_where(sentinel)}: " + (redisclient.describe(exc) if isinstance(
                    exc, redisclient.ERRORS) else str(exc)))
                continue
            self.order.remove(sentinel)
            self.order.insert(0, sentinel)
            return found
        raise NoPrimary(f"no sentinel names a {what} of {self.service.name} (" + "; ".join(said) + ")")

    def primary_failed(self, why: str) -> str:
        """The primary the first sentinel named fails (``why``): ask the others first next time (that
        one may not know of a failover yet).  Returns what to log."""
        if len(self.order) > 1:
            self.order.append(self.order.pop(0))
        return f"primary {self.where()}: {why}" if self.address else f"asking the sentinels: {why}"

    def where(self) -> str:
        """The primary named last, for the log: host and port only."""
        return _where(self.address) if self.address else "none"

    async def _ask(self, host, port, question, answer):
        pipe = await Pipe.open(sentinelurl.sentinel_url(self.service, host, port), _ignore)
        try:
            reply = await pipe.call("SENTINEL", question, self.service.name)
        finally:
            await redisclient.quietly(pipe.close())
        return answer(reply, self.service.name)


async def watch(store):
    """While ``store`` (shared.SharedStore) is used, ask its sentinels every RECHECK seconds which server
    is the primary, and have it probe that one when it is not the one in use: the connection to a
    primary that a failover demoted does not fail before the sentinels reconfigure it, and until then
    its writes would not reach the hosts that use the new primary.  Ends when the store is closed."""
    while not store.closed:
        await asyncio.sleep(RECHECK)
        if not store.up:   # its probes ask the sentinels
            continue
        try:
            url = await asyncio.wait_for(store.locator.primary(), RECHECK)
        except (asyncio.TimeoutError, NoPrimary):
            continue   # the store's own calls say whether the primary still answers
        probe = store.reprobe() if url != store.server_url else None
        if probe is not None:   # one at a time
            await asyncio.wait([probe])


def _address(reply, name):
    """(host, port) from a get-master-addr-by-name reply; ValueError for any other reply."""
    if reply is None:
        raise ValueError(f"watches no service named {name}")
    if not (isinstance(reply, list) and len(reply) == 2 and all(isinstance(x, bytes) for x in reply)):
        raise ValueError(f"a reply that is no address: {type(reply).__name__}")
    host, port = reply[0].decode("ascii", "replace"), reply[1]
    if not host or len(host) > MAX_HOST or not port.isdigit() or not 1 <= int(port) <= 65535 \
            or any(c in host for c in "/@?#[] "):
        raise ValueError("a reply that is no address")
    return host, int(port)


def _replica(reply, name):
    """(host, port) of a replica to read from, in a SENTINEL REPLICAS reply: one that is up (no s_down,
    o_down or disconnected flag); this host's first (its address can be bound here: a replica next to
    the MTA is read in well under a millisecond), then one the sentinel saw linked to its primary (its
    view is up to 10 s old: the probe asks the replica itself, ROLE)."""
    usable = []
    for fields in reply if isinstance(reply, list) else ():
        info = dict(zip(fields[::2], fields[1::2])) if isinstance(fields, list) else fields
        info = {_text(k): _text(v) for k, v in info.items()} if isinstance(info, dict) else {}
        if set(info.get("flags", "").split(",")) & {"s_down", "o_down", "disconnected"}:
            continue
        try:
            address = _address([info["ip"].encode("ascii"), info["port"].encode("ascii")], name)
        except (KeyError, ValueError, UnicodeEncodeError):
            continue
        usable.append((not _here(address[0]), info.get("master-link-status") != "ok", len(usable), address))
    if not usable:
        raise ValueError(f"lists no replica of {name} that is up")
    return min(usable)[3]


def _here(host) -> bool:
    """Whether ``host`` is an address of this host (it can be bound; a name is not looked up: no wait
    for DNS on the event loop)."""
    try:
        ipaddress.ip_address(host)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, 0))
        return True
    except (OSError, ValueError):
        return False


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _where(address):
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ignore(pipe, why):
    """A sentinel's connection lost: its call fails (Lost), which says it."""
