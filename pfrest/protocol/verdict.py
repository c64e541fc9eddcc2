"""What a backend answer means, independent of the Postfix protocol it will be sent over.  No I/O here.

The HTTP contract (the original connector's, made fail-safe):

    200 + JSON array of strings   found, values joined by list-separator (lookups)
    200 + action text             the policy action (policy)
    200 + [] (or only ""), 404    not found (lookups); 404 is a permanent error for policy
    200 + nothing or ["name"]     authenticated, as the name given or the one named (dovecot-sasl)
    401, 403, 404                 bad credentials (dovecot-sasl)
    other 4xx                     permanent error: the connector or backend is misconfigured
    5xx, timeout, transport       temporary error
    anything else                 temporary error: other statuses, redirects, bodies that are not
                                  what the contract says, values Postfix would misread; for
                                  dovecot-sasl every 4xx but 401, 403 and 404 too (a 535 is final
                                  for the user, a 454 is tried again)

Nothing that goes wrong may turn into "found", "not found" or a permanent error by accident.
"""

import json
import re
from typing import NamedTuple, Optional, Union

from pfrest.protocol import actions, dovecotauth

FOUND, NOTFOUND, ACTION = "FOUND", "NOTFOUND", "ACTION"
AUTHENTICATED, REJECTED = "OK", "FAIL"     # dovecot-sasl: named as the protocol's replies
BAD_CREDENTIALS = (401, 403, 404)
TEMP, TIMEOUT, PERM = "TEMP", "TIMEOUT", "PERM"


class HttpResult(NamedTuple):
    status: int
    body: bytes
    location: Optional[str] = None       # for 3xx, only to log it
    max_age: Optional[int] = None        # Cache-Control max-age, None when absent; -1 for no-store
    cached: bool = False                 # answered from pfrest's cache, not by a new request
    stale_if_error: Optional[int] = None  # Cache-Control stale-if-error (RFC 5861), None when absent
    stale: bool = False                  # a cached answer past its lifetime, served as the backend failed
    content_type: Optional[bytes] = None  # the Content-Type header, only to tell a malformed answer
    bearer_challenge: bool = False       # a WWW-Authenticate naming Bearer came with it (RFC 6750 3)
    stale_while_revalidate: Optional[int] = None   # Cache-Control stale-while-revalidate (RFC 5861), or None


class Failure(NamedTuple):
    """The HTTP exchange did not complete.  ``kind`` is one of the words below."""
    kind: str        # timeout, refused, reset, dns, tls, too-large, protocol, stray, token, internal
    detail: str = ""  # for the log only, never for Postfix


class Verdict(NamedTuple):
    kind: str                 # FOUND, NOTFOUND, ACTION, TEMP, TIMEOUT, PERM
    value: Union[bytes, str]  # found value (bytes), action (str), or a short reason for errors
    status: Optional[int] = None

    @property
    def is_error(self):
        return self.kind in (TEMP, TIMEOUT, PERM)


def _failure(result: Failure) -> Verdict:
    if result.kind == "timeout":
        return Verdict(TIMEOUT, "backend timed out")
    return Verdict(TEMP, {
        "refused": "backend refused the connection",
        "reset": "backend connection failed",
        "dns": "backend host name did not resolve",
        "tls": "TLS error talking to the backend",
        "too-large": "backend answer too large",
        "protocol": "backend answer is not valid HTTP",
        "stray": "backend answer was not this request's",
        "token": "no bearer token for the backend",
    }.get(result.kind, "internal error"))


def _status(status: int) -> Verdict:
    if 300 <= status < 400:
        return Verdict(TEMP, f"backend redirected (HTTP {status})", status)
    if 400 <= status < 500:
        return Verdict(PERM, f"backend rejected the request (HTTP {status})", status)
    if 500 <= status < 600:
        return Verdict(TEMP, f"backend error (HTTP {status})", status)
    return Verdict(TEMP, f"unexpected backend status (HTTP {status})", status)


_json = json.JSONDecoder()
# The answer most lookups get, ["value"]: one string without escapes, which means its text as it is
# (JSON's whitespace around; no backslash, quote or control character inside, which the strict
# decoder refuses or reads otherwise).  Anything else goes through the JSON decoder.
_ONE_PLAIN_STRING = re.compile(r'[ \t\n\r]*\[[ \t\n\r]*"([^"\\\x00-\x1f]*)"[ \t\n\r]*\][ \t\n\r]*')


def values(body: bytes):
    """The list of strings in a JSON body, or None when the body is anything else."""
    try:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:  # JSON in UTF-16 or UTF-32 (RFC 4627), which json.loads detects
            text = body.decode(json.detect_encoding(body), "surrogatepass")
        else:
            one = _ONE_PLAIN_STRING.fullmatch(text)
            if one is not None:   # half the cost of the decoder's
                return [one.group(1)]
        data = _json.decode(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
        return None
    return data


MAX_REMEMBERED = 10000            # verdicts of cached answers remembered at most
MAX_REMEMBERED_BYTES = 8 << 20    # and the bytes of the bodies they are remembered by (and of their values)


class _Remembered:
    """The verdicts of cached answers, by (status, body, separator): the bodies are keys, so both
    bounds hold whatever the caches keep (bodies up to 1 MiB each, in every endpoint's cache): when
    either is reached, everything is forgotten and worked out again."""

    def __init__(self):
        self.verdicts, self.size = {}, 0

    def get(self, result, separator):
        key = (result.status, result.body, separator)
        found = self.verdicts.get(key)
        if found is None:
            found = _lookup(result, separator)
            size = 2 * len(result.body)   # the body, and at most as much of value
            if len(self.verdicts) >= MAX_REMEMBERED or self.size + size > MAX_REMEMBERED_BYTES:
                self.verdicts.clear()
                self.size = 0
            if size <= MAX_REMEMBERED_BYTES:
                self.verdicts[key] = found
                self.size += size
        return found


_REMEMBERED = _Remembered()


def lookup(result, separator: str = ",") -> Verdict:
    """The verdict for a tcp-lookup or socketmap-lookup answer.  A cached answer comes again and
    again: its verdict is worked out once (JSON and all), not on every hit."""
    if isinstance(result, HttpResult) and result.cached:
        return _REMEMBERED.get(result, separator)
    return _lookup(result, separator)


def _lookup(result, separator) -> Verdict:
    if isinstance(result, Failure):
        return _failure(result)
    if result.status == 404:
        return Verdict(NOTFOUND, "not found", 404)
    if result.status != 200:
        return _status(result.status)
    items = values(result.body)
    if items is None:
        return Verdict(TEMP, "invalid backend data: not a JSON array of strings", 200)
    try:
        value = separator.join(items).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \ud800 escapes
        return Verdict(TEMP, "invalid backend data: not UTF-8", 200)
    if b"\r" in value or b"\n" in value or b"\0" in value:
        return Verdict(TEMP, "invalid backend data: value holds CR, LF or NUL", 200)
    if not value:  # Postfix treats an empty found value as an error; it means "nothing"
        return Verdict(NOTFOUND, "not found", 200)
    return Verdict(FOUND, value, 200)


def policy(result) -> Verdict:
    """The verdict for a policy answer: an action, or an error for the endpoint's error actions."""
    if isinstance(result, Failure):
        return _failure(result)
    if result.status != 200:
        return _status(result.status)
    action = actions.from_body(result.body)
    if action is None:
        return Verdict(TEMP, "invalid backend data: not an action Postfix would read as meant", 200)
    return Verdict(ACTION, action, 200)


def login(result, given: bytes) -> Verdict:
    """The verdict for a dovecot-sasl answer: AUTHENTICATED (value: the user name for Postfix),
    REJECTED, or an error, which is always temporary (never a 535 by accident)."""
    if isinstance(result, Failure):
        return _failure(result)
    if result.status in BAD_CREDENTIALS:
        return Verdict(REJECTED, "bad credentials", result.status)
    if result.status != 200:
        v = _status(result.status)
        return v._replace(kind=TEMP) if v.kind == PERM else v
    if not result.body.strip():
        return Verdict(AUTHENTICATED, given, 200)
    items = values(result.body)
    if items is None or len(items) != 1:
        return Verdict(TEMP, "invalid backend data: not empty and not a JSON array of one user name", 200)
    try:
        name = items[0].encode("utf-8")
    except UnicodeEncodeError:   # lone surrogates from \ud800 escapes
        name = b""
    if not dovecotauth.safe_name(name):
        return Verdict(TEMP, "invalid backend data: the user name is empty, too long, not UTF-8, or holds "
                             "TAB, CR, LF or NUL", 200)
    return Verdict(AUTHENTICATED, name, 200)
