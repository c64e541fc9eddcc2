"""What the shared cache (cache-url) holds and says, as bytes: the names of its keys and channels, its
entries, its invalidation messages.  Pure but for reading the client certificate of a namespace,
standard library only: the store (shared.py), its invalidation channel (invalidation.py) and
``pfrest cache`` (commands/cache.py) all spell them from here.

Names.  Every key of an endpoint starts with its *namespace*, ``pfrest:NAME:HASH``: the endpoint's name
and a hash of everything that shapes its answers (``namespace``): its name, mode and target list, and
the credentials it asks with (auth-token, headers, basic-auth, the client certificate), so that two
endpoints, two sites with their own backends, or two tenants of one backend, sharing one Redis never
see each other's answers.  The credentials go in only through scrypt, a slow one-way function with a
salt of the endpoint's name and targets (the same on every host): a reader of Redis cannot recover a
low-entropy token from a key name by trying candidates at the speed of SHA-256.  Same config, same
namespace on every host; a new token starts a new one.  The key is the namespace and the lookup's
query string as the backend gets it (``pfrest:domains:5f0c...:key=example.com``,
``...:name=aliases&key=a%40b.example``), readable with redis-cli.  Invalidations go out on a channel
named after the namespace.

Entries.  ``pfrest/1 KEY\\nSTATUS FRESH-UNTIL STALE-UNTIL[ REVALIDATE-UNTIL]\\nBODY``: the answer (HTTP
status and body), until when it is fresh, until when it may serve as a stale answer (RFC 5861
stale-if-error) and, with stale-while-revalidate, until when it is answered at once while refreshed, in
milliseconds since the epoch: every host reads the same instants whatever its uptime (NTP keeps their
clocks within far less than any cache-ttl).  Redis drops the entry at the later of STALE-UNTIL and
REVALIDATE-UNTIL itself (SET PX); REVALIDATE-UNTIL is written only when there is one, so that entries
without it read as before.  The entry names its own key, so that a reply that is not for the request
that got it (a connection out of step after a cancelled call, as in redis-py before 4.5.4) can never
become an answer.

Invalidations.  ``drop\\nQUERY\\nQUERY...`` (those lookups) or ``flush`` (all of the namespace): on the
channel, and in a ``pfrest cache`` request to a serve's control socket (controlsocket.py) alike.
"""

import hashlib
import os
import re
from typing import NamedTuple, Optional
from urllib.parse import unquote_to_bytes

from pfrest.backend.request import query
from pfrest.protocol.verdict import HttpResult

VERSION = b"pfrest/1"
HASH_DIGITS = 16        # of the namespace's SHA-256: 64 bits tell sites and tenants apart
# scrypt of the credentials: 2**14 rounds of 8 blocks, 16 MiB and some 0.1 s once per process and
# endpoint with cache-url (within OpenSSL's default 32 MiB memory limit), as much per guessed token
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
MAX_CERT_FILE = 1 << 20   # bytes of client-cert read for the namespace (a certificate chain is far less)
_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----[^-]*-----END CERTIFICATE-----")
DROP, FLUSH = b"drop", b"flush"
# The shared store's writes of one turn in one command (a pipeline of SETs would cost redis-py some
# 20 us of CPU each, on the loop): each key with its entry and milliseconds to live, 0 to delete it
WRITE_SCRIPT = """
for i, key in ipairs(KEYS) do
  local milliseconds = tonumber(ARGV[2 * i])
  if milliseconds > 0 then
    redis.call('SET', key, ARGV[2 * i - 1], 'PX', milliseconds)
  else
    redis.call('DEL', key)
  end
end
return #KEYS
"""


class Mismatch(Exception):
    """A value that is an entry for another key: the reply was not for this request."""


class Entry(NamedTuple):
    result: HttpResult    # marked cached
    fresh_until: int      # ms since the epoch
    stale_until: int      # ms since the epoch: a stale answer while the backend fails until then
    revalidate_until: int = 0   # ms since the epoch: answered at once and refreshed until then (0: never)


def namespace(endpoint) -> str:
    """``pfrest:NAME:HASH`` for the endpoint (see the module's notes); OSError when its client-cert
    cannot be read."""
    shape = "\0".join((endpoint.name, endpoint.mode, *endpoint.targets)).encode("utf-8")
    secret = credentials(endpoint)
    if secret:
        shape += b"\0" + hashlib.scrypt(secret, salt=b"pfrest namespace\0" + shape, n=SCRYPT_N, r=SCRYPT_R,
                                        p=SCRYPT_P, dklen=32)
    return f"pfrest:{endpoint.name}:{hashlib.sha256(shape).hexdigest()[:HASH_DIGITS]}"


def credentials(endpoint) -> bytes:
    """What the endpoint asks with that a backend may answer differently to, as one byte string (empty
    for none): never to be stored or logged as it is."""
    parts = [endpoint.auth_token or "", endpoint.basic_auth or "",
             *(f"{name.lower()}: {value}" for name, value in sorted(endpoint.headers))]
    found = "\0".join(parts).encode("utf-8") if any(parts) else b""
    if endpoint.client_cert:
        found += b"\0cert\0" + client_certificate(endpoint.client_cert)
    return found


def alone(endpoint) -> str:
    """A namespace of this process only, for an endpoint whose ``namespace`` cannot be known: no other
    process reads what it keeps, nor keeps anything it reads."""
    return f"pfrest:{endpoint.name}:alone-{os.urandom(HASH_DIGITS // 2).hex()}"


def client_certificate(path: str) -> bytes:
    """The certificates of the client-cert file (not the key it may hold too): the identity the backend
    sees.  Opened without following a link, as every path pfrest may open as root."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_CERT_FILE)
    return b"\n".join(b"".join(block.split()) for block in _CERTIFICATE.findall(data))


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


def encode(rkey: bytes, result: HttpResult, fresh_until: int, stale_until: int, revalidate_until: int = 0
           ) -> bytes:
    revalidate = b" %d" % revalidate_until if revalidate_until > fresh_until else b""
    return b"%s %s\n%d %d %d%s\n%s" % (VERSION, rkey, result.status, fresh_until, stale_until, revalidate,
                                       result.body)


def entry(rkey: bytes, result: HttpResult, now: int, fresh: float, stale: float, revalidate: float = 0.0):
    """(the value, its milliseconds to live) of an entry kept ``fresh`` seconds from ``now`` (ms), a
    stale answer ``stale`` more, answered at once while refreshed ``revalidate`` more."""
    fresh_until = now + int(fresh * 1000)
    stale_until, revalidate_until = fresh_until + int(stale * 1000), fresh_until + int(revalidate * 1000)
    return (encode(rkey, result, fresh_until, stale_until, revalidate_until),
            max(max(stale_until, revalidate_until) - now, 1))


def lock_key(space: str, rkey: bytes) -> bytes:
    """The key of the lock of one refresh of ``rkey`` (refresh.py): ``NAMESPACE:lock:QUERY``, never a
    lookup's key (those are ``NAMESPACE:name=...``)."""
    return b"%s:lock:%s" % (space.encode("ascii"), rkey[len(space) + 1:])


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
        status, fresh_until, stale_until, *revalidate = map(int, times.split(b" "))
    except ValueError:
        return None
    if len(revalidate) > 1:
        return None
    return Entry(HttpResult(status, body, cached=True), fresh_until, stale_until, *revalidate)


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

