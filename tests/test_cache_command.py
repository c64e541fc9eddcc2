"""`pfrest cache drop` and `flush` for endpoints without a shared cache: through the control socket of a
real `pfrest serve --workers 2`, which passes them to each worker; socketmap keys with their map name;
the socket answers root and serve's own user only; what the command refuses, and its exit status."""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest

from conftest import ROOT, pfrest_cmd, pfrest_env
from pfrest import cli
from pfrest.cache import sharedformat
from pfrest.commands import localhttp
from pfrest.ops import controlsocket
from pfrest.protocol import netstring
from postfix_instance import free_port
from test_serve import ask, connect, served, tcp_get  # noqa: F401 (served is a fixture)

EX_USAGE, EX_UNAVAILABLE = 64, 69


def cache(*args):
    return subprocess.run(pfrest_cmd("cache", *args), capture_output=True, text=True, timeout=60,
                          env=pfrest_env(), cwd=ROOT)


def sm_get(sock, mapname, key):
    return ask(sock, netstring.encode(mapname + b" " + key), b",")


@pytest.fixture
def reachable():
    """A directory every user may enter (a test's tmp_path is root's alone), removed after."""
    directory = tempfile.mkdtemp(prefix="pfrest-control-")
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def serve(backend, write_config, served, reachable):
    """A serve --workers 2 with a cached tcp and socketmap endpoint, an uncached one, a policy one and an
    auth one."""
    control = os.path.join(reachable, "control.sock")
    ports = {name: free_port() for name in ("tcp", "sm", "plain", "pol", "auth")}
    common = {"target": backend.url + "/lookup", "request-timeout": 3000}
    path = write_config([
        {"name": "tcp", "mode": "tcp-lookup", "bind-port": ports["tcp"], "cache-ttl": 600, **common},
        {"name": "sm", "mode": "socketmap-lookup", "bind-port": ports["sm"], "cache-ttl": 600, **common},
        {"name": "plain", "mode": "tcp-lookup", "bind-port": ports["plain"], **common},
        {"name": "pol", "mode": "policy", "bind-port": ports["pol"], **common},
        {"name": "auth", "mode": "dovecot-sasl", "bind-port": ports["auth"], **common}],
        **{"control-socket": control})
    proc = served("-c", path, "--workers", "2")
    proc.wait_for(r"ready: serving 5 endpoint")
    return path, ports, control, proc


def test_drop_and_flush_reach_every_worker(serve, backend):
    path, ports, _, proc = serve
    backend.answers.update({"k": (200, ["old"]), "x": (200, ["x-old"]), "a@b": (200, ["sm-old"])})
    socks = [connect(("127.0.0.1", ports["tcp"])) for _ in range(2)]   # one connection on each worker
    maps = [connect(("127.0.0.1", ports["sm"])) for _ in range(2)]
    try:
        for sock in socks:
            assert tcp_get(sock, b"k") == b"200 old\n" and tcp_get(sock, b"x") == b"200 x-old\n"
        for sock in maps:
            assert sm_get(sock, b"aliases", b"a@b") == b"9:OK sm-old,"
        backend.answers.update({"k": (200, ["new"]), "x": (200, ["x-new"]), "a@b": (200, ["sm-new"])})
        assert [tcp_get(sock, b"k") for sock in socks] == [b"200 old\n"] * 2

        done = cache("-c", path, "drop", "tcp", "k")
        assert done.returncode == 0, done.stderr
        assert "(2 entries were there, in 2 process(es))" in done.stdout, done.stdout
        assert [tcp_get(sock, b"k") for sock in socks] == [b"200 new\n"] * 2
        assert [tcp_get(sock, b"x") for sock in socks] == [b"200 x-old\n"] * 2

        # a socketmap key is the map name and the key: another map's is another answer
        assert cache("-c", path, "drop", "sm", "a@b").returncode == 0          # map "sm": not the one used
        assert [sm_get(sock, b"aliases", b"a@b") for sock in maps] == [b"9:OK sm-old,"] * 2
        done = cache("-c", path, "drop", "sm", "--map", "aliases", "a@b")   # the README's order
        assert done.returncode == 0 and "(2 entries were there" in done.stdout, done.stdout
        assert [sm_get(sock, b"aliases", b"a@b") for sock in maps] == [b"9:OK sm-new,"] * 2

        assert cache("-c", path, "flush", "tcp").returncode == 0
        assert [tcp_get(sock, b"x") for sock in socks] == [b"200 x-new\n"] * 2
    finally:
        for sock in socks + maps:
            sock.close()
    assert proc.log.count("as pfrest cache asked") == 4


def test_what_the_command_refuses(serve, write_config, tmp_path, capsys):
    path, _, control, _ = serve

    def cache(*args):   # in this process: quicker than a process per case
        status = cli.main(["cache", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, status, out, err)
    for args, status, words in (
            (("drop", "pol", "k"), EX_USAGE, "a policy endpoint: its answers are never cached"),
            (("flush", "auth"), EX_USAGE, "a dovecot-sasl endpoint: its answers are never cached"),
            (("drop", "plain", "k"), EX_USAGE, "keeps no cache"),
            (("drop", "tcp"), EX_USAGE, "drop needs at least one KEY"),
            (("flush", "tcp", "k"), EX_USAGE, "flush takes no KEY"),
            (("drop", "tcp", "k", "--map", "m"), EX_USAGE, "--map is for socketmap-lookup endpoints"),
            (("drop", "tcp", ""), EX_USAGE, "an empty KEY is never looked up"),
            (("drop", "nosuch", "k"), 78, "no endpoint named 'nosuch'")):
        done = cache("-c", path, *args)
        assert (done.returncode, done.stdout) == (status, ""), (args, done.stdout, done.stderr)
        assert words in done.stderr, (args, done.stderr)
    # the serve has no such cached endpoint (its config is older than the file's), or no serve at all
    other = write_config([{"name": "tcp", "mode": "tcp-lookup", "target": "http://127.0.0.1:1/x",
                           "cache-ttl": 5, "bind-port": free_port()},
                          {"name": "new", "mode": "tcp-lookup", "target": "http://127.0.0.1:1/x",
                           "cache-ttl": 5, "bind-port": free_port()}],
                         name="other.json", **{"control-socket": control})
    done = cache("-c", other, "drop", "new", "k")
    assert done.returncode == EX_UNAVAILABLE and "keeps no cache in this pfrest serve" in done.stderr, done.stderr
    gone = write_config([{"name": "tcp", "mode": "tcp-lookup", "target": "http://127.0.0.1:1/x", "cache-ttl": 5}],
                        name="gone.json", **{"control-socket": str(tmp_path / "nobody-here.sock")})
    done = cache("-c", gone, "flush", "tcp")
    assert done.returncode == EX_UNAVAILABLE and "no pfrest serve answers at" in done.stderr, done.stderr
    # a shared cache where no store answers: said, with the password left out
    down = write_config([{"name": "tcp", "mode": "tcp-lookup", "target": "http://127.0.0.1:1/x", "cache-ttl": 5,
                          "cache-url": f"redis://:hush-hush@127.0.0.1:{free_port()}/0"}], name="down.json")
    done = cache("-c", down, "drop", "tcp", "k")
    assert done.returncode == EX_UNAVAILABLE and "cannot be reached: connection refused (is the store running " \
        "there" in done.stderr and "Error 111" not in done.stderr, done.stderr
    assert "run it again" in done.stderr and "hush-hush" not in done.stderr + done.stdout
    # a client-cert that is a link: not followed, so no namespace to drop from
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")
    (tmp_path / "link.pem").symlink_to(tmp_path / "cert.pem")
    linked = write_config([{"name": "tcp", "mode": "tcp-lookup", "target": "https://127.0.0.1:1/x", "cache-ttl": 5,
                            "cache-url": f"redis://127.0.0.1:{free_port()}/0",
                            "client-cert": str(tmp_path / "link.pem")}], name="linked.json")
    done = cache("-c", linked, "flush", "tcp")
    assert done.returncode == EX_UNAVAILABLE and "cannot read client-cert" in done.stderr, done.stderr


def test_the_control_socket_answers_root_and_its_own_user_only(serve):
    _, _, control, proc = serve
    assert os.stat(control).st_mode & 0o777 == 0o600
    os.chmod(control, 0o666)   # even when its mode would let others in
    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ntry:\n"
            "    s.sendall(b'POST /cache/tcp HTTP/1.1\\r\\nContent-Length: 5\\r\\n\\r\\nflush')\n"
            "    print(repr(s.recv(100)))\nexcept OSError as e:\n    print(type(e).__name__)")
    other = subprocess.run(["python3", "-c", code, control], user="nobody", capture_output=True, text=True,
                           timeout=30)
    # connected (the file's mode let it), then closed without an answer
    assert other.stdout.strip() in ("b''", "BrokenPipeError", "ConnectionResetError"), other.stdout + other.stderr
    proc.wait_for(r"control-socket: peer of user \d+ refused: only root and the user pfrest runs as")
    with socket.socket(socket.AF_UNIX) as sock:   # root is answered
        sock.connect(control)
        sock.sendall(b"POST /cache/tcp HTTP/1.1\r\nContent-Length: 5\r\n\r\nflush")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")


def test_many_keys_go_in_several_requests(serve):
    path, _, control, proc = serve
    keys = [f"k{i}" for i in range(controlsocket.MAX_KEYS + 1)]
    # the serve takes MAX_KEYS keys a request: more would cost it 30 times the body's size
    status, _, text = localhttp.exchange(control, "POST", "/cache/tcp", sharedformat.drop_message(
        [f"key={key}" for key in keys]))
    assert (status, text) == (413, b"over %d keys in one request\n" % controlsocket.MAX_KEYS)
    done = cache("-c", path, "drop", "tcp", *keys)
    assert done.returncode == 0, done.stderr
    assert f"the answers to {len(keys)} key(s) dropped" in done.stdout and "in 2 process(es)" in done.stdout
    assert proc.log.count("as pfrest cache asked") == 2   # in two requests


def test_stats_and_cache_reach_a_serve_whose_file_was_broken_since(backend, write_config, served, reachable):
    """A reload refused (the file on disk invalid while serve runs its last valid config) is when the admin
    needs stats and cache: they read only their part of the file, and say the rest is invalid."""
    control, port = os.path.join(reachable, "control.sock"), free_port()
    top = {"control-socket": control, "metrics-address": f"127.0.0.1:{free_port()}"}
    good = {"name": "tcp", "mode": "tcp-lookup", "bind-port": port, "cache-ttl": 600,
            "target": backend.url + "/lookup", "request-timeout": 3000}
    path = write_config([good], **top)
    proc = served("-c", path)
    proc.wait_for(r"ready: serving 1 endpoint")
    backend.answers["k"] = (200, ["old"])
    with connect(("127.0.0.1", port)) as sock:
        assert tcp_get(sock, b"k") == b"200 old\n"
        write_config([good, {"name": "new", "mode": "tcp-lookup", "target": "ftp://x"}], **top, colour="red")
        mark = proc.mark()
        proc.send(signal.SIGHUP)
        proc.wait_for(r"reload: keeping the old configuration", after=mark)
        warning = (f"warning: {path} is not valid (2 problem(s); pfrest check -c {path} lists them, and a pfrest "
                   "serve keeps its last valid config): using only ")
        stats = subprocess.run(pfrest_cmd("stats", "-c", path), capture_output=True, text=True, timeout=60,
                               env=pfrest_env(), cwd=ROOT)
        assert stats.returncode == 0 and re.search(r"(?m)^tcp\s+tcp-lookup\s", stats.stdout), stats.stderr
        assert stats.stderr == f"pfrest stats: {warning}metrics-address\n", stats.stderr
        backend.answers["k"] = (200, ["new"])
        done = cache("-c", path, "drop", "tcp", "k")
        assert done.returncode == 0 and "(1 entries were there" in done.stdout, done.stderr
        assert done.stderr == f"pfrest cache: {warning}control-socket and endpoint tcp\n", done.stderr
        assert tcp_get(sock, b"k") == b"200 new\n"
    # the broken endpoint itself, or the file unreadable as JSON: still refused, every problem named
    done = cache("-c", path, "flush", "new")
    assert done.returncode == 78 and "endpoints[1] (new).target: must be an http" in done.stderr, done.stderr
    assert "colour: unknown key" in done.stderr
    with open(path, "w") as f:
        f.write("{")
    for args in (("stats",), ("cache", "flush", "tcp")):
        done = subprocess.run(pfrest_cmd(*args, "-c", path), capture_output=True, text=True, timeout=60,
                              env=pfrest_env(), cwd=ROOT)
        assert done.returncode == 78 and "not valid JSON" in done.stderr, (args, done.stderr)
