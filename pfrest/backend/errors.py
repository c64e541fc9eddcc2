"""What went wrong, as a verdict.Failure kind, from the exception an exchange ended with."""

import socket

from pfrest.backend.tls import is_tls_error
from pfrest.protocol.verdict import Failure


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
        return Failure("tls", detail)
    if isinstance(exc, ConnectionRefusedError):
        return Failure("refused", detail)
    if isinstance(exc, TimeoutError):
        return Failure("timeout", detail)
    if isinstance(exc, OSError):
        return Failure("reset", detail)
    return Failure("internal", detail)


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
