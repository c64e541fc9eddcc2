"""dovecot-sasl and the operator's side: /readyz never sends a login to the backend (a probe would be a
login attempt), /metrics counts logins by result (ok, fail, temp, timeout) and never by user name,
``log-requests: problems`` logs failed logins, the Grafana dashboard has a panel for them.  A real
in-process Server on loopback with a real backend; a real ``pfrest handle`` for the log."""

import json
import time
from base64 import b64encode

import pytest

from conftest import ServerThread
from pfrest.commands import minihttp
from pfrest.ops.counters import Figures, PROBLEMS, Stats
from pfrest.ops.health import READY_WINDOW, Check
from postfix_instance import free_port
from test_monitoring import DASHBOARD, backend_down, get, samples, total
from test_serve import connect, ephemeral

PASSWORD = b"Tr0ub4dor&3"
HELLO = b"VERSION\t1\t0\nCPID\t99\n"


def auth(auth_id, user, password):
    resp = b64encode(b"\0" + user + b"\0" + password)
    return b"AUTH\t%d\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.9\tresp=%s\n" % (auth_id, resp)


@pytest.fixture
def backend(reset_backend):
    """Logins: 200 for alice with PASSWORD, 401 for others; ``status`` forces one status for all."""
    def login(request):
        form = dict(minihttp.form_bytes(request))
        if reset_backend.status:
            return reset_backend.status, b""
        good = form.get(b"username") == b"alice" and form.get(b"password") == PASSWORD
        return (200, b"") if good else (401, b"")
    reset_backend.status = None
    reset_backend.default = login
    return reset_backend


def login(address, user, password):
    """The server's answer to one login on a new connection: its OK/FAIL line, or b"" when it closed."""
    with connect(address) as sock:
        sock.sendall(HELLO + auth(1, user, password))
        data = b""
        while b"DONE\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, data   # closed before its greeting ended
            data += chunk
        data = data.split(b"DONE\n", 1)[1]
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:   # over TCP a temporary failure ends with a reset
                break
            if not chunk:
                break
            data += chunk
        return data


@pytest.fixture
def served(backend):
    port = free_port()
    cfg = ephemeral([{"name": "auth", "mode": "dovecot-sasl", "target": backend.url + "/login", "bind-port": 1,
                      "request-timeout": 1000}], **{"metrics-address": f"127.0.0.1:{port}"})
    server = ServerThread(cfg)
    server.metrics_port = port
    yield server
    server.stop(drain_timeout=1)


def test_readyz_never_sends_a_login_to_the_backend(served, backend):
    status, body = get(served.metrics_port, "/readyz")
    assert status == 200 and "auth: ready: no failed login request in the last" in body, body
    assert "(dovecot-sasl endpoints are never probed)" in body and backend.requests == []
    port = int(backend.url.rsplit(":", 1)[1])
    backend_down(backend)
    try:
        assert login(served.addresses["auth"], b"alice", PASSWORD) == b""   # closed: smtpd says 454
        status, body = get(served.metrics_port, "/readyz")
        assert status == 503 and "auth: NOT READY: the last login request" in body, body
    finally:
        backend.server = minihttp.serve_app(backend.app, port=port)
    status, body = get(served.metrics_port, "/readyz")
    assert status == 503 and backend.requests == []   # still no probe: the next login tells
    assert login(served.addresses["auth"], b"alice", PASSWORD).startswith(b"OK\t1\tuser=alice")
    status, body = get(served.metrics_port, "/readyz")
    assert status == 200 and len(backend.requests) == 1, body


def test_metrics_count_logins_by_result_never_by_user(served, backend):
    address = served.addresses["auth"]
    assert login(address, b"alice", PASSWORD).startswith(b"OK\t")
    assert login(address, b"mallory-guessing", b"123456").startswith(b"FAIL\t")
    assert login(address, b"mallory-guessing", b"password").startswith(b"FAIL\t")
    backend.status = 500
    assert login(address, b"alice", PASSWORD) == b""
    text = get(served.metrics_port)[1]
    found = samples(text)
    for reply, count in (("ok", 1), ("fail", 2), ("temp", 1)):
        assert total(found, "pfrest_requests_total", endpoint="auth", mode="dovecot-sasl", reply=reply) == count
    assert total(found, "pfrest_backend_errors_total", endpoint="auth", kind="http-500") == 1
    assert "mallory" not in text and "alice" not in text and PASSWORD.decode() not in text


def test_failed_logins_are_problems_that_get_a_log_line(handle, write_config, backend):
    """``log-requests: problems``: a FAIL is logged (user and client address), an OK is not."""
    assert "FAIL" in PROBLEMS and "OK" not in PROBLEMS
    path = write_config([{"name": "auth", "mode": "dovecot-sasl", "target": backend.url + "/login",
                          "log-requests": "problems"}])
    out = handle(path, "auth", HELLO + auth(1, b"alice", PASSWORD) + auth(2, b"bob", b"guess"))
    assert out.endswith(b"OK\t1\tuser=alice\nFAIL\t2\tuser=bob\treason=Invalid credentials\n"), out
    lines = [line for line in handle.log.splitlines() if " id=" in line and "user=" in line]
    assert len(lines) == 1 and "user=bob mechanism=PLAIN client_address=192.0.2.9 status=401 reply=FAIL" in lines[0]
    assert PASSWORD.decode() not in handle.log and "guess" not in handle.log


def test_a_login_endpoint_is_never_in_the_probe_list():
    now = time.monotonic()
    fresh, failed = Stats("dovecot-sasl"), Stats("dovecot-sasl")
    failed.last_failed = now - 1
    lookup = Stats("tcp-lookup")
    check = Check(Figures({"a": fresh, "b": failed, "t": lookup}, {"a": 0, "b": 0, "t": 0}, {}), now)
    assert check.to_probe == ["t"]
    assert check.found["a"][0] and not check.found["b"][0]
    failed.last_failed = now - READY_WINDOW - 1   # a failure long ago says nothing now
    assert Check(Figures({"b": failed}, {"b": 0}, {}), now).found["b"][0]


def test_the_dashboard_shows_logins_by_result():
    with open(DASHBOARD) as f:
        panels = json.load(f)["panels"]
    [panel] = [p for p in panels if "logins" in p["title"].lower()]
    [target] = panel["targets"]
    assert 'mode="dovecot-sasl"' in target["expr"] and "by (endpoint, reply)" in target["expr"]
    assert "pfrest_requests_total" in target["expr"]
    assert len({p["id"] for p in panels}) == len(panels)
    taken = {(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels if p is not panel}
    assert (panel["gridPos"]["x"], panel["gridPos"]["y"]) not in taken
