"""dovecot-sasl through a real `pfrest serve` (TCP and unix socket, two workers, reload, allow-from,
metrics) and a real `pfrest handle`, against a real HTTP backend, with a client speaking the protocol as
Postfix's smtpd does.  The password must show nowhere: log, metrics, process listing."""

import os
import signal
import subprocess
import time
import urllib.request
from base64 import b64encode

import pytest

from conftest import Backend
from hostile import SocketPeer, read_to_close
from pfrest.commands import minihttp
from postfix_instance import free_port
from test_serve import connect, endpoint, served, unix_endpoint  # noqa: F401 (served: a fixture)

PASSWORD = "Tr0ub4dor&3-unique-marker"
HELLO = b"VERSION\t1\t0\nCPID\t%d\n" % os.getpid()


def plain(user, password):
    return b64encode(b"\0" + user.encode() + b"\0" + password.encode())


class Client:
    """One auth connection, as smtpd keeps it: greeting read once, then one AUTH at a time."""

    def __init__(self, address):
        self.sock = connect(address)
        self.sock.sendall(HELLO)
        self.buf = b""
        self.greeting = self.until(b"DONE\n")
        assert b"MECH\tPLAIN\tplaintext\n" in self.greeting and self.greeting.startswith(b"VERSION\t1\t")
        self.next_id = 1
        self.ended = None   # how the connection ended: "reset", "closed"

    def until(self, end):
        while end not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        head, _, self.buf = self.buf.partition(end)
        return head + end

    def line(self):
        return self.until(b"\n")

    def login(self, user, password, client=b"198.51.100.7"):
        """The reply line, or None when the connection was closed (Postfix: 454, reconnect)."""
        auth_id, self.next_id = self.next_id, self.next_id + 1
        self.sock.sendall(b"AUTH\t%d\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=%s\tresp=%s\n"
                          % (auth_id, client, plain(user, password)))
        try:
            return self.line()
        except EOFError:
            self.ended = "closed"
        except ConnectionResetError:
            self.ended = "reset"
        return None

    def close(self):
        self.sock.close()


class Users(Backend):
    """The backend: alice's password is PASSWORD; 'down' makes every login a 500."""

    def __init__(self):
        super().__init__()
        self.down = False
        self.default = self.decide

    def decide(self, request):
        fields = dict(minihttp.form_bytes(request))
        if self.down:
            return 500, b""
        if fields.get(b"username") == b"alice" and fields.get(b"password") == PASSWORD.encode():
            return 200, ["alice@example.com"]
        return 401, b""


@pytest.fixture
def users():
    b = Users()
    yield b
    b.stop()


def test_serve_with_workers_logs_in_fails_and_says_try_later_without_ever_showing_the_password(
        users, write_config, served, tmp_path):
    port, metrics = free_port(), free_port()
    path = tmp_path / "auth.sock"
    cfg = write_config([endpoint(users, "dovecot-sasl", "auth", **{"bind-port": port}),
                        unix_endpoint(users, path, "dovecot-sasl", "auth-unix", mechanisms=["PLAIN"])],
                       **{"metrics-address": f"127.0.0.1:{metrics}"})
    proc = served("-c", cfg, "--workers", "2")
    proc.wait_for(r"ready: serving 2 endpoint")
    tcp, unix = Client(("127.0.0.1", port)), Client(str(path))
    try:
        assert b"MECH\tLOGIN" not in unix.greeting and b"MECH\tLOGIN\tplaintext\n" in tcp.greeting
        assert tcp.login("alice", PASSWORD) == b"OK\t1\tuser=alice@example.com\n"
        assert tcp.login("alice", "wrong") == b"FAIL\t2\tuser=alice\treason=Invalid credentials\n"
        assert unix.login("alice", PASSWORD) == b"OK\t1\tuser=alice@example.com\n"
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert PASSWORD not in ps
        users.down = True
        # closed, so that smtpd says 454 and reconnects: over TCP with a reset (a Postfix before 3.7.15
        # would write its next AUTH into a connection ended with FIN), over a unix socket plainly
        assert tcp.login("alice", PASSWORD) is None and tcp.ended == "reset"
        assert unix.login("alice", PASSWORD) is None and unix.ended == "closed"
        users.down = False
        again = Client(("127.0.0.1", port))
        assert again.login("alice", PASSWORD) == b"OK\t1\tuser=alice@example.com\n"
        deadline = time.monotonic() + 15
        while True:   # the workers' counters reach the arbiter's page within a second or two
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as answer:
                page = answer.read().decode()
            if all(f'reply="{word}"' in page for word in ("ok", "fail", "temp")) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert all(f'endpoint="auth",mode="dovecot-sasl",reply="{word}"' in page for word in ("ok", "fail", "temp"))
        assert PASSWORD not in page and "alice" not in page
        proc.wait_for(r"endpoint=auth id=\w+ user=alice mechanism=PLAIN client_address=198\.51\.100\.7 "
                      r"status=500 reply=TEMP")
        proc.wait_for(r"endpoint=auth id=\w+ user=alice .* status=401 reply=FAIL")
    finally:
        for client in (tcp, unix):
            client.close()
    proc.send(signal.SIGTERM)
    assert proc.exit_status() == 0
    assert PASSWORD not in proc.log and b64encode(PASSWORD.encode()).decode() not in proc.log


def test_an_idle_auth_connection_stays_open_across_a_reload_and_uses_the_new_target(
        users, write_config, served, tmp_path):
    other = Users()
    try:
        other.down = True   # the new target says 500: a login after the reload must reach it
        port = free_port()
        cfg = write_config([endpoint(users, "dovecot-sasl", "auth", **{"bind-port": port})])
        proc = served("-c", cfg)
        proc.wait_for(r"ready: serving 1 endpoint")
        kept = Client(("127.0.0.1", port))
        assert kept.login("alice", PASSWORD).startswith(b"OK\t1\t")
        write_config([endpoint(other, "dovecot-sasl", "auth", **{"bind-port": port})])
        mark = proc.mark()
        proc.send(signal.SIGHUP)
        proc.wait_for(r"reloaded ", after=mark)
        time.sleep(0.2)
        assert kept.login("alice", PASSWORD) is None   # answered by the new target (500): closed
        other.down = False
        assert Client(("127.0.0.1", port)).login("alice", PASSWORD).startswith(b"OK\t1\t")
        assert len(other.requests) == 2 and len(users.requests) == 1
    finally:
        other.stop()


def test_garbage_closes_that_connection_only(users, write_config, served):
    port = free_port()
    cfg = write_config([endpoint(users, "dovecot-sasl", "auth", **{"bind-port": port, "allow-from": ["127.0.0.0/8"]})])
    proc = served("-c", cfg)
    proc.wait_for(r"ready: serving 1 endpoint")
    good = Client(("127.0.0.1", port))
    for junk in (b"GET / HTTP/1.0\r\n\r\n", b"VERSION\t9\t0\n", HELLO + b"CONT\t5\tAAAA\n",
                 HELLO + b"X" * 20000):
        peer = SocketPeer(("127.0.0.1", port))
        try:
            peer.send(junk)
            data, closed = read_to_close(peer, 10)
        finally:
            peer.close()
        assert closed and data.endswith(b"DONE\n")   # the greeting, then nothing but the close
    assert good.login("alice", PASSWORD).startswith(b"OK\t1\t")
    proc.wait_for(r"protocol error, closing: not a Dovecot auth client")
    proc.wait_for(r"protocol error, closing: CONT for no authentication in progress")


def test_handle_answers_like_serve(users, write_config, handle):
    cfg = write_config([endpoint(users, "dovecot-sasl", "auth")])
    data = HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.9\tresp=%s\n" \
        % plain("alice", PASSWORD) + b"AUTH\t2\tLOGIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.9\n" \
        + b"CONT\t2\t" + b64encode(b"alice") + b"\nCONT\t2\t" + b64encode(b"nope") + b"\n"
    out = handle(cfg, "auth", data)
    assert out.split(b"DONE\n", 1)[1] == (b"OK\t1\tuser=alice@example.com\nCONT\t2\tVXNlcm5hbWU6\n"
                                          b"CONT\t2\tUGFzc3dvcmQ6\nFAIL\t2\tuser=alice\treason=Invalid credentials\n")
    assert handle.returncode == 0
    assert "user=alice" in handle.log and PASSWORD not in handle.log and "nope" not in handle.log
