"""Every key of the config file and its check: ENDPOINT_KEYS and TOP_KEYS are the one list that the
loader (__init__.py), the key tables of docs/configuration.md and the man pages (bin/pfrest-manpages) follow.  Each check
returns an error message or None; nothing here reads a file or builds a Config.
"""

import ipaddress
import os
import re
from urllib.parse import parse_qsl, urlsplit

from pfrest.protocol import actions
from pfrest.protocol.dovecotauth import MECHANISMS
from pfrest.protocol.modes import LOOKUPS, MODES, POLICY, SASL
from pfrest.config import sentinelurl
from pfrest.config.schema import AUTH_METHODS, CACHE_SCHEMES, CACHE_URL_FILES, LOG_REQUESTS, RESERVED_HEADERS, _NAME_RE


# --- checks: each returns an error message or None ------------------------------------------------

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text(v):
    if not isinstance(v, str):
        return "must be a string"
    if any(c in v for c in "\r\n\0"):
        return "must not contain CR, LF or NUL"
    return None


def _nonempty_text(v):
    return _text(v) or (None if v.strip() else "must not be empty")


def _header_text(v):
    """Sent as an HTTP header value, which is Latin-1 on the wire."""
    problem = _nonempty_text(v)
    if problem is None and any(ord(c) > 255 or (ord(c) < 32 and c != "\t") or c == "\x7f" for c in v):
        problem = "must be Latin-1 text without control characters (it is sent as an HTTP header)"
    return problem


def _name(v):
    return _text(v) or (None if _NAME_RE.match(v) else
                        "must be 1-64 characters of letters, digits, '.', '_' or '-'")


def _mode(v):
    return None if v in MODES else "must be one of " + ", ".join(MODES)


def _url(v):
    if not isinstance(v, str):
        return "must be an http or https URL"
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "must be an http or https URL"
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment or " " in v:
        return "must be an http or https URL"
    return None


def _target(v):
    problem = _url(v)
    if problem is None and "@" in urlsplit(v).netloc:
        return "must not hold user:password@ (it would show in logs and query output); use auth-token"
    return problem


def _token(v):
    """Sent as an HTTP header value: printable ASCII, so that no HTTP library ever refuses it (and
    quotes it in an error message)."""
    problem = _text(v)
    if problem is None and (not v or v != v.strip() or any(not " " <= c <= "~" for c in v)):
        problem = "must be printable ASCII without leading or trailing white space"
    return problem


def _proxy(v):
    return _url(v) and "must be an http or https proxy URL"


def _targets(v):
    """One URL, or a non-empty list of them: tried in order, a failing one skipped for a while."""
    if isinstance(v, list):
        if not v:
            return "must be a URL or a non-empty list of URLs"
        for i, item in enumerate(v):
            problem = _target(item)
            if problem:
                return f"item {i}: {problem}"
        return "the same URL is listed twice" if len(set(v)) != len(v) else None
    return _target(v)


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token


def _headers(v):
    if not isinstance(v, dict):
        return "must be an object of header names and values, e.g. {\"Authorization\": \"Bearer ...\"}"
    for name, value in v.items():
        if not _HEADER_NAME.match(name):
            return f"{name!r} is not a header name"
        if name.lower() in RESERVED_HEADERS:
            return f"{name} is set by pfrest itself (or frames the message) and cannot be set here"
        if not isinstance(value, str) or not value or value != value.strip() \
                or any(not (" " <= c <= "~") for c in value):
            return f"the value of {name} must be printable ASCII without leading or trailing white space"
    lowered = [name.lower() for name in v]
    return "a header is given twice (names are case-insensitive)" if len(set(lowered)) != len(lowered) else None


def _basic_auth(v):
    problem = _text(v)
    if problem is None and (":" not in v or not v.split(":", 1)[0] or any(ord(c) < 32 or c == "\x7f" for c in v)):
        problem = "must be \"user:password\" (no control characters; the user without a colon)"
    return problem


def _log_requests(v):
    return None if v in LOG_REQUESTS else "must be one of " + ", ".join(LOG_REQUESTS)


def _host_port(v):
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) for the metrics listener."""
    if not isinstance(v, str):
        return "must be \"HOST:PORT\", e.g. \"127.0.0.1:9100\""
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or _address(host.strip("[]") or "?"):
        return "must be \"HOST:PORT\", e.g. \"127.0.0.1:9100\""
    return None


def _address(v):
    if not isinstance(v, str) or not v:
        return "must be an IP address or host name"
    try:
        ipaddress.ip_address(v.strip("[]"))
        return None
    except ValueError:
        pass
    if re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$", v):
        return None
    return "must be an IP address or host name"


def _cache_url(v):
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` the same over TLS, or
    ``unix://[[user]:password@]/path/to.sock[?db=N]``; the query may name the database (``db``) and, for
    rediss://, the TLS files (CACHE_URL_FILES, absolute paths); or the sentinels of a service
    (sentinelurl.py: ``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``)."""
    usage = "must be a redis://, rediss://, unix:// or redis+sentinel:// URL"
    if not isinstance(v, str) or _text(v) or " " in v:
        return usage
    if sentinelurl.is_sentinel(v):
        try:
            sentinelurl.parse(v)
        except ValueError as exc:
            return str(exc)
        return None
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises ValueError on a bad port
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        return usage
    if parts.scheme not in CACHE_SCHEMES or parts.fragment:
        return usage
    if parts.scheme == "unix":
        if parts.hostname or not parts.path.startswith("/"):
            return "a unix:// URL names an absolute socket path: unix:///run/redis/redis.sock"
    elif not parts.hostname:
        return f"a {parts.scheme}:// URL names a host: {parts.scheme}://HOST[:PORT][/DB]"
    elif parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return "the path of a redis:// URL is the database number: redis://HOST[:PORT]/DB"
    for name, value in query:
        if name == "db":
            if not value.isdigit():
                return "db must be a database number"
        elif name in CACHE_URL_FILES and parts.scheme == "rediss":
            if not os.path.isabs(value):
                return f"{name} must be an absolute path"
        else:
            known = "db" + (", " + ", ".join(CACHE_URL_FILES) if parts.scheme == "rediss" else "")
            return f"{name!r} is not a setting pfrest takes in a {parts.scheme}:// URL (it takes {known})"
    return None


def _port(v):
    return None if _is_int(v) and 1 <= v <= 65535 else "must be 1..65535"


def _abspath(v):
    return _text(v) or (None if os.path.isabs(v) else "must be an absolute path")


def _filemode(v):
    # a string only: a JSON integer 660 would silently mean 0o1224, not rw-rw----
    if isinstance(v, str) and re.match(r"^0?[0-7]{3,4}$", v):
        return None
    return "must be an octal file mode in a string, such as \"0660\""


def _timeout_ms(v):
    return None if _is_int(v) and 1 <= v <= 99000 else "must be an integer 1..99000 (milliseconds)"


def _method(v):
    return None if isinstance(v, str) and v.upper() in ("GET", "POST") else "must be GET or POST"


def _action(v):
    return _text(v) or actions.check(v)


def _networks(v):
    if not isinstance(v, list) or not v:
        return "must be a non-empty list of networks such as \"127.0.0.0/8\""
    for i, net in enumerate(v):
        try:
            ipaddress.ip_network(net, strict=False)
        except (TypeError, ValueError):
            return f"item {i} ({net!r}) is not a network such as \"127.0.0.0/8\""
    return None


def _cache_timeout_ms(v):
    return None if _is_int(v) and 1 <= v <= 10000 else "must be an integer 1..10000 (milliseconds)"


def _positive_int(v):
    return None if _is_int(v) and v >= 1 else "must be a positive integer"


def _seconds(v):
    return None if _is_number(v) and 0 <= v <= 86400 * 7 else "must be a number of seconds, 0..604800"


def _boolean(v):
    return None if isinstance(v, bool) else "must be true or false"


def _positive_seconds(v):
    return None if _is_number(v) and 0 < v <= 86400 else "must be a number of seconds, above 0 and at most 86400"


def _mechanisms(v):
    if not isinstance(v, list) or not v or not all(isinstance(m, str) for m in v):
        return "must be a non-empty list of mechanisms such as [\"PLAIN\", \"LOGIN\"]"
    words = [m.upper() for m in v]
    unknown = [m for m in v if m.upper() not in MECHANISMS]
    if unknown:
        return f"{unknown[0]!r} is not one of " + ", ".join(MECHANISMS)
    if len(set(words)) != len(words):
        return "names a mechanism twice"
    return None


# oauth2's keys: each with its check; token-url or issuer, client-secret or client-secret-file
OAUTH2_KEYS = {
    "token-url": _url, "issuer": _url, "client-id": _token, "client-secret": _token,
    "client-secret-file": _abspath, "scope": _token, "audience": _token,
    "auth-method": lambda v: None if v in AUTH_METHODS else "must be one of " + ", ".join(AUTH_METHODS),
}


def _oauth2(v):
    """The client credentials grant's settings (see OAUTH2_KEYS); the secret never in a message."""
    if not isinstance(v, dict):
        return ("must be an object such as {\"token-url\": \"https://idp/token\", \"client-id\": \"pfrest\", "
                "\"client-secret-file\": \"/etc/pfrest/client-secret\"}")
    for key, value in v.items():
        if key not in OAUTH2_KEYS:
            return f"{key!r} is not one of its keys (" + ", ".join(OAUTH2_KEYS) + ")"
        problem = OAUTH2_KEYS[key](value)
        if problem:
            return f"{key} {problem}" if key != "client-secret" else "client-secret must be printable ASCII"
        if key in ("token-url", "issuer") and "@" in value.split("/")[2]:
            return f"{key} must not hold user:password@"
    if ("token-url" in v) == ("issuer" in v):
        return "needs token-url or issuer (OIDC discovery), one of them"
    if "client-id" not in v:
        return "needs client-id"
    if ("client-secret" in v) == ("client-secret-file" in v):
        return "needs client-secret or client-secret-file, one of them"
    return None


TRACING_KEYS = {
    "otlp-endpoint": _url,
    "sample-ratio": lambda v: None if _is_number(v) and 0 <= v <= 1 else "must be a number 0..1",
    "service-name": _header_text,
}


def _tracing(v):
    """``{"otlp-endpoint": "http://127.0.0.1:4318/v1/traces", "sample-ratio": 0.1, "service-name": ...}``"""
    if not isinstance(v, dict):
        return "must be an object such as {\"otlp-endpoint\": \"http://127.0.0.1:4318/v1/traces\"}"
    for key, value in v.items():
        if key not in TRACING_KEYS:
            return f"{key!r} is not one of its keys (" + ", ".join(TRACING_KEYS) + ")"
        problem = TRACING_KEYS[key](value)
        if problem:
            return f"{key} {problem}"
    return None if "otlp-endpoint" in v else "needs otlp-endpoint (the collector's OTLP/HTTP traces URL)"


# key -> (attribute, check, modes it applies to or None for all)
ENDPOINT_KEYS = {
    "name": ("name", _name, None),
    "mode": ("mode", _mode, None),
    "target": ("target", _targets, None),
    "bind-address": ("bind_address", _address, None),
    "bind-port": ("bind_port", _port, None),
    "bind-path": ("bind_path", _abspath, None),
    "bind-mode": ("bind_mode", _filemode, None),
    "auth-token": ("auth_token", _token, None),
    "request-timeout": ("request_timeout", _timeout_ms, None),
    "list-separator": ("list_separator", _text, LOOKUPS),
    "method": ("method", _method, (POLICY,)),
    "temporary-error-action": ("temporary_error_action", _action, (POLICY,)),
    "permanent-error-action": ("permanent_error_action", _action, (POLICY,)),
    "allow-from": ("allow_from", _networks, None),
    "max-connections": ("max_connections", _positive_int, None),
    "idle-timeout": ("idle_timeout", _positive_seconds, None),
    "partial-request-timeout": ("partial_request_timeout", _positive_seconds, None),
    "cache-ttl": ("cache_ttl", _seconds, LOOKUPS),
    "cache-negative-ttl": ("cache_negative_ttl", _seconds, LOOKUPS),
    "cache-max-entries": ("cache_max_entries", _positive_int, LOOKUPS),
    "ca-file": ("ca_file", _abspath, None),
    "proxy": ("proxy", _proxy, None),
    "headers": ("headers", _headers, None),
    "basic-auth": ("basic_auth", _basic_auth, None),
    "client-cert": ("client_cert", _abspath, None),
    "client-key": ("client_key", _abspath, None),
    "cache-stale-if-error": ("cache_stale_if_error", _seconds, LOOKUPS),
    "cache-stale-while-revalidate": ("cache_stale_while_revalidate", _seconds, LOOKUPS),
    "log-requests": ("log_requests", _log_requests, None),
    "cache-url": ("cache_url", _cache_url, LOOKUPS),
    "cache-local-ttl": ("cache_local_ttl", _seconds, LOOKUPS),
    "cache-timeout": ("cache_timeout", _cache_timeout_ms, LOOKUPS),
    "cache-read-url": ("cache_read_url", _cache_url, LOOKUPS),
    "require-request-id": ("require_request_id", _boolean, None),
    "pipelining": ("pipelining", _boolean, LOOKUPS),
    "mechanisms": ("mechanisms", _mechanisms, (SASL,)),
    "oauth2": ("oauth2", _oauth2, None),
}
REQUIRED_ENDPOINT_KEYS = ("name", "mode", "target")
TOP_KEYS = {
    "user-agent": _header_text,
    "endpoints": None,  # checked item by item
    "user": _nonempty_text,
    "metrics-address": _host_port,
    "metrics-allow-from": _networks,
    "log-requests": _log_requests,
    "control-socket": _abspath,
    "tracing": _tracing,
}
