"""The cache-url form for Redis Sentinel, read:
``redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/db]`` (``rediss+sentinel://``
over TLS), the form other Redis clients read.  It names the sentinels and the
service they watch, not a server: the shared cache asks the sentinels which server is the service's
primary (cache/sentinel.py).  Pure, standard library only: the config check (keys.py) and the cache
both read it here.

The user and password are the servers' (the primary's and its replicas'); the sentinels are asked
without them.  The query, for ``rediss+sentinel://``, names the TLS files (CACHE_URL_FILES) used for
sentinels and servers alike.
"""

import re
from typing import NamedTuple, Tuple
from urllib.parse import parse_qsl

from pfrest.config.schema import CACHE_URL_FILES

SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}   # -> the servers' scheme
DEFAULT_PORT = 26379    # a sentinel's, where a host is given without one
MAX_SENTINELS = 16      # a site runs three or five
_SERVICE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
USAGE = "must be redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"


class Service(NamedTuple):
    scheme: str                           # the servers': redis or rediss
    userinfo: str                         # ``[user]:password`` as written (percent-encoded), or ""
    sentinels: Tuple[Tuple[str, int], ...]
    name: str                             # the service (sentinel monitor NAME)
    db: int
    query: str                            # the TLS files, as written


def is_sentinel(url) -> bool:
    return isinstance(url, str) and url.partition("://")[0] in SCHEMES


class Parts(NamedTuple):
    scheme: str
    netloc: str
    path: str
    query: str
    fragment: str


def split(url: str) -> Parts:
    """A URL's parts, split by hand: urllib's urlsplit takes a netloc for one host, and some of its
    versions (Debian 12's 3.11.2, with its security fixes) refuse a list of hosts holding ``[v6]:port``
    ("Invalid IPv6 URL"), which a sentinel list may be."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(USAGE)
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    return Parts(scheme.lower(), netloc, slash + path, query, fragment)


def parse(url: str) -> Service:
    """The parts of a Sentinel cache-url; ValueError saying what is wrong and how it is written."""
    try:
        parts = split(url)
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError(USAGE) from None
    if parts.scheme not in SCHEMES or parts.fragment or " " in url:
        raise ValueError(USAGE)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = tuple(_address(item) for item in hosts.split(","))
    if len(sentinels) > MAX_SENTINELS:
        raise ValueError(f"names more than {MAX_SENTINELS} sentinels")
    if len(set(sentinels)) != len(sentinels):
        raise ValueError("names a sentinel twice")
    path = parts.path.strip("/").split("/") if parts.path.strip("/") else []
    if not path or len(path) > 2 or not _SERVICE.match(path[0]) or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"the path is the service the sentinels watch, and a database number: {USAGE}")
    for name, value in query:
        if name not in CACHE_URL_FILES or parts.scheme != "rediss+sentinel":
            known = ", ".join(CACHE_URL_FILES) if parts.scheme == "rediss+sentinel" else "none"
            raise ValueError(f"{name!r} is not a setting pfrest takes in a {parts.scheme}:// URL (it takes "
                             f"{known}; the database is the path's: /SERVICE/DB)")
        if not value.startswith("/"):
            raise ValueError(f"{name} must be an absolute path")
    return Service(SCHEMES[parts.scheme], userinfo, sentinels, path[0], int(path[1]) if len(path) == 2 else 0,
                   parts.query)


def _address(item):
    """(host, port) of one ``host:port`` (``[v6]:port``), the port 26379 if none is given."""
    host, port = item, ""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{item!r} is not a sentinel's HOST:PORT")
        port = rest[1:]
    elif ":" in item:
        host, _, port = item.rpartition(":")
    if not host or not re.match(r"^[A-Za-z0-9.:-]+$", host) or (port and not port.isdigit()):
        raise ValueError(f"{item!r} is not a sentinel's HOST:PORT: {USAGE}")
    number = int(port) if port else DEFAULT_PORT
    if not 1 <= number <= 65535:
        raise ValueError(f"{item!r}: the port must be 1..65535")
    return host, number


def _netloc(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sentinel_url(service: Service, host: str, port: int) -> str:
    """A URL of one sentinel, for a connection to it: no password, no database."""
    return f"{service.scheme}://{_netloc(host, port)}" + (f"?{service.query}" if service.query else "")


def server_url(service: Service, host: str, port: int) -> str:
    """The URL of the server at ``host:port`` (the primary the sentinels named), with the password and
    database of the service's URL: a plain cache-url."""
    auth = f"{service.userinfo}@" if service.userinfo else ""
    return f"{service.scheme}://{auth}{_netloc(host, port)}/{service.db}" + \
        (f"?{service.query}" if service.query else "")
