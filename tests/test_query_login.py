"""`pfrest query` of a dovecot-sasl endpoint against a real backend (an HTTP server on 127.0.0.1:0): one
login per run, its fields as the backend gets them, what smtpd would answer, the exit status (0
authenticated, 1 rejected, 75 temporary), and the password: from stdin or a prompt, never from argv,
never printed."""

import os
import pty
import subprocess
import sys

import pytest

from conftest import ROOT, pfrest_cmd, pfrest_env
from pfrest import config
from pfrest.commands import minihttp, query

PASSWORD = "c0rrect horse"
USERS = {b"alice@example.com": PASSWORD.encode()}


@pytest.fixture
def backend(reset_backend):
    """Logins: 200 for alice's password, 401 for any other; a status set in ``force`` for every one."""
    force = {}

    def login(request):
        form = dict(minihttp.form_bytes(request))
        if "status" in force:
            return force["status"], b""
        return (200, b"") if USERS.get(form.get(b"username")) == form.get(b"password") else (401, b"")
    reset_backend.default = login
    reset_backend.force = force
    return reset_backend


@pytest.fixture
def ask(backend):
    """ask(user, password, **endpoint keys) -> (exit status, {field: value} printed, lines printed)."""
    def run(user, password, **extra):
        ep = dict({"name": "auth", "mode": "dovecot-sasl", "target": backend.url + "/login"},
                  **{k.replace("_", "-"): v for k, v in extra.items()})
        printed = []
        status = query.run(config.parse({"endpoints": [ep]}), "auth", [user.encode()], out=printed.append,
                           password=password.encode())
        assert all(password not in line for line in printed) or not password, printed
        return status, dict(line.split(": ", 1) for line in printed), printed
    return run


def test_a_good_password_authenticates_and_shows_the_fields_sent(ask, backend):
    got, printed, _ = ask("alice@example.com", PASSWORD)
    assert got == 0 and printed["result"] == "authenticated" and printed["user"] == "alice@example.com"
    assert printed["endpoint"] == f"auth (dovecot-sasl) -> POST {backend.url}/login"
    assert printed["fields"] == ("mechanism=PLAIN username=alice@example.com service=smtp client_address=127.0.0.1 "
                                 "server_address=127.0.0.1 secured=no password=(not shown)")
    assert printed["reply"] == '"OK\\t1\\tuser=alice@example.com\\n"'
    assert printed["smtpd"] == "235 2.7.0 Authentication successful"
    [request] = backend.requests
    assert request.method == "POST" and dict(minihttp.form_bytes(request))[b"password"] == PASSWORD.encode()


def test_a_bad_password_is_rejected(ask, backend):
    got, printed, _ = ask("alice@example.com", "wrong")
    assert got == 1 and printed["result"] == "rejected" and printed["backend"] == "HTTP 401"
    assert printed["reply"].startswith('"FAIL\\t1\\tuser=alice@example.com\\treason=')
    assert printed["smtpd"] == "535 5.7.8 Error: authentication failed"


@pytest.mark.parametrize("status", [500, 429, 400])
def test_a_backend_failure_is_temporary_the_connection_closed(ask, backend, status):
    backend.force["status"] = status
    got, printed, _ = ask("alice@example.com", PASSWORD)
    assert got == 75 and printed["result"].startswith("temporary: ")
    assert printed["reply"] == "(none: the connection is closed)"
    assert printed["smtpd"].startswith("454 4.7.0 Temporary authentication failure")


def test_an_unreachable_backend_is_temporary(ask, backend):
    from postfix_instance import free_port
    got, printed, _ = ask("alice@example.com", PASSWORD, target=f"http://127.0.0.1:{free_port()}/login")
    assert got == 75 and printed["backend"].startswith("connection refused by 127.0.0.1:")


def test_the_canonical_name_the_backend_gives_is_shown(ask, backend):
    backend.default = lambda request: (200, ["Alice@Example.COM"])
    got, printed, _ = ask("alice", PASSWORD)
    assert got == 0 and printed["user"] == "Alice@Example.COM"
    assert printed["reply"] == '"OK\\t1\\tuser=Alice@Example.COM\\n"'


def test_an_empty_password_is_refused_unasked_as_postfix_logins_are(ask, backend):
    got, printed, _ = ask("alice@example.com", "")
    assert got == 1 and printed["result"] == "rejected: empty password"
    assert printed["backend"] == "no request made" and backend.requests == []


def test_login_only_endpoints_take_two_rounds(ask, backend):
    got, printed, _ = ask("alice@example.com", PASSWORD, mechanisms=["LOGIN"])
    assert got == 0 and printed["fields"].startswith("mechanism=LOGIN username=alice@example.com ")


def test_the_command_reads_the_password_from_stdin_and_exits_by_result(backend, write_config):
    path = write_config([{"name": "auth", "mode": "dovecot-sasl", "target": backend.url + "/login"}])
    for password, status in ((PASSWORD, 0), ("nope", 1)):
        proc = subprocess.run(pfrest_cmd("query", "-c", path, "auth", "alice@example.com"),
                              input=password + "\n", capture_output=True, text=True, env=pfrest_env(), cwd=ROOT,
                              timeout=30)
        assert proc.returncode == status, proc.stdout + proc.stderr
        assert password not in proc.stdout + proc.stderr and proc.stderr == ""
    sent = [dict(minihttp.form_bytes(r))[b"password"] for r in backend.requests]
    assert sent == [PASSWORD.encode(), b"nope"]   # the line, without its newline


def test_a_password_on_the_command_line_is_refused(backend, write_config):
    path = write_config([{"name": "auth", "mode": "dovecot-sasl", "target": backend.url + "/login"}])
    proc = subprocess.run(pfrest_cmd("query", "-c", path, "auth", "alice@example.com", PASSWORD),
                          input="", capture_output=True, text=True, env=pfrest_env(), cwd=ROOT, timeout=30)
    assert proc.returncode == 64 and "never taken from the command line" in proc.stderr
    assert backend.requests == []


def test_on_a_terminal_the_password_is_asked_for_without_echo(backend, write_config):
    """A real pseudo-terminal: getpass's prompt, the password typed not echoed back."""
    path = write_config([{"name": "auth", "mode": "dovecot-sasl", "target": backend.url + "/login"}])
    pid, fd = pty.fork()
    if pid == 0:   # the child: pfrest query on the terminal
        env = pfrest_env()
        os.chdir(ROOT)
        os.execve(sys.executable, pfrest_cmd("query", "-c", path, "auth", "alice@example.com"), env)
    seen = b""
    try:
        while b"password for alice@example.com: " not in seen:
            seen += os.read(fd, 1024)
        os.write(fd, PASSWORD.encode() + b"\n")
        while True:
            try:
                chunk = os.read(fd, 1024)
            except OSError:   # EIO: the child ended, its terminal is gone
                break
            if not chunk:
                break
            seen += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert b"result: authenticated" in seen and PASSWORD.encode() not in seen
