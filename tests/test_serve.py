"""`pfrest serve`: the listener in-process (fast, port 0) and as a real process (signals, systemd,
postmap), always with real sockets on loopback or in tmp_path and a real HTTP backend."""

import dataclasses
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, Backend, ServerThread, need_binary, pfrest_cmd, pfrest_env, postmap
from pfrest import config
from pfrest.process.serving import Server
from pfrest.protocol import netstring
from pfrest.system import systemd
from pfrest.system.sockets import BindError
from postfix_instance import free_port, stop_process

POLICY_REQUEST = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\n"
                  b"sender=a@example.com\nrecipient=%s\n\n")


def endpoint(backend, mode="tcp-lookup", name="ep", **extra):
    ep = {"name": name, "mode": mode, "target": backend.url + "/lookup", "bind-port": 1,
          "request-timeout": 3000}
    ep.update(extra)
    return ep


def unix_endpoint(backend, path, mode="tcp-lookup", name="ep", **extra):
    ep = endpoint(backend, mode, name, **{"bind-path": str(path)}, **extra)
    del ep["bind-port"]
    return ep


def ephemeral(raw_endpoints, **top):
    """A Config whose TCP endpoints bind port 0 (config files may not say 0; the API may)."""
    cfg = config.parse({"endpoints": raw_endpoints, **top})
    return dataclasses.replace(cfg, endpoints=tuple(
        dataclasses.replace(ep, bind_port=0) if ep.bind_port else ep for ep in cfg.endpoints))


@pytest.fixture
def pfrest_log(caplog):
    """The pfrest logger's records (it does not propagate once a command has set up logging)."""
    logger = logging.getLogger("pfrest")
    logger.addHandler(caplog.handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


@pytest.fixture
def listening():
    """listening(cfg, names=()) -> a started ServerThread, stopped at teardown."""
    started = []

    def start(cfg, names=()):
        started.append(ServerThread(cfg, names))
        return started[-1]
    yield start
    for listener in started:
        listener.stop(drain_timeout=2)


def connect(address, source=None, timeout=10):
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(timeout)
        sock.connect(address)
        return sock
    sock = socket.socket()
    sock.settimeout(timeout)
    if source:
        sock.bind((source, 0))
    sock.connect(address)
    return sock


def ask(sock, data, end):
    """Send one request and read until the reply ends with ``end``."""
    sock.sendall(data)
    reply = b""
    while not reply.endswith(end):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed after {reply!r}")
        reply += chunk
    return reply


def tcp_get(sock, key):
    return ask(sock, b"get " + key + b"\n", b"\n")


def assert_closed(sock):
    assert sock.recv(100) == b""


# --- in-process: every mode, byte for byte as `pfrest handle` -----------------------------------

def test_every_mode_answers_as_handle_does(backend, write_config, handle, listening, tmp_path):
    backend.answers.update({"k": (200, ["v 1%"]), "gone": (404, b""), "rcpt@x": (200, b"REJECT no")})
    unix = str(tmp_path / "sm.sock")
    raw = [endpoint(backend, "tcp-lookup", "tcp"), unix_endpoint(backend, unix, "socketmap-lookup", "sm"),
           endpoint(backend, "policy", "pol")]
    listener = listening(ephemeral(raw))
    addresses = listener.addresses
    assert addresses["sm"] == unix and addresses["tcp"][0] == "127.0.0.1" and addresses["tcp"][1] > 0
    path = write_config(raw)
    cases = {"tcp": b"get k\nget gone\nget %zz\n",
             "sm": netstring.encode(b"map k") + netstring.encode(b"map gone"),
             "pol": POLICY_REQUEST % b"rcpt@x"}
    for name, data in cases.items():
        expected = handle(path, name, data)
        assert expected  # the same bytes, requests sent one byte at a time
        with connect(addresses[name]) as sock:
            for i in range(len(data)):
                sock.sendall(data[i:i + 1])
            got = b""
            while len(got) < len(expected):
                got += sock.recv(65536)
        assert got == expected, name


def test_unix_socket_mode_stale_file_and_refusals(backend, listening, tmp_path):
    path = tmp_path / "pf.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays behind, nobody listens: stale
    raw = unix_endpoint(backend, path, "socketmap-lookup", **{"bind-mode": "0640"})
    listener = listening(ephemeral([raw]))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    backend.answers["k"] = (200, ["v"])
    with connect(str(path)) as sock:
        assert ask(sock, netstring.encode(b"m k"), b",") == b"4:OK v,"
    with pytest.raises(BindError, match=r"endpoint ep: cannot listen on .*pf.sock: another process is listening on it \(another pfrest serve"):
        Server(ephemeral([raw])).bind()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    raw["bind-path"] = str(regular)
    with pytest.raises(BindError, match=r"endpoint ep: .*file exists and is not a socket; not removing it"):
        Server(ephemeral([raw])).bind()
    assert regular.read_text() == "keep me"
    listener.stop()
    assert not path.exists()  # its own socket file goes with it


def test_allow_from_refuses_other_peers(backend, listening, pfrest_log):
    backend.answers["k"] = (200, ["v"])
    listener = listening(ephemeral([endpoint(backend, **{"allow-from": ["127.0.0.1/32"]})]))
    address = listener.addresses["ep"]
    with connect(address, source="127.0.0.2") as refused:
        assert_closed(refused)
    with connect(address, source="127.0.0.1") as allowed:
        assert tcp_get(allowed, b"k") == b"200 v\n"
    assert re.search(r"endpoint=ep peer=127\.0\.0\.2:\d+ refused: not in allow-from", pfrest_log.text)
    assert "allow-from:1" in listener.summary()[0]


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_ipv6_dual_stack_and_allow_from(backend, listening):
    backend.answers["k"] = (200, ["v"])
    try:
        listener = listening(ephemeral([endpoint(backend, **{"bind-address": "::",
                                                             "allow-from": ["127.0.0.1/32"]})]))
    except BindError as exc:
        pytest.skip(f"cannot bind ::: {exc}")
    port = listener.addresses["ep"][1]
    with connect(("127.0.0.1", port)) as mapped:  # arrives as ::ffff:127.0.0.1, counts as IPv4
        assert tcp_get(mapped, b"k") == b"200 v\n"
    with socket.create_connection(("::1", port), timeout=10) as v6:
        assert_closed(v6)


def test_max_connections_closes_the_excess_at_once(backend, listening, pfrest_log):
    backend.answers["k"] = (200, ["v"])
    listener = listening(ephemeral([endpoint(backend, **{"max-connections": 2})]))
    address = listener.addresses["ep"]
    first, second = connect(address), connect(address)
    assert tcp_get(first, b"k") == tcp_get(second, b"k") == b"200 v\n"
    with connect(address) as third:
        assert_closed(third)
    assert "refused: max-connections (2) reached" in pfrest_log.text
    first.close()
    deadline = time.monotonic() + 5
    while listener.connection_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with connect(address) as fourth:
        assert tcp_get(fourth, b"k") == b"200 v\n"
    second.close()


def test_200_held_connections_do_not_stop_others(backend, listening):
    backend.answers["k"] = (200, ["v"])
    listener = listening(ephemeral([endpoint(backend, "socketmap-lookup")]))
    address = listener.addresses["ep"]
    held = [connect(address) for _ in range(200)]
    try:
        for sock in held[:20]:  # some hold half a request, the rest nothing at all
            sock.sendall(b"10:map")
        for sock in held[100:110]:  # held connections answer too
            assert ask(sock, netstring.encode(b"map k"), b",") == b"4:OK v,"
        answers = []

        def client():
            with connect(address) as sock:
                for _ in range(10):
                    answers.append(ask(sock, netstring.encode(b"map k"), b","))
        threads = [threading.Thread(target=client) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert answers == [b"4:OK v,"] * 200
        assert listener.connection_count() >= 200
    finally:
        for sock in held:
            sock.close()


def test_counters_by_reply_kind_and_backend_error(backend, listening):
    backend.answers.update({"k": (200, ["v"]), "down": (503, b""), "gone": (404, b"")})
    listener = listening(ephemeral([endpoint(backend)]))
    with connect(listener.addresses["ep"]) as sock:
        for key in (b"k", b"k", b"down", b"gone"):
            tcp_get(sock, key)
        line = listener.summary()[0]
    assert re.fullmatch(r"endpoint=ep connections=1 accepted=1 refused=- requests=4 "
                        r"replies=FOUND:2,NOTFOUND:1,TEMP:1 backend-errors=1 \(http-503:1\) "
                        r"ms-p50=\d+\.\d ms-p99=\d+\.\d", line), line


def test_idle_and_partial_request_timeouts(backend, listening):
    backend.answers["k"] = (200, ["v"])
    listener = listening(ephemeral([endpoint(backend, **{"idle-timeout": 2.0, "partial-request-timeout": 0.3})]))
    with connect(listener.addresses["ep"]) as idle, connect(listener.addresses["ep"]) as partial:
        assert tcp_get(idle, b"k") == b"200 v\n"
        started = time.monotonic()
        partial.sendall(b"get par")
        assert_closed(partial)
        assert 0.25 < time.monotonic() - started < 1.5  # the partial-request limit, not the idle one
        assert_closed(idle)
        assert 1.9 < time.monotonic() - started < 6
    with connect(listener.addresses["ep"]) as drip:  # a byte every 0.1 s never resets the deadline
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"get " + b"x" * 100:
                drip.sendall(bytes([byte]))
                time.sleep(0.1)
            assert_closed(drip)
        assert time.monotonic() - started < 2


def test_reload_in_process(backend, listening, tmp_path):
    other = Backend()
    try:
        backend.answers["k"] = (200, ["old"])
        other.answers["k"] = (200, ["new"])
        a, b = endpoint(backend, name="a"), endpoint(backend, name="b")
        listener = listening(ephemeral([a, b]))
        before = listener.addresses
        with connect(before["a"]) as kept_a, connect(before["b"]) as kept_b:
            assert tcp_get(kept_a, b"k") == b"200 old\n"
            new = ephemeral([dict(a, target=other.url + "/lookup"),
                             unix_endpoint(backend, tmp_path / "c.sock", name="c")])
            listener.reload(new)
            after = listener.addresses
            assert after["a"] == before["a"] and "b" not in after and after["c"].endswith("c.sock")
            assert tcp_get(kept_a, b"k") == b"200 new\n"  # open connections get the new settings too
            assert_closed(kept_b)                          # b is gone: its idle connection closes
            with connect(after["a"]) as fresh:
                assert tcp_get(fresh, b"k") == b"200 new\n"
            with pytest.raises(ConnectionRefusedError):
                connect(before["b"])
            with pytest.raises(config.ConfigError, match="no endpoint named 'zz'"):
                Server(new, names=["zz"]).bind()
            with pytest.raises(config.ConfigError, match="nothing to serve"):
                listener.reload(dataclasses.replace(new, endpoints=()))
            assert listener.addresses == after
            # same sockets, other protocol and file mode: connections of the old protocol close; the
            # mode waits for the next start (socketfiles: never a chmod by path)
            listener.reload(ephemeral([dict(a, mode="socketmap-lookup"),
                                       unix_endpoint(backend, tmp_path / "c.sock", name="c",
                                                     **{"bind-mode": "0600"})]))
            assert listener.addresses == after
            assert_closed(kept_a)
            assert stat.S_IMODE(os.stat(after["c"]).st_mode) == 0o660
            with connect(after["a"]) as fresh:
                assert ask(fresh, netstring.encode(b"m k"), b",") == b"6:OK old,"
    finally:
        other.stop()


# --- real processes ------------------------------------------------------------------------------

class Served:
    """A `pfrest serve` process whose log (stderr) is collected line by line."""

    def __init__(self, args, env=None, prefix=()):
        self.proc = subprocess.Popen([*prefix, *pfrest_cmd("serve", *args)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env or pfrest_env(), cwd=ROOT)
        self.lines, self.ended = [], False
        self._cond = threading.Condition()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self):
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    @property
    def log(self):
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern, after=0, timeout=20):
        """The first log line from index ``after`` on that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if self.ended or left <= 0:
                    raise AssertionError(f"no log line like {pattern!r}:\n" + "\n".join(self.lines))
                self._cond.wait(left)

    def mark(self):
        with self._cond:
            return len(self.lines)

    def send(self, signum):
        self.proc.send_signal(signum)

    def exit_status(self, timeout=20):
        """Wait for the process to end and for its last log line to be collected."""
        status = self.proc.wait(timeout)
        with self._cond:
            self._cond.wait_for(lambda: self.ended, timeout=5)
        return status


@pytest.fixture
def served():
    """served(args..., env=, prefix=) -> a running Served; every one is stopped at teardown."""
    started = []

    def start(*args, env=None, prefix=()):
        started.append(Served(args, env, prefix))
        return started[-1]
    yield start
    for proc in started:
        stop_process(proc.proc)


def test_sighup_changed_target_broken_config_and_counters(backend, write_config, served, tmp_path):
    other = Backend()
    try:
        backend.answers["k"] = (200, ["old"])
        # the rotated token must be what the connection already open sends, too
        other.answers["k"] = lambda request: (200, ["new"]) if request.headers.get("x-auth-token") == \
            "n3w-t0ken" else (403, b"")
        path = tmp_path / "t.sock"
        cfg = write_config([unix_endpoint(backend, path, **{"auth-token": "t0ken"})])
        os.chmod(cfg, 0o644)
        proc = served("-c", cfg)
        proc.wait_for(r"ready: serving 1 endpoint")
        assert "holds an auth-token and is readable by every user" in proc.log  # config.warnings()
        assert "running as root" in proc.log or os.geteuid() != 0
        with connect(str(path)) as kept:
            assert tcp_get(kept, b"k") == b"200 old\n"
            write_config([unix_endpoint(other, path, **{"auth-token": "n3w-t0ken"})])
            mark = proc.mark()
            proc.send(signal.SIGHUP)
            proc.wait_for(r"reloaded ", after=mark)
            with connect(str(path)) as fresh:
                assert tcp_get(fresh, b"k") == b"200 new\n"
            assert tcp_get(kept, b"k") == b"200 new\n"  # connections already open: the new settings too
            with open(cfg, "w") as f:
                f.write('{"endpoints": [{"name": "ep", "mode": "tcp-lookup", "bind-port": 0}]}')
            mark = proc.mark()
            proc.send(signal.SIGHUP)
            proc.wait_for(r"reload: keeping the old configuration", after=mark)
            proc.wait_for(r"endpoints\[0\] \(ep\)\.bind-port: must be 1\.\.65535", after=mark)
            proc.wait_for(r"endpoints\[0\] \(ep\)\.target: is required", after=mark)
            with connect(str(path)) as fresh:
                assert tcp_get(fresh, b"k") == b"200 new\n"
            mark = proc.mark()
            proc.send(signal.SIGUSR1)
            line = proc.wait_for(r"stats endpoint=ep .*", after=mark).group(0)
            assert re.search(r"connections=\d accepted=3 .* requests=4 replies=FOUND:4 backend-errors=0 "
                             r".* ms-p50=\d+\.\d ms-p99=\d+\.\d", line), line
        proc.send(signal.SIGTERM)
        assert proc.exit_status() == 0
        assert not path.exists()
        assert "t0ken" not in proc.log and "n3w-t0ken" not in proc.log
    finally:
        other.stop()


def slow(seconds, answer):
    def respond(request):
        time.sleep(seconds)
        return answer
    return respond


def test_sigterm_answers_every_request_in_flight(backend, write_config, served, tmp_path):
    backend.answers["slow"] = slow(1.0, (200, ["done"]))
    backend.answers["slowpol"] = slow(1.0, (200, b"DUNNO"))
    port = free_port()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    env = dict(pfrest_env(), NOTIFY_SOCKET=str(tmp_path / "notify"))
    policy_path = tmp_path / "pol.sock"
    cfg = write_config([endpoint(backend, "tcp-lookup", "t", **{"bind-port": port}),
                        unix_endpoint(backend, policy_path, "policy", "p")])
    proc = served("-c", cfg, env=env)
    assert notify.recv(100).startswith(b"READY=1")
    busy = [connect(("127.0.0.1", port)) for _ in range(4)] + [connect(str(policy_path)) for _ in range(2)]
    idle = [connect(("127.0.0.1", port)), connect(str(policy_path))]
    for sock in busy[:4]:
        sock.sendall(b"get slow\n")
    for sock in busy[4:]:
        sock.sendall(POLICY_REQUEST % b"slowpol")
    deadline = time.monotonic() + 10
    while len(backend.requests) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(backend.requests) == 6
    proc.send(signal.SIGTERM)
    assert notify.recv(100) == b"STOPPING=1"
    for sock in idle:
        assert_closed(sock)  # at once, not after the slow requests
    with pytest.raises(ConnectionRefusedError):
        connect(("127.0.0.1", port))
    for sock in busy[:4]:
        assert sock.recv(100) == b"200 done\n"
        assert_closed(sock)
    for sock in busy[4:]:
        assert sock.recv(100) == b"action=DUNNO\n\n"
        assert_closed(sock)
    assert proc.exit_status() == 0
    assert "stats endpoint=t" in proc.log and proc.log.rstrip().endswith("stopped")
    for sock in busy + idle + [notify]:
        sock.close()


def test_second_signal_exits_at_once(backend, write_config, served, tmp_path):
    backend.answers["slow"] = slow(5.0, (200, ["late"]))
    path = tmp_path / "t.sock"
    proc = served("-c", write_config([unix_endpoint(backend, path, **{"request-timeout": 9000})]))
    proc.wait_for("ready:")
    with connect(str(path)) as sock:
        sock.sendall(b"get slow\n")
        deadline = time.monotonic() + 10
        while not backend.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send(signal.SIGINT)
        proc.wait_for("SIGINT: no longer accepting")
        started = time.monotonic()
        proc.send(signal.SIGINT)
        assert proc.exit_status() == 1
        assert time.monotonic() - started < 3
    assert "second SIGINT: exiting at once" in proc.log


def test_postmap_against_serve(backend, write_config, served, postmap_conf, tmp_path):
    backend.answers.update({"a b%c": (200, ["x y"]), "k": (200, ["v1", "v2"])})
    port = free_port()
    sm_path = tmp_path / "sm.sock"
    cfg = write_config([endpoint(backend, "tcp-lookup", "t", **{"bind-port": port}),
                        unix_endpoint(backend, sm_path, "socketmap-lookup", "s")])
    proc = served("-c", cfg, "t", "s")
    proc.wait_for("ready: serving 2")
    assert postmap(postmap_conf, "a b%c", f"tcp:127.0.0.1:{port}") == (0, "x y\n", "")
    assert postmap(postmap_conf, "nope", f"tcp:127.0.0.1:{port}")[:2] == (1, "")
    assert postmap(postmap_conf, "k", f"socketmap:unix:{sm_path}:virtual") == (0, "v1,v2\n", "")
    proc.wait_for(r"endpoint=s id=\w+ map=virtual key=k status=200 reply=FOUND")  # the log may lag


def test_systemd_socket_activation(backend, write_config, served, postmap_conf, tmp_path):
    need_binary("systemd-socket-activate")
    backend.answers["k"] = (200, ["from-systemd"])
    port = free_port()
    sm_path = tmp_path / "sa.sock"
    # the config's own bind-port is not used: the endpoint takes the socket named after it
    cfg = write_config([endpoint(backend, "tcp-lookup", "t", **{"bind-port": 1}),
                        endpoint(backend, "socketmap-lookup", "s", **{"bind-port": 2})])
    activate = [need_binary("systemd-socket-activate"), "-l", f"127.0.0.1:{port}", "-l", str(sm_path),
                "--fdname=t:s", "-E", f"PYTHONPATH={ROOT}"]
    proc = served("-c", cfg, prefix=activate)
    proc.wait_for(f"Listening on {re.escape(str(sm_path))}")
    # systemd-socket-activate starts pfrest on the first connection, as systemd does with Accept=no
    assert postmap(postmap_conf, "k", f"tcp:127.0.0.1:{port}") == (0, "from-systemd\n", "")
    assert postmap(postmap_conf, "k", f"socketmap:unix:{sm_path}:m") == (0, "from-systemd\n", "")
    assert re.search(rf"endpoint=t mode=tcp-lookup listening on 127\.0\.0\.1:{port} \(from systemd\)", proc.log)
    proc.send(signal.SIGTERM)
    assert proc.exit_status() == 0


def test_bind_failures_name_the_endpoint(backend, write_config, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config([unix_endpoint(backend, tmp_path / "ok.sock", name="ok"),
                            endpoint(backend, name="busy", **{"bind-port": port})])
        proc = subprocess.run(pfrest_cmd("serve", "-c", cfg), capture_output=True, text=True, timeout=30,
                              env=pfrest_env(), cwd=ROOT)
    assert proc.returncode == 1
    assert f"endpoint busy: cannot listen on 127.0.0.1:{port}: Address already in use; another pfrest " \
        "serve (the pfrest service?) or another program may be listening there: see ss -ltnp, or stop it " \
        "first" in proc.stderr
    assert not (tmp_path / "ok.sock").exists()  # what was bound is undone
    proc = subprocess.run(pfrest_cmd("serve", "-c", cfg, "nope", "--syslog"), capture_output=True,
                          text=True, timeout=30, env=pfrest_env(), cwd=ROOT)
    assert proc.returncode == 78 and "no endpoint named 'nope'" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_root_drops_privileges_after_binding(backend, write_config, served, tmp_path):
    import pwd
    nobody = pwd.getpwnam("nobody")
    backend.answers["k"] = (200, ["v"])
    path = tmp_path / "p.sock"
    cfg = write_config([unix_endpoint(backend, path, **{"bind-mode": "0666"})], user="nobody")
    proc = served("-c", cfg)
    proc.wait_for("ready:")
    assert "running as user nobody" in proc.log
    with open(f"/proc/{proc.proc.pid}/status") as f:
        ids = {line.split(":")[0]: line.split()[1:] for line in f if line.startswith(("Uid", "Gid"))}
    assert ids["Uid"] == [str(nobody.pw_uid)] * 4 and ids["Gid"] == [str(nobody.pw_gid)] * 4
    assert os.stat(path).st_uid == nobody.pw_uid
    with connect(str(path)) as sock:
        assert tcp_get(sock, b"k") == b"200 v\n"
    proc.send(signal.SIGTERM)
    assert proc.exit_status() == 0
    deadline = time.monotonic() + 10  # nobody may not unlink in tmp_path: root's janitor does, at exit
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not path.exists()


# --- the systemd helpers, on their own --------------------------------------------------------------

def test_notify_reaches_path_and_abstract_sockets(tmp_path, monkeypatch):
    for address, bind_to in ((str(tmp_path / "n"), str(tmp_path / "n")),
                             (f"@pfrest-test-{os.getpid()}", f"\0pfrest-test-{os.getpid()}")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(bind_to)
            monkeypatch.setenv("NOTIFY_SOCKET", address)
            assert systemd.notify("READY=1")
            assert sock.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert systemd.notify("READY=1") is False


def test_listen_fds_only_for_this_process(monkeypatch):
    """The fds themselves are covered by the systemd-socket-activate test."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "a:b")
    assert systemd.listen_fds() == []
    assert not any(v in os.environ for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))


def test_cli_help_does_not_import_the_listener():
    code = ("import sys; from pfrest import cli\n"
            "try:\n    cli.main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert not {'pfrest.process.serving', 'asyncio', 'requests'} & set(sys.modules), sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=pfrest_env(), cwd=ROOT)


def test_cached_answers_need_no_backend_request(backend, listening, pfrest_log):
    """A hit is answered at once (no task, no backend request), byte for byte as the first answer."""
    backend.answers.update({"k": (200, ["v 1"]), "gone": (404, b"")})
    listener = listening(ephemeral([endpoint(backend, "socketmap-lookup", **{"cache-ttl": 60,
                                                                             "cache-negative-ttl": 60})]))
    with connect(listener.addresses["ep"]) as sock:
        for _ in range(3):
            assert ask(sock, netstring.encode(b"m k"), b",") == b"6:OK v 1,"
            assert ask(sock, netstring.encode(b"m gone"), b",") == b"9:NOTFOUND ,"
    assert len(backend.requests) == 2
    assert len(set(re.findall(r"endpoint=ep id=(\w+) map=m key=k status=200 reply=FOUND ms=\S+ cache=hit",
                              pfrest_log.text))) == 2
    assert "replies=FOUND:3,NOTFOUND:3" in listener.summary()[0]
