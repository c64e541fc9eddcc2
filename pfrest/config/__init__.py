"""Load and validate the pfrest configuration (JSON, or TOML with the same keys).

The file format is the one of the original postfix-rest-connector, so its config files load unchanged:

    {"user-agent": "...", "endpoints": [{"name": "...", "mode": "tcp-lookup", "target": "https://...",
      "bind-address": "0.0.0.0", "bind-port": 9000, "auth-token": "...", "request-timeout": 2000}]}

Every problem is reported with the path of the offending field (``endpoints[1].bind-port: must be
1..65535``); all problems are collected, not only the first.  Only the standard library is used here, so
``pfrest check`` and ``pfrest --help`` stay cheap.
"""

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple
from urllib.parse import parse_qsl, unquote, urlsplit

from pfrest.protocol import actions
from pfrest.protocol.modes import MODES, POLICY, SOCKETMAP, TCP  # noqa: F401 (config.MODES ...)

DEFAULT_PATH = "/etc/pfrest/pfrest.json"
DEFAULT_USER_AGENT = "Postfix REST Connector"
DEFAULT_TIMEOUT_MS = 2000
DEFAULT_BIND_ADDRESS = "127.0.0.1"
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_CACHE_ENTRIES = 10000
# With a shared cache (cache-url): how long each process keeps an answer itself, so that a change made
# fleet-wide shows everywhere within seconds; and the bound on every call to the shared store, in
# milliseconds (a store on the same site answers within one)
DEFAULT_CACHE_LOCAL_TTL = 5.0
DEFAULT_CACHE_TIMEOUT_MS = 5
# Where `pfrest serve` takes `pfrest cache` commands unless control-socket says otherwise
DEFAULT_CONTROL_SOCKET = "/run/pfrest/control.sock"
# cache-url: redis:// and rediss:// (TLS) name a host, unix:// a socket path; the query may say these
# (redis-py reads them: the database, and for rediss:// the CA and client certificate files)
CACHE_SCHEMES = ("redis", "rediss", "unix")
CACHE_URL_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")

# log-requests: a line per request; only for temporary and permanent failures, timeouts, stale
# answers, policy refusals and protocol errors; none (counters and metrics count everything anyway)
LOG_ALL, LOG_PROBLEMS, LOG_NONE = "all", "problems", "none"
LOG_REQUESTS = (LOG_ALL, LOG_PROBLEMS, LOG_NONE)
# Headers pfrest sets itself or that frame the message: `headers` may not set them.
RESERVED_HEADERS = frozenset("""host content-length content-type transfer-encoding connection keep-alive
    te trailer upgrade expect proxy-authorization proxy-connection x-request-id""".split())

# Idle limits between requests, chosen above what each Postfix client tolerates (see the protocol
# reference, R3): policy clients idle up to 300 s, socketmap clients close after 10 s, tcp clients never.
DEFAULT_IDLE_TIMEOUT = {TCP: 600.0, SOCKETMAP: 60.0, POLICY: 600.0}
# From the first byte of a request to its last (R3): Postfix writes a request in one go, so only a
# stalled or dripping client (slowloris) takes longer.  A deadline for the whole request, not per read.
PARTIAL_REQUEST_TIMEOUT = 30.0

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(Exception):
    """One or more problems in a configuration; ``problems`` holds ``path: message`` strings."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Endpoint:
    name: str
    mode: str
    target: str
    bind_address: str = DEFAULT_BIND_ADDRESS
    bind_port: Optional[int] = None
    bind_path: Optional[str] = None
    bind_mode: int = 0o660
    auth_token: Optional[str] = field(default=None, repr=False)
    request_timeout: int = DEFAULT_TIMEOUT_MS
    list_separator: str = ","
    method: str = "GET"
    temporary_error_action: str = actions.DEFAULT_TEMPORARY
    permanent_error_action: str = actions.DEFAULT_PERMANENT
    allow_from: Tuple[str, ...] = ()
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: Optional[float] = None
    partial_request_timeout: Optional[float] = None
    cache_ttl: float = 0.0
    cache_negative_ttl: float = 0.0
    cache_max_entries: int = DEFAULT_CACHE_ENTRIES
    ca_file: Optional[str] = None
    proxy: Optional[str] = field(default=None, repr=False)
    targets: Tuple[str, ...] = ()     # every target in order (``target`` is the first); see parse()
    headers: Tuple[Tuple[str, str], ...] = field(default=(), repr=False)
    basic_auth: Optional[str] = field(default=None, repr=False)
    client_cert: Optional[str] = None
    client_key: Optional[str] = None
    cache_stale_if_error: float = 0.0
    log_requests: Optional[str] = None  # None: the top-level log-requests
    cache_url: Optional[str] = field(default=None, repr=False)   # may hold a password
    cache_local_ttl: float = DEFAULT_CACHE_LOCAL_TTL
    cache_timeout: int = DEFAULT_CACHE_TIMEOUT_MS
    require_request_id: bool = False

    def __post_init__(self):
        if not self.targets:  # an Endpoint made in code with one target
            object.__setattr__(self, "targets", (self.target,))

    def secrets(self):
        """What must never show in a log line: token, password, header values."""
        found = [self.auth_token, self.basic_auth, *(value for _, value in self.headers)]
        if self.basic_auth:
            found.append(self.basic_auth.split(":", 1)[1])
        for url in (self.proxy, self.cache_url):
            password = url and urlsplit(url).password
            if password:
                found += [password, unquote(password)]   # as written, and as the library sends it
        return [s for s in found if s]

    @property
    def timeout(self) -> float:
        """The request timeout in seconds."""
        return self.request_timeout / 1000.0

    @property
    def idle_limit(self) -> float:
        return self.idle_timeout if self.idle_timeout is not None else DEFAULT_IDLE_TIMEOUT[self.mode]

    @property
    def partial_limit(self) -> float:
        """Seconds a request may take from its first byte to its last."""
        return self.partial_request_timeout if self.partial_request_timeout is not None \
            else PARTIAL_REQUEST_TIMEOUT


    @property
    def caches(self) -> bool:
        """Whether it keeps answers: a lookup endpoint with a cache-ttl or cache-negative-ttl."""
        return self.mode != POLICY and (self.cache_ttl > 0 or self.cache_negative_ttl > 0)


@dataclass(frozen=True)
class Config:
    endpoints: Tuple[Endpoint, ...]
    user_agent: str = DEFAULT_USER_AGENT
    user: Optional[str] = None
    path: Optional[str] = None
    metrics_address: Optional[Tuple[str, int]] = None   # (host, port) of /metrics, /healthz, /readyz
    metrics_allow_from: Tuple[str, ...] = ()
    log_requests: str = LOG_ALL
    control_socket: Optional[str] = None   # None: DEFAULT_CONTROL_SOCKET, if it can be had

    def endpoint(self, name: str) -> Endpoint:
        for ep in self.endpoints:
            if ep.name == name:
                return ep
        known = ", ".join(ep.name for ep in self.endpoints) or "none"
        raise ConfigError([f"no endpoint named {name!r} (endpoints: {known})"])


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
    rediss://, the TLS files (CACHE_URL_FILES, absolute paths)."""
    usage = "must be a redis://, rediss:// or unix:// URL"
    if not isinstance(v, str) or _text(v) or " " in v:
        return usage
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


# key -> (attribute, check, modes it applies to or None for all)
_LOOKUPS = (TCP, SOCKETMAP)
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
    "list-separator": ("list_separator", _text, _LOOKUPS),
    "method": ("method", _method, (POLICY,)),
    "temporary-error-action": ("temporary_error_action", _action, (POLICY,)),
    "permanent-error-action": ("permanent_error_action", _action, (POLICY,)),
    "allow-from": ("allow_from", _networks, None),
    "max-connections": ("max_connections", _positive_int, None),
    "idle-timeout": ("idle_timeout", _positive_seconds, None),
    "partial-request-timeout": ("partial_request_timeout", _positive_seconds, None),
    "cache-ttl": ("cache_ttl", _seconds, _LOOKUPS),
    "cache-negative-ttl": ("cache_negative_ttl", _seconds, _LOOKUPS),
    "cache-max-entries": ("cache_max_entries", _positive_int, _LOOKUPS),
    "ca-file": ("ca_file", _abspath, None),
    "proxy": ("proxy", _proxy, None),
    "headers": ("headers", _headers, None),
    "basic-auth": ("basic_auth", _basic_auth, None),
    "client-cert": ("client_cert", _abspath, None),
    "client-key": ("client_key", _abspath, None),
    "cache-stale-if-error": ("cache_stale_if_error", _seconds, _LOOKUPS),
    "log-requests": ("log_requests", _log_requests, None),
    "cache-url": ("cache_url", _cache_url, _LOOKUPS),
    "cache-local-ttl": ("cache_local_ttl", _seconds, _LOOKUPS),
    "cache-timeout": ("cache_timeout", _cache_timeout_ms, _LOOKUPS),
    "require-request-id": ("require_request_id", _boolean, None),
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
}


def _convert(key, value):
    if key == "bind-mode":
        return int(value, 8)
    if key == "method":
        return value.upper()
    if key == "allow-from":
        return tuple(str(ipaddress.ip_network(n, strict=False)) for n in value)
    if key in ("idle-timeout", "partial-request-timeout", "cache-ttl", "cache-negative-ttl",
               "cache-stale-if-error", "cache-local-ttl"):
        return float(value)
    if key == "headers":
        return tuple(value.items())
    return value


def _endpoint(raw, where, problems):
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be an object")
        return None
    values = {}
    for key in REQUIRED_ENDPOINT_KEYS:
        if key not in raw:
            problems.append(f"{where}.{key}: is required")
    mode = raw.get("mode")
    for key, value in raw.items():
        if key not in ENDPOINT_KEYS:
            problems.append(f"{where}.{key}: unknown key")
            continue
        attr, check, modes = ENDPOINT_KEYS[key]
        message = check(value)
        if message:
            problems.append(f"{where}.{key}: {message}")
        elif modes and mode in MODES and mode not in modes:
            problems.append(f"{where}.{key}: not used by mode {mode}")
        else:
            values[attr] = _convert(key, value)
    if isinstance(values.get("target"), list):  # several targets: the first is ``target``
        values["targets"] = tuple(values["target"])
        values["target"] = values["targets"][0]
    elif "target" in values:
        values["targets"] = (values["target"],)
    if "bind-path" in raw and ("bind-port" in raw or "bind-address" in raw):
        problems.append(f"{where}.bind-path: give either bind-path or bind-address/bind-port, not both")
    if "basic_auth" in values and any(name.lower() == "authorization"
                                      for name, _ in values.get("headers", ())):
        problems.append(f"{where}.basic-auth: conflicts with headers' Authorization")
    if "client-key" in raw and "client-cert" not in raw:
        problems.append(f"{where}.client-key: needs client-cert (the key of that certificate)")
    if ("client-cert" in raw or "client-key" in raw) and not any(
            str(t).startswith("https:") for t in values.get("targets", ())):
        problems.append(f"{where}.client-cert: only an https target can use a client certificate")
    for key in ("cache-local-ttl", "cache-timeout"):
        if key in raw and "cache-url" not in raw:
            problems.append(f"{where}.{key}: needs cache-url (it is about the shared cache)")
    if "cache_url" in values and not (values.get("cache_ttl") or values.get("cache_negative_ttl")):
        problems.append(f"{where}.cache-url: needs cache-ttl or cache-negative-ttl (nothing is cached without)")
    if any(f"{where}.{key}:" in p for p in problems for key in REQUIRED_ENDPOINT_KEYS):
        return None
    try:
        return Endpoint(**values)
    except TypeError as exc:  # a required key failed its check
        problems.append(f"{where}: {exc}")
        return None


def parse(raw, path=None) -> Config:
    """Validate a decoded config document and build a :class:`Config`; raise ConfigError."""
    problems = []
    if not isinstance(raw, dict):
        raise ConfigError([f"{path or 'config'}: the top level must be an object"])
    for key, value in raw.items():
        if key not in TOP_KEYS:
            problems.append(f"{key}: unknown key")
        elif TOP_KEYS[key] and TOP_KEYS[key](value):
            problems.append(f"{key}: {TOP_KEYS[key](value)}")
    endpoints = []
    items = raw.get("endpoints")
    if items is None:
        problems.append("endpoints: is required")
    elif not isinstance(items, list):
        problems.append("endpoints: must be a list")
    elif not items:  # nothing to serve or handle: a config that can only be a mistake
        problems.append("endpoints: must list at least one endpoint")
    else:
        seen = {}
        for i, item in enumerate(items):
            ep = _endpoint(item, f"endpoints[{i}]", problems)
            if ep is None:
                continue
            if ep.name in seen:
                problems.append(f"endpoints[{i}].name: duplicate name {ep.name!r} "
                                f"(also endpoints[{seen[ep.name]}])")
            seen.setdefault(ep.name, i)
            endpoints.append(ep)
    if problems:
        raise ConfigError(problems)
    log_requests = raw.get("log-requests", LOG_ALL)
    endpoints = [ep if ep.log_requests else replace(ep, log_requests=log_requests) for ep in endpoints]
    metrics = raw.get("metrics-address")
    if metrics:
        host, _, port = metrics.rpartition(":")
        metrics = (host.strip("[]"), int(port))
    return Config(endpoints=tuple(endpoints),
                  user_agent=raw.get("user-agent", DEFAULT_USER_AGENT),
                  user=raw.get("user"), path=path, metrics_address=metrics,
                  metrics_allow_from=tuple(str(ipaddress.ip_network(n, strict=False))
                                           for n in raw.get("metrics-allow-from", ())),
                  log_requests=log_requests, control_socket=raw.get("control-socket"))


def _no_duplicate_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def decode(text: bytes, path: str):
    """Decode a config file's bytes: TOML for ``*.toml``, JSON otherwise."""
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib
        try:
            return tomllib.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError([f"{path}: not valid JSON: {exc}"]) from None


def load(path: str) -> Config:
    """Read, decode and validate the config file at ``path``."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse(decode(text, path), path)


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def warnings(config: Config) -> List[str]:
    """Things that are valid but probably not what the admin wants."""
    found = []
    for i, ep in enumerate(config.endpoints):
        if ep.bind_path is None and ep.bind_port is not None and not ep.allow_from \
                and not is_loopback(ep.bind_address):
            found.append(f"endpoints[{i}] ({ep.name}): listens on {ep.bind_address}, beyond loopback, "
                         "without allow-from: any host that reaches it can query it")
    if config.metrics_address and not config.metrics_allow_from and not is_loopback(config.metrics_address[0]):
        found.append(f"metrics-address: listens on {config.metrics_address[0]}, beyond loopback, without "
                     "metrics-allow-from: any host that reaches it can read the metrics")
    if config.path and any(ep.auth_token for ep in config.endpoints):
        try:
            mode = os.stat(config.path).st_mode
        except OSError:
            mode = 0
        if mode & 0o004:
            found.append(f"{config.path}: holds an auth-token and is readable by every user; "
                         "chmod o-r it")
    return found
