"""SMTP AUTH through a real Postfix smtpd (``smtpd_sasl_type = dovecot``) whose auth server is pfrest:
an SMTP client (smtplib) logs in with PLAIN (with and without an initial response) and LOGIN, and gets
what the backend decided as the SMTP client must see it: 235, 535 for bad credentials, 454 (try again
later) while the backend is down, fails or is slow, and 235 again once it is back, in the same smtpd
process (maxproc 1, its PID read from the maillog).

Two ways to reach pfrest: `pfrest serve` on loopback TCP (``smtpd_sasl_path = inet:...``), and the spawn
service of master.cf.example in ``private/`` with its main.cf lines, each on its own smtpd.  A third
smtpd has TLS and ``smtpd_tls_auth_only = yes``: AUTH is offered only after STARTTLS, and the backend
sees ``secured=yes``.  After a login the policy endpoint of the same pfrest gets ``sasl_username``.
The password shows in no log file, metrics page or process listing.  An smtpd that gets no mechanism
from its auth server (none listening, or ``noplaintext``) exits.  One Postfix instance and one
`pfrest serve` for the module; the tests run in order.  The last test needs neither Postfix nor root:
how pfrest ends a connection on a temporary failure, which the smtpd tests rely on.
"""

import base64
import contextlib
import json
import os
import pwd
import re
import smtplib
import signal
import socket
import ssl
import subprocess
import threading
import time
import types
import urllib.request

import pytest

from conftest import IN_CI, Backend, package_installed, pfrest_cmd, pfrest_env
from pfrest.commands import minihttp
from test_serve import connect, ephemeral, listening  # noqa: F401 (listening: a fixture)
from postfix_instance import (TLSMGR, Installation, PostfixInstance, certificate, commented_main_cf, free_port,
                              installed_for_nobody, master_entries, processes_with, remove_tree, smtp_login,
                              stop_process, wait_port, world_tmpdir)

USER, CANONICAL = "alice", "alice@example.com"   # the backend names the canonical user
PASSWORD = "Corr3ct-h0rse-batt3ry"               # must show nowhere but in the backend's requests
WRONG = "Wr0ng-staple-guess"
REQUEST_TIMEOUT_MS = 1000                         # the backend's "slow" answers take longer
SLOW_SECONDS = 2.5
# master.cf.example's main.cf lines for SMTP AUTH (the others are its lookups' and policy's), and the
# override it gives for the submission service, which every smtpd here gets
SASL_LINES = ("smtpd_sasl_type", "smtpd_sasl_path", "smtpd_tls_auth_only", "pfrest-auth_time_limit")
ENABLE = "-o smtpd_sasl_auth_enable=yes"
# The fields of the HTTP contract (docs/dovecot-sasl.md), in order, when the client gives no authzid
FIELDS = ["mechanism", "username", "password", "service", "client_address", "server_address", "secured"]


class AuthBackend(Backend):
    """Logins (path /auth) decided by the password: 200 with the canonical user for the right one, 401
    for any other; ``state`` "error" answers 500, "slow" answers after request-timeout; down() and up()
    stop and restart the server on the same port (connections refused in between).  Policy requests
    (/policy) answer DUNNO."""

    def __init__(self):
        super().__init__()
        self.state = "up"
        self.port = self.server.server_address[1]
        self.default = self.decide
        self.connections = []
        self._track()

    def _track(self):
        """Record the connections the server accepts, for down() to end them: pfrest keeps its
        connections to the backend open (keep-alive), and the server's threads would serve them on."""
        accept = self.server.process_request

        def process_request(sock, address):
            self.connections.append(sock)
            accept(sock, address)
        self.server.process_request = process_request

    def key_of(self, request):
        return ""   # everything goes to decide()

    def decide(self, request):
        if request.path.endswith("/policy"):
            return 200, "DUNNO", {"Content-Type": "text/plain"}
        if self.state == "error":
            return 500, b""
        if self.state == "slow":
            time.sleep(SLOW_SECONDS)
        fields = dict(minihttp.form_bytes(request))
        if fields.get(b"username") == USER.encode() and fields.get(b"password") == PASSWORD.encode():
            return 200, [CANONICAL]
        return 401, b""

    def down(self):
        self.server.stop()
        for sock in self.connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass   # closed already
        self.connections.clear()

    def up(self):
        self.server = minihttp.serve_app(self.app, port=self.port)
        self._track()

    def logins(self):
        return [dict(minihttp.form_bytes(r)) for r in self.requests if r.path.endswith("/auth")]


@contextlib.contextmanager
def installation_with_auth():
    """The files to deploy: the installed package's when it ships the auth service (always in CI, which
    builds it from this checkout), else this checkout's, with a pfrest that user nobody can run."""
    if IN_CI or package_installed():
        package = Installation.package()
        if IN_CI or "pfrest-auth" in package.shipped("master.cf.example"):
            yield package
            return
    with installed_for_nobody() as script:
        yield Installation.checkout(script)


class Sampler:
    """`ps -eo args` every 0.2 s while the module runs: what any local user could see of argv."""

    def __init__(self):
        self.seen, self.done = [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.wait(0.2):
            self.seen.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True,
                                            timeout=30).stdout)

    def stop(self):
        self.done.set()
        self.thread.join(30)
        return "".join(self.seen)


@pytest.fixture(scope="module")
def site():
    stack = contextlib.ExitStack()
    installation = stack.enter_context(installation_with_auth())
    root = world_tmpdir("pfrest-sasl-")
    backend = AuthBackend()
    instance = PostfixInstance(root)
    s = types.SimpleNamespace(root=root, backend=backend, instance=instance, installation=installation,
                              auth_port=free_port(), policy_port=free_port(), metrics_port=free_port(),
                              closed_port=free_port(),   # where nothing listens
                              serve_log=root / "serve.log", config=root / "pfrest.json", sampler=Sampler())
    proc = None
    try:
        # The shipped files: master.cf.example's spawn service and its main.cf lines, for the endpoint
        # "auth" of pfrest.json.example (its request-timeout shortened below the test's slow answers).
        # `pfrest serve` serves the same endpoint on loopback TCP (auth-tcp), and a policy endpoint.
        doc = json.loads(installation.config(backend.url))
        (auth,) = [ep for ep in doc["endpoints"] if ep["name"] == "auth"]
        auth["request-timeout"] = REQUEST_TIMEOUT_MS
        tcp = {k: v for k, v in auth.items() if not k.startswith("bind-")}
        doc["endpoints"] += [
            dict(tcp, name="auth-tcp", **{"bind-address": "127.0.0.1", "bind-port": s.auth_port}),
            {"name": "policy-tcp", "mode": "policy", "target": f"{backend.url}/postfix/policy",
             "bind-address": "127.0.0.1", "bind-port": s.policy_port}]
        doc["metrics-address"] = f"127.0.0.1:{s.metrics_port}"
        doc["log-requests"] = "all"
        s.config.write_text(json.dumps(doc))
        s.config.chmod(0o644)   # read by the spawned handlers, which run as master.cf's user=
        master = installation.substitute(installation.shipped("master.cf.example"), config=s.config)
        instance.services += master_entries(master) + TLSMGR
        s.main_lines = {k: v for k, v in commented_main_cf(master).items() if k in SASL_LINES}
        instance.main.update(s.main_lines)
        # Every smtpd: maxproc 1 (one process, whose auth connection lives across sessions), its own
        # syslog_name (its PID found in the maillog), the policy endpoint after the login
        s.cert, s.key = certificate(root)
        assert ENABLE in master
        restrictions = f"check_policy_service inet:127.0.0.1:{s.policy_port}, permit"
        enabled = {"smtpd_sasl_auth_enable": "yes", "smtpd_recipient_restrictions": restrictions}
        plain = dict(enabled, smtpd_tls_auth_only="no")
        tls = {"smtpd_tls_security_level": "may", "smtpd_tls_cert_file": s.cert, "smtpd_tls_key_file": s.key}
        s.smtp = {
            "serve": instance.add_smtpd("serve", maxproc=1, syslog_name="postfix/sasl-serve",
                                        smtpd_sasl_path=f"inet:127.0.0.1:{s.auth_port}", **plain),
            "spawn": instance.add_smtpd("spawn", maxproc=1, syslog_name="postfix/sasl-spawn", **plain),
            # master.cf.example's lines as they are (smtpd_tls_auth_only = yes), with TLS
            "tls": instance.add_smtpd("tls", maxproc=1, syslog_name="postfix/sasl-tls",
                                      smtpd_sasl_path=f"inet:127.0.0.1:{s.auth_port}", **tls, **enabled),
        }
        # What makes an smtpd exit as AUTH becomes available (after STARTTLS, so that the banner
        # instance.start() waits for comes first): no auth server, or no mechanism left
        s.smtp["unreachable"] = instance.add_smtpd("unreachable", syslog_name="postfix/sasl-unreachable",
                                                   smtpd_sasl_path=f"inet:127.0.0.1:{s.closed_port}",
                                                   **tls, **enabled)
        s.smtp["noplain"] = instance.add_smtpd("noplain", syslog_name="postfix/sasl-noplain",
                                               smtpd_sasl_path=f"inet:127.0.0.1:{s.auth_port}",
                                               smtpd_sasl_tls_security_options="noanonymous, noplaintext",
                                               **tls, **enabled)
        log = stack.enter_context(open(s.serve_log, "wb"))
        proc = subprocess.Popen(pfrest_cmd("serve", "-c", str(s.config), "auth-tcp", "policy-tcp"),
                                stdout=log, stderr=log, env=pfrest_env())
        for port in (s.auth_port, s.policy_port, s.metrics_port):
            wait_port(port)
        instance.start()
        yield s
    finally:
        s.sampler.stop()
        if proc is not None:
            stop_process(proc)
        instance.stop()
        backend.stop()
        remove_tree(root)
        stack.close()


@pytest.fixture
def fresh(site):
    site.backend.requests.clear()
    site.backend.state = "up"
    return site


def login(site, smtpd, mechanism, password=PASSWORD, initial=True, user=USER, tls=False, then=None):
    """One SMTP session on the smtpd ``smtpd`` (postfix_instance.smtp_login): (code, text) of the AUTH."""
    return smtp_login(site.smtp[smtpd], user, password, mechanism, initial, site.cert if tls else None, then)


WAYS = [("PLAIN", True), ("PLAIN", False), ("LOGIN", True), ("LOGIN", False)]


def smtpd_pids(site, smtpd):
    """PIDs of the smtpd processes of the service ``smtpd`` that took a connection, from the maillog."""
    return set(re.findall(rf"postfix/sasl-{smtpd}/smtpd\[(\d+)\]: connect from", site.instance.log()))


@pytest.mark.parametrize("smtpd", ["serve", "spawn"])
def test_logins_and_temporary_failures_in_one_smtpd(fresh, smtpd):
    s = fresh
    for mechanism, initial in WAYS:
        assert login(s, smtpd, mechanism, initial=initial) == (235, "2.7.0 Authentication successful"), \
            (mechanism, initial)
        assert login(s, smtpd, mechanism, WRONG, initial=initial) == \
            (535, "5.7.8 Error: authentication failed: Invalid credentials")
    assert len(s.backend.logins()) == 2 * len(WAYS)
    for trouble in ("error", "slow", "down"):
        for mechanism, initial in WAYS:
            # every login asks the backend (none fails on a connection left dead by the one before)
            s.backend.requests.clear()
            if trouble == "down":
                s.backend.down()
            else:
                s.backend.state = trouble
            code, text = login(s, smtpd, mechanism, initial=initial)
            assert (code, text) == (454, "4.7.0 Temporary authentication failure: Connection lost to authentication server"), (trouble, mechanism, initial)
            assert len(s.backend.logins()) == (trouble != "down")
            if trouble == "down":
                s.backend.up()
            s.backend.state = "up"
            # the first login once the backend is back succeeds, in the same smtpd process
            assert login(s, smtpd, mechanism, initial=initial)[0] == 235, (trouble, mechanism, initial)
    assert len(smtpd_pids(s, smtpd)) == 1, s.instance.log()


def auth_handlers(site):
    """The `pfrest handle -c CONFIG auth` processes spawn(8) started for the smtpd's auth connection
    (not spawn itself, whose command line holds argv=...)."""
    found = []
    for pid in processes_with(str(site.config)):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().rstrip(b"\0").split(b"\0")
        if args[0] != b"spawn" and args[-3:] == [b"-c", str(site.config).encode(), b"auth"]:
            found.append(pid)
    return found


def test_spawned_handler_killed_between_logins(fresh):
    """What the spawn service's time limit (pfrest-auth_time_limit) does when it expires: spawn(8) kills
    the handler; smtpd's next login writes into the closed unix socket, which fails at once, and it
    connects again (a new handler): the login succeeds, in the same smtpd."""
    s = fresh
    assert login(s, "spawn", "PLAIN")[0] == 235
    handlers = auth_handlers(s)
    assert len(handlers) == 1
    uid = pwd.getpwnam(s.installation.user).pw_uid
    assert os.stat(f"/proc/{handlers[0]}").st_uid == uid   # user= of master.cf.example, never root
    os.kill(handlers[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while handlers[0] in processes_with(str(s.config)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert login(s, "spawn", "LOGIN")[0] == 235
    assert len(auth_handlers(s)) == 1 and auth_handlers(s) != handlers
    assert len(smtpd_pids(s, "spawn")) == 1


def test_the_backend_receives_the_documented_fields(fresh):
    s = fresh
    for mechanism, initial in WAYS:
        assert login(s, "serve", mechanism, initial=initial)[0] == 235
    sent = [r for r in s.backend.requests if r.path == "/postfix/auth"]
    assert len(sent) == len(WAYS)
    for request, (mechanism, _) in zip(sent, WAYS):
        assert request.method == "POST" and request.raw_query == ""
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        assert request.headers["x-auth-token"] == "change-me"
        assert re.fullmatch(r"[0-9a-f]{16}", request.headers["x-request-id"])
        assert request.headers["user-agent"].startswith("Postfix REST Connector")
        assert [(n.decode(), v.decode()) for n, v in minihttp.form_bytes(request)] == [
            ("mechanism", mechanism), ("username", USER), ("password", PASSWORD), ("service", "smtp"),
            ("client_address", "127.0.0.1"), ("server_address", "127.0.0.1"), ("secured", "no")]
    # PLAIN with an authorization identity: authzid follows username
    s.backend.requests.clear()
    with smtplib.SMTP("127.0.0.1", s.smtp["serve"], local_hostname="client.example", timeout=60) as smtp:
        smtp.ehlo()
        assert smtp.auth("PLAIN", lambda challenge=None: f"boss\0{USER}\0{PASSWORD}")[0] == 235
    (request,) = s.backend.requests
    assert [n.decode() for n, _ in minihttp.form_bytes(request)] == FIELDS[:2] + ["authzid"] + FIELDS[2:]
    assert dict(minihttp.form_bytes(request))[b"authzid"] == b"boss"


def test_auth_only_after_starttls_and_secured(fresh):
    """master.cf.example's smtpd_tls_auth_only = yes: no AUTH before STARTTLS; after it, the backend
    learns the session is encrypted (secured=yes)."""
    s = fresh
    with smtplib.SMTP("127.0.0.1", s.smtp["tls"], local_hostname="client.example", timeout=60) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        assert smtp.docmd("AUTH", "PLAIN") == (503, b"5.5.1 Error: authentication not enabled")
        smtp.starttls(context=ssl.create_default_context(cafile=str(s.cert)))
        smtp.ehlo()
        assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
    for mechanism, initial in WAYS:
        assert login(s, "tls", mechanism, initial=initial, tls=True)[0] == 235
        assert login(s, "tls", mechanism, WRONG, initial=initial, tls=True)[0] == 535
    assert {dict(minihttp.form_bytes(r))[b"secured"] for r in s.backend.requests} == {b"yes"}
    # without smtpd_tls_auth_only, AUTH is offered in the clear, and the backend is told so
    with smtplib.SMTP("127.0.0.1", s.smtp["serve"], local_hostname="client.example", timeout=60) as smtp:
        smtp.ehlo()
        assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]


@pytest.mark.parametrize("smtpd, why", [
    ("unreachable", "warning: SASL: Connect to Dovecot auth socket 'inet:127.0.0.1:{port}' failed: "
                    "Connection refused"),
    # PLAIN and LOGIN are "plaintext": smtpd_tls_auth_only is the way to keep them under TLS
    ("noplain", None)])
def test_an_smtpd_without_mechanisms_exits(fresh, smtpd, why):
    """smtpd connects to its auth server when AUTH becomes available (here after STARTTLS), and exits
    when that gives it no mechanism: the SMTP client loses its connection (docs/dovecot-sasl.md: hence
    AUTH on the submission service only)."""
    s = fresh
    with smtplib.SMTP("127.0.0.1", s.smtp[smtpd], local_hostname="client.example", timeout=60) as smtp:
        smtp.ehlo()
        smtp.starttls(context=ssl.create_default_context(cafile=str(s.cert)))
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.ehlo()
    deadline = time.monotonic() + 10
    fatal = rf"postfix/sasl-{smtpd}/smtpd\[\d+\]: fatal: no SASL authentication mechanisms"
    while not re.search(fatal, s.instance.log()):
        assert time.monotonic() < deadline, s.instance.log()
        time.sleep(0.05)
    if why is not None:
        assert why.format(port=s.closed_port) in s.instance.log()


@pytest.mark.parametrize("smtpd", ["serve", "spawn"])
def test_the_policy_service_gets_the_sasl_username(fresh, smtpd):
    s = fresh

    def transaction(smtp):
        assert smtp.mail("sender@source.example")[0] == 250
        assert smtp.rcpt("someone@dest.example")[0] == 250
        smtp.rset()
    assert login(s, smtpd, "LOGIN", initial=False, then=transaction)[0] == 235
    (policy,) = [dict(r.form()) for r in s.backend.requests if r.path == "/postfix/policy"]
    # the name the backend gave (not the one the client typed) is the one Postfix uses from then on
    assert (policy["sasl_username"], policy["sasl_method"]) == (CANONICAL, "LOGIN")
    assert policy["recipient"] == "someone@dest.example"


def test_the_password_shows_nowhere(site):
    """After every test above: the password, and the base64 forms the SMTP client sent, are in no log
    file (pfrest's, Postfix's maillog), on the metrics page, or in any process's argv seen meanwhile."""
    s = site
    assert login(s, "serve", "PLAIN")[0] == 235
    with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=30) as response:
        metrics = response.read().decode()
    processes = s.sampler.stop()
    logs = {"pfrest serve's log": s.serve_log.read_text(), "maillog": s.instance.log(),
            "/metrics": metrics, "ps -eo args": processes}
    # what each holds, so that a search in them means something
    assert "user=alice mechanism=PLAIN" in logs["pfrest serve's log"]
    assert "sasl_username=alice@example.com" in logs["maillog"]
    assert 'endpoint="auth-tcp"' in metrics
    assert "handle -c" in processes and "pfrest" in processes
    secrets = []
    for password in (PASSWORD, WRONG):
        secrets += [password, b64(password), b64(f"\0{USER}\0{password}"), b64(f"boss\0{USER}\0{password}")]
    for where, text in logs.items():
        for secret in secrets:
            assert secret not in text, (where, secret)


def b64(text):
    return base64.b64encode(text.encode()).decode()


# --- without Postfix (and without root): what the smtpd tests above rely on -----------------------

LOGIN_LINES = (b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=127.0.0.1\tresp="
               + base64.b64encode(b"\0alice\0" + PASSWORD.encode()) + b"\n")


def test_a_temporary_failure_resets_tcp_and_closes_unix(backend, tmp_path, listening):
    """The backend answers 500: pfrest ends the connection without a reply, over TCP with a reset (so
    that an smtpd before 3.7.15 sees an error, not an end, and connects again for its next login:
    test_logins_and_temporary_failures_in_one_smtpd), over a unix socket with an ordinary end."""
    backend.default = (500, b"")
    cfg = ephemeral([
        {"name": "tcp", "mode": "dovecot-sasl", "target": backend.url, "bind-address": "127.0.0.1", "bind-port": 1},
        {"name": "unix", "mode": "dovecot-sasl", "target": backend.url, "bind-path": str(tmp_path / "auth")}])
    addresses = listening(cfg).addresses
    for name in ("tcp", "unix"):
        with connect(addresses[name]) as sock:
            sock.sendall(LOGIN_LINES)
            received = b""
            try:
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    received += chunk
                ended = "end"
            except ConnectionResetError:
                ended = "reset"
        assert received.endswith(b"\nDONE\n")   # the greeting, and no answer
        assert ended == {"tcp": "reset", "unix": "end"}[name], name
    assert len(backend.requests) == 2
