"""The one log line per answered request, for an admin grepping the mail log:

    endpoint=domains id=3f2a9c0d11b2e4f5 key=example.com status=200 reply=FOUND ms=4.1
    endpoint=policy id=... client_address=192.0.2.1 sender=a@b.example recipient=c@d.example status=200 action=REJECT go away ms=3.3

A request the backend failed (no answer, an HTTP error, an answer not as the contract says, or a
stale cached answer served in its place) is a WARNING (``warns``): ``journalctl -p warning`` and a
mail log filtered by priority show what went wrong, not only the requests that went well.
"""

from pfrest.protocol import verdict
from pfrest.protocol.answers import printable
from pfrest.protocol.verdict import Failure, HttpResult

MAX_DETAIL = 300  # characters of an error's or a Location's text
_PLAIN = frozenset((verdict.FOUND, verdict.NOTFOUND))   # replies whose line shows no value or reason


def warns(result, answer) -> bool:
    """Whether the request's line is a WARNING: the backend failed it (a policy REJECT is an answer)."""
    return isinstance(result, Failure) or answer.verdict.is_error or getattr(result, "stale", False)


def line(endpoint_name, request_id, subject, result, answer, ms) -> str:
    v = answer.verdict
    if result.__class__ is HttpResult and v.kind in _PLAIN and answer.action is None and result.status \
            and not (result.cached or result.stale or result.location):   # most lines: the same text
        return f"endpoint={endpoint_name} id={request_id} {subject} status={result.status} reply={v.kind} " \
               f"ms={ms:.1f}"
    status = getattr(result, "status", None) or "-"
    extra = ""
    if isinstance(result, Failure):
        extra = f" error={result.kind}: {result.detail}"[:MAX_DETAIL]
    elif getattr(result, "stale", False):   # a cached answer past its lifetime: the backend failed
        extra = " cache=stale"
    elif getattr(result, "cached", False):
        extra = " cache=hit"
    elif getattr(result, "location", None) and 300 <= result.status < 400:
        extra = f" location={printable(result.location.encode(), MAX_DETAIL)}"
    if answer.action is not None:
        outcome = f"action={printable(answer.action.encode())}"
    else:
        outcome = f"reply={v.kind}" + (f" ({v.value})" if v.is_error else "")
    return f"endpoint={endpoint_name} id={request_id} {subject} status={status} {outcome} ms={ms:.1f}{extra}"
