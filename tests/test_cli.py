"""`pfrest check`, `pfrest query` and `--help` as real subprocesses."""

import json
import re
import subprocess
import sys

import pytest

from conftest import pfrest_cmd, pfrest_env, ROOT
from pfrest import cli
from test_config import SEED


def run(*args):
    return subprocess.run(pfrest_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=pfrest_env(), cwd=ROOT, timeout=30)


def test_help_and_version():
    for args in (["--help"], ["check", "--help"], ["handle", "--help"], ["query", "--help"]):
        proc = run(*args)
        assert proc.returncode == 0 and "usage: pfrest" in proc.stdout
    assert run("--version").stdout.startswith("pfrest ")
    assert run("-V").stdout == run("--version").stdout


def test_cache_keys_on_either_side_of_map():
    """The README's `pfrest cache drop aliases --map virtual info@example.com`, and the other order."""
    proc = run("cache", "-c", "/nonexistent.json", "drop", "aliases", "--map", "virtual", "info@example.com")
    assert proc.returncode == 78 and "cannot read" in proc.stderr, proc.stderr   # parsed; then the config
    for argv in (["drop", "aliases", "--map", "virtual", "info@example.com", "b@x"],
                 ["drop", "aliases", "info@example.com", "--map", "virtual", "b@x"],
                 ["drop", "aliases", "info@example.com", "b@x", "--map", "virtual"]):
        args = cli._parse(["cache", *argv])
        assert (args.name, args.mapname, args.keys) == ("aliases", "virtual", ["info@example.com", "b@x"]), argv


@pytest.mark.parametrize("argv", [
    ["nosuch"], [], ["check", "--bogus"], ["check", "extra"], ["handle"], ["query", "t"], ["serve", "--workers", "0"],
    ["stats", "extra"], ["cache", "drop"], ["cache", "drop", "t", "k", "--bogus"], ["cache", "purge", "t"],
    ["demo", "--port-base", "x"], ["handle", "t", "--bogus"]])
def test_every_usage_error_exits_64(argv):
    proc = run(*argv)
    assert proc.returncode == 64, (argv, proc.returncode, proc.stderr)   # EX_USAGE, not argparse's 2
    assert "usage: pfrest" in proc.stderr and "error:" in proc.stderr


def test_help_shows_the_exit_statuses():
    text = run("--help").stdout
    for code in ("0", "1", "64", "69", "75", "78"):
        assert re.search(rf"(?m)^ +{code}  \S", text), code


def test_check_and_help_do_not_import_the_request_path(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(SEED))
    code = ("import sys; from pfrest.cli import main; rc = main(['check', '-c', %r]); "
            "loaded = {'asyncio', 'httptools', 'uvloop', 'pfrest.backend', 'requests'} & set(sys.modules); "
            "assert not loaded, loaded; sys.exit(rc)" % str(path))
    proc = subprocess.run([sys.executable, "-c", code], env=pfrest_env(), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_check_valid_seed_config(tmp_path):
    path = tmp_path / "pfrest.json"
    path.write_text(json.dumps(SEED))
    path.chmod(0o600)
    proc = run("check", "-c", str(path))
    assert proc.returncode == 0
    assert "valid" in proc.stdout and "domain-lookup (tcp-lookup)" in proc.stdout
    assert "listens on 0.0.0.0" in proc.stderr  # the seed's 0.0.0.0 without allow-from


def test_check_invalid_config_names_fields(tmp_path):
    doc = {"endpoints": [{"name": "a", "mode": "tcp-lookup", "target": "http://h/"},
                         {"name": "b", "mode": "policy", "target": "gopher://x", "bind-port": 70000}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    proc = run("check", "-c", str(path))
    assert proc.returncode == 78  # EX_CONFIG, as serve, handle and query
    assert "endpoints[1] (b).target: must be an http or https URL" in proc.stderr
    assert "endpoints[1] (b).bind-port: must be 1..65535" in proc.stderr
    proc = run("check", "-c", str(tmp_path / "none.json"))
    assert proc.returncode == 78 and "cannot read" in proc.stderr


def test_query_each_mode_prints_exact_reply(backend, write_config):
    backend.answers["user@example.com"] = (200, ["a@x", "b@y"])
    backend.answers["blocked@example.com"] = (200, b"REJECT blocked")
    eps = [{"name": "t", "mode": "tcp-lookup", "target": backend.url + "/t", "auth-token": "tok-SECRET"},
           {"name": "s", "mode": "socketmap-lookup", "target": backend.url + "/s"},
           {"name": "p", "mode": "policy", "target": backend.url + "/p"}]
    path = write_config(eps)
    proc = run("query", "-c", path, "t", "user@example.com")
    assert proc.returncode == 0
    assert 'reply: "200 a@x,b@y\\n"' in proc.stdout and "value: a@x,b@y\n" in proc.stdout
    assert "backend: HTTP 200" in proc.stdout and "time: " in proc.stdout
    assert "tok-SECRET" not in proc.stdout + proc.stderr and "redacted" in proc.stdout
    proc = run("query", "-c", path, "--map", "virtual", "s", "user@example.com")
    assert 'reply: "10:OK a@x,b@y,"' in proc.stdout
    assert backend.requests[-1].raw_query == "name=virtual&key=user%40example.com"
    proc = run("query", "-c", path, "s", "nobody")
    assert proc.returncode == 1  # as postmap -q
    assert 'reply: "9:NOTFOUND ,"' in proc.stdout and "backend: HTTP 404" in proc.stdout
    assert backend.requests[-1].raw_query == "name=s&key=nobody"
    proc = run("query", "-c", path, "p", "recipient=blocked@example.com", "sender=x@y", "extra=1")
    assert proc.returncode == 0  # an action that is not a deferral
    assert 'reply: "action=REJECT blocked\\n\\n"' in proc.stdout
    form = backend.requests[-1].form()
    assert form[0] == ("request", "smtpd_access_policy")
    assert ("sender", "x@y") in form and form[-1] == ("extra", "1")
    assert len(form) == 30


def test_query_seed_endpoints(tmp_path):
    """The seed's example targets do not resolve here: a temporary answer, never found/not found."""
    path = tmp_path / "pfrest.json"
    path.write_text(json.dumps(SEED))
    proc = run("query", "-c", str(path), "domain-lookup", "example.com")
    assert proc.returncode == 75 and 'reply: "400 ' in proc.stdout
    assert "test123" not in proc.stdout + proc.stderr
    proc = run("query", "-c", str(path), "pol", "sender=a@b")
    assert 'reply: "action=DEFER_IF_PERMIT Policy service temporarily unavailable (ref ' in proc.stdout
    proc = run("query", "-c", str(path), "nope", "k")
    assert proc.returncode == 78 and "no endpoint named 'nope'" in proc.stderr


def test_the_plain_handle_command_line_needs_no_argparse():
    from pfrest.cli import handle_argv
    for argv, expected in [(["handle", "ep"], ("ep", "/etc/pfrest/pfrest.json", None)),
                           (["handle", "-c", "/x.json", "ep"], ("ep", "/x.json", None)),
                           (["handle", "--config=/x.json", "--log-file", "/l", "ep"], ("ep", "/x.json", "/l")),
                           (["handle", "ep", "--config", "/x.json"], ("ep", "/x.json", None))]:
        args = handle_argv(argv)
        assert (args.name, args.config, args.log_file) == expected, argv
    for argv in (["handle"], ["handle", "-h"], ["handle", "a", "b"], ["handle", "-c"], ["handle", "-x", "ep"],
                 ["handle", "-c", "a", "--config", "b", "ep"], ["check", "ep"], []):
        assert handle_argv(argv) is None, argv  # argparse's turn: help, usage errors
    code = ("import sys; from pfrest.cli import main\n"
            "try:\n    main(['handle', '-c', '/nonexistent.json', 'ep'])\nexcept SystemExit:\n    pass\n"
            "assert 'argparse' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=pfrest_env(), cwd=ROOT)
