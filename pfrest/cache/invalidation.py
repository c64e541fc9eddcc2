"""The invalidation channel of a shared cache: Redis pub/sub, one channel per namespace
(sharedformat).  ``pfrest cache drop`` and ``flush`` remove answers from the store and publish what they
removed; every pfrest process using the store (each worker of each serve, each handle) is subscribed
and drops its own copies at once.

Pub/sub delivers to whoever listens at that moment, so a process that was not listening may have
missed a message: whenever its subscription starts again, it drops every answer it keeps itself, and
the local cache stores no answer fetched before that (cache/local.py, its generation).  Not at the first
subscription: the process starts with an empty cache, and its first lookups must be kept.  Between a lost
connection and the next subscription, the local copies live ``cache-local-ttl`` at most, as they do
without any invalidation.  While the store is skipped (shared.py), the channel waits for it to answer
again.  A subscription that fails twice in a row while the store is not skipped (the first failure
may be the store's own outage, which the store logs) is logged once, then retried with a growing
pause.  With Sentinel, the subscription follows the primary: it starts again on the one each probe
finds (shared.py), after a failover too.
"""

import asyncio
import logging

from pfrest.cache import redisclient, sharedformat

log = logging.getLogger("pfrest")

POLL = 1.0              # seconds between looks at the store's health while listening
SUBSCRIBE_TIMEOUT = 5.0  # seconds to connect and subscribe (not on any lookup's path)
RETRY_FIRST, RETRY_MAX = 1.0, 30.0   # pause before subscribing again, doubling while it fails
FAILURES_TO_LOG = 2     # failed subscriptions in a row, while the store answers, that are logged


async def listen(store):
    """The task of one store's subscription, until cancelled (the store closed)."""
    pause, failures, again = RETRY_FIRST, 0, False
    # ``closed`` ends it too, not only the cancellation: a library may swallow one (async-timeout
    # 4.0.2, under redis-py 4.3's reads, does when its own timer fires in the same turn: a handle hung
    # at exit that way; the store also cancels it again and again)
    while not store.closed:
        await store.until_up()
        if store.closed:
            break
        url = store.server_url   # the primary's, with Sentinel: the one the last probe found
        client = redisclient.connect(url)
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            await asyncio.wait_for(pubsub.subscribe(store.namespace), SUBSCRIBE_TIMEOUT)
            if again:
                store.invalidated(None)   # what was kept meanwhile may have missed a message
            again = True
            if failures >= FAILURES_TO_LOG:
                log.info("endpoint=%s shared cache %s: invalidations heard again", store.name, store.where)
            pause, failures = RETRY_FIRST, 0
            # until the store is skipped, or (Sentinel) a probe found another primary: subscribed there,
            # this process hears what `pfrest cache` publishes on the new primary
            while store.up and not store.closed and store.server_url == url:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL)
                if message is not None and message.get("type") == "message":
                    _deliver(store, message["data"])
        except (*redisclient.ERRORS, asyncio.TimeoutError) as exc:
            failures = failures + 1 if store.up else 0
            if failures == FAILURES_TO_LOG:
                log.warning("endpoint=%s shared cache %s: cannot hear invalidations (%s: %s); answers kept "
                            "in this process live cache-local-ttl at most meanwhile", store.name,
                            store.where, type(exc).__name__, exc)
        finally:
            await redisclient.quietly(redisclient.close(client))
        await asyncio.sleep(pause)
        pause = min(pause * 2, RETRY_MAX)


def _deliver(store, data):
    try:
        lookups = sharedformat.read_message(data)
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("endpoint=%s shared cache %s: ignoring a message on its channel: %s", store.name,
                    store.where, exc)
        return
    log.info("endpoint=%s cache: dropping %s, as pfrest cache asked", store.name,
             "every answer" if lookups is None else f"the answers to {len(lookups)} key(s)")
    store.invalidated(lookups)

