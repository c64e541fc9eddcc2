"""``pfrest cache drop ENDPOINT KEY...`` and ``pfrest cache flush ENDPOINT``: make pfrest forget cached
answers at once, e.g. after a change in the backend, instead of waiting for their cache-ttl.

With a shared cache (the endpoint's ``cache-url``): the answers are removed from the store (drop: the
keys' entries; flush: every key of the endpoint's namespace, found by SCAN) and the invalidation is
published on the store's channel, which every pfrest process using the store hears (each worker of
each serve, each handle, on every host) and drops its own copies.  Without one: the local ``pfrest
serve`` is asked through its control socket (controlsocket.py), and passes it to each of its workers.

The keys are given as for ``pfrest query``: a socketmap endpoint's with the map name they are looked up
in (``--map``, by default the endpoint's name).  A lookup of an empty key is never cached.

Exit status: 0 done; 69 (EX_UNAVAILABLE) the store or the control socket could not be reached, or the
serve there keeps no cache for the endpoint; 64 (EX_USAGE) the arguments do not fit the endpoint; 78
a config error (cli.py).
"""

import asyncio
import http.client
import json
import os
import sys

from pfrest.backend.request import query
from pfrest.cache import sharedformat
from pfrest.commands import localhttp
from pfrest.commands.query import build_request
from pfrest.config import POLICY, SASL, SOCKETMAP, sentinelurl
from pfrest.ops import controlsocket
from pfrest.protocol.answers import mode_for
from pfrest.system import eventloop

TIMEOUT = 10.0          # seconds for each exchange: an admin's command may wait, a lookup may not
MAX_ANSWER = 1 << 16    # bytes of the control socket's answer: a line, or a little JSON
UNLINK_BATCH = 1000     # keys per UNLINK while flushing
EX_USAGE = 64


def run(cfg, action, name, keys, mapname=None, out=print) -> int:
    """``keys``: bytes, as the command line gave them.  Returns the exit status."""
    endpoint = cfg.endpoint(name)
    if endpoint.mode in (POLICY, SASL):
        return _usage(f"endpoint {name} is a {endpoint.mode} endpoint: its answers are never cached")
    if not endpoint.caches:
        return _usage(f"endpoint {name} keeps no cache (neither cache-ttl nor cache-negative-ttl is set)")
    if action == "flush":
        if keys or mapname:
            return _usage("flush takes no KEY and no --map: it drops every answer of the endpoint")
        queries = None
    else:
        if not keys:
            return _usage("drop needs at least one KEY")
        if mapname and endpoint.mode != SOCKETMAP:
            return _usage("--map is for socketmap-lookup endpoints")
        try:
            queries = [query(_params(endpoint, key, mapname)) for key in keys]
        except ValueError as exc:
            return _usage(str(exc))
    if endpoint.cache_url:
        return _shared(endpoint, queries, out)
    return _local(cfg, endpoint, queries, out)


def _params(endpoint, key, mapname):
    """The params of the lookup of ``key``, as a conversation would make them (the cache's key)."""
    call = mode_for(endpoint).call(build_request(endpoint, [key], mapname))
    if call is None:
        raise ValueError("an empty KEY is never looked up, nor cached")
    return call.params


def _usage(text) -> int:
    print(f"pfrest cache: {text}", file=sys.stderr)
    return EX_USAGE


def _shared(endpoint, queries, out) -> int:
    from pfrest.cache import redisclient, sentinel   # redis-py: only for a shared cache
    where = redisclient.where(endpoint.cache_url)
    try:
        space = sharedformat.namespace(endpoint)
    except OSError as exc:
        print(f"pfrest cache: cannot read client-cert {endpoint.client_cert} without following a link "
              f"({exc.strerror}), so the shared-cache namespace of endpoint {endpoint.name} is unknown "
              "(its processes share no answers, each logs why)", file=sys.stderr)
        return os.EX_UNAVAILABLE
    try:
        removed, heard = eventloop.run(asyncio.wait_for(_invalidate(endpoint, space, queries), TIMEOUT),
                                       fast=False)
    except (*redisclient.ERRORS, asyncio.TimeoutError, sentinel.NoPrimary) as exc:
        # it may have failed after removing the entries, before telling the processes (PUBLISH)
        print(f"pfrest cache: the shared cache {where} of endpoint {endpoint.name} {_failure(exc)}; the answers "
              "may still be kept, in the store or by the pfrest processes using it: run it again once the "
              "store answers", file=sys.stderr)
        return os.EX_UNAVAILABLE
    what = "every answer" if queries is None else f"the answers to {len(queries)} key(s)"
    out(f"endpoint {endpoint.name}: {what} dropped from the shared cache {where} ({removed} "
        f"entries were there); {heard} pfrest process(es) heard it and drop their own copies")
    return 0


def _failure(exc) -> str:
    """What went wrong with the store, in plain words: redis-py's "Error 111 connecting to HOST:PORT. 111."
    says less than "cannot be reached: connection refused"."""
    from pfrest.cache import redisclient
    if isinstance(exc, asyncio.TimeoutError):
        return f"did not answer within {TIMEOUT:g} s"
    if not isinstance(exc, redisclient.ERRORS):   # sentinel.NoPrimary: what each sentinel said
        return f"has no primary now: {exc}"
    under = exc if isinstance(exc, OSError) else (exc.__cause__ or exc.__context__)
    if isinstance(under, OSError) and under.errno:
        return (f"cannot be reached: {os.strerror(under.errno).lower()} (is the store running there, and "
                "does cache-url name it?)")
    return f"failed: {redisclient.describe(exc)}"


async def _invalidate(endpoint, space, queries):
    """(entries removed from the store of namespace ``space``, processes that heard the invalidation)."""
    from pfrest.cache import redisclient, sentinel
    url = endpoint.cache_url
    if sentinelurl.is_sentinel(url):   # the primary: where every process of the fleet is subscribed
        url = await sentinel.Locator(url).primary()
    client = redisclient.connect(url)
    try:
        if queries is None:
            removed, found = 0, []
            async for key in client.scan_iter(match=sharedformat.pattern(space), count=UNLINK_BATCH):
                found.append(key)
                if len(found) >= UNLINK_BATCH:
                    removed += await client.unlink(*found)
                    found = []
            if found:
                removed += await client.unlink(*found)
            message = sharedformat.flush_message()
        else:
            removed = await client.unlink(*(f"{space}:{q}" for q in queries))
            message = sharedformat.drop_message(queries)
        return removed, await client.publish(space, message)
    finally:
        await redisclient.close(client)


def _local(cfg, endpoint, queries, out) -> int:
    path = controlsocket.path_of(cfg)
    batches = [None] if queries is None else \
        [queries[i:i + controlsocket.MAX_KEYS] for i in range(0, len(queries), controlsocket.MAX_KEYS)]
    dropped = processes = 0
    for batch in batches:
        body = sharedformat.flush_message() if batch is None else sharedformat.drop_message(batch)
        try:
            status, _, text = localhttp.exchange(path, "POST", f"{controlsocket.PATH_PREFIX}{endpoint.name}",
                                                 body, TIMEOUT, MAX_ANSWER)
            if status == 200:
                counts = json.loads(text)
                dropped, processes = dropped + counts["dropped"], counts["processes"]
        except (OSError, http.client.HTTPException, ValueError, TypeError, KeyError) as exc:  # not a serve
            print(f"pfrest cache: no pfrest serve answers at {path} (control-socket): {exc}; endpoint "
                  f"{endpoint.name} has no cache-url, so only a serve's own cache can be reached", file=sys.stderr)
            return os.EX_UNAVAILABLE
        if status != 200:
            print(f"pfrest cache: the pfrest serve at {path}: {text.decode('utf-8', 'replace').strip()}",
                  file=sys.stderr)
            return os.EX_UNAVAILABLE
    what = "every answer" if queries is None else f"the answers to {len(queries)} key(s)"
    out(f"endpoint {endpoint.name}: {what} dropped from the cache of the pfrest serve at {path} "
        f"({dropped} entries were there, in {processes} process(es))")
    return 0
