"""A read replica of the shared cache (``cache-read-url``): usually a replica of the primary on the same
host, read in well under a millisecond; or, in Sentinel's form, one the sentinels list as up and linked,
this host's first (sentinel.Locator.replica), asked again at each probe.  The lookups' reads (MGET) go there; writes, probes,
invalidations and ``pfrest cache`` go to the primary (``cache-url``), as without it.

It is used as the primary is (shared.py), with a health of its own (sharedhealth.StoreHealth, one log
line per change, its name marked "reads"): a probe in the background connects and asks ROLE before reads
go there, and takes a replica whose link to its primary is up, or a primary; a replica whose link is
down (it falls further behind every second), or that fails, is *skipped*, and reads go to the primary
meanwhile, until a probe after a back-off finds it usable again.  While it is used, a watch asks ROLE
every RECHECK seconds, so that a replica that loses its link is skipped within that.

What a reader sees during replication lag: an entry at most that lag older than the primary's (an answer
another host fetched a moment ago may not be there yet: fetched again; one ``pfrest cache`` removed may
still be read for that moment, as its invalidation reaches each process's own cache at once); never
another key's (an entry names its key), and never past its own lifetime (it carries it).
"""

import asyncio

from pfrest.cache import redisclient, sentinel
from pfrest.cache.redispipe import Lost, Pipe
from pfrest.cache.sharedhealth import StoreHealth
from pfrest.config import sentinelurl

PROBE_TIMEOUT = 2.0   # seconds a probe may take (as the primary's: shared.PROBE_TIMEOUT)
RECHECK = 1.0         # seconds between the watch's ROLE calls while the replica is used
LINKED = b"connected"  # a replica's link state in ROLE when it follows its primary


class Lagging(Exception):
    """A server that is no usable replica; the text says why."""


class ReadReplica:
    """The read replica of one store in one process: its connection (``pipe``) and health."""

    def __init__(self, name, url, observer):
        self.url, self.where, self.observer = url, redisclient.where(url), observer
        self.health = StoreHealth(name, f"{self.where} (reads)", instead="reads go to the primary")
        self.pipe, self.ready = None, False
        # with Sentinel's form: a replica the sentinels list, this host's first, asked at each probe
        self.locator = sentinel.Locator(url) if sentinelurl.is_sentinel(url) else None
        self.server_url = None if self.locator else url   # the one read from (a secret: a password)

    @property
    def up(self) -> bool:
        """Read from now: probed, and not skipped."""
        return self.ready and self.pipe is not None and not self.health.down_until

    def bind(self, spawn):
        """A new event loop: what was open belongs to the old one; a probe (``spawn``: the store's)."""
        self.pipe, self.ready = None, False
        spawn(self.probe())

    def due(self, now) -> bool:
        """Skipped, and its back-off has run out: this caller probes it (Backoff.usable)."""
        return bool(self.health.down_until) and self.health.usable(now)

    async def probe(self):
        pipe, url = None, self.url
        try:
            if self.locator is not None:
                url = await asyncio.wait_for(self.locator.replica(), PROBE_TIMEOUT)
            pipe = await asyncio.wait_for(Pipe.open(url, self._lost), PROBE_TIMEOUT)
            usable(await asyncio.wait_for(pipe.call("ROLE"), PROBE_TIMEOUT))
        except (asyncio.TimeoutError, *redisclient.ERRORS, Lost, Lagging, sentinel.NoPrimary) as exc:
            self.failed(_why(exc), probe=True)
        else:
            old, self.pipe, pipe, self.ready, self.server_url = self.pipe, pipe, None, True, url
            self.health.call_succeeded(probe=True)
            if old is not None:
                await redisclient.quietly(old.close())
        finally:
            if pipe is not None:
                await redisclient.quietly(pipe.close())

    def failed(self, why, at_once=False, probe=False):
        """A call that failed (sharedhealth says when it skips the replica)."""
        self.observer.shared("error")
        self.health.call_failed(asyncio.get_running_loop().time(), why, at_once, probe)

    def drop(self):
        """Its connection gave a reply that is not for the request: closed; a probe opens another."""
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            asyncio.get_running_loop().create_task(redisclient.quietly(pipe.close()))

    async def close(self):
        if self.pipe is not None:
            await redisclient.quietly(self.pipe.close())

    def _lost(self, pipe, why):
        if pipe is self.pipe:
            self.failed(f"connection lost: {why}", at_once=True)


async def watch(store):
    """While ``store``'s replica is used, ask it ROLE every RECHECK seconds: one whose link to its
    primary went down is skipped (reads go to the primary).  Ends when the store is closed."""
    replica = store.replica
    while not store.closed:
        await asyncio.sleep(RECHECK)
        pipe = replica.pipe
        if not replica.up:
            continue
        try:
            usable(await asyncio.wait_for(pipe.call("ROLE"), PROBE_TIMEOUT))
        except (asyncio.TimeoutError, *redisclient.ERRORS, Lost, Lagging) as exc:
            if pipe is replica.pipe and not store.closed:
                replica.failed(_why(exc), at_once=True)


def usable(role):
    """Nothing, for a ROLE reply of a primary or of a replica linked to its primary; else Lagging."""
    if not isinstance(role, list) or not role:
        raise Lagging(f"a reply to ROLE that is no role: {type(role).__name__}")
    if role[0] == b"master":
        return
    if role[0] != b"slave" or len(role) < 4:
        raise Lagging(f"a {role[0]!r} is no replica to read from")
    if role[3] != LINKED:
        raise Lagging(f"a replica whose link to its primary is {role[3].decode('ascii', 'replace')}: it lags")


def _why(exc):
    if isinstance(exc, asyncio.TimeoutError):
        return f"no reply to a probe within {PROBE_TIMEOUT:g} s"
    return str(exc) if isinstance(exc, (Lost, Lagging, sentinel.NoPrimary)) else redisclient.describe(exc)
