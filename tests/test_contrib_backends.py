"""The reference backends of contrib/backends, as an admin's first hour uses them: `pfrest init` writes the
config, `pfrest check` accepts it, `pfrest serve` serves it, and Postfix's own `postmap -q` (and a policy
client speaking the policy protocol on a raw socket) gets the table's answers through each backend."""

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import IN_CI, ROOT, pfrest_cmd, pfrest_env, postmap
from hostile import SocketPeer, read_to_close
from test_serve import Served

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

BACKENDS = f"{ROOT}/contrib/backends"
START_TIMEOUT = 20


def free_port_base():
    """A port N with N, N+1 and N+2 free on loopback now (pfrest init --port-base N)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base > 65533:
            continue
        try:
            probes = [socket.socket() for _ in range(3)]
            for offset, probe in enumerate(probes):
                probe.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise AssertionError("no three consecutive free ports")


class Backend:
    """A reference backend process on a free loopback port."""

    def __init__(self, script, token):
        env = dict(os.environ, PFREST_AUTH_TOKEN=token)
        self.proc = subprocess.Popen([sys.executable, f"{BACKENDS}/{script}", "--listen", "127.0.0.1:0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                     cwd=BACKENDS)
        line = self.proc.stdout.readline()  # "listening on URL", or "" when it failed to start
        assert line.startswith("listening on http://127.0.0.1:"), f"{script} did not start: {line!r}"
        self.url = line.split()[-1]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(START_TIMEOUT)


def need_flask(script):
    """Flask is in the test extra (bin/test installs it): skip without it, but never in CI."""
    if script.startswith("flask") and not IN_CI:
        pytest.importorskip("flask")


def pfrest(*args):
    return subprocess.run(pfrest_cmd(*args), capture_output=True, text=True, timeout=60, env=pfrest_env(),
                          cwd=ROOT)


def policy(port, sender):
    """One policy request as Postfix's smtpd sends it; the reply line."""
    request = ("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\n"
               f"sender={sender}\nrecipient=info@example.com\n\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT) as s:
        s.sendall(request)
        reply = b""
        while not reply.endswith(b"\n\n"):
            data = s.recv(4096)
            assert data, f"connection closed after {reply!r}"
            reply += data
    return reply.decode()


@pytest.fixture
def initialized(tmp_path):
    """A config from `pfrest init` (every mode, loopback ports), and its auth token."""
    base = free_port_base()
    path = tmp_path / "pfrest.toml"
    # the backend's URL is not known yet (port 0): init with a stand-in, then set the real one below
    proc = pfrest("init", "-c", str(path), "--target", "http://127.0.0.1:1", "--port-base", str(base))
    assert proc.returncode == 0, proc.stderr
    with open(path, "rb") as f:
        token = tomllib.load(f)["endpoints"][0]["auth-token"]
    return path, base, token, proc.stdout


@pytest.mark.parametrize("script", ["stdlib_backend.py", "flask_backend.py"])
def test_postmap_through_pfrest_and_the_reference_backend(initialized, postmap_conf, script):
    need_flask(script)
    path, base, token, printed = initialized
    backend = Backend(script, token)
    try:
        path.write_text(path.read_text().replace("http://127.0.0.1:1/", f"{backend.url}/"))
        check = pfrest("check", "-c", str(path))
        assert check.returncode == 0, check.stderr
        served = Served(["-c", str(path)])
        try:
            served.wait_for(r"ready: serving 3 endpoint")
            # the very tables init printed for main.cf
            tcp = f"tcp:127.0.0.1:{base}"
            aliases = f"socketmap:inet:127.0.0.1:{base + 1}:aliases"
            assert tcp in printed and aliases in printed
            assert f"check_policy_service inet:127.0.0.1:{base + 2}" in printed
            assert postmap(postmap_conf, "example.com", tcp) == (0, "example.com\n", "")
            assert postmap(postmap_conf, "example.net", tcp)[:2] == (1, "")
            assert postmap(postmap_conf, "INFO@example.com", aliases) == (
                0, "alice@example.com,bob@example.com\n", "")
            assert postmap(postmap_conf, "nobody@example.com", aliases)[:2] == (1, "")
            assert policy(base + 2, "spammer@bad.example") == \
                "action=REJECT Sender blocked by the reference backend\n\n"
            assert policy(base + 2, "friend@example.org") == "action=DUNNO\n\n"
            # the backend checked the token and echoed every X-Request-Id: no failure was logged
            assert "backend-error" not in served.log and "http-403" not in served.log, served.log
            assert "X-Request-Id" not in served.log, served.log
        finally:
            served.send(15)
            assert served.exit_status() == 0, served.log
    finally:
        backend.stop()


@pytest.mark.parametrize("script", ["stdlib_backend.py", "flask_backend.py"])
def test_a_wrong_token_is_refused(script):
    need_flask(script)
    import urllib.error
    import urllib.request
    backend = Backend(script, "right")
    try:
        request = urllib.request.Request(f"{backend.url}/domains?key=example.com",
                                         headers={"X-Auth-Token": "wrong"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=START_TIMEOUT)
        assert refused.value.code == 403
        request.headers["X-auth-token"] = "right"
        request.add_header("X-Request-Id", "0123456789abcdef")
        with urllib.request.urlopen(request, timeout=START_TIMEOUT) as answer:
            assert answer.read() == b'["example.com"]'
            assert answer.headers["X-Request-Id"] == "0123456789abcdef"
    finally:
        backend.stop()


def test_the_stdlib_backend_keeps_connections_alive_without_the_nagle_delay():
    """Ten lookups on one kept-alive connection: with Nagle's algorithm on, each after the first waits
    for the client's delayed ACK (~40 ms); with TCP_NODELAY all ten take a few ms."""
    import http.client
    backend = Backend("stdlib_backend.py", "t")
    try:
        conn = http.client.HTTPConnection(backend.url[len("http://"):], timeout=START_TIMEOUT)
        conn.request("GET", "/domains?key=example.com", headers={"X-Auth-Token": "t"})
        conn.getresponse().read()
        first_socket = conn.sock
        started = time.monotonic()
        for _ in range(10):
            conn.request("GET", "/domains?key=example.com", headers={"X-Auth-Token": "t"})
            answer = conn.getresponse()
            assert answer.status == 200 and answer.read() == b'["example.com"]'
        elapsed = time.monotonic() - started
        assert conn.sock is first_socket  # one connection for every request
        assert elapsed < 0.2, f"10 kept-alive lookups took {elapsed:.3f} s: the Nagle + delayed-ACK trap"
        conn.close()
    finally:
        backend.stop()


def test_the_stdlib_backend_refuses_a_body_it_cannot_read_and_closes():
    """A body without a Content-Length it can read would stay in the connection as the next request."""
    backend = Backend("stdlib_backend.py", "t")
    try:
        peer = SocketPeer(("127.0.0.1", int(backend.url.rsplit(":", 1)[1])), timeout=5)
        try:
            peer.send(b"POST /policy HTTP/1.1\r\nHost: x\r\nX-Auth-Token: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\nsende\r\n0\r\n\r\n")
            reply, closed = read_to_close(peer, 5)
        finally:
            peer.close()
        assert closed and reply.startswith(b"HTTP/1.1 400 ") and reply.endswith(b"a body needs a Content-Length up to 1 MiB")
    finally:
        backend.stop()


ALICE_PASSWORD = "alice-password"   # the password of table.json's user, as contrib/backends/README.md says


@pytest.mark.parametrize("script", ["stdlib_backend.py", "flask_backend.py"])
def test_logins_through_pfrest_and_the_reference_backend(script, write_config):
    """dovecot-sasl: `pfrest query` logs in with table.json's user; a wrong password and an unknown user
    get the same 401 (FAIL); the hashes are never answered as a lookup."""
    need_flask(script)
    backend = Backend(script, "tok")
    try:
        path = write_config([{"name": "auth", "mode": "dovecot-sasl", "target": f"{backend.url}/auth",
                              "auth-token": "tok"}])
        results = {}
        for user, password in (("Alice@example.com", ALICE_PASSWORD), ("alice@example.com", "guess"),
                               ("mallory@example.com", ALICE_PASSWORD)):
            proc = subprocess.run(pfrest_cmd("query", "-c", path, "auth", user), input=password + "\n",
                                  capture_output=True, text=True, timeout=60, env=pfrest_env(), cwd=ROOT)
            results[user, password] = (proc.returncode, [line for line in proc.stdout.splitlines()
                                                         if line.startswith(("backend:", "user:"))])
        assert results == {("Alice@example.com", ALICE_PASSWORD): (0, ["backend: HTTP 200", "user: alice@example.com"]),
                           ("alice@example.com", "guess"): (1, ["backend: HTTP 401"]),
                           ("mallory@example.com", ALICE_PASSWORD): (1, ["backend: HTTP 401"])}
        import urllib.error
        import urllib.request
        for url in (f"{backend.url}/users?key=alice@example.com", f"{backend.url}/x?name=users&key=alice@example.com",
                    f"{backend.url}/auth"):
            request = urllib.request.Request(url, headers={"X-Auth-Token": "tok"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=START_TIMEOUT)
            assert refused.value.code in (404, 405), url   # /auth by GET: 405, temporary for pfrest
    finally:
        backend.stop()


def test_a_password_hash_for_the_table():
    """--hash-password reads stdin (never argv) and prints what the table's "users" hold; it matches that
    password alone, and each hash has its own salt."""
    sys.path.insert(0, BACKENDS)
    try:
        import stdlib_backend
    finally:
        sys.path.remove(BACKENDS)
    hashes = [subprocess.run([sys.executable, f"{BACKENDS}/stdlib_backend.py", "--hash-password"], input=b"s3cret\n",
                             capture_output=True, timeout=60, check=True).stdout.decode().strip() for _ in range(2)]
    assert hashes[0] != hashes[1] and hashes[0].startswith("pbkdf2_sha256$600000$")
    assert stdlib_backend.password_matches(b"s3cret", hashes[0])
    assert not stdlib_backend.password_matches(b"s3cret\n", hashes[0])
    assert not stdlib_backend.password_matches(b"s3cret", stdlib_backend.NOBODY)
    assert not stdlib_backend.password_matches(b"s3cret", "md5$1$x$y")
