"""What the shared cache (cache-url) holds and says, as bytes: the names of its keys and channels, its
entries, its invalidation messages.  Pure, standard library only: the store (shared.py), its
invalidation channel (invalidation.py) and ``pfrest cache`` (cachecmd.py) all spell them from here.

Names.  Every key of an endpoint starts with its *namespace*, ``pfrest:NAME:HASH``: the endpoint's name
and a hash of its target list, so that two endpoints, or two sites with their own backends, sharing
one Redis never see each other's answers.  The key is the namespace and the lookup's query string as
the backend gets it (``pfrest:domains:5f0c...:key=example.com``, ``...:name=aliases&key=a%40b.example``),
readable with redis-cli.  Invalidations go out on a channel named after the namespace.

Entries.  ``pfrest/1 KEY\\nSTATUS FRESH-UNTIL STALE-UNTIL\\nBODY``: the answer (HTTP status and body),
until when it is fresh and until when it may serve as a stale answer (RFC 5861 stale-if-error), in
milliseconds since the epoch: every host reads the same instants whatever its uptime (NTP keeps their
clocks within far less than any cache-ttl).  Redis drops the entry at STALE-UNTIL itself (SET PX).
The entry names its own key, so that a reply that is not for the request that got it (a connection out
of step after a cancelled call, as in redis-py before 4.5.4) can never become an answer.

Invalidations.  ``drop\\nQUERY\\nQUERY...`` (those lookups) or ``flush`` (all of the namespace): on the
channel, and in a ``pfrest cache`` request to a serve's control socket (controlsocket.py) alike.
"""

import hashlib
from typing import NamedTuple, Optional
from urllib.parse import unquote_to_bytes

from pfrest.backend.request import query
from pfrest.protocol.verdict import HttpResult

VERSION = b"pfrest/1"
HASH_DIGITS = 16        # of the SHA-256 of the target list: 64 bits tell sites apart
DROP, FLUSH = b"drop", b"flush"


class Mismatch(Exception):
    """A value that is an entry for another key: the reply was not for this request."""


class Entry(NamedTuple):
    result: HttpResult    # marked cached
    fresh_until: int      # ms since the epoch
    stale_until: int      # ms since the epoch; Redis drops the entry then


def namespace(endpoint) -> str:
    targets = "\n".join(endpoint.targets).encode("utf-8")
    return f"pfrest:{endpoint.name}:{hashlib.sha256(targets).hexdigest()[:HASH_DIGITS]}"


def key(space: str, params) -> bytes:
    """The key of a lookup (its (name, bytes) params) in the namespace ``space``."""
    return f"{space}:{query(params)}".encode("ascii")


def pattern(space: str) -> str:
    """Every key of a namespace, for SCAN MATCH (names and hashes hold no glob characters)."""
    return f"{space}:*"


def params_of(text: str):
    """The params of a lookup from its query string (the inverse of request.query): the local cache's
    key for it."""
    pairs = []
    for item in text.split("&"):
        name, _, value = item.partition("=")
        pairs.append((name, unquote_to_bytes(value)))
    return tuple(pairs)


def encode(rkey: bytes, result: HttpResult, fresh_until: int, stale_until: int) -> bytes:
    return b"%s %s\n%d %d %d\n%s" % (VERSION, rkey, result.status, fresh_until, stale_until, result.body)


def decode(rkey: bytes, value) -> Optional[Entry]:
    """The entry in ``value`` (a GET reply for ``rkey``), or None: no entry, or one in another format
    (another pfrest version's).  Raises Mismatch for an entry of another key."""
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise Mismatch(f"a reply of type {type(value).__name__} to a GET")
    head, _, rest = value.partition(b"\n")
    version, _, named = head.partition(b" ")
    if version != VERSION:
        return None
    if named != rkey:
        raise Mismatch("the entry of another key")
    times, _, body = rest.partition(b"\n")
    try:
        status, fresh_until, stale_until = map(int, times.split(b" "))
    except ValueError:
        return None
    return Entry(HttpResult(status, body, cached=True), fresh_until, stale_until)


def drop_message(queries) -> bytes:
    return b"\n".join([DROP, *(q.encode("ascii") for q in queries)])


def flush_message() -> bytes:
    return FLUSH


def read_message(data: bytes):
    """The lookups (params tuples) an invalidation names, or None for all of them; ValueError for what
    is no invalidation."""
    kind, _, rest = data.partition(b"\n")
    if kind == FLUSH and not rest:
        return None
    if kind == DROP:
        return [params_of(line.decode("ascii")) for line in rest.split(b"\n") if line]
    raise ValueError(f"not an invalidation: {data[:40]!r}")

