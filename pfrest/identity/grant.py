"""The messages of the client credentials grant (RFC 6749 4.4, 5.1, 5.2) and of OIDC discovery
(OpenID Connect Discovery 1.0, section 4): what is sent, and what an answer means.  Pure: no I/O.

The token request goes out through pfrest's own HTTP client (pfrest/backend/), as an endpoint of its
own made here: the backend endpoint's ``ca-file``, ``proxy``, client certificate and
``request-timeout``, the token URL as its target, POST.  Its answer is read within the client's bounds
(MAX_BODY), and taken only up to MAX_ANSWER.  Of an error answer only the status and the RFC 6749 5.2
error code are ever told: never the body (a provider may put anything in it, the request's secret
too)."""

import json
import re
from typing import NamedTuple
from urllib.parse import quote, urlsplit

from pfrest.config.schema import CLIENT_SECRET_BASIC, Endpoint
from pfrest.protocol.modes import POLICY
from pfrest.protocol.verdict import Failure, HttpResult

MAX_ANSWER = 1 << 16        # bytes of a token answer or discovery document: far above any real one
MAX_TOKEN = 1 << 14         # characters of an access token: a JWT with many claims stays far below
DEFAULT_LIFETIME = 300.0    # seconds, for an answer without expires_in (RFC 6749 5.1: only RECOMMENDED)
MAX_LIFETIME = 86400.0 * 7  # a longer expires_in is taken as this: renewal still happens now and then
DISCOVERY_PATH = "/.well-known/openid-configuration"
GRANT = ((b"grant_type", b"client_credentials"),)
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")   # RFC 6749 5.2's codes: said in the log, the body never
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")   # RFC 6750 2.1's b64token: safe in a header


class Token(NamedTuple):
    """An access token and how long it lives (seconds, from when its answer came)."""
    value: str
    lifetime: float


def transport(endpoint, url: str, secret=None) -> Endpoint:
    """The endpoint the token (or discovery) request is sent as: ``endpoint``'s transport, to ``url``;
    with client_secret_basic and a ``secret``, its Authorization (RFC 6749 2.3.1: id and secret each
    form-encoded first)."""
    oauth = endpoint.oauth2
    basic = None
    if secret is not None and oauth.auth_method == CLIENT_SECRET_BASIC:
        basic = f"{quote(oauth.client_id, safe='')}:{quote(secret, safe='')}"
    return Endpoint(name=endpoint.name, mode=POLICY, target=url, method="POST",
                    request_timeout=endpoint.request_timeout, ca_file=endpoint.ca_file, proxy=endpoint.proxy,
                    client_cert=endpoint.client_cert, client_key=endpoint.client_key, basic_auth=basic)


def form(oauth, secret: str):
    """The token request's form fields, as (bytes, bytes) pairs."""
    pairs = list(GRANT)
    if oauth.scope:
        pairs.append((b"scope", oauth.scope.encode("utf-8")))
    if oauth.audience:   # not RFC 6749: Auth0, Authentik and others take it
        pairs.append((b"audience", oauth.audience.encode("utf-8")))
    if oauth.auth_method != CLIENT_SECRET_BASIC:
        pairs += [(b"client_id", oauth.client_id.encode("utf-8")), (b"client_secret", secret.encode("utf-8"))]
    return pairs


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + DISCOVERY_PATH


def token(result, where: str):
    """A Token from the token endpoint's answer, or a Failure of kind "token" saying what went wrong."""
    document = _document(result, where)
    if document.__class__ is Failure:
        return document
    value, kind = document.get("access_token"), document.get("token_type", "Bearer")
    if not isinstance(value, str) or not value or len(value) > MAX_TOKEN or not _TOKEN_CHARS.fullmatch(value):
        return Failure("token", f"{where}: the answer has no usable access_token")
    if not isinstance(kind, str) or kind.lower() != "bearer":
        return Failure("token", f"{where}: the token is not a Bearer token")
    lifetime = document.get("expires_in", DEFAULT_LIFETIME)
    if isinstance(lifetime, str) and lifetime.isdigit():   # some providers send it as a string
        lifetime = int(lifetime)
    if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
        return Failure("token", f"{where}: the answer's expires_in is not a positive number")
    return Token(value, min(float(lifetime), MAX_LIFETIME))


def token_endpoint(result, where: str):
    """The token endpoint's URL from a discovery document, or a Failure."""
    document = _document(result, where)
    if document.__class__ is Failure:
        return document
    url = document.get("token_endpoint")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname \
            or any(c in url for c in " \r\n\0"):
        return Failure("token", f"{where}: the discovery document has no token_endpoint URL")
    return url


def _document(result, where: str):
    """The JSON object of a 200 answer, or a Failure that tells the status and error code only."""
    if result.__class__ is Failure:
        return Failure("token", f"{where}: {result.kind}: {result.detail}")
    if result.__class__ is not HttpResult:
        return Failure("token", f"{where}: no answer")
    if result.status != 200:
        return Failure("token", f"{where} answered HTTP {result.status}{_error_code(result.body)}")
    if len(result.body) > MAX_ANSWER:
        return Failure("token", f"{where}: answer over {MAX_ANSWER} bytes")
    try:
        document = json.loads(result.body)
    except ValueError:   # UnicodeDecodeError too
        document = None
    if not isinstance(document, dict):
        return Failure("token", f"{where}: the answer is not a JSON object")
    return document


def _error_code(body: bytes) -> str:
    """`` (invalid_client)``: RFC 6749 5.2's code when the body has one, else nothing."""
    try:
        code = json.loads(body[:MAX_ANSWER]).get("error") if len(body) <= MAX_ANSWER else None
    except (ValueError, AttributeError):
        return ""
    return f" ({code})" if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""
