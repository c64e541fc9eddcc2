"""``pfrest init``: the file it writes (format, mode, a new token each time), what it refuses (an existing
file or link, a bad --target, unknown modes), and the Postfix lines it prints.  The end-to-end run (init,
check, serve, postmap through a reference backend) is in test_contrib_backends.py."""

import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import ROOT, pfrest_cmd, pfrest_env
from pfrest.commands import init

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

TARGET = "http://127.0.0.1:8081"


def pfrest(*args):
    return subprocess.run(pfrest_cmd(*args), capture_output=True, text=True, timeout=60, env=pfrest_env(),
                          cwd=ROOT)


def read(path):
    with open(path, "rb") as f:
        return tomllib.load(f) if str(path).endswith(".toml") else json.load(f)


@pytest.mark.parametrize("name", ["pfrest.toml", "pfrest.json"])
def test_writes_a_config_that_check_accepts(tmp_path, name):
    path = tmp_path / name
    proc = pfrest("init", "-c", str(path), "--target", TARGET)
    assert proc.returncode == 0, proc.stderr
    doc = read(path)
    assert [(ep["name"], ep["mode"], ep["target"]) for ep in doc["endpoints"]] == [
        ("domains", "tcp-lookup", f"{TARGET}/domains"), ("aliases", "socketmap-lookup", f"{TARGET}/aliases"),
        ("policy", "policy", f"{TARGET}/policy")]
    tokens = {ep["auth-token"] for ep in doc["endpoints"]}
    assert len(tokens) == 1 and len(tokens.pop()) >= 43
    if name.endswith(".toml"):
        assert path.read_text().startswith("# pfrest config written by `pfrest init`")
    check = pfrest("check", "-c", str(path))
    assert check.returncode == 0 and f"{path}: valid" in check.stdout, check.stderr
    # the lines for the endpoints it wrote: main.cf's, and master.cf's for spawn
    assert "virtual_mailbox_domains = tcp:127.0.0.1:9001" in proc.stdout
    assert "virtual_alias_maps = socketmap:unix:private/pfrest-aliases:aliases" in proc.stdout
    assert "check_policy_service unix:private/pfrest-policy" in proc.stdout
    assert "pfrest-policy unix - n n - 0 spawn" in proc.stdout
    assert f"handle -c {path} policy" in proc.stdout
    assert doc["endpoints"][0]["auth-token"] not in proc.stdout + proc.stderr  # never shown


def test_every_file_gets_a_new_token(tmp_path):
    for name in ("a.json", "b.json"):
        assert pfrest("init", "-c", str(tmp_path / name), "--target", TARGET).returncode == 0
    assert read(tmp_path / "a.json")["endpoints"][0]["auth-token"] != \
        read(tmp_path / "b.json")["endpoints"][0]["auth-token"]


def test_only_the_modes_asked_on_the_ports_asked(tmp_path):
    path = tmp_path / "p.json"
    proc = pfrest("init", "-c", str(path), "--target", TARGET, "--modes", "socketmap,policy", "--port-base", "9301")
    assert proc.returncode == 0, proc.stderr
    assert [(ep["name"], ep.get("bind-port")) for ep in read(path)["endpoints"]] == [
        ("aliases", 9302), ("policy", 9303)]
    assert "socketmap:inet:127.0.0.1:9302:aliases" in proc.stdout
    assert "check_policy_service inet:127.0.0.1:9303" in proc.stdout
    assert "127.0.0.1:9303 inet n n n - 0 spawn" in proc.stdout
    assert "tcp:" not in proc.stdout


def test_never_replaces_a_file(tmp_path):
    path = tmp_path / "pfrest.json"
    path.write_text("precious")
    proc = pfrest("init", "-c", str(path), "--target", TARGET)
    assert proc.returncode == 73
    assert f"{path} exists; it was left as it is" in proc.stderr
    assert path.read_text() == "precious"


def test_never_follows_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "pfrest.json"
    link.symlink_to(victim)
    dangling = tmp_path / "pfrest.toml"
    dangling.symlink_to(tmp_path / "created-through-the-link")
    assert pfrest("init", "-c", str(link), "--target", TARGET).returncode == 73
    assert pfrest("init", "-c", str(dangling), "--target", TARGET).returncode == 73
    assert victim.read_text() == "precious"
    assert not (tmp_path / "created-through-the-link").exists()


def test_a_missing_directory_is_exit_73(tmp_path):
    proc = pfrest("init", "-c", str(tmp_path / "nowhere" / "pfrest.json"), "--target", TARGET)
    assert proc.returncode == 73
    assert proc.stderr == (f"pfrest init: cannot create {tmp_path}/nowhere/pfrest.json: its directory does not "
                           f"exist (mkdir -p {tmp_path}/nowhere first)\n")


def test_spawn_runs_this_very_pfrest(tmp_path):
    """argv= in master.cf names the pfrest that wrote it (a venv's, say), by its absolute path."""
    program = tmp_path / "bin" / "pfrest"
    program.parent.mkdir()
    program.write_text(f"#!{sys.executable}\nimport sys\nfrom pfrest.cli import main\nsys.exit(main())\n")
    program.chmod(0o755)
    proc = subprocess.run([str(program), "init", "-c", str(tmp_path / "p.json"), "--target", TARGET],
                          capture_output=True, text=True, timeout=60, env=pfrest_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert f"argv={program} handle -c {tmp_path}/p.json domains" in proc.stdout


def test_a_bad_target_names_the_option(tmp_path):
    proc = pfrest("init", "-c", str(tmp_path / "p.json"), "--target", "ftp://backend")
    assert proc.returncode == 78
    assert proc.stderr.strip() == "pfrest init: --target ftp://backend: must be an http or https URL"
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("modes", ["tcp,smtp", ""])
def test_unknown_modes_are_a_usage_error(tmp_path, modes):
    proc = pfrest("init", "-c", str(tmp_path / "p.json"), "--target", TARGET, "--modes", modes)
    assert proc.returncode == 64 and "--modes: must be a comma-separated list of tcp,socketmap,policy" in proc.stderr


def test_private_to_its_owner_unless_serve_runs_as_pfrest(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(init, "default_user", lambda: None)
    assert init.run(str(tmp_path / "own.json"), ["tcp"], TARGET) == 0
    st = os.stat(tmp_path / "own.json")
    assert stat.S_IMODE(st.st_mode) == 0o600 and "user" not in read(tmp_path / "own.json")


def test_as_root_readable_by_the_pfrest_account(tmp_path, capsys):
    import grp
    if init.default_user() is None:
        pytest.skip("needs root and the pfrest account (the Debian package creates it)")
    assert init.run(str(tmp_path / "root.toml"), ["tcp"], TARGET) == 0
    st = os.stat(tmp_path / "root.toml")
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0
    assert grp.getgrgid(st.st_gid).gr_name == "pfrest"
    assert read(tmp_path / "root.toml")["user"] == "pfrest"
    assert "(mode 0640, group pfrest)" in capsys.readouterr().out


@pytest.mark.parametrize("word", ["auth", "sasl", "dovecot-sasl"])
def test_smtp_auth_when_asked_with_the_main_cf_lines(tmp_path, word):
    path = tmp_path / "p.toml"
    proc = pfrest("init", "-c", str(path), "--target", TARGET, "--modes", f"policy,{word}")
    assert proc.returncode == 0, proc.stderr
    [policy, auth] = read(path)["endpoints"]
    assert (auth["name"], auth["mode"], auth["target"]) == ("auth", "dovecot-sasl", f"{TARGET}/auth")
    assert auth["bind-path"] == "/var/spool/postfix/private/pfrest-auth"
    for line in ("smtpd_sasl_auth_enable = yes", "smtpd_sasl_type = dovecot",
                 "smtpd_sasl_path = private/pfrest-auth", "smtpd_tls_auth_only = yes",
                 "pfrest-auth unix - n n - 0 spawn", "pfrest-auth_time_limit = 86400s",
                 "pfrest-policy_time_limit = 3600s"):
        assert f"    {line}" in proc.stdout, (line, proc.stdout)
    assert f" handle -c {path} auth\n" in proc.stdout
    assert "# dovecot-sasl: SMTP AUTH" in path.read_text()
    check = pfrest("check", "-c", str(path))
    assert check.returncode == 0 and "(auth)" not in check.stderr, check.stderr   # no login warning
    assert "tcp" not in [ep["name"] for ep in read(path)["endpoints"]]


def test_smtp_auth_on_a_port(tmp_path):
    path = tmp_path / "p.json"
    proc = pfrest("init", "-c", str(path), "--target", TARGET, "--modes", "tcp,auth", "--port-base", "9301")
    assert proc.returncode == 0, proc.stderr
    assert [(ep["name"], ep.get("bind-port")) for ep in read(path)["endpoints"]] == [("domains", 9301), ("auth", 9304)]
    assert "    smtpd_sasl_path = inet:127.0.0.1:9304" in proc.stdout
    assert pfrest("init", "-c", str(tmp_path / "q.json"), "--target", TARGET, "--port-base", "65533").returncode == 64
