"""The HTTP side on the event loop: one backend request per Postfix request.

    backend = for_endpoint(endpoint, user_agent)
    result = await backend.lookup((("key", b"a b"),), new_request_id())   # HttpResult or Failure
    result = await backend.policy([(b"recipient", b"x@example.com")], new_request_id())
    backend.close()

Several targets fail over (client), a cache may answer stale when the backend fails (cache), and a
shared cache on Redis or Valkey (shared; only loaded for an endpoint with ``cache-url``) sits behind the
process's own.

Deliberate choices, as before the move to asyncio:
- no redirects, no proxies or CA bundles from the environment, no .netrc: spawn(8) and systemd give a
  clean environment, and an admin must never see behaviour change because of one.  ``proxy`` and
  ``ca-file`` are config keys, so the auth token only ever goes to the configured target (as do
  ``headers``, ``basic-auth`` and the ``client-cert``: a proxy's CONNECT carries none of them);
- the whole exchange is bounded by ``request-timeout``; bodies are read up to MAX_BODY and no further.

Modules: route and request (what to send where, pure), response and tunnel (reading answers,
sans-I/O), connection, connect, tls and pool (the sockets), deadline and backoff (time limits and
health), client and cache (the interface); for the shared cache sharedformat (its keys, entries and
messages, pure), redisclient, shared and invalidation.
"""

from pfrest.backend.client import Client
from pfrest.backend.observer import NOBODY, Observer
from pfrest.backend.request import new_request_id
from pfrest.backend.response import MAX_BODY
from pfrest.cache.local import CachingClient

__all__ = ["CachingClient", "Client", "MAX_BODY", "Observer", "for_endpoint", "new_request_id"]


def for_endpoint(endpoint, user_agent: str, observer=NOBODY):
    """The client for one endpoint: HTTP, behind a cache when a lookup endpoint configures one;
    ``observer`` (observer.Observer) hears of every exchange and cache event."""
    client = Client(endpoint, user_agent, observer)
    if not endpoint.caches:
        return client
    shared = None
    if endpoint.cache_url:
        from pfrest.cache.shared import SharedStore   # redis-py: only where a shared cache is used
        shared = SharedStore(endpoint, observer)
    return CachingClient(client, endpoint.cache_ttl, endpoint.cache_negative_ttl, endpoint.cache_max_entries,
                         endpoint.list_separator, stale_if_error=endpoint.cache_stale_if_error,
                         observer=observer, shared=shared, local_ttl=endpoint.cache_local_ttl)
