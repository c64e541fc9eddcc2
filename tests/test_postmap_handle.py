"""Real Postfix as the client: `postmap -q` against `pfrest handle` behind an inetd-style launcher
(socat EXEC: for one mode, systemd-socket-activate --inetd for the other), as spawn(8) would run it."""

import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, need_binary, postmap
from postfix_instance import free_port, wait_port

KEYS = {
    "found.example": (200, ["the-value"]),
    "hello world": (200, ["value with spaces % and \u00e9"]),
    "100%": (200, ["percent"]),
    "cl\u00e9": (200, ["\u00fcn\u00ef"]),
    "multi": (200, ["a@x", "b@y"]),
    "down": (503, b""),
    "empty": (200, []),
}


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
        "env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "pfrest", "handle", "-c", cfg,
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


def test_found_not_found_and_encodings(launched, postmap_conf):
    mode, table, backend, log = launched
    for key, value in [("found.example", "the-value"), ("hello world", "value with spaces % and \u00e9"),
                       ("100%", "percent"), ("cl\u00e9", "\u00fcn\u00ef"), ("multi", "a@x,b@y")]:
        assert postmap(postmap_conf, key, table) == (0, value + "\n", ""), key
    for key in ("unknown", "empty"):
        assert postmap(postmap_conf, key, table) == (1, "", ""), key
    seen = [dict(r.query).get("key") for r in backend.requests]
    assert seen[:5] == ["found.example", "hello world", "100%", "cl\u00e9", "multi"]
    if mode == "socketmap-lookup":
        assert all(dict(r.query)["name"] == "mymap" for r in backend.requests)


def test_temporary_error_is_a_query_error(launched, postmap_conf):
    mode, table, backend, log = launched
    status, out, err = postmap(postmap_conf, "down", table)
    assert status == 1 and out == ""
    assert "query error" in err
    if mode == "socketmap-lookup":
        assert "socketmap server temporary error: backend error (HTTP 503) (ref " in err


def test_many_keys_over_one_connection(launched, postmap_conf):
    mode, table, backend, log = launched
    keys = ["found.example", "unknown", "hello world", "cl\u00e9", "multi"]
    status, out, err = postmap(postmap_conf, "-", table, stdin="\n".join(keys) + "\n")
    assert status == 0, err
    assert out == ("found.example\tthe-value\nhello world\tvalue with spaces % and \u00e9\n"
                           "cl\u00e9\t\u00fcn\u00ef\nmulti\ta@x,b@y\n")
    # one handler process served every key (wait_port's connection had one too, which asked nothing)
    pids = set(re.findall(r"pfrest\[(\d+)\]: INFO: endpoint=ep id=", log.read_text()))
    assert len(pids) == 1
    assert len(backend.requests) == len(keys)
