"""`pfrest query`: every reply class against real backends (HTTP servers on 127.0.0.1:0, a TLS server
with a certificate nobody trusts, a closed port, a silent server), with its exit status, the status
class, the value or action as Postfix reads it, the exact reply bytes, and failures in plain words."""

import re
import ssl
import subprocess

import pytest

from conftest import ROOT, need_binary, pfrest_cmd, pfrest_env
from pfrest import config
from pfrest.commands import query
from postfix_instance import free_port
from rogue import Rogue, Scripted, response

PYTHON_WORDS = re.compile(r"\w+(Error|Exception)\b|Errno|Traceback|_ssl\.c")


@pytest.fixture
def backend(reset_backend):
    return reset_backend


@pytest.fixture
def ask(backend):
    """ask(mode, *words, **endpoint keys) -> (exit status, {field: value} of what query printed)."""
    def run(mode, *words, **extra):
        ep = dict({"name": "ep", "mode": mode, "target": backend.url + "/q"},
                  **{k.replace("_", "-"): v for k, v in extra.items()})
        printed = []
        status = query.run(config.parse({"endpoints": [ep]}), "ep", [w.encode() for w in words],
                           out=printed.append)
        assert not PYTHON_WORDS.search("\n".join(printed)), printed
        return status, dict(line.split(": ", 1) for line in printed)
    return run


@pytest.mark.parametrize("mode,answer,status,result,shown", [
    ("tcp-lookup", (200, ["a b", "c%"]), 0, "found", ("value", "a b,c%")),
    ("tcp-lookup", (404, b""), 1, "not found", ("reply", '"500 not%20found\\n"')),
    ("tcp-lookup", (200, []), 1, "not found", ("reply", '"500 not%20found\\n"')),
    ("tcp-lookup", (503, b""), 75, "temporary: backend error (HTTP 503)", None),
    # tcp_table has no permanent error: Postfix gets "400", a temporary one
    ("tcp-lookup", (403, b""), 75, "temporary: backend rejected the request (HTTP 403)", None),
    ("tcp-lookup", (200, ["a\r\nb"]), 75, "temporary: invalid backend data: value holds CR, LF or NUL", None),
    ("socketmap-lookup", (200, ["x@y"]), 0, "found", ("reply", '"6:OK x@y,"')),
    ("socketmap-lookup", (404, b""), 1, "not found", ("reply", '"9:NOTFOUND ,"')),
    ("socketmap-lookup", (403, b""), 69, "permanent: backend rejected the request (HTTP 403)", None),
    ("policy", (200, b"DUNNO"), 0, "action DUNNO", ("reply", '"action=DUNNO\\n\\n"')),
    ("policy", (200, b"REJECT not here"), 0, "action REJECT", ("action", "REJECT not here")),
    ("policy", (200, b"DEFER_IF_PERMIT later"), 75, "temporary: action DEFER_IF_PERMIT",
     ("action", "DEFER_IF_PERMIT later")),
    ("policy", (200, b"450 4.7.1 later"), 75, "temporary: action 4XX", ("action", "450 4.7.1 later")),
    ("policy", (500, b""), 75, "temporary: backend error (HTTP 500)", ("action", "DUNNO")),
    ("policy", (403, b""), 69, "permanent: backend rejected the request (HTTP 403)",
     ("action", "REJECT misconfigured")),
])
def test_every_reply_class(ask, backend, mode, answer, status, result, shown):
    backend.answers["k"] = answer
    words = ["recipient=k"] if mode == "policy" else ["k"]
    actions = {"temporary_error_action": "DUNNO", "permanent_error_action": "REJECT misconfigured"} \
        if mode == "policy" else {}
    got, printed = ask(mode, *words, **actions)
    assert (got, printed["result"], printed["backend"]) == (status, result, f"HTTP {answer[0]}")
    if shown:
        name, text = shown
        assert printed[name].startswith(text) and printed["reply"].startswith('"')
    if status in (69, 75) and mode != "policy":   # the reason Postfix logs, with the request id
        assert printed["reply"].endswith(f"(ref%20{printed['request id']})\\n\"") or \
            printed["reply"].endswith(f"(ref {printed['request id']}),\"")


def test_the_exact_bytes_are_escaped(ask, backend):
    backend.answers["k"] = (200, ["caf\u00e9 \u2603"])
    got, printed = ask("socketmap-lookup", "k")
    assert got == 0 and printed["value"] == "caf\u00e9 \u2603"
    assert printed["reply"] == '"12:OK caf\\xc3\\xa9 \\xe2\\x98\\x83,"'


def test_an_empty_key_makes_no_request(ask, backend):
    got, printed = ask("tcp-lookup", "")
    assert (got, printed["backend"], printed["result"]) == (1, "no request made", "not found")
    assert backend.requests == []


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    need_binary("openssl")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


def test_failures_in_plain_words(ask, certificate):
    closed = free_port()
    got, printed = ask("tcp-lookup", "k", target=f"http://127.0.0.1:{closed}/q")
    assert (got, printed["backend"]) == (75, f"connection refused by 127.0.0.1:{closed}")
    assert printed["result"] == "temporary: backend refused the connection"

    silent = Rogue()
    try:
        got, printed = ask("socketmap-lookup", "silent", target=silent.url, request_timeout=300)
        assert (got, printed["backend"]) == (75, f"no answer within 0.3 s from 127.0.0.1:{silent.port}")
        assert printed["reply"].startswith('"') and ":TIMEOUT backend timed out (ref " in printed["reply"]
        got, printed = ask("tcp-lookup", "garbage", target=silent.url)
        assert got == 75 and printed["backend"].startswith(
            f"answer from 127.0.0.1:{silent.port} is not HTTP as it should be: malformed response")
    finally:
        silent.stop()

    cert, key = certificate
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = Scripted(lambda request: response(200, b'["secure"]'), tls=tls)
    try:
        got, printed = ask("tcp-lookup", "k", target=server.url)
        assert (got, printed["backend"]) == (
            75, f"TLS certificate not trusted: self-signed certificate (127.0.0.1:{server.port})")
        got, printed = ask("tcp-lookup", "k", target=server.url, ca_file=cert)   # the same, trusted
        assert (got, printed["value"]) == (0, "secure")
    finally:
        server.stop()

    got, printed = ask("tcp-lookup", "k", target="http://no-such-host.invalid/q")
    assert got == 75 and printed["backend"].startswith("host name no-such-host.invalid does not resolve (")


def test_exit_statuses_of_the_command(backend, write_config):
    backend.answers["k"] = (403, b"")
    path = write_config([{"name": "s", "mode": "socketmap-lookup", "target": backend.url + "/s"}])
    proc = subprocess.run(pfrest_cmd("query", "-c", path, "s", "k"), capture_output=True, text=True,
                          env=pfrest_env(), cwd=ROOT, timeout=30)
    assert proc.returncode == 69 and "result: permanent: backend rejected the request (HTTP 403)\n" in proc.stdout
    assert proc.stderr == ""


def test_the_url_is_printed_whole_for_curl(ask, backend):
    """The lookup's query string is part of the URL printed (pasteable into curl); the token is not."""
    backend.answers["a b@x"] = (200, ["v"])
    got, printed = ask("tcp-lookup", "a b@x", auth_token="s3cret-token")
    assert got == 0 and printed["endpoint"] == f"ep (tcp-lookup) -> GET {backend.url}/q?key=a%20b%40x"
    assert printed["auth-token"] == "(set, redacted)" and "s3cret" not in str(printed)
    backend.answers["k"] = (200, ["v"])
    got, printed = ask("socketmap-lookup", "k", target=backend.url + "/q?v=1")
    assert got == 0 and printed["endpoint"] == f"ep (socketmap-lookup) -> GET {backend.url}/q?v=1&name=ep&key=k"
    got, printed = ask("policy", "recipient=k")
    assert printed["endpoint"] == f"ep (policy) -> GET {backend.url}/q"   # the attributes: the body


def test_a_malformed_answer_shows_its_type_and_start(ask, backend):
    backend.answers["k"] = (200, b"<html><body>Welcome to nginx!\n</body></html>",
                              {"Content-Type": "text/html"})
    got, printed = ask("tcp-lookup", "k")
    assert got == 75 and printed["result"] == "temporary: invalid backend data: not a JSON array of strings"
    assert printed["answer"] == 'Content-Type text/html, body "<html><body>Welcome to nginx!\\n</body></html>"'


def test_a_bad_policy_attribute_is_shown_as_text(write_config, backend):
    path = write_config([{"name": "p", "mode": "policy", "target": backend.url + "/p"}])
    proc = subprocess.run(pfrest_cmd("query", "-c", path, "p", "caf\u00e9"), capture_output=True, text=True,
                          env=pfrest_env(), cwd=ROOT, timeout=30)
    assert proc.returncode != 0 and "policy attributes are name=value, not 'caf\u00e9'" in proc.stderr, proc.stderr
    assert "b'" not in proc.stderr


def test_https_to_a_plain_http_port_says_so(ask, backend):
    got, printed = ask("tcp-lookup", "k", target=backend.url.replace("http://", "https://") + "/q")
    port = backend.url.rsplit(":", 1)[1]
    assert got == 75 and printed["backend"] == (
        f"TLS with 127.0.0.1:{port} failed: that port speaks plain HTTP, not TLS: use an http:// target, or "
        "the port that speaks TLS")
