"""Secrets and trust: the auth token never shows (logs, replies, tracebacks, `query`, config errors), and
nothing a backend answers can add lines to the Postfix protocol (response splitting), over `pfrest handle`
and `pfrest serve` alike."""

import re
import time

import pytest

import hostile
from pfrest import config
from postfix_instance import free_port

TOKEN = "s3cr3t-T0KEN-value"


def problems(raw_endpoint):
    with pytest.raises(config.ConfigError) as info:
        config.parse({"endpoints": [dict({"name": "a", "mode": "tcp-lookup", "target": "http://h/"},
                                         **raw_endpoint)]})
    return info.value.problems


@pytest.mark.parametrize("token", [" " + TOKEN, TOKEN + " ", TOKEN + "\t", "caf\u00e9-" + TOKEN, "", "\x7f" + TOKEN])
def test_a_token_no_http_library_would_send_is_refused_without_showing_it(token):
    """requests quotes a header value it refuses in its exception text, which would reach the log."""
    found = problems({"auth-token": token})
    assert found == ["endpoints[0] (a).auth-token: must be printable ASCII without leading or trailing white space"]


def test_credentials_in_the_target_are_refused_without_showing_them():
    found = problems({"target": f"http://user:{TOKEN}@127.0.0.1:8080/lookup"})
    assert len(found) == 1 and found[0].startswith("endpoints[0] (a).target: must not hold user:password@")
    assert TOKEN not in found[0]
    ok = config.parse({"endpoints": [{"name": "a", "mode": "tcp-lookup", "target": "http://h/x?a=b@c",
                                      "auth-token": "a b~c", "partial-request-timeout": 1.5}]})
    assert ok.endpoints[0].partial_limit == 1.5 and ok.endpoints[0].auth_token == "a b~c"


# --- the token in what pfrest writes ------------------------------------------------------------

def echo_token(request):
    """A backend that puts the token it was sent where pfrest might show it."""
    token = request.headers.get("x-auth-token", "")
    return 302, f"token {token}", {"Location": f"http://elsewhere.example/?t={token}"}


def test_token_echoed_by_the_backend_is_redacted_in_log_and_replies(backend, write_config, handle):
    backend.answers["echo"] = echo_token
    backend.answers["err"] = lambda request: (500, request.headers.get("x-auth-token", ""), {})
    path = write_config([{"name": "t", "mode": "tcp-lookup", "target": backend.url + "/l", "auth-token": TOKEN}])
    out = handle(path, "t", b"get echo\nget err\n")
    assert backend.requests[0].headers["x-auth-token"] == TOKEN  # it was sent, to the target only
    assert out.count(b"\n") == 2 and out.startswith(b"400 backend%20redirected%20(HTTP%20302)")
    assert TOKEN.encode() not in out
    assert "location=http://elsewhere.example/?t=(redacted)" in handle.log and TOKEN not in handle.log


@pytest.fixture
def pfrest_logging(tmp_path):
    """pfrest's own foreground logging to a file, as `serve --log-file` sets it up; undone afterwards."""
    import logging
    from pfrest import log
    logger = logging.getLogger("pfrest")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    path = tmp_path / "pfrest.log"
    log.for_foreground(log_file=str(path))
    yield path
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:], logger.level, logger.propagate = saved


def test_token_in_an_internal_error_traceback_is_redacted(pfrest_logging):
    import asyncio
    from pfrest.conversation.services import Service

    class Broken:
        async def lookup(self, params, request_id):
            raise RuntimeError(f"cannot use header X-Auth-Token: {TOKEN}")
    ep = config.parse({"endpoints": [{"name": "t", "mode": "tcp-lookup", "target": "http://127.0.0.1:9/",
                                      "auth-token": TOKEN}]}).endpoints[0]
    result, answer = asyncio.run(Service(ep, "ua", backend=Broken()).answer(b"k", "0123456789abcdef"))
    assert answer.reply == b"400 internal%20error%20(ref%200123456789abcdef)\n"
    text = pfrest_logging.read_text()
    assert "Traceback" in text and "RuntimeError: cannot use header X-Auth-Token: (redacted)" in text
    assert TOKEN not in text


def test_query_never_shows_the_token(backend, write_config, capsys):
    from pfrest.commands import query
    from pfrest.protocol.verdict import Failure
    backend.answers["echo"] = echo_token
    path = write_config([{"name": "t", "mode": "tcp-lookup", "target": backend.url + "/l", "auth-token": TOKEN,
                          "proxy": f"http://user:{TOKEN}x@127.0.0.1:9"}])
    cfg = config.load(path)
    lines = []
    assert query.run(cfg, "t", [b"echo"], out=lines.append) == 75  # through the (refusing) proxy: EX_TEMPFAIL
    assert "auth-token: (set, redacted)" in lines

    class Leaky:  # whatever an HTTP library might quote in its exception text
        async def lookup(self, params, request_id):
            return Failure("internal", f"header X-Auth-Token: {TOKEN} refused")

        def close(self):
            pass
    query.run(cfg, "t", [b"k"], out=lines.append, backend=Leaky())
    assert "backend: internal error in pfrest: header X-Auth-Token: (redacted) refused" in lines
    assert not any(TOKEN in line for line in lines)
    assert TOKEN not in capsys.readouterr().err


# --- response splitting: nothing the backend says adds a line to the Postfix protocol ----------------

REF = rb" \(ref [0-9a-f]{16}\)"
TCP_REF = REF.replace(b" ", b"%20")
BAD_DATA = rb"invalid backend data: value holds CR, LF or NUL"
# lookup key -> (backend's JSON values, tcp reply regex, socketmap reply regex)
SPLIT_LOOKUPS = {
    "lf": (["a\nb"], b"400 " + BAD_DATA.replace(b" ", b"%20") + TCP_REF + b"\n",
           rb"\d+:TEMP " + BAD_DATA + REF + b","),
    "crlf-line": (["x\r\n200 y"], None, None),  # the same as lf
    "second-value": (["a", "b\n500 c"], None, None),
    "nul": (["a\0b"], None, None),
    "encoded-lf": (["a%0Ab"], rb"200 a%250Ab\n", rb"8:OK a%0Ab,"),
    "netstring": (["3:abc,"], rb"200 3:abc,\n", rb"9:OK 3:abc,,"),
    "unicode-separators": (["a\u2028b\u0085c"], rb"200 a%E2%80%A8b%C2%85c\n",
                           "11:OK a\u2028b\u0085c,".encode()),
}
TEMPORARY = rb"action=DEFER_IF_PERMIT Policy service temporarily unavailable" + REF + rb"\n\n"
# policy recipient -> (backend's body, reply regex)
SPLIT_ACTIONS = {
    "two-replies@x": (b"OK x\n\naction=OK", TEMPORARY),
    "second-line@x": (b"DUNNO\naction=REJECT", TEMPORARY),
    "action-prefix@x": (b"action=OK\n\naction=REJECT", TEMPORARY),
    "cr@x": (b"OK x\rREJECT", TEMPORARY),
    "nul@x": (b"REJECT \0", TEMPORARY),
    "header@x": (b"PREPEND X-Spam: no\nX-Other: yes", TEMPORARY),
    "trailing-crlf@x": (b"OK fine\r\n", rb"action=OK fine\n\n"),
}


def split_cases():
    """{mode: (requests, [reply regex per request])}, each ending with a good request, to prove the
    stream is still in step."""
    keys = list(SPLIT_LOOKUPS)
    tcp = [SPLIT_LOOKUPS[k][1] or SPLIT_LOOKUPS["lf"][1] for k in keys] + [rb"200 v\n"]
    sm = [SPLIT_LOOKUPS[k][2] or SPLIT_LOOKUPS["lf"][2] for k in keys] + [rb"4:OK v,"]
    recipients = list(SPLIT_ACTIONS)
    return {
        hostile.TCP: (b"".join(b"get %s\n" % k.encode() for k in keys + ["k"]), tcp),
        hostile.SOCKETMAP: (b"".join(hostile.netstring(b"map " + k.encode()) for k in keys + ["k"]), sm),
        hostile.POLICY: (b"".join(hostile.policy_request(r.encode()) for r in recipients + ["good@example.com"]),
                         [SPLIT_ACTIONS[r][1] for r in recipients] + [rb"action=OK fine\n\n"]),
    }


def split_backend(backend):
    backend.answers.update(hostile.ANSWERS)
    backend.answers.update({k: (200, values) for k, (values, _, _) in SPLIT_LOOKUPS.items()})
    backend.answers.update({r: (200, body, {}) for r, (body, _) in SPLIT_ACTIONS.items()})


def split_pattern(expected):
    return re.compile(b"".join(b"(" + regex + b")" for regex in expected), re.S)


def check_split(out, expected):
    assert split_pattern(expected).fullmatch(out), out


def test_response_splitting_over_handle(backend, write_config, handle):
    split_backend(backend)
    path = write_config(hostile.endpoints(backend.url + "/l"))
    for mode, (requests, expected) in split_cases().items():
        check_split(handle(path, mode.split("-")[0], requests), expected)


def test_response_splitting_over_serve(backend, write_config, tmp_path):
    split_backend(backend)
    endpoints = hostile.endpoints(backend.url + "/l")
    for ep in endpoints:
        ep["bind-port"] = free_port()
    proc = hostile.ServeProcess(write_config(endpoints), str(tmp_path / "serve.log"))
    try:
        for ep in endpoints:
            requests, expected = split_cases()[ep["mode"]]
            peer = hostile.SocketPeer(("127.0.0.1", ep["bind-port"]))
            peer.send(requests)
            out, pattern, deadline = b"", split_pattern(expected), time.monotonic() + 10
            while not pattern.fullmatch(out) and time.monotonic() < deadline:
                out += hostile.read_exactly(peer, 1, 1)
            out += hostile.read_exactly(peer, 1, 0.3)  # and never anything more
            peer.close()
            check_split(out, expected)
    finally:
        assert proc.stop() == 0
