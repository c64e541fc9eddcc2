"""``pfrest handle``: serve one Postfix connection on stdin/stdout, for spawn(8), xinetd and systemd
socket units with ``Accept=yes``.  One process per Postfix connection, many requests per process,
through the very conversation code that ``pfrest serve`` runs for each connection it accepts.

Nothing but protocol replies is ever written to fd 1 or 2 (both may be the Postfix socket): problems,
a broken config included, go to syslog (facility mail) or ``--log-file``, and the exit status says it
(78, EX_CONFIG), which spawn(8) logs.
"""

import asyncio
import logging
import os
import time

from pfrest import config, log, tracing
from pfrest.conversation import stdio
from pfrest.conversation.conversation import Conversation
from pfrest.conversation.services import Origin, Services
from pfrest.system import eventloop

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
    tracing.configure(cfg.tracing)
    try:
        eventloop.run(converse(endpoint, cfg.user_agent), fast=False)
    finally:
        tracing.shutdown()   # the spans of this connection go out before the process ends
    return 0


async def converse(endpoint, user_agent):
    """The conversation on fd 0/1, until it ends."""
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
