"""What a pfrest configuration is: the defaults, the Endpoint and the Config every part reads, and
ConfigError.  Nothing here reads a file or checks a value: keys.py checks, __init__.py loads."""

import re
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Tuple
from urllib.parse import unquote, urlsplit

from pfrest.protocol import actions
from pfrest.protocol.dovecotauth import MECHANISMS
from pfrest.protocol.modes import LOOKUPS, POLICY, SASL, SOCKETMAP, TCP


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
# An smtpd keeps its auth connection for its whole life and fails the next login (454) if the server
# closed it: a day, above any smtpd's (max_idle 100 s, max_use 100 sessions).
DEFAULT_IDLE_TIMEOUT = {TCP: 600.0, SOCKETMAP: 60.0, POLICY: 600.0, SASL: 86400.0}
# From the first byte of a request to its last (R3): Postfix writes a request in one go, so only a
# stalled or dripping client (slowloris) takes longer.  A deadline for the whole request, not per read.
PARTIAL_REQUEST_TIMEOUT = 30.0

# oauth2's auth-method: how the client authenticates at the token endpoint (RFC 6749 2.3.1)
CLIENT_SECRET_BASIC, CLIENT_SECRET_POST = "client_secret_basic", "client_secret_post"
AUTH_METHODS = (CLIENT_SECRET_BASIC, CLIENT_SECRET_POST)


class OAuth2(NamedTuple):
    """An endpoint's ``oauth2`` object: where its bearer token comes from (the client credentials
    grant, RFC 6749 4.4).  Hashable: endpoints with equal credentials share one token."""
    token_url: Optional[str] = None      # or issuer, whose OIDC discovery document names it
    issuer: Optional[str] = None
    client_id: str = ""
    client_secret: Optional[str] = None  # or client_secret_file, read at each fetch (rotation)
    client_secret_file: Optional[str] = None
    scope: Optional[str] = None
    audience: Optional[str] = None
    auth_method: str = CLIENT_SECRET_BASIC

    def __repr__(self):   # never the secret
        return f"OAuth2(token_url={self.token_url!r}, issuer={self.issuer!r}, client_id={self.client_id!r})"


DEFAULT_SERVICE_NAME = "pfrest"


class Tracing(NamedTuple):
    """The top-level ``tracing`` object: where spans go (OTLP/HTTP) and which requests are sampled."""
    otlp_endpoint: str
    sample_ratio: float = 1.0
    service_name: str = DEFAULT_SERVICE_NAME


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _password(url: str):
    """The password in a URL as written, or None.  A Sentinel cache-url's netloc is a list of hosts,
    which urlsplit may refuse (sentinelurl.split): its user information is taken by hand."""
    if "+sentinel://" in url:
        userinfo = url.partition("://")[2].partition("/")[0].partition("?")[0].rpartition("@")[0]
        return userinfo.partition(":")[2] or None
    return urlsplit(url).password


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
    bind_address_alone: bool = False   # bind-address given without bind-port: serve refuses it, handle not
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
    cache_stale_while_revalidate: float = 0.0
    log_requests: Optional[str] = None  # None: the top-level log-requests
    cache_url: Optional[str] = field(default=None, repr=False)   # may hold a password
    cache_local_ttl: float = DEFAULT_CACHE_LOCAL_TTL
    cache_timeout: int = DEFAULT_CACHE_TIMEOUT_MS
    require_request_id: bool = False
    pipelining: bool = False
    cache_read_url: Optional[str] = field(default=None, repr=False)   # a replica for reads; a password too
    mechanisms: Tuple[str, ...] = MECHANISMS
    oauth2: Optional[OAuth2] = field(default=None, repr=False)

    def __post_init__(self):
        if not self.targets:  # an Endpoint made in code with one target
            object.__setattr__(self, "targets", (self.target,))
        if self.mode == SASL:   # a password goes in a POST body, never in a URL
            object.__setattr__(self, "method", "POST")

    def secrets(self):
        """What must never show in a log line: token, password, header values."""
        found = [self.auth_token, self.basic_auth, *(value for _, value in self.headers)]
        if self.oauth2 is not None:
            found.append(self.oauth2.client_secret)
        if self.basic_auth:
            found.append(self.basic_auth.split(":", 1)[1])
        for url in (self.proxy, self.cache_url, self.cache_read_url):
            password = url and _password(url)
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
    def binds(self) -> bool:
        """Whether ``pfrest serve`` listens for it on a socket of its own (else only an inherited socket of
        its name, or ``pfrest handle``, serve it)."""
        return bool(self.bind_path) or self.bind_port is not None

    @property
    def caches(self) -> bool:
        """Whether it keeps answers: a lookup endpoint with a cache-ttl or cache-negative-ttl."""
        return self.mode in LOOKUPS and (self.cache_ttl > 0 or self.cache_negative_ttl > 0)


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
    tracing: Optional[Tracing] = None

    def endpoint(self, name: str) -> Endpoint:
        for ep in self.endpoints:
            if ep.name == name:
                return ep
        known = ", ".join(ep.name for ep in self.endpoints) or "none"
        raise ConfigError([f"no endpoint named {name!r} (endpoints: {known})"])
