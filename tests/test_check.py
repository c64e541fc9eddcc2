"""`pfrest check`: what it refuses (as `pfrest serve` does, exit 78), what it warns about, and
`check --postfix`, which compares Postfix's own configuration (read through real postconf from private
config directories) with pfrest's.

The refusals and warnings are checked against the system itself: two endpoints are refused exactly when
binding both fails, and "user nobody cannot read this" exactly when nobody cannot open it."""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import textwrap

import pytest

from conftest import ROOT, need_binary, pfrest_cmd, pfrest_env
from pfrest import cli, config, log
from pfrest.config import checks
from pfrest.system import sockets
from postfix_instance import (backdate, commented_main_cf, free_port, interpreter_for, master_entries,
                              need_root, remove_tree, shipped, shipped_config, substitute, world_tmpdir)


def run(*args):
    return subprocess.run(pfrest_cmd(*args), capture_output=True, text=True, env=pfrest_env(), cwd=ROOT,
                          timeout=60)


def endpoint(name, mode="tcp-lookup", **extra):
    return dict({"name": name, "mode": mode, "target": "http://127.0.0.1:9/x"}, **extra)


# --- refusals ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first,second", [
    ("localhost", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "127.0.0.1"),
    ("::", "::1"), ("::1", "127.0.0.1"), ("127.0.0.1", "127.0.0.2"), ("[::1]", "localhost")])
def test_two_endpoints_are_refused_exactly_when_serve_cannot_bind_both(first, second):
    port = free_port()
    cfg = config.parse({"endpoints": [endpoint("a", **{"bind-address": first, "bind-port": port}),
                                      endpoint("b", **{"bind-address": second, "bind-port": port})]})
    opened = []
    try:
        for ep in cfg.endpoints:
            opened.append(sockets.open_tcp(ep))
        both_bind = True
    except sockets.BindError:
        both_bind = False
    finally:
        for sock in opened:
            sock.close()
    expected = [] if both_bind else [f"endpoints[1] (b).bind-port: would listen on {second}:{port}, where "
                                     f"endpoints[0] (a) listens on {first}:{port}"]
    assert checks.refusals(cfg) == expected


def test_other_refusals():
    def refused(*endpoints, **top):
        return checks.refusals(config.parse({"endpoints": list(endpoints), **top}))
    assert refused(endpoint("a", **{"bind-path": "/run/pfrest/x.sock"}),
                   endpoint("b", **{"bind-path": "/run/pfrest/../pfrest/x.sock"})) == [
        "endpoints[1] (b).bind-path: would listen on /run/pfrest/../pfrest/x.sock, where endpoints[0] (a) "
        "listens on /run/pfrest/x.sock"]
    problem, = refused(endpoint("a", **{"bind-address": "no-such-host.invalid", "bind-port": 9001}))
    assert problem.startswith("endpoints[0] (a).bind-address: 'no-such-host.invalid' does not resolve")
    assert refused(endpoint("a"), user="no-such-user-for-pfrest") == [
        "user: no such user 'no-such-user-for-pfrest'"]
    assert refused(endpoint("a"), user="nobody") == refused(endpoint("a"), user="65534") == []
    # endpoints without a socket are not served: nothing to collide
    assert refused(endpoint("a"), endpoint("b"), endpoint("c", **{"bind-port": 9001})) == []


def test_check_and_serve_both_refuse_with_78(write_config, tmp_path):
    port = free_port()
    path = write_config([endpoint("a", **{"bind-path": str(tmp_path / "a.sock")}),
                         endpoint("b", **{"bind-address": "localhost", "bind-port": port}),
                         endpoint("c", **{"bind-address": "127.0.0.1", "bind-port": port})])
    message = (f"endpoints[2] (c).bind-port: would listen on 127.0.0.1:{port}, where endpoints[1] (b) listens "
               f"on localhost:{port}")
    proc = run("check", "-c", path)
    assert (proc.returncode, proc.stderr, proc.stdout) == (78, message + "\n", "")
    proc = run("serve", "-c", path)
    assert proc.returncode == 78 and message in proc.stderr
    assert not (tmp_path / "a.sock").exists()   # refused before binding anything
    path = write_config([], name="empty.json")
    proc = run("check", "-c", path)
    assert (proc.returncode, proc.stderr) == (78, "endpoints: must list at least one endpoint\n")


def test_check_says_what_serve_says_of_endpoints_without_a_socket(write_config, tmp_path):
    """serve refuses a config with no bind-port/bind-path anywhere ("nothing to serve"); check says so, as
    a config right for handle only; a bind-address without bind-port is refused by both, naming the fix."""
    path = write_config([endpoint("a"), endpoint("b")])
    proc = run("check", "-c", path)
    assert (proc.returncode, own(proc.stderr)) == (0, "") and f"{path}: valid;" in proc.stdout
    assert f"{path}: for pfrest handle only (spawn, xinetd, systemd Accept=yes): no endpoint has a bind-port or " \
        "bind-path, so pfrest serve would refuse it (nothing to serve)" in proc.stdout, proc.stdout
    serve = run("serve", "-c", path)
    assert serve.returncode == 78 and "nothing to serve" in serve.stderr
    # one endpoint with a socket: serve runs, so nothing more is said
    path = write_config([endpoint("a"), endpoint("b", **{"bind-path": str(tmp_path / "b.sock")})], name="some.json")
    proc = run("check", "-c", path)
    assert proc.returncode == 0 and proc.stdout == f"{path}: valid; a (tcp-lookup), b (tcp-lookup)\n", proc.stdout
    path = write_config([endpoint("a", **{"bind-path": str(tmp_path / "a.sock")}),
                         endpoint("b", **{"bind-address": "127.0.0.1"})], name="address.json")
    message = "endpoints[1] (b).bind-address: set without bind-port, so nothing listens on it: add bind-port"
    for command in ("check", "serve"):
        proc = run(command, "-c", path)
        assert proc.returncode == 78 and message in proc.stderr, (command, proc.stderr)
    assert not (tmp_path / "a.sock").exists()
    assert config.load(path).endpoints[1].bind_address_alone   # handle still takes it: spawn keeps working


def test_the_installed_placeholders_are_warned_about(tmp_path):
    """pfrest.json.example and the package's copy of it (debian/rules: its backend on 127.0.0.1:8080)."""
    with open(f"{ROOT}/debian/rules") as f:
        sed = re.search(r"sed -e '(s\|[^']*)' pfrest.json.example", f.read()).group(1)
    installed = tmp_path / "pfrest.json"
    installed.write_text(subprocess.run(["sed", "-e", sed, f"{ROOT}/pfrest.json.example"], capture_output=True,
                                        text=True, check=True).stdout)
    installed.chmod(0o600)
    for path in (f"{ROOT}/pfrest.json.example", str(installed)):
        proc = run("check", "-c", path)
        assert proc.returncode == 0, proc.stderr
        for i, name in enumerate(("domains", "aliases", "policy")):
            assert f"warning: endpoints[{i}] ({name}).auth-token: still the example's placeholder 'change-me': " \
                "set the token your backend expects" in proc.stderr, proc.stderr
            assert re.search(rf"warning: endpoints\[{i}\] \({name}\)\.target: \S+/postfix/{name} is the "
                             "example's placeholder backend: set your backend's URL", proc.stderr), proc.stderr
    # a real token and backend: nothing said (and no token shown)
    real = json.loads(installed.read_text())
    for ep in real["endpoints"]:
        ep.update({"auth-token": "s3cret-token", "target": "http://127.0.0.1:8081/lookup"})
    installed.write_text(json.dumps(real))
    proc = run("check", "-c", str(installed))
    assert proc.returncode == 0 and "example's placeholder" not in proc.stderr and "s3cret" not in proc.stderr, \
        proc.stderr


# --- warnings ------------------------------------------------------------------------------------------

@pytest.fixture
def shared_dir():
    """A directory that nobody can enter, for files nobody may or may not read."""
    need_root()
    d = world_tmpdir("pfrest-check-")
    yield d
    remove_tree(d)


def nobody_can_read(path):
    proc = subprocess.run([interpreter_for("nobody"), "-I", "-c", f"open({str(path)!r}, 'rb').close()"],
                          user="nobody", group="nogroup", extra_groups=[], capture_output=True, timeout=30,
                          cwd="/")
    return proc.returncode == 0


@pytest.mark.parametrize("mode,group,inside", [
    (0o600, "root", ""), (0o640, "nogroup", ""), (0o640, "root", ""), (0o604, "root", ""),
    (0o640, "nogroup", "locked/")])
def test_unreadable_for_user_exactly_when_it_is(shared_dir, mode, group, inside):
    (shared_dir / "locked").mkdir(mode=0o700)
    path = shared_dir / inside / "pfrest.json"
    path.write_text(json.dumps({"user": "nobody", "endpoints": [endpoint("a")]}))
    path.chmod(mode)
    shutil.chown(path, "root", group)
    warned = [w for w in checks.warnings(checks.load(str(path))) if "user nobody" in w]
    if nobody_can_read(path):
        assert warned == []
    else:
        reason = f"may not enter {shared_dir}/locked" if inside else \
            f"may not read it (mode {mode:04o}, owner root:{group})"
        assert warned == [f"{path}: user nobody {reason}: a reload (SIGHUP) once pfrest serve runs as nobody "
                          "would fail; e.g. chown root:nogroup and chmod 0640 it"]


def test_writable_config_and_tls_files(shared_dir):
    cert = shared_dir / "client.pem"
    cert.write_text("not read by check")
    cert.chmod(0o600)
    path = shared_dir / "pfrest.json"
    https = {"target": "https://127.0.0.1:9/x"}
    path.write_text(json.dumps({"user": "nobody", "endpoints": [
        endpoint("a", **https, **{"ca-file": str(shared_dir / "missing.pem")}),
        endpoint("b", **https, **{"client-cert": str(cert), "client-key": str(cert)})]}))
    shutil.chown(path, "root", "nogroup")
    path.chmod(0o660)
    found = checks.warnings(checks.load(str(path)))
    assert found == [
        f"{path}: writable by its group, who could send requests and tokens anywhere; chmod go-w {path}",
        f"endpoints[0] (a).ca-file: {shared_dir}/missing.pem does not exist; connections to "
        "https://127.0.0.1:9/x will fail",
        f"endpoints[1] (b).client-cert: {cert}: user nobody may not read it (mode 0600, owner root:root); "
        "connections to https://127.0.0.1:9/x will fail",
        f"endpoints[1] (b).client-key: {cert}: user nobody may not read it (mode 0600, owner root:root); "
        "connections to https://127.0.0.1:9/x will fail"]
    assert not nobody_can_read(cert)
    path.chmod(0o642)
    cert.chmod(0o644)
    assert checks.warnings(checks.load(str(path))) == [found[0].replace("its group", "every user"), found[1]]


# --- check --postfix -----------------------------------------------------------------------------------

def postfix_config(root, main, master):
    """A Postfix config directory for postconf -c (backdated: postconf waits ~2 s for a fresh main.cf)."""
    d = root / "postfix"
    d.mkdir()
    (d / "main.cf").write_text(textwrap.dedent(main))
    (d / "master.cf").write_text(textwrap.dedent(master))
    backdate(d / "main.cf", d / "master.cf")
    return d


def pfrest_config(directory, endpoints, mode=0o640):
    """A config that user nobody (spawn's user= here) can read, as docs/deploying.md says to install it."""
    path = directory / "pfrest.json"
    path.write_text(json.dumps({"user": "nobody", "endpoints": endpoints}))
    shutil.chown(path, "root", "nogroup")
    path.chmod(mode)
    return path


def lines(text, kind):
    return [line for line in own(text).splitlines() if line.startswith(kind + ": ")]


def own(stderr):
    """``stderr`` without the warning of a host that has no syslog socket (this one may not have
    /dev/log): the host's, not the config's (test_no_syslog_socket_is_warned_about)."""
    return "".join(line for line in stderr.splitlines(keepends=True)
                   if not line.startswith("warning: no syslog socket"))


def test_the_shipped_files_are_consistent(shared_dir):
    """pfrest.json.example, master.cf.example and its main.cf lines, as a deployment uses them."""
    need_binary("postconf")
    path = shared_dir / "pfrest.json"
    # as deployed: its own backend and token (the placeholders are warned about), only the account: nobody
    path.write_text(shipped_config("https://rest.internal").replace('"change-me"', '"a-deployed-token"'))
    shutil.chown(path, "root", "nogroup")
    path.chmod(0o640)
    master = substitute(shipped("master.cf.example"), config=path)
    main = "compatibility_level = 3.6\n" + "".join(f"{k} = {v}\n" for k, v in commented_main_cf(master).items())
    d = postfix_config(shared_dir, main, master_entries(master))
    proc = run("check", "-c", str(path), "--postfix", str(d))
    assert (proc.returncode, own(proc.stderr)) == (0, "")
    assert proc.stdout.endswith(f"Postfix ({d}): consistent with {path}\n")


def test_every_mismatch_is_named_with_both_sides(shared_dir):
    need_binary("postconf")
    spool = shared_dir / "spool"
    path = pfrest_config(shared_dir, [
        endpoint("domains", **{"bind-address": "127.0.0.1", "bind-port": 9001}),
        endpoint("aliases", "socketmap-lookup", **{"bind-path": f"{spool}/private/pfrest-aliases"}),
        endpoint("policy", "policy", **{"bind-address": "localhost", "bind-port": 9003}),
        endpoint("spare")])
    handle = f"spawn user=nobody argv=/usr/local/bin/pfrest handle -c {path}"
    d = postfix_config(shared_dir, f"""\
        compatibility_level = 3.6
        queue_directory = {spool}
        virtual_mailbox_domains = tcp:localhost:9003
        virtual_alias_maps = socketmap:unix:private/pfrest-aliases:aliases
        transport_maps = socketmap:inet:127.0.0.1:9001:transport
        smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination,
            check_policy_service unix:private/pfrest-policy
        pfrest-policy_time_limit = 3600s
        """, f"""\
        smtp      inet  n       -       n       -       -       smtpd
          -o smtpd_client_restrictions=check_policy_service{{inet:127.0.0.1:9001,timeout=10s}}
        pfrest-policy unix - n n - 0 {handle} polcy
        pfrest-aliases2 unix - n n - 0 {handle} aliases
        postgrey  unix  -       n       n       -       -       spawn user=nobody argv=/usr/sbin/postgrey
        """)
    proc = run("check", "-c", str(path), "--postfix", str(d))
    assert proc.returncode == 1
    assert lines(proc.stderr, "mismatch") == [
        f"mismatch: master.cf service pfrest-policy/unix: runs pfrest handle for endpoint 'polcy', which {path} "
        "does not have (endpoints: domains, aliases, policy, spare)",
        "mismatch: master.cf service pfrest-aliases2/unix: runs pfrest handle aliases without "
        "pfrest-aliases2_time_limit in main.cf: spawn kills the handler after 1000 s while Postfix may still "
        "use it; add pfrest-aliases2_time_limit = 3600s",
        "mismatch: main.cf smtpd_recipient_restrictions: check_policy_service unix:private/pfrest-policy "
        "reaches master.cf service pfrest-policy/unix, which runs pfrest handle for endpoint 'polcy', not in "
        f"{path}",
        "mismatch: main.cf transport_maps: socketmap:inet:127.0.0.1:9001:transport reaches endpoint domains at "
        "127.0.0.1:9001, a tcp-lookup endpoint, not socketmap-lookup",
        "mismatch: main.cf virtual_mailbox_domains: tcp:localhost:9003 reaches endpoint policy at localhost:9003, "
        "a policy endpoint, not tcp-lookup",
        "mismatch: master.cf smtp/inet -o smtpd_client_restrictions: check_policy_service inet:127.0.0.1:9001 "
        "reaches endpoint domains at 127.0.0.1:9001, a tcp-lookup endpoint, not policy"]
    assert lines(proc.stderr, "warning") == [
        "warning: endpoint spare (tcp-lookup, no bind address): Postfix never uses it: no main.cf parameter, "
        "-o override or spawn service reaches it"]
    assert proc.stdout.endswith(f"Postfix ({d}): 6 mismatch(es) with {path}\n")


def test_a_spawn_user_that_cannot_read_the_config(shared_dir):
    need_binary("postconf")
    path = pfrest_config(shared_dir, [endpoint("domains")], mode=0o600)
    d = postfix_config(shared_dir, "127.0.0.1:9001_time_limit = 3600s\n", f"""\
        127.0.0.1:9001 inet n n n - 0 spawn user=nobody:nogroup argv=/usr/bin/pfrest handle -c {path} domains
        """)
    proc = run("check", "-c", str(path), "--postfix", str(d))
    assert proc.returncode == 1
    assert lines(proc.stderr, "mismatch") == [
        "mismatch: master.cf service 127.0.0.1:9001/inet: runs pfrest handle domains as user=nobody:nogroup, who "
        f"may not read it (mode 0600, owner root:nogroup) ({path}): every handler would exit 78"]
    assert not nobody_can_read(path)


def test_postconf_failing_is_said_plainly(tmp_path, write_config):
    need_binary("postconf")
    path = write_config([endpoint("a")])
    proc = run("check", "-c", path, "--postfix", str(tmp_path / "none"))
    assert proc.returncode == 69   # EX_UNAVAILABLE: not a mismatch, not a pfrest config error
    assert own(proc.stderr) == (f"pfrest check --postfix: postconf -c {tmp_path}/none -n failed (exit status 1): "
                           f"postconf: fatal: open {tmp_path}/none/main.cf: No such file or directory\n")
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\n")
    backdate(tmp_path / "main.cf")
    proc = run("check", "-c", path, "--postfix", str(tmp_path))
    assert proc.returncode == 69 and f"open {tmp_path}/master.cf: No such file or directory" in proc.stderr


# postconf's output where it cannot be produced here: postconf missing, another version's layout

def test_postconf_missing(fp, write_config, capsys):
    def missing(process):
        raise FileNotFoundError(2, "No such file or directory", "postconf")
    fp.register(["postconf", "-n"], callback=missing)
    assert cli.main(["check", "-c", write_config([endpoint("a")]), "--postfix"]) == 69
    assert own(capsys.readouterr().err) == ("pfrest check --postfix: postconf not found (looked in PATH and /usr/sbin, "
                                       "/usr/local/sbin, /sbin): is Postfix installed?\n")


def test_another_layout_of_postconf_output(fp, shared_dir, capsys):
    """postconf output laid out otherwise than this machine's 3.7 prints it: folded onto continuation lines
    (as -f folds), tabs, name=value without blanks; and { } grouping in argv, a program run as python -m
    pfrest.  Read as what they mean, or the findings below would differ."""
    path = pfrest_config(shared_dir, [endpoint("pol", "policy"), endpoint("domains"), endpoint(
        "aliases", "socketmap-lookup", **{"bind-path": "/run/pfrest/aliases.sock"})])
    d = str(shared_dir)
    fp.register(["postconf", "-c", d, "-n"], stdout=(
        "queue_directory = /var/spool/other\n"
        "smtpd_recipient_restrictions = permit_mynetworks,\n"
        "    check_policy_service { unix:private/pfrest-pol, timeout=10s }\n"
        "pfrest-pol_time_limit = 3600s\n"
        "virtual_alias_maps =\n"
        "\tsocketmap:unix:/run/pfrest/aliases.sock:aliases\n"))
    fp.register(["postconf", "-c", d, "-M"], stdout=(
        "smtp\tinet\tn\t-\ty\t-\t-\tsmtpd\n"
        "\t-o smtpd_client_restrictions=check_policy_service{inet:127.0.0.1:9010}\n"
        "pfrest-pol\tunix\t-\tn\tn\t-\t0\tspawn\n"
        "\tuser=nobody\n"
        f"\targv=/opt/pfrest/bin/pfrest handle -c {path}\n"
        "\t{ pol }\n"
        f"127.0.0.1:9010 inet n n n - 0 spawn user=nobody argv=/usr/bin/python3 -m pfrest handle --config={path} "
        "domains\n"))
    fp.register(["postconf", "-c", d, "-P"],
                stdout="smtp/inet/smtpd_client_restrictions=check_policy_service{inet:127.0.0.1:9010}\n")
    fp.register(["postconf", "-c", d, "-xh", "queue_directory"], stdout="/var/spool/other\n")
    assert cli.main(["check", "-c", str(path), "--postfix", d]) == 1
    assert own(capsys.readouterr().err).splitlines() == [
        "mismatch: master.cf service 127.0.0.1:9010/inet: runs pfrest handle domains without "
        "127.0.0.1:9010_time_limit in main.cf: spawn kills the handler after 1000 s while Postfix may still use "
        "it; add 127.0.0.1:9010_time_limit = 3600s",
        "mismatch: master.cf smtp/inet -o smtpd_client_restrictions: check_policy_service inet:127.0.0.1:9010 "
        "reaches endpoint domains through master.cf service 127.0.0.1:9010/inet, a tcp-lookup endpoint, "
        "not policy"]


def test_no_syslog_socket_is_warned_about(write_config, monkeypatch, capsys):
    """pfrest handle's lines go to /dev/log or journald's sockets: with none of them they would be
    lost, and check says so (for a config with endpoints handle serves); real sockets stand in."""
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:   # short: a socket path has 108 bytes
        for name in ("SYSLOG_SOCKET", "JOURNAL_SYSLOG_SOCKET", "JOURNAL_NATIVE_SOCKET"):
            monkeypatch.setattr(log, name, os.path.join(tmp, name))
        handled = write_config([endpoint("a")])
        served = write_config([endpoint("b", **{"bind-port": 9001, "bind-address": "127.0.0.1"})], "b.json")
        assert cli.main(["check", "-c", handled]) == 0
        assert f"warning: no syslog socket ({tmp}/SYSLOG_SOCKET, {tmp}/JOURNAL_SYSLOG_SOCKET or " \
               f"{tmp}/JOURNAL_NATIVE_SOCKET): pfrest handle would lose its log lines (endpoints: a); run a " \
               "syslog daemon or journald, or give handle --log-file in master.cf\n" in capsys.readouterr().err
        assert cli.main(["check", "-c", served]) == 0 and "syslog" not in capsys.readouterr().err
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journald:
            journald.bind(os.path.join(tmp, "JOURNAL_NATIVE_SOCKET"))
            assert cli.main(["check", "-c", handled]) == 0 and "syslog" not in capsys.readouterr().err
