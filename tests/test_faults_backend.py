"""Fault injection on the backend side, through real `pfrest handle` processes: every misbehaviour
ends in a temporary answer (or the right answer), never a wrong found / not found / permanent error,
and every request gets exactly one reply in time."""

import re
import subprocess
import time

import pytest

from conftest import ROOT, pfrest_cmd, pfrest_env
from pfrest.commands import minihttp
from pfrest.protocol import netstring
from rogue import Rogue

# behaviour -> expected kind: FOUND, NOTFOUND, TEMP, TIMEOUT, PERM
BEHAVIOURS = {
    "found": "FOUND", "unknown": "NOTFOUND",
    "reset": "TEMP", "close-early": "TEMP", "no-answer-close": "TEMP", "garbage": "TEMP",
    "status-99": "TEMP",
    "silent": "TIMEOUT", "slow": "TIMEOUT", "drip": "TIMEOUT", "drip-headers": "TIMEOUT",
    "length-lie": "TIMEOUT",
    "redirect": "TEMP", "redirect-same": "TEMP",
    "interim": "FOUND", "no-content": "TEMP", "partial": "TEMP", "status-600": "TEMP", "teapot": "PERM",
    "gzip": "FOUND", "chunked": "FOUND", "text-plain": "FOUND",
    "gzip-bomb": "TEMP", "bad-gzip": "TEMP", "huge": "TEMP", "huge-chunked": "TEMP",
    "html": "TEMP", "object": "TEMP", "nested": "TEMP", "numbers": "TEMP", "deep": "TEMP",
    "bad-utf8": "TEMP", "surrogate": "TEMP", "crlf": "TEMP", "nul": "TEMP",
}
TIMEOUT_MS = 1000  # generous: a loaded CI machine must not turn a TEMP row into a timeout


def tcp_kind(line):
    code = line[:4]
    if code == b"200 ":
        return "FOUND"
    if code == b"500 ":
        return "NOTFOUND"
    if code == b"400 ":
        return "TIMEOUT" if b"timed%20out" in line else "TEMP"
    return "BAD"


def socketmap_kind(payload):
    word = payload.split(b" ", 1)[0]
    return {b"OK": "FOUND", b"NOTFOUND": "NOTFOUND", b"TEMP": "TEMP", b"TIMEOUT": "TIMEOUT",
            b"PERM": "PERM"}.get(word, "BAD")


@pytest.fixture
def rogue():
    r = Rogue()
    second = Rogue("127.0.0.2")  # where redirects (and environment proxies) point: never contacted
    r.redirect_to = second.url + "/steal"
    yield r, second
    r.stop()
    second.stop()


def run_handle(config_path, data, env=None, timeout=60):
    start = time.monotonic()
    proc = subprocess.run(pfrest_cmd("handle", "-c", config_path, "ep"), input=data,
                          capture_output=True, timeout=timeout, env=env or pfrest_env(), cwd=ROOT)
    assert proc.stderr == b""
    return proc.stdout, time.monotonic() - start


def config_for(write_config, url, mode, **extra):
    ep = {"name": "ep", "mode": mode, "target": url + "/api", "auth-token": "SECRET-TOKEN",
          "request-timeout": TIMEOUT_MS}
    ep.update(extra)
    return write_config([ep])


def test_tcp_faults(rogue, write_config):
    r, second = rogue
    keys = list(BEHAVIOURS)
    out, elapsed = run_handle(config_for(write_config, r.url, "tcp-lookup"),
                              b"".join(b"get %s\n" % k.encode() for k in keys))
    lines = out.split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == len(keys)
    got = {k: tcp_kind(l) for k, l in zip(keys, lines)}
    assert got == {k: "TEMP" if v == "PERM" else v for k, v in BEHAVIOURS.items()}  # tcp has no PERM
    assert all(len(l) < 4096 and b"SECRET" not in l and b"127.0.0.1" not in l for l in lines)
    assert second.heads == []  # the redirect was not followed: the token went nowhere else
    assert sum(1 for h in r.heads if b"key=redirect-same" in h) == 1


def test_socketmap_faults(rogue, write_config):
    r, second = rogue
    keys = list(BEHAVIOURS)
    out, _ = run_handle(config_for(write_config, r.url, "socketmap-lookup"),
                        b"".join(netstring.encode(b"map " + k.encode()) for k in keys))
    payloads = netstring.Decoder().feed(out)
    assert len(payloads) == len(keys)
    assert {k: socketmap_kind(p) for k, p in zip(keys, payloads)} == BEHAVIOURS
    assert payloads[0] == b"OK ok"
    assert second.heads == []


def test_policy_faults_give_the_temporary_action(rogue, write_config):
    r, second = rogue
    keys = [k for k in BEHAVIOURS if BEHAVIOURS[k] in ("TEMP", "TIMEOUT")] + ["policy-ok", "lf-action"]
    data = b"".join(b"request=smtpd_access_policy\nrecipient=%s\n\n" % k.encode() for k in keys)
    out, _ = run_handle(config_for(write_config, r.url, "policy"), data)
    replies = out.split(b"\n\n")[:-1]
    assert len(replies) == len(keys)
    for key, reply in zip(keys, replies):
        expected = b"action=DUNNO" if key == "policy-ok" else \
            b"action=DEFER_IF_PERMIT Policy service temporarily unavailable (ref "
        assert reply.startswith(expected), (key, reply)


def test_environment_cannot_redirect_the_token(backend, write_config, tmp_path, rogue):
    """spawn(8) and systemd give a clean environment; a dirty one must not change behaviour either."""
    r, second = rogue
    backend.answers["k"] = (200, ["v"])
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login user password pass\n")
    env = pfrest_env()
    proxy = f"http://127.0.0.2:{second.port}"
    env.update(HTTP_PROXY=proxy, http_proxy=proxy, HTTPS_PROXY=proxy, ALL_PROXY=proxy,
               NO_PROXY="", HOME=str(tmp_path), REQUESTS_CA_BUNDLE="/nonexistent", CURL_CA_BUNDLE="/x")
    out, _ = run_handle(config_for(write_config, backend.url, "tcp-lookup"), b"get k\n", env=env)
    assert out == b"200 v\n"
    assert second.heads == []
    assert "authorization" not in backend.requests[0].headers


def test_dns_failure_is_temporary(write_config):
    out, _ = run_handle(config_for(write_config, "http://pfrest-test.invalid", "tcp-lookup"), b"get k\n")
    assert re.fullmatch(rb"400 backend%20host%20name%20did%20not%20resolve%20\(ref%20[0-9a-f]{16}\)\n", out)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


def test_tls_bad_certificate_is_temporary_and_ca_file_fixes_it(certificate, write_config):
    import ssl
    cert, key = certificate
    server = minihttp.Server(("127.0.0.1", 0), lambda req: (200, {}, b'["secure"]'))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    import threading
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        out, _ = run_handle(config_for(write_config, url, "tcp-lookup"), b"get k\n")
        assert out.startswith(b"400 TLS%20error%20talking%20to%20the%20backend%20(ref%20")
        out, _ = run_handle(config_for(write_config, url, "tcp-lookup", **{"ca-file": cert}), b"get k\n")
        assert out == b"200 secure\n"
    finally:
        server.stop()


def test_an_interim_answer_never_answers_the_next_key_through_postmap(postmap_conf):
    """The wrong answer an independent review found in the threaded design: a 103 Early Hints and the
    final 200 in two writes left the 200 for the next request, another key, to read.  Real postmap,
    two keys over one connection to `pfrest serve` (in-process), one kept-alive backend connection."""
    import dataclasses
    from conftest import ServerThread, postmap
    from pfrest import config
    from rogue import Scripted, response
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"

    def answer(request):
        found = response(200, b'["%s"]' % request.key.encode(), {"Content-Type": "application/json"})
        return [hints, 0.2, found] if request.key.startswith("hint") else [found]
    backend = Scripted(answer)
    cfg = config.parse({"endpoints": [{"name": "t", "mode": "tcp-lookup", "target": backend.url + "/l",
                                       "bind-port": 1, "request-timeout": 3000}]})
    server = ServerThread(dataclasses.replace(cfg, endpoints=(dataclasses.replace(cfg.endpoints[0],
                                                                                  bind_port=0),)))
    try:
        host, port = server.addresses["t"]
        status, out, err = postmap(postmap_conf, "-", f"tcp:{host}:{port}", stdin="hint1\nnormal2\nhint3\n")
        assert (status, out) == (0, "hint1\thint1\nnormal2\tnormal2\nhint3\thint3\n"), err
        assert backend.connections == 1  # the same kept-alive connection for all three
    finally:
        server.stop()
        backend.stop()


def test_https_to_a_plain_http_port_is_logged_with_what_to_do(write_config, tmp_path):
    """The admin reading serve's log (or handle's) learns what OpenSSL's "wrong version number" means."""
    server = minihttp.serve_app(lambda req: (200, {}, b'["plain"]'))
    try:
        cfg = config_for(write_config, server.url.replace("http://", "https://"), "tcp-lookup")
        log = tmp_path / "handle.log"
        proc = subprocess.run(pfrest_cmd("handle", "-c", cfg, "--log-file", str(log), "ep"), input=b"get k\n",
                              capture_output=True, timeout=60, env=pfrest_env(), cwd=ROOT)
        assert proc.stdout.startswith(b"400 TLS%20error%20talking%20to%20the%20backend")
        assert "error=tls: " in log.read_text()
        assert "that port speaks plain HTTP, not TLS: use an http:// target, or the port that speaks TLS" \
            in log.read_text()
    finally:
        server.stop()
