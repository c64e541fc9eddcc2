"""A redis-py asyncio client for a ``cache-url``, as the shared cache (shared.py), its invalidation
channel (invalidation.py) and ``pfrest cache`` (commands/cache.py) need it.  Works with Redis and Valkey,
with redis-py 4.3 (Debian 12's) and later.

redis-py reads the URL (host, port, database, user, password, TLS; unix socket paths).  What pfrest
sets on top:
- no retries: the shared cache is skipped when it fails (shared.py), a retry would only add waiting;
  every call is bounded by the caller's deadline (cancellation), not by socket timeouts (a timeout
  per read, which redis-py 6 and later set by default, costs a third of a call's CPU);
- rediss:// verifies the server's certificate *and its name*, as pfrest does for an https backend
  (redis-py checks only the certificate unless told);
- the connections carry the client name ``pfrest``, for CLIENT LIST.
"""

import asyncio
import re
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from pfrest.config import sentinelurl

CLIENT_NAME = "pfrest"
CLOSE_TIMEOUT = 1.0              # seconds to close a connection that is no longer used
ERRORS = (RedisError, OSError)   # what a call may raise, besides a cancellation
# among them, the store's own refusals: it answers, but will not do it (OOM when full, READONLY on a
# replica, a wrong password); no retry will change that soon, unlike a timeout or a lost connection
REFUSALS = (ResponseError, AuthenticationError)
_PIPELINE_COMMAND = re.compile(r"Command # \d+ \(.*?\) of pipeline caused error: ", re.DOTALL)


def connect(url: str) -> aioredis.Redis:
    """A client for ``url`` (config.py checked it); it connects at its first call."""
    return aioredis.Redis.from_url(url, **_options(url))


def connection(url: str):
    """One connection for ``url``, not connected yet (redispipe.Pipe's)."""
    pool = aioredis.ConnectionPool.from_url(url, **_options(url))
    return pool.connection_class(**pool.connection_kwargs)


def _options(url):
    options = {"retry": Retry(NoBackoff(), 0), "client_name": CLIENT_NAME, "socket_timeout": None}
    if urlsplit(url).scheme == "rediss":
        options["ssl_check_hostname"] = True
    return options


def describe(exc) -> str:
    """An error for the log: its kind and the store's words, without the command redis-py quotes for a
    pipeline (which holds a cached answer), and with the error underneath where redis-py's own text
    leaves it out (a TLS error, in redis-py 4)."""
    text = _PIPELINE_COMMAND.sub("", str(exc))
    under = exc.__cause__ or exc.__context__
    if isinstance(under, OSError) and str(under) and str(under) not in text:
        text += f" ({type(under).__name__}: {under})"
    return f"{type(exc).__name__}: {text}"


def where(url: str) -> str:
    """The store a URL names, for messages: never its password."""
    if sentinelurl.is_sentinel(url):   # the sentinels and the service, split as urlsplit may not
        parts = sentinelurl.split(url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path or '/0'}"


async def close(client: aioredis.Redis):
    """Close every connection of ``client`` (``disconnect`` is the pool's, in every redis-py)."""
    await client.connection_pool.disconnect()


async def quietly(closing, timeout=CLOSE_TIMEOUT):
    """Await ``closing`` (a connection's close) for ``timeout`` seconds at most, whatever it raises: a
    connection being dropped has nothing more to say."""
    try:
        await asyncio.wait_for(closing, timeout)
    except (*ERRORS, asyncio.TimeoutError):
        pass
