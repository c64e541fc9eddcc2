"""Where an endpoint's requests go: the target origin and, when ``proxy`` is set, the proxy in front.

Pure: no I/O, no imports beyond the standard library's URL helpers.  Nothing here comes from the
environment: proxies are a config key, never HTTP_PROXY and the like.
"""

import base64
from typing import NamedTuple, Optional
from urllib.parse import quote, unquote, urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
# Everything printable in ASCII but the space stays as written (existing %XX escapes included); any
# other character of the target's path and query is percent-encoded as UTF-8, as requests did.
_PATH_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


class Origin(NamedTuple):
    """One end of a TCP connection: ``host`` is an IP literal (no brackets) or an ASCII host name."""
    tls: bool
    host: str
    port: int

    @property
    def authority(self) -> str:
        """``host:port`` as it goes into a CONNECT request."""
        return f"{_bracketed(self.host)}:{self.port}"

    @property
    def host_header(self) -> str:
        """The Host header: the port only when it is not the scheme's default."""
        default = DEFAULT_PORTS["https" if self.tls else "http"]
        return _bracketed(self.host) if self.port == default else self.authority


class Route(NamedTuple):
    target: Origin
    path: str                               # origin-form request target, e.g. "/api?x=1"
    proxy: Optional[Origin] = None
    proxy_authorization: Optional[str] = None   # "Basic ..." when the proxy URL has user:password

    @property
    def tunnel(self) -> bool:
        """An https target behind a proxy: CONNECT, then TLS end to end; the proxy sees no request."""
        return self.proxy is not None and self.target.tls

    @property
    def request_target(self) -> str:
        """Absolute-form through a proxy that forwards plain http, origin-form otherwise."""
        if self.proxy is not None and not self.target.tls:
            return f"http://{self.target.host_header}{self.path}"
        return self.path

    @property
    def first_hop(self) -> Origin:
        return self.proxy or self.target


def for_endpoint(endpoint) -> Route:
    """The route to ``endpoint``'s first target."""
    return for_target(endpoint.target, endpoint.proxy)


def for_target(target: str, proxy_url: Optional[str]) -> Route:
    """The route to ``target`` (config validation guarantees http(s) URLs with a host), through
    ``proxy_url`` when set."""
    url = urlsplit(target)
    path = quote(url.path or "/", safe=_PATH_SAFE)
    if url.query:
        path += "?" + quote(url.query, safe=_PATH_SAFE)
    if not proxy_url:
        return Route(_origin(url), path)
    proxy = urlsplit(proxy_url)
    return Route(_origin(url), path, _origin(proxy), _proxy_authorization(proxy))


def _origin(url) -> Origin:
    return Origin(url.scheme == "https", _ascii_host(url.hostname), url.port or DEFAULT_PORTS[url.scheme])


def _ascii_host(host: str) -> str:
    """IDNA-encoded, so that DNS, the Host header and TLS server name all get the A-label form."""
    return host if host.isascii() else host.encode("idna").decode("ascii")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def basic(username: str, password: str) -> str:
    """``Basic base64(user:password)``: RFC 7617, in UTF-8."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode("utf-8")).decode("ascii")


def _proxy_authorization(url) -> Optional[str]:
    """From the proxy URL's percent-encoded ``user:password@``, if any."""
    if url.username is None:
        return None
    return basic(unquote(url.username), unquote(url.password or ""))
