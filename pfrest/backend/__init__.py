"""The HTTP side on the event loop: one backend request per Postfix request.

    backend = Client(endpoint, user_agent)   # or pfrest.cache.for_endpoint(endpoint, user_agent)
    result = await backend.lookup((("key", b"a b"),), new_request_id())   # HttpResult or Failure
    result = await backend.policy([(b"recipient", b"x@example.com")], new_request_id())
    backend.close()

Several targets fail over (client).  The answer caches in front of it are pfrest/cache/'s
(``pfrest.cache.for_endpoint``: the client of an endpoint behind its caches).

Deliberate choices, as before the move to asyncio:
- no redirects, no proxies or CA bundles from the environment, no .netrc: spawn(8) and systemd give a
  clean environment, and an admin must never see behaviour change because of one.  ``proxy`` and
  ``ca-file`` are config keys, so the auth token only ever goes to the configured target (as do
  ``headers``, ``basic-auth`` and the ``client-cert``: a proxy's CONNECT carries none of them);
- the whole exchange is bounded by ``request-timeout``; bodies are read up to MAX_BODY and no further.

Modules: route and request (what to send where, pure), response and tunnel (reading answers,
sans-I/O), connection, connect, tls and pool (the sockets), deadline and backoff (time limits and
health), client (the interface).
"""

from pfrest.backend.client import Client
from pfrest.backend.observer import NOBODY, Observer
from pfrest.backend.request import new_request_id
from pfrest.backend.response import MAX_BODY

__all__ = ["Client", "MAX_BODY", "NOBODY", "Observer", "new_request_id"]
