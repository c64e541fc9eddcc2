"""``pfrest query``: one real backend call, shown as the exact bytes Postfix would receive."""

import logging
import time

from pfrest import config
from pfrest.log import redact
from pfrest.protocol.verdict import Failure
from pfrest.server import eventloop, requestlog
from pfrest.backend.request import new_request_id
from pfrest.server.services import Service

logger = logging.getLogger("pfrest")

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
            raise ValueError(f"policy attributes are name=value, not {arg!r}")
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


def run(cfg, name, words, mapname=None, out=print, backend=None) -> int:
    """words: the KEY or attr=value arguments, as bytes.  ``backend``: instead of the endpoint's HTTP
    client (a test's)."""
    endpoint = cfg.endpoint(name)
    request = build_request(endpoint, words, mapname)
    service = Service(endpoint, cfg.user_agent, backend=backend)
    result, answer, request_id, ms = eventloop.run(ask(service, request), fast=False)
    logger.info("%s", requestlog.line(endpoint.name, request_id, service.mode.subject(request), result,
                                      answer, ms))
    method = endpoint.method if endpoint.mode == config.POLICY else "GET"
    out(f"endpoint: {endpoint.name} ({endpoint.mode}) -> {method} {endpoint.target}")
    out(f"auth-token: {'(set, redacted)' if endpoint.auth_token else '(none)'}")
    if result is None:
        out("http: (no request made)")
    elif isinstance(result, Failure):
        out(f"http: failed ({result.kind}): {redact(result.detail)}")  # exception texts quote anything
    else:
        out(f"http: {result.status}")
    out(f"time: {ms:.1f} ms")
    out(f"reply: {answer.reply!r}")
    return 0


async def ask(service, request):
    """(result, answer, request id, ms) of one request, as a conversation would answer it."""
    request_id, started = new_request_id(), time.monotonic()
    try:
        result, answer = await service.answer(request, request_id)
    finally:
        service.close()
    return result, answer, request_id, (time.monotonic() - started) * 1000
