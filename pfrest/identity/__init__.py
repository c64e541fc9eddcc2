"""Who pfrest is to a backend behind an identity provider: the bearer tokens of the OAuth2 client
credentials grant (an endpoint's ``oauth2``), fetched with pfrest's own HTTP client (pfrest/backend/),
kept, renewed ahead of time and shared (tokens), the grant's messages (grant, pure) and the file that
shares a token between processes (tokenfile).  Never a Postfix request, never a listening socket: the
backend client only asks it for the Authorization line of each request.

Loaded only for an endpoint with ``oauth2`` (pfrest.cache.for_endpoint imports it then): ``handle``
without one never imports it.

Endpoints with the same credentials and transport share one TokenSource in a process
(``bearer_for``), and through the token file, every process of the same user.
"""

import logging
import os
import weakref

from pfrest.identity import tokenfile
from pfrest.identity.tokens import TokenSource

__all__ = ["TokenSource", "bearer_for"]

log = logging.getLogger("pfrest")
_sources = weakref.WeakValueDictionary()   # credentials -> TokenSource, while a client holds it
_unshared = False                          # said once that no private directory can be had


def bearer_for(endpoint, user_agent: str):
    """The TokenSource of ``endpoint``'s oauth2 credentials, or None without oauth2."""
    if endpoint.oauth2 is None:
        return None
    key = (endpoint.oauth2, endpoint.ca_file, endpoint.proxy, endpoint.client_cert, endpoint.client_key,
           endpoint.request_timeout, user_agent)
    source = _sources.get(key)
    if source is None:
        folder = tokenfile.directory()
        global _unshared
        if folder is None and not _unshared:
            _unshared = True
            log.warning("endpoint=%s no private runtime directory (%s, %s): each process fetches its own "
                        "oauth2 token", endpoint.name, tokenfile.SYSTEM_RUNTIME, tokenfile.FALLBACK_RUNTIME % os.geteuid())
        # the file's name from every field that makes another token (OAuth2's repr shows only a few, and
        # never the secret, which stays out of the name too): another scope or audience, another file
        named = (tuple(endpoint.oauth2._replace(client_secret=None)), *key[1:])
        store = tokenfile.TokenFile(folder, named) if folder is not None else None
        source = _sources[key] = TokenSource(endpoint, user_agent, store)
    return source
