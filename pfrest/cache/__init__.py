"""The answers pfrest keeps: each process's own cache in front of the backend client (local) and the
shared cache on Redis or Valkey behind it (shared, over one pipelined connection: redispipe, redisclient;
when it is skipped and probed again: sharedhealth; its primary found through Redis Sentinel: sentinel),
its keys, entries and messages as bytes (sharedformat, pure) and its invalidation channel (invalidation).
Never a Postfix protocol and never a socket it listens on: it sits between a conversation and the HTTP
side (pfrest/backend/)."""

from pfrest.backend.client import Client
from pfrest.backend.observer import NOBODY
from pfrest.cache.local import CachingClient
from pfrest.cache.refresh import LOCK_MARGIN_MS

__all__ = ["CachingClient", "for_endpoint"]


def for_endpoint(endpoint, user_agent: str, observer=NOBODY):
    """The client for one endpoint: HTTP, behind a cache when a lookup endpoint configures one;
    ``observer`` (observer.Observer) hears of every exchange and cache event."""
    bearer = None
    if endpoint.oauth2 is not None:
        from pfrest.identity import bearer_for   # only where an endpoint has oauth2
        bearer = bearer_for(endpoint, user_agent)
    client = Client(endpoint, user_agent, observer, bearer=bearer)
    if not endpoint.caches:
        return client
    shared = None
    if endpoint.cache_url:
        from pfrest.cache.shared import SharedStore   # redis-py: only where a shared cache is used
        shared = SharedStore(endpoint, observer)
    return CachingClient(client, endpoint.cache_ttl, endpoint.cache_negative_ttl, endpoint.cache_max_entries,
                         endpoint.list_separator, stale_if_error=endpoint.cache_stale_if_error,
                         observer=observer, shared=shared, local_ttl=endpoint.cache_local_ttl,
                         stale_while_revalidate=endpoint.cache_stale_while_revalidate,
                         refresh_lock_ms=endpoint.request_timeout + LOCK_MARGIN_MS)
