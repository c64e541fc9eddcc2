"""``pfrest query``: one real backend call, shown as Postfix will read it, with an exit status a script
can test.

What is printed: the endpoint and the URL asked (a lookup's with its query, for curl), with ``oauth2``
the token step (``token: fetched from URL, expires in 3599 s``, or why none could be had), with
``tracing`` the ``traceparent`` sent, the backend's
HTTP status or, when no answer came, what went wrong in plain words (``connection refused by
127.0.0.1:8080``, ``no answer within 2 s``, ``TLS certificate not trusted``), the status class (found,
not found, temporary, permanent; a policy action's class), for a malformed answer its Content-Type and
the start of its body, the decoded value or the policy action, and the exact reply bytes, escaped.

A ``dovecot-sasl`` endpoint takes one USER; the password is read from stdin when it is not a terminal,
else asked for without echo (``read_password``), never taken from the command line, where every user's
``ps`` would show it.  The login goes through the same decoder as Postfix's (AUTH PLAIN with its initial
response, or LOGIN's rounds), so that what it refuses unasked (an empty password) is refused here too;
what is printed names the fields sent, never the password, and what smtpd would answer the SMTP client.

The exit status (``postmap -q`` gives 0 and 1 the same meanings; the others are sysexits.h's):

    0   found; for a policy, an action that is not a deferral (REJECT too: the backend decided);
        authenticated (dovecot-sasl)
    1   not found; rejected (dovecot-sasl: bad credentials, smtpd answers 535)
    75  EX_TEMPFAIL: a temporary failure, or a policy action that defers the mail; for dovecot-sasl
        the connection closed, smtpd answers 454
    69  EX_UNAVAILABLE: a permanent failure (the backend refused the request: 4xx), for socketmap
        and policy endpoints; a tcp table has no permanent error, Postfix gets a temporary one
    78  EX_CONFIG: the config is invalid or has no such endpoint (cli.py)
"""

import contextlib
import os
import re
import sys
import time
from base64 import b64encode
from typing import NamedTuple
from urllib.parse import urlsplit

from pfrest import config, tracing
from pfrest.backend.client import Client
from pfrest.backend.errors import PLAIN_HTTP_HINT
from pfrest.backend.request import new_request_id, query as query_string
from pfrest.conversation.services import Service
from pfrest.ops.counters import reply_class
from pfrest.log import redact
from pfrest.protocol import dovecotauth, verdict
from pfrest.protocol.answers import printable
from pfrest.protocol.framing import Close, Reject
from pfrest.protocol.verdict import Failure, HttpResult
from pfrest.system import eventloop

FOUND, NOT_FOUND, TEMPORARY, PERMANENT = "found", "not found", "temporary", "permanent"
AUTHENTICATED, REJECTED = "authenticated", "rejected"
EXIT_STATUS = {FOUND: 0, NOT_FOUND: 1, TEMPORARY: os.EX_TEMPFAIL, PERMANENT: os.EX_UNAVAILABLE,
               AUTHENTICATED: 0, REJECTED: 1}
# What smtpd answers the SMTP client for each (smtpd_sasl_glue.c; the text after 454/535 is its own).
SMTPD_SAYS = {AUTHENTICATED: "235 2.7.0 Authentication successful",
              REJECTED: "535 5.7.8 Error: authentication failed",
              TEMPORARY: "454 4.7.0 Temporary authentication failure (the connection was closed: smtpd "
                         "reconnects for the next login)"}
# Policy actions that defer the mail (smtpd answers 4xx), besides numeric 4NN replies.
DEFERRALS = frozenset({"DEFER", "DEFER_IF_PERMIT", "DEFER_IF_REJECT"})
DEFAULT_PORTS = {"http": 80, "https": 443}

# What Python puts into the failure details the backend collects from exceptions, for the log:
# class names ("ConnectionRefusedError: "), errno and OpenSSL tags, the C source line.
_PYTHON_NOISE = re.compile(r"\b[A-Za-z_][\w.]*(?:Error|Exception|error): |\[Errno -?\d+\] |\[SSL: \w+\] "
                           r"| ?\(_ssl\.c:\d+\)")
EXCERPT = 120   # bytes of a malformed answer's body shown
_CERTIFICATE = re.compile(r"certificate verify failed:?\s*(.*)", re.IGNORECASE)

# What Postfix 3.7+ always sends, in its order; values given on the command line replace these.
POLICY_DEFAULTS = (
    ("request", "smtpd_access_policy"), ("protocol_state", "RCPT"), ("protocol_name", "ESMTP"),
    ("client_address", "127.0.0.1"), ("client_name", "localhost"), ("client_port", "12345"),
    ("reverse_client_name", "localhost"), ("server_address", "127.0.0.1"), ("server_port", "25"),
    ("helo_name", "client.example"), ("sender", "sender@example.com"),
    ("recipient", "recipient@example.com"), ("recipient_count", "0"), ("queue_id", ""),
    ("instance", "1.2.3.4"), ("size", "0"), ("etrn_domain", ""), ("stress", ""),
    ("sasl_method", ""), ("sasl_username", ""), ("sasl_sender", ""), ("ccert_subject", ""),
    ("ccert_issuer", ""), ("ccert_fingerprint", ""), ("ccert_pubkey_fingerprint", ""),
    ("encryption_protocol", ""), ("encryption_cipher", ""), ("encryption_keysize", "0"),
    ("policy_context", ""),
)


def policy_attributes(args):
    """name=value arguments merged into the defaults; unknown names are appended in order."""
    attrs = [(n.encode(), v.encode()) for n, v in POLICY_DEFAULTS]
    index = {n: i for i, (n, _) in enumerate(attrs)}
    for arg in args:
        name, sep, value = arg.partition(b"=")
        if not sep or not name:
            raise ValueError(f"policy attributes are name=value, not {arg.decode('utf-8', 'backslashreplace')!r}")
        if name in index:
            attrs[index[name]] = (name, value)
        else:
            index[name] = len(attrs)
            attrs.append((name, value))
    return attrs


def build_request(endpoint, words, mapname):
    if endpoint.mode == config.TCP:
        if len(words) != 1:
            raise ValueError("tcp-lookup endpoints take exactly one KEY")
        return words[0]
    if endpoint.mode == config.SOCKETMAP:
        if len(words) != 1:
            raise ValueError("socketmap-lookup endpoints take exactly one KEY")
        return (mapname or endpoint.name).encode(), words[0]
    return policy_attributes(words)


def run(cfg, name, words, mapname=None, out=print, backend=None, password=None) -> int:
    """words: the KEY or attr=value arguments, or the USER, as bytes; ``password``: for a dovecot-sasl
    endpoint (bytes).  ``backend``: instead of the endpoint's HTTP client (a test's).  Returns the exit
    status."""
    endpoint = cfg.endpoint(name)
    backend = backend or http_client(endpoint, cfg.user_agent)
    bearer = getattr(backend, "bearer", None)
    if endpoint.mode == config.SASL:
        with traced(cfg):
            return run_login(endpoint, cfg.user_agent, words, password, out, backend, bearer)
    request = build_request(endpoint, words, mapname)
    service = Service(endpoint, cfg.user_agent, backend=backend)
    with traced(cfg):
        result, answer, request_id, ms = eventloop.run(ask(service, request), fast=False)
    status = status_class(endpoint, answer)
    method = endpoint.method if endpoint.mode == config.POLICY else "GET"
    out(f"endpoint: {endpoint.name} ({endpoint.mode}) -> {method} {redact(url(service, request))}")
    out(f"auth-token: {'(set, redacted)' if endpoint.auth_token else '(none)'}")
    if bearer is not None:
        out(f"token: {token_words(bearer, result)}")
    out(f"request id: {request_id}")
    if cfg.tracing is not None:
        sent = tracing.last_sent and tracing.last_sent.split("\r\n")[0].partition(": ")[2]
        out(f"traceparent: {sent or '(none sent)'}")
    out(f"backend: {backend_words(result, endpoint)}")
    out(f"time: {ms:.1f} ms")
    v = answer.verdict
    out(f"result: {result_words(status, answer)}")
    if v.is_error and isinstance(result, HttpResult) and result.status == 200:   # not as the contract says
        out(f"answer: {answer_words(result)}")
    if answer.action is not None:
        action = answer.action.encode()
        out(f"action: {printable(action, len(action))}")
    elif v.kind == verdict.FOUND:
        out(f"value: {printable(v.value, len(v.value))}")
    out(f"reply: {escaped(answer.reply)}")
    return EXIT_STATUS[status]


def http_client(endpoint, user_agent):
    """The backend itself, past any cache (the answer as it is now), with the endpoint's oauth2 token as
    serve sends it."""
    bearer = None
    if endpoint.oauth2 is not None:
        from pfrest.identity import bearer_for   # only for an endpoint with oauth2
        bearer = bearer_for(endpoint, user_agent)
    return Client(endpoint, user_agent, bearer=bearer)


@contextlib.contextmanager
def traced(cfg):
    """The query's spans, with ``tracing``: sent when it ends."""
    tracing.configure(cfg.tracing)
    try:
        yield
    finally:
        tracing.shutdown()


def run_login(endpoint, user_agent, words, password, out, backend, bearer=None) -> int:
    """``pfrest query`` of a dovecot-sasl endpoint: one login, as smtpd would send it."""
    if len(words) != 1:
        raise ValueError("dovecot-sasl endpoints take exactly one USER; the password is read from stdin, "
                         "or asked for on a terminal, never taken from the command line")
    if password is None:
        raise ValueError("no password given")
    service = Service(endpoint, user_agent, backend=backend)
    request = login_request(endpoint.mechanisms, words[0], password)
    if isinstance(request, dovecotauth.Login):
        result, answer, request_id, ms = eventloop.run(ask(service, request), fast=False)
        fields = " ".join(f"{name.decode()}={printable(value)}" for name, value in request.form()
                          if name != b"password")
    else:   # refused by the decoder, as smtpd's login would be, before any backend request
        service.close()
        result, answer, request_id, ms = None, request, new_request_id(), 0.0
        fields = "(none: no request made)"
    out(f"endpoint: {endpoint.name} ({endpoint.mode}) -> POST {redact(endpoint.target)}")
    out(f"auth-token: {'(set, redacted)' if endpoint.auth_token else '(none)'}")
    if bearer is not None:
        out(f"token: {token_words(bearer, result)}")
    out(f"request id: {request_id}")
    out(f"fields: {fields}" + (" password=(not shown)" if result is not None else ""))
    out(f"backend: {backend_words(result, endpoint)}")
    out(f"time: {ms:.1f} ms")
    status = login_class(answer)
    v = answer.verdict
    out(f"result: {status}: {v.value}" if v.is_error else
        f"result: {status}" + (f": {answer.why}" if result is None else ""))
    if status == AUTHENTICATED:
        out(f"user: {printable(v.value, len(v.value))}")
    if v.is_error and isinstance(result, HttpResult) and result.status == 200:   # not as the contract says
        out(f"answer: {answer_words(result)}")
    out(f"reply: {escaped(answer.reply)}" if answer.reply else "reply: (none: the connection is closed)")
    out(f"smtpd: {SMTPD_SAYS[status]}")
    return EXIT_STATUS[status]


class Refused(NamedTuple):
    """A login the decoder refused unasked (as an Answer: its reply and verdict), and why."""
    reply: bytes
    verdict: verdict.Verdict
    why: str
    close: bool = False


def login_request(mechanisms, user: bytes, password: bytes):
    """What smtpd's login gives pfrest's decoder: a dovecotauth.Login to ask the backend about, or a
    Refused.  PLAIN with an initial response when the endpoint offers it (smtpd's usual), else LOGIN's
    two rounds."""
    decoder = dovecotauth.Decoder(mechanisms)
    auth = b"AUTH\t1\t%s\tservice=smtp\tnologin\tlip=127.0.0.1\trip=127.0.0.1"
    if "PLAIN" in decoder.mechanisms:
        items = decoder.feed(b"VERSION\t1\t2\nCPID\t1\n" + auth % b"PLAIN" + b"\tresp="
                             + b64encode(b"\0" + user + b"\0" + password) + b"\n")
    else:
        items = decoder.feed(b"VERSION\t1\t2\nCPID\t1\n" + auth % b"LOGIN" + b"\n")
        for answer in (user, password):
            items += decoder.feed(b"CONT\t1\t" + (b64encode(answer) or b"=") + b"\n")
    for item in items:
        if isinstance(item, dovecotauth.Login):
            return item
        if isinstance(item, (Reject, Close)):
            return Refused(getattr(item, "reply", b""), verdict.Verdict(verdict.REJECTED, "refused"), item.why)
    raise AssertionError(f"no login from the decoder: {items!r}")   # not reached: it answers every AUTH


def login_class(answer) -> str:
    kind = answer.verdict.kind
    return AUTHENTICATED if kind == verdict.AUTHENTICATED else REJECTED if kind == verdict.REJECTED \
        else TEMPORARY


def read_password(user: str, stdin=None) -> bytes:
    """The password for ``pfrest query`` of a dovecot-sasl endpoint: the first line of stdin when it
    is not a terminal (``printf '%s\\n' "$PW" | pfrest query ...``), else asked for without echo."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        import getpass
        return os.fsencode(getpass.getpass(f"password for {user}: "))
    line = stdin.buffer.readline(dovecotauth.MAX_SECRET + 2)
    return line[:-1] if line.endswith(b"\n") else line


def url(service, request) -> str:
    """The target with the lookup's query (``?key=``, ``name=``), pasteable into curl; a policy's
    attributes go in the body."""
    target = service.endpoint.target
    call = service.mode.call(request)
    if call is None or call.kind != "lookup":
        return target
    return target + ("&" if "?" in target else "?") + query_string(call.params)


def token_words(bearer, result) -> str:
    """The oauth2 step: where the token came from and how long it lives, or why there is none."""
    left = bearer.expires_in()
    if left is not None:
        return f"{bearer.origin}, expires in {left:.0f} s"
    if isinstance(result, Failure) and result.kind == "token":
        return f"none could be had: {redact(result.detail)}"
    return "none"


def result_words(status: str, answer) -> str:
    """The status class, with the error's reason, or for a policy the action's class: a REJECT is the
    backend's decision (exit 0), not a lookup "found"."""
    v = answer.verdict
    if v.is_error:
        return f"{status}: {v.value}"
    if answer.action is not None:
        kind = reply_class(v.kind, answer.action)
        return f"{status}: action {kind}" if status == TEMPORARY else f"action {kind}"
    return status


def answer_words(result) -> str:
    """An answer that is not what the contract says: its Content-Type and the start of its body."""
    body = result.body[:EXCERPT]
    more = f" ({len(result.body)} bytes)" if len(result.body) > EXCERPT else ""
    kind = printable(result.content_type, EXCERPT) if result.content_type else "(none)"
    return f"Content-Type {kind}, body {escaped(body)}{more}"


def status_class(endpoint, answer) -> str:
    """found, not found, temporary or permanent: what the answer means to Postfix.  A policy endpoint's
    error is its backend's failure, whatever error action stands in for it; tcp_table knows no
    permanent error (a 4xx from the backend goes to Postfix as ``400``, temporary)."""
    kind = answer.verdict.kind
    if kind == verdict.FOUND:
        return FOUND
    if kind == verdict.NOTFOUND:
        return NOT_FOUND
    if kind == verdict.ACTION:
        return TEMPORARY if defers(answer.action) else FOUND
    return PERMANENT if kind == verdict.PERM and endpoint.mode != config.TCP else TEMPORARY


def defers(action: str) -> bool:
    word = action.split(None, 1)[0].upper()
    return word in DEFERRALS or (word.isdigit() and word.startswith("4"))


def backend_words(result, endpoint) -> str:
    if result is None:
        return "no request made"
    if isinstance(result, HttpResult):   # never from a cache: a query asks the backend itself
        return f"HTTP {result.status}"
    return failure_words(result, endpoint)


def failure_words(failure: Failure, endpoint) -> str:
    """What went wrong, in plain words, from the failure's kind (its detail is for the log, and
    quotes exception class names)."""
    peer = _peer(failure.detail, endpoint)
    raw = failure.detail.replace(f"{peer}: ", "", 1)
    detail = redact(_PYTHON_NOISE.sub("", raw)).strip()
    own_words = _PYTHON_NOISE.search(raw) is None   # pfrest's words (a proxy's refusal), not an exception's
    kind = failure.kind
    if kind == "timeout":
        return f"no answer within {endpoint.timeout:g} s from {peer}"
    if kind == "refused":
        return f"connection refused by {peer}" + (f" ({detail})" if own_words and detail else "")
    if kind == "dns":
        return f"host name {peer.rpartition(':')[0].strip('[]')} does not resolve ({detail})"
    if kind == "tls":
        if PLAIN_HTTP_HINT in detail:
            return f"TLS with {peer} failed: {PLAIN_HTTP_HINT}"
        certificate = _CERTIFICATE.search(detail)
        if certificate:
            return f"TLS certificate not trusted: {certificate.group(1) or 'verification failed'} ({peer})"
        return f"TLS with {peer} failed: {detail}"
    if kind == "reset":
        return f"connection to {peer} failed: {detail}"
    if kind == "too-large":
        return f"answer from {peer} too large: {detail}"
    if kind == "protocol":
        return f"answer from {peer} is not HTTP as it should be: {detail}"
    if kind == "token":
        return f"not asked: no bearer token ({redact(failure.detail)})"
    return f"internal error in pfrest: {detail}"


def _peer(detail: str, endpoint) -> str:
    """``host:port`` of the first hop (the proxy, if any) of the target the failure is about: the one
    the detail names, else the first."""
    hops = [_authority(endpoint.proxy or target) for target in endpoint.targets]
    return next((hop for hop in hops if hop in detail), hops[0])


def _authority(url: str) -> str:
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port or DEFAULT_PORTS[parts.scheme]}"


def escaped(data: bytes) -> str:
    """The bytes in double quotes, C-style: printable ASCII as is, \\n \\r \\t, \\xHH for the rest."""
    special = {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x22: '\\"', 0x5C: "\\\\"}
    return '"' + "".join(special.get(b) or (chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}")
                         for b in data) + '"'


async def ask(service, request):
    """(result, answer, request id, ms) of one request, as a conversation would answer it."""
    request_id, started = new_request_id(), time.monotonic()
    try:
        result, answer = await service.answer(request, request_id)
    finally:
        service.close()
    return result, answer, request_id, (time.monotonic() - started) * 1000
