"""The shipped per-connection launcher files, run by the programs they are written for:

- xinetd.d/pfrest-* under a real `xinetd -dontfork -f FILE`;
- systemd/pfrest-*.socket + pfrest-*@.service (Accept=yes) under `systemd-socket-activate --inetd
  --accept`, with the units' own ListenStream= and ExecStart= (systemd is not PID 1 in a container);
  the User=/Group=, CapabilityBoundingSet=, NoNewPrivileges= and SocketUser=/SocketMode= settings,
  which that tool does not apply, are applied by the test (setpriv, chown/chmod); test_package.py runs
  the installed units under systemd itself, their whole sandbox applied;
- `systemd-analyze verify` on the shipped units.

Only ports, paths and the account (nobody instead of pfrest, in the repository's files) are substituted.
Lookups go through real `postmap -q` with the tables the files' main.cf comments give; policy through a
real smtpd that uses the file's check_policy_service line, SMTP AUTH through one that uses its
smtpd_sasl_* lines.  Each test runs on the repository's files and
on those the Debian package installed, running /usr/sbin/pfrest as pfrest (conftest.py: installation).
"""

import grp
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import types

import pytest

from conftest import ROOT, need_binary
from postfix_instance import (PostfixInstance, RoutedBackend, check_policy_transaction, commented_main_cf,
                              free_port, remove_tree, sandbox, smtp_login, stop_process, unit_settings, wait_path,
                              wait_port, world_tmpdir)

MODES = ("tcp", "socketmap", "policy", "auth")
UNITS = sorted(f"systemd/{name}" for name in os.listdir(os.path.join(ROOT, "systemd")))


def start_xinetd(root, installation, config, procs):
    need_binary("xinetd")
    ports = {mode: free_port() for mode in MODES}
    conf = root / "xinetd.conf"
    text = "".join(installation.substitute(installation.shipped(f"xinetd.d/pfrest-{mode}"), config, ports)
                   for mode in MODES)
    conf.write_text(text)
    main = commented_main_cf(text)
    procs.append(subprocess.Popen([need_binary("xinetd"), "-dontfork", "-f", str(conf),
                                   "-filelog", str(root / "xinetd.log")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for port in ports.values():
        wait_port(port)
    return types.SimpleNamespace(name="xinetd", ports=ports, main=main, text=text)


def start_socket_activate(root, installation, config, spool, procs):
    """systemd-socket-activate per shipped socket unit, running its @.service's ExecStart= with the
    unit's account, capabilities and NoNewPrivileges= (the rest of its sandbox: test_package.py)."""
    need_binary("systemd-socket-activate")
    ports = {"tcp": free_port()}
    main, log = {}, open(root / "socket-activate.log", "ab")

    def unit(name):
        return installation.substitute(installation.shipped(f"systemd/{name}"), config, ports, spool)

    for mode in MODES:
        socket_unit = unit(f"pfrest-{mode}.socket")
        sock = unit_settings(socket_unit)
        main.update(commented_main_cf(socket_unit))
        service = unit_settings(unit(f"pfrest-{mode}@.service"))
        (listen,) = sock["ListenStream"]
        (exec_start,) = service["ExecStart"]
        (user,), (group,) = service["User"], service["Group"]
        argv = [*sandbox(service), f"--reuid={user}", f"--regid={group}", "--init-groups",
                *shlex.split(exec_start)]
        procs.append(subprocess.Popen(
            [need_binary("systemd-socket-activate"), "--inetd", "--accept", "-l", listen, *argv],
            stdout=log, stderr=log, env={"PATH": "/usr/bin:/bin"}))
        if listen.startswith("/"):
            wait_path(listen)
            os.chown(listen, pwd.getpwnam(sock["SocketUser"][0]).pw_uid,
                     grp.getgrnam(sock["SocketGroup"][0]).gr_gid)
            os.chmod(listen, int(sock["SocketMode"][0], 8))
        else:
            wait_port(int(listen.rsplit(":", 1)[1]))
    return types.SimpleNamespace(name="systemd", ports=ports, main=main)


@pytest.fixture(scope="module")
def launchers(installation):
    root = world_tmpdir("pfrest-launch-")
    backend = RoutedBackend()
    instance = PostfixInstance(root)
    procs = []
    s = types.SimpleNamespace(backend=backend, instance=instance)
    try:
        config = root / "pfrest.json"
        config.write_text(installation.config(backend.url))
        config.chmod(0o644)  # read by the handlers, which run as the files' account
        s.xinetd = start_xinetd(root, installation, config, procs)
        # the smtpd's policy restriction is the file's main.cf line, as an -o override per launcher
        systemd_main = commented_main_cf(installation.shipped("systemd/pfrest-policy.socket"))
        s.xinetd.smtp = instance.add_smtpd(
            "xinetd", smtpd_recipient_restrictions=s.xinetd.main["smtpd_recipient_restrictions"])
        smtp_systemd = instance.add_smtpd(
            "systemd", smtpd_recipient_restrictions=systemd_main["smtpd_recipient_restrictions"])
        # SMTP AUTH with the files' smtpd_sasl_* lines, in the clear (STARTTLS: test_sasl_postfix.py);
        # one smtpd process, which keeps its auth connection across sessions
        s.xinetd.smtp_auth = instance.add_smtpd("xinetd-auth", maxproc=1, **sasl_lines(s.xinetd.text))
        smtp_auth_systemd = instance.add_smtpd("systemd-auth", maxproc=1, **sasl_lines(
            installation.shipped("systemd/pfrest-auth.socket")))
        # the unix sockets of the systemd units live in the queue directory's private/, and must be there
        # before Postfix starts: an smtpd with SMTP AUTH connects to its auth server as a session begins,
        # and exits if none answers ("fatal: no SASL authentication mechanisms")
        private = instance.spool / "private"
        private.mkdir(parents=True)
        shutil.chown(private, "postfix")
        private.chmod(0o700)
        s.systemd = start_socket_activate(root, installation, config, instance.spool, procs)
        s.systemd.smtp, s.systemd.smtp_auth = smtp_systemd, smtp_auth_systemd
        instance.start()
        yield s
    finally:
        for proc in procs:
            stop_process(proc)
        instance.stop()
        backend.stop()
        remove_tree(root)


@pytest.fixture(params=["xinetd", "systemd"])
def launcher(request, launchers):
    launchers.backend.answers.clear()
    launchers.backend.requests.clear()
    return launchers, getattr(launchers, request.param)


def absolute(table, spool):
    """postmap does not chdir to the queue directory as the daemons do."""
    return table.replace("unix:private/", f"unix:{spool}/private/")


def test_lookups(launcher):
    s, via = launcher
    s.backend.answers["domains example.com"] = (200, ["example.com"])
    s.backend.answers["domains down.example"] = (503, "")
    s.backend.answers["aliases info@example.com"] = (200, ["alice@example.com"])
    tcp = via.main["virtual_mailbox_domains"]
    sockmap = absolute(via.main["virtual_alias_maps"], s.instance.spool)
    assert tcp == f"tcp:127.0.0.1:{via.ports['tcp']}"
    pm = s.instance.postmap
    assert pm("example.com", tcp).stdout == "example.com\n"
    assert pm("missing.example", tcp).returncode == 1
    assert pm("down.example", tcp).returncode == 1
    many = pm("-", tcp, stdin="example.com\nmissing.example\nexample.com\n")
    assert many.stdout == "example.com\texample.com\n" * 2
    found = pm("info@example.com", sockmap)
    assert (found.stdout, found.returncode) == ("alice@example.com\n", 0)
    assert pm("bob@example.com", sockmap).returncode == 1
    paths = [(r.path, dict(r.query)["key"]) for r in s.backend.requests]
    assert ("/postfix/aliases", "info@example.com") in paths and ("/postfix/domains", "down.example") in paths


def test_policy_through_smtpd(launcher):
    s, via = launcher
    check_policy_transaction(s.backend, via.smtp, slow=False)


def sasl_lines(text):
    """A shipped file's main.cf lines for SMTP AUTH and its master.cf -o that enables it, but AUTH offered
    without TLS."""
    main = commented_main_cf(text)
    lines = {k: v for k, v in main.items() if k.startswith("smtpd_sasl_")}
    assert lines["smtpd_sasl_type"] == "dovecot" and main["smtpd_tls_auth_only"] == "yes"
    assert "-o smtpd_sasl_auth_enable=yes" in text
    return dict(lines, smtpd_sasl_auth_enable="yes", smtpd_tls_auth_only="no")


def test_login_through_smtpd(launcher):
    """235 for the password the backend takes, 535 for another, 454 when the backend fails (the handler
    ends the connection), and 235 at the next login: smtpd connected again, to a new handler."""
    s, via = launcher
    state = {"status": 200}

    def decide(request):
        password = dict(request.form()).get("password")
        return (state["status"], b"") if password == "right" else (401, b"")
    s.backend.answers["auth "] = decide
    assert [smtp_login(via.smtp_auth, "alice", p)[0] for p in ("right", "wrong")] == [235, 535]
    state["status"] = 500
    assert smtp_login(via.smtp_auth, "alice", "right")[0] == 454
    state["status"] = 200
    assert smtp_login(via.smtp_auth, "alice", "right")[0] == 235
    logins = [dict(r.form()) for r in s.backend.requests if r.path == "/postfix/auth"]
    assert [(f["username"], f["mechanism"], f["service"]) for f in logins] == [("alice", "PLAIN", "smtp")] * 4


def test_xinetd_takes_a_burst_above_its_default_rate(launchers):
    """55 connections at once: xinetd's default cps (50/s) would disable the service for 10 s."""
    launchers.backend.answers["domains burst.example"] = (200, ["yes"])
    port = launchers.xinetd.ports["tcp"]
    conns = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(55)]
    try:
        for c in conns:
            c.sendall(b"get burst.example\n")
        assert [c.recv(100) for c in conns] == [b"200 yes\n"] * 55
    finally:
        for c in conns:
            c.close()


def test_shipped_limits(installation):
    shipped = installation.shipped
    for mode in MODES:
        xinetd = shipped(f"xinetd.d/pfrest-{mode}")
        settings = dict(re.findall(r"(?m)^\s+(\w+)\s+=\s*(.*?)\s*$", xinetd))
        assert settings["bind"] == settings["only_from"] == "127.0.0.1"
        assert int(settings["cps"].split()[0]) >= 500 and int(settings["instances"]) >= 200
        assert settings["per_source"] == "UNLIMITED" and settings["type"] == "UNLISTED"
        assert settings["server_args"].startswith("handle -c /etc/pfrest/pfrest.json ")
        sock = unit_settings(shipped(f"systemd/pfrest-{mode}.socket"))
        service = unit_settings(shipped(f"systemd/pfrest-{mode}@.service"))
        assert sock["Accept"] == ["yes"] and int(sock["MaxConnections"][0]) > 100
        assert int(sock["TriggerLimitBurst"][0]) >= 1000
        assert service["StandardInput"] == ["socket"] and service["StandardError"] == ["journal"]
        # smtpd keeps an auth connection for its life (master.cf.example: pfrest-auth_time_limit)
        runtime = "86400" if mode == "auth" else "3600"
        assert service["CollectMode"] == ["inactive-or-failed"] and service["RuntimeMaxSec"] == [runtime]
        assert service["ExecStart"][0].split()[1:4] == ["handle", "-c", "/etc/pfrest/pfrest.json"]


def test_systemd_analyze_verify(tmp_path, installation):
    """systemd's own parser accepts the shipped units: no unknown keys, no bad values."""
    analyze = need_binary("systemd-analyze")
    assert len(UNITS) == 10 and "systemd/pfrest.service" in UNITS and "systemd/pfrest.socket" in UNITS
    paths = []
    for unit in UNITS:
        path = tmp_path / os.path.basename(unit)
        # the command must exist for verify; nothing else is changed
        path.write_text(installation.shipped(unit).replace("/usr/local/bin/pfrest", installation.command))
        paths.append(str(path))
    proc = subprocess.run([analyze, "verify", "--man=no", *paths], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
