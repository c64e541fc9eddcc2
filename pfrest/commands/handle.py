"""``pfrest handle``: serve one Postfix connection on stdin/stdout, for spawn(8), xinetd and systemd
socket units with ``Accept=yes``.  One process per Postfix connection, many requests per process,
through the very conversation code that ``pfrest serve`` runs for each connection it accepts.

Nothing but protocol replies is ever written to fd 1 or 2 (both may be the Postfix socket): problems,
a broken config included, go to syslog (facility mail) or ``--log-file``, and the exit status says it
(78, EX_CONFIG), which spawn(8) logs.

Postfix may start a hundred of these at once, so a handle loads no more than its endpoint needs: when
nothing of it can speak TLS (plain http targets and proxy; no oauth2, shared cache or tracing), the
``ssl`` module is barred before asyncio is imported (asyncio imports it in a ``try`` and runs without
it): OpenSSL stays out of the process, 0.75 MiB of private memory and a few ms of start-up less.
"""

import logging
import os
import sys
import time

from pfrest import config, log, tracing

logger = logging.getLogger("pfrest")

EX_CONFIG = 78


def peer_name() -> str:
    """Who is on the other end, as the launcher tells it (spawn(8) tells nothing)."""
    for var in ("REMOTE_ADDR", "REMOTE_HOST", "SOCAT_PEERADDR"):
        if os.environ.get(var):
            return os.environ[var]
    return "stdin"


def run(config_path: str, name: str, log_file=None) -> int:
    log.for_handler(log_file)
    try:
        cfg = config.load(config_path)
        endpoint = cfg.endpoint(name)
    except config.ConfigError as exc:
        for problem in exc.problems:
            logger.error("%s", problem)
        return EX_CONFIG
    if not may_need_tls(cfg, endpoint) and "ssl" not in sys.modules:
        sys.modules["ssl"] = None   # the import system's own "not here": `import ssl` raises ImportError
    tracing.configure(cfg.tracing)
    from pfrest.system import eventloop   # asyncio, after the line above
    try:
        eventloop.run(converse(endpoint, cfg.user_agent), fast=False)
    finally:
        tracing.shutdown()   # the spans of this connection go out before the process ends
    return 0


def may_need_tls(cfg, endpoint) -> bool:
    """Whether anything this endpoint's handle may connect to could be TLS.  Only a config of plain
    http URLs says no: oauth2, a shared cache and tracing may use TLS or load libraries that import it."""
    if cfg.tracing is not None or endpoint.oauth2 is not None or endpoint.cache_url or endpoint.cache_read_url:
        return True
    return any(not url.lower().startswith("http://") for url in (*endpoint.targets, endpoint.proxy or "http://"))


async def converse(endpoint, user_agent):
    """The conversation on fd 0/1, until it ends."""
    import asyncio   # here: run() decides first whether asyncio may load ssl
    from pfrest.conversation import stdio
    from pfrest.conversation.conversation import Conversation
    from pfrest.conversation.services import Origin, Services
    services = Services()
    services.apply([endpoint], user_agent)
    ended = asyncio.get_running_loop().create_future()
    peer, started = peer_name(), time.monotonic()
    conversation = Conversation(services, Origin(endpoint.name), peer, on_end=lambda conv: ended.set_result(None))
    try:
        await stdio.attach(conversation)
        await ended
    finally:
        closing = services.close()
        if closing:   # a shared cache's connections, closed before the loop is
            await asyncio.wait(closing)
    # the one line of a connection that log-requests may have kept quiet: what it did, in sum
    logger.info("endpoint=%s peer=%s connection ended: %s connected=%.1fs", endpoint.name, peer,
                services.stats[endpoint.name].requests_summary(), time.monotonic() - started)
