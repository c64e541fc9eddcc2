"""``pfrest handle``: serve one Postfix connection on stdin/stdout, for spawn(8), xinetd and systemd
socket units with ``Accept=yes``.  One process per Postfix connection, many requests per process."""

import logging
import os
import select
import sys

from pfrest import config, log
from pfrest.dialogue import serve

logger = logging.getLogger("pfrest")


def peer_name() -> str:
    """Who is on the other end, as the launcher tells it (spawn(8) tells nothing)."""
    for var in ("REMOTE_ADDR", "REMOTE_HOST", "SOCAT_PEERADDR"):
        if os.environ.get(var):
            return os.environ[var]
    return "stdin"


class TimedInput:
    """Standard input with the dialogue's read timeouts, whatever fd 0 is (a socket from spawn(8) or
    xinetd, a pipe): ``read1`` raises TimeoutError when nothing arrives in time, as a socket would."""

    def __init__(self, fd=0):
        self.fd, self.timeout = fd, None
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def before_read(self, pending, timeout):
        self.timeout = timeout

    def read1(self, size):
        if self.timeout is not None and not self._poll.poll(self.timeout * 1000):
            raise TimeoutError("no input in time")
        return os.read(self.fd, size)


def run(config_path: str, name: str, log_file=None) -> int:
    try:
        cfg = config.load(config_path)
        endpoint = cfg.endpoint(name)
    except config.ConfigError as exc:
        if os.isatty(2):  # run by hand: say it where the admin looks
            print("\n".join(exc.problems), file=sys.stderr)
        log.for_handler(log_file)
        for problem in exc.problems:
            logger.error("%s", problem)
        return 78  # EX_CONFIG; spawn(8) logs the exit status
    log.for_handler(log_file)
    from pfrest.legacy_backend import for_endpoint
    from pfrest.responder import Responder
    backend = for_endpoint(endpoint, cfg.user_agent, concurrency=2)
    wfile = open(1, "wb", buffering=0, closefd=False)
    stdin = TimedInput(0)
    serve(stdin, wfile, Responder(endpoint, backend), stdin.before_read, peer=peer_name())
    return 0
