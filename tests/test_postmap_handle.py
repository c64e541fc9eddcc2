"""Real Postfix as the client: `postmap -q` against `pfrest handle` behind an inetd-style launcher
(socat EXEC: for one mode, systemd-socket-activate --inetd for the other), as spawn(8) would run it."""

import os
import re
import shlex
import socket
import subprocess
import time

import pytest

from conftest import ROOT, need_binary

KEYS = {
    "found.example": (200, ["the-value"]),
    "hello world": (200, ["value with spaces % and \u00e9"]),
    "100%": (200, ["percent"]),
    "cl\u00e9": (200, ["\u00fcn\u00ef"]),
    "multi": (200, ["a@x", "b@y"]),
    "down": (503, b""),
    "empty": (200, []),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def postmap_dir(tmp_path_factory):
    """postmap needs a config directory; a fresh Debian install has no /etc/postfix/main.cf."""
    need_binary("postmap")
    d = tmp_path_factory.mktemp("postfix-conf")
    (d / "main.cf").write_text("compatibility_level = 3.6\n")
    old = time.time() - 10  # Postfix re-reads a main.cf younger than ~2 s until it settles
    os.utime(d / "main.cf", (old, old))
    return str(d)


def postmap(confdir, key, table, stdin=None):
    args = ["postmap", "-c", confdir, "-q", key, table]
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)


@pytest.fixture(params=["tcp-lookup", "socketmap-lookup"])
def launched(request, backend, write_config, tmp_path):
    """A launcher listening on a loopback port that runs `pfrest handle` per connection."""
    mode = request.param
    for key, answer in KEYS.items():
        backend.answers[key] = answer
    cfg = write_config([{"name": "ep", "mode": mode, "target": backend.url + "/lookup",
                         "auth-token": "tok", "request-timeout": 2000}])
    log = tmp_path / "handle.log"
    wrapper = tmp_path / "handler.sh"
    # socat's EXEC: splits on blanks and cannot quote: a one-line wrapper carries the argv
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in [
        "env", f"PYTHONPATH={ROOT}", "python3", "-m", "pfrest", "handle", "-c", cfg,
        "--log-file", str(log), "ep"]) + "\n")
    wrapper.chmod(0o755)
    port = free_port()
    if mode == "tcp-lookup":
        need_binary("systemd-socket-activate")
        cmd = ["systemd-socket-activate", "--inetd", "-a", "-l", f"127.0.0.1:{port}", str(wrapper)]
        table = f"tcp:127.0.0.1:{port}"
    else:
        need_binary("socat")
        cmd = ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{wrapper}"]
        table = f"socketmap:inet:127.0.0.1:{port}:mymap"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield mode, table, backend, log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_found_not_found_and_encodings(launched, postmap_dir):
    mode, table, backend, log = launched
    for key, value in [("found.example", "the-value"), ("hello world", "value with spaces % and \u00e9"),
                       ("100%", "percent"), ("cl\u00e9", "\u00fcn\u00ef"), ("multi", "a@x,b@y")]:
        proc = postmap(postmap_dir, key, table)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, value + "\n", ""), key
    for key in ("unknown", "empty"):
        proc = postmap(postmap_dir, key, table)
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", ""), key
    seen = [dict(r.query).get("key") for r in backend.requests]
    assert seen[:5] == ["found.example", "hello world", "100%", "cl\u00e9", "multi"]
    if mode == "socketmap-lookup":
        assert all(dict(r.query)["name"] == "mymap" for r in backend.requests)


def test_temporary_error_is_a_query_error(launched, postmap_dir):
    mode, table, backend, log = launched
    proc = postmap(postmap_dir, "down", table)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "query error" in proc.stderr
    if mode == "socketmap-lookup":
        assert "socketmap server temporary error: backend error (HTTP 503) (ref " in proc.stderr


def test_many_keys_over_one_connection(launched, postmap_dir):
    mode, table, backend, log = launched
    keys = ["found.example", "unknown", "hello world", "cl\u00e9", "multi"]
    proc = postmap(postmap_dir, "-", table, stdin="\n".join(keys) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("found.example\tthe-value\nhello world\tvalue with spaces % and \u00e9\n"
                           "cl\u00e9\t\u00fcn\u00ef\nmulti\ta@x,b@y\n")
    pids = set(re.findall(r"pfrest\[(\d+)\]", log.read_text()))
    assert len(pids) == 1  # one handler process served every key
    assert len(backend.requests) == len(keys)
