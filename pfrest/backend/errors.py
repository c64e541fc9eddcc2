"""What went wrong, as a verdict.Failure kind, from the exception an exchange ended with."""

import re
import socket

from pfrest.backend.tls import is_tls_error
from pfrest.protocol.verdict import Failure


# What OpenSSL says when the server's first bytes are not a TLS record (a plain HTTP answer); the log line
# then says what it means and what to do, not only OpenSSL's words.
PLAIN_HTTP = re.compile(r"wrong version number|record layer failure|packet length too long", re.IGNORECASE)
PLAIN_HTTP_HINT = "that port speaks plain HTTP, not TLS: use an http:// target, or the port that speaks TLS"


class Failed(Exception):
    """Raised inside the client where a step fails with a known Failure (e.g. the proxy said no)."""

    def __init__(self, failure: Failure):
        super().__init__(failure.detail)
        self.failure = failure


def failure_for(exc: BaseException, where: str = "") -> Failure:
    """The Failure for ``exc``; ``where`` (e.g. "connect to host:port") prefixes the detail.  Details
    come from exception texts and addresses only: no request bytes, no token, no proxy password."""
    if isinstance(exc, Failed):
        return exc.failure
    detail = f"{where}: {_text(exc)}" if where else _text(exc)
    if isinstance(exc, socket.gaierror):
        return Failure("dns", detail)
    if is_tls_error(exc):
        return Failure("tls", f"{detail} ({PLAIN_HTTP_HINT})" if PLAIN_HTTP.search(detail) else detail)
    if isinstance(exc, ConnectionRefusedError):
        return Failure("refused", detail)
    if isinstance(exc, TimeoutError):
        return Failure("timeout", detail)
    if isinstance(exc, OSError):
        return Failure("reset", detail)
    return Failure("internal", detail)


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
