"""The bytes of each backend request, built from a per-endpoint template.  Pure, no I/O.

Everything that is the same for every request to an endpoint (request line prefix, Host, User-Agent,
Accept, X-Auth-Token, Proxy-Authorization, Connection, then Authorization from ``basic-auth`` and the
endpoint's own ``headers``) is encoded once; per request only the query or form body and X-Request-Id
are added (and, with ``oauth2``, the bearer token's Authorization line, which changes as tokens are
renewed: the caller passes the current line, already encoded), and the whole request is one ``bytes``
for one write.  The CONNECT request to a proxy is
built apart (``connect_request``) and carries none of the endpoint's headers.
"""

from random import getrandbits as _random_bits

from pfrest.backend.route import basic

FORM_TYPE = b"application/x-www-form-urlencoded"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# byte -> its text in a query (RFC 3986: unreserved as is, anything else %XX), and in a form (the
# same, but a space is "+"); as urllib.parse.quote / quote_plus with safe="", at a third of the cost
_QUERY = [chr(b) if b in _UNRESERVED else "%%%02X" % b for b in range(256)]
_FORM = _QUERY[:32] + ["+"] + _QUERY[33:]
# what a form body keeps as it is: the unreserved bytes, and NUL and LF, which stand for "=" and "&"
_FORM_KEPT = bytes(sorted(_UNRESERVED | {0, ord("\n")}))
_FORM_ESCAPES = {b: _FORM[b].encode("ascii") for b in range(256)}
_PERCENT, _SPACE = ord("%"), ord(" ")


def new_request_id() -> str:
    """16 hex digits naming a request in the log, the reply and X-Request-Id.  Not a secret, so the
    Mersenne Twister will do (reseeded in each forked worker by the random module)."""
    return "%016x" % _random_bits(64)


def query(params) -> str:
    """``name=value&...`` with every byte of each value percent-encoded as needed (RFC 3986)."""
    return "&".join(f"{name}={value.decode('latin-1').translate(_QUERY)}" for name, value in params)


def form(pairs) -> bytes:
    """An application/x-www-form-urlencoded body from (bytes, bytes) pairs, in order, byte-exact.

    Policy attributes hold neither NUL nor LF (the policy decoder sees to it), so the pairs are joined
    with those, escaped in one pass over the whole body, and only then turned into ``=`` and ``&``: a
    policy request's thirty-odd attributes cost one pass instead of sixty translations.  That pass
    finds which bytes need escaping (a request has a few distinct ones: "@", ":", " "), each then
    replaced in a pass of its own: all in C, where a regex's callback per byte costs a Python call
    each (a third of the time to build a policy request, measured)."""
    joined = b"\n".join(map(b"\0".join, pairs))
    if joined.count(b"\0") != len(pairs) or joined.count(b"\n") != max(len(pairs) - 1, 0):
        return "&".join(f"{n.decode('latin-1').translate(_FORM)}={v.decode('latin-1').translate(_FORM)}"
                        for n, v in pairs).encode("ascii")
    unsafe = joined.translate(None, _FORM_KEPT)
    if unsafe:
        escaped = set(unsafe)
        if _PERCENT in escaped:   # first: every other escape holds a "%" that must stay one
            escaped.discard(_PERCENT)
            joined = joined.replace(b"%", b"%25")
        space = _SPACE in escaped
        escaped.discard(_SPACE)
        for byte in escaped:   # escapes are "%" and hex digits: none is escaped again by a later pass
            joined = joined.replace(bytes((byte,)), _FORM_ESCAPES[byte])
        if space:   # last: a "+" in the text was escaped before spaces became "+"
            joined = joined.replace(b" ", b"+")
    return joined.replace(b"\0", b"=").replace(b"\n", b"&")


def _line(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("utf-8")


def _endpoint_headers(endpoint) -> bytes:
    """Authorization from ``basic-auth``, then ``headers`` as configured (config has refused names
    pfrest sets itself, and an Authorization header next to basic-auth)."""
    lines = b""
    if endpoint.basic_auth:
        lines += _line("Authorization", basic(*endpoint.basic_auth.split(":", 1)))
    for name, value in endpoint.headers:
        lines += _line(name, value)
    return lines


class Template:
    """Builds lookup and policy requests for one endpoint along ``route`` (see route.py)."""
    __slots__ = ("_lookup_start", "_lookup_rest", "_after_id", "_policy_head", "_policy_rest")

    def __init__(self, endpoint, user_agent: str, route):
        target = route.request_target.encode("ascii")
        head = _line("Host", route.target.host_header) + _line("User-Agent", user_agent) \
            + b"Accept: */*\r\n"
        if endpoint.auth_token:
            head += _line("X-Auth-Token", endpoint.auth_token)
        if route.proxy_authorization and not route.tunnel:  # a tunnelled request never shows it
            head += _line("Proxy-Authorization", route.proxy_authorization)
        head += b"Connection: keep-alive\r\nX-Request-Id: "
        after_id = b"\r\n" + _endpoint_headers(endpoint)
        self._lookup_start = b"GET " + target + (b"&" if b"?" in target else b"?")
        self._lookup_rest = b" HTTP/1.1\r\n" + head
        self._after_id = after_id
        self._policy_head = endpoint.method.encode("ascii") + b" " + target + b" HTTP/1.1\r\n" + head
        self._policy_rest = b"Content-Type: " + FORM_TYPE + b"\r\nContent-Length: "

    def lookup(self, params, request_id: str, auth: bytes = b"") -> bytes:
        """GET target?name=value&... for (str, bytes) params; ``auth``: a header line, or b""."""
        return b"".join((self._lookup_start, query(params).encode("ascii"), self._lookup_rest,
                         request_id.encode("ascii"), self._after_id, auth, b"\r\n"))

    def policy(self, pairs, request_id: str, auth: bytes = b"") -> bytes:
        """The policy attributes as a form body, with the endpoint's method (GET too, as before)."""
        body = form(pairs)
        return b"".join((self._policy_head, request_id.encode("ascii"), self._after_id, auth,
                         self._policy_rest, b"%d\r\n\r\n" % len(body), body))


def connect_request(route, user_agent: str) -> bytes:
    """The CONNECT request that opens a tunnel through the proxy to an https target."""
    authority = route.target.authority
    head = f"CONNECT {authority} HTTP/1.1\r\n".encode("ascii") + _line("Host", authority) \
        + _line("User-Agent", user_agent)
    if route.proxy_authorization:
        head += _line("Proxy-Authorization", route.proxy_authorization)
    return head + b"\r\n"
