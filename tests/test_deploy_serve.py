"""`pfrest serve` in a private Postfix instance, as systemd/pfrest.service and systemd/pfrest.socket run
it: the shipped pfrest.json.example (targets, the TCP port and the queue directory substituted) served
by one process started as root that drops to the config's user; Postfix reaches it over the unix sockets
under its queue directory and over TCP, for lookups, policy checks and SMTP AUTH.  Then the same endpoints with their sockets created by
`systemd-socket-activate` from pfrest.socket's ListenStream= lines (Accept=no), running
pfrest.service's ExecStart=, with sd_notify READY=1 as Type=notify waits for it.  Both run with only the
capabilities the unit grants (CapabilityBoundingSet=, NoNewPrivileges=; the rest of its sandbox:
test_package.py), on the repository's files and on those the Debian package installed, running
/usr/sbin/pfrest and dropping to the account pfrest (conftest.py: installation).
"""

import grp
import json
import os
import pwd
import shlex
import signal
import socket
import subprocess
import types

import pytest

from conftest import need_binary
from postfix_instance import (TLSMGR, NotifySocket, PostfixInstance, RoutedBackend, certificate,
                              check_policy_transaction, commented_main_cf, free_port, remove_tree, sandbox,
                              smtp_login, stop_process, unit_settings, wait_path, world_tmpdir)


def substituted(relpath, s):
    return s.installation.substitute(s.installation.shipped(relpath), config=s.config,
                                     ports={"tcp": s.tcp_port}, spool=s.spool)


@pytest.fixture(scope="module")
def site(installation):
    """A private Postfix with two smtpd services: one whose policy service is the shipped unix socket
    (master.cf.example's main.cf line), one that asks an extra inet policy endpoint."""
    root = world_tmpdir("pfrest-serve-")
    backend = RoutedBackend()
    instance = PostfixInstance(root)
    s = types.SimpleNamespace(root=root, backend=backend, instance=instance, installation=installation,
                              spool=instance.spool, config=root / "pfrest.json", tcp_port=free_port(),
                              policy_port=free_port())
    try:
        doc = json.loads(installation.config(backend.url, ports={"tcp": s.tcp_port}, spool=s.spool))
        inet = dict(next(ep for ep in doc["endpoints"] if ep["name"] == "policy"), name="policy-inet",
                     **{"bind-address": "127.0.0.1", "bind-port": s.policy_port})
        del inet["bind-path"], inet["bind-mode"]
        doc["endpoints"].append(inet)
        s.config.write_text(json.dumps(doc))
        master = installation.shipped("master.cf.example")
        restrictions = commented_main_cf(master)["smtpd_recipient_restrictions"]
        s.smtp_unix = instance.add_smtpd("unix", smtpd_recipient_restrictions=restrictions)
        s.smtp_inet = instance.add_smtpd("inet", smtpd_recipient_restrictions=restrictions.replace(
            "unix:private/pfrest-policy", f"inet:127.0.0.1:{s.policy_port}"))
        # SMTP AUTH as master.cf.example says (its main.cf lines, AUTH enabled on this smtpd), over the
        # endpoint auth's socket; with TLS, as smtpd_tls_auth_only wants, so that smtpd asks for the
        # mechanisms only after STARTTLS, not at the connection instance.start() makes before serve runs
        s.cert, s.key = certificate(root)
        sasl = {k: v for k, v in commented_main_cf(master).items()
                if k.startswith("smtpd_sasl_") or k == "smtpd_tls_auth_only"}
        s.smtp_auth = instance.add_smtpd("auth", smtpd_sasl_auth_enable="yes", smtpd_tls_security_level="may",
                                         smtpd_tls_cert_file=s.cert, smtpd_tls_key_file=s.key, **sasl)
        instance.services += TLSMGR
        instance.start()
        yield s
    finally:
        instance.stop()
        backend.stop()
        remove_tree(root)


@pytest.fixture
def notify(site):
    path = site.root / "notify.sock"
    if path.exists():
        path.unlink()
    n = NotifySocket(path)
    yield n
    n.close()


def check_lookups(s):
    s.backend.answers["domains example.com"] = (200, ["example.com"])
    s.backend.answers["aliases info@example.com"] = (200, ["alice@example.com"])
    main = commented_main_cf(substituted("master.cf.example", s))
    pm = s.instance.postmap
    assert pm("example.com", main["virtual_mailbox_domains"]).stdout == "example.com\n"
    assert pm("example.org", main["virtual_mailbox_domains"]).returncode == 1
    aliases = main["virtual_alias_maps"].replace("unix:private/", f"unix:{s.spool}/private/")
    assert pm("info@example.com", aliases).stdout == "alice@example.com\n"


def check_login(s):
    """AUTH PLAIN through smtpd (after STARTTLS) and the endpoint auth's unix socket: 235 for the
    password the backend takes, 535 for another."""
    s.backend.answers["auth "] = lambda request: (200, b"") if dict(request.form())["password"] == "right" \
        else (401, b"")
    assert smtp_login(s.smtp_auth, "alice", "right", cafile=s.cert) == (235, "2.7.0 Authentication successful")
    assert smtp_login(s.smtp_auth, "alice", "wrong", cafile=s.cert)[0] == 535


def uid_of(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Uid:")).split()[1])


def test_serve_as_pfrest_service_runs_it(site, notify):
    s = site
    service = unit_settings(substituted("systemd/pfrest.service", s))
    log = open(s.root / "serve.log", "wb")
    proc = subprocess.Popen([*sandbox(service), *shlex.split(service["ExecStart"][0])], stdout=log, stderr=log,
                            env={"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": notify.path})
    try:
        notify.wait_for("READY=1")
        # started as root, it bound everything, gave the unix sockets to the config's user and became it
        user = pwd.getpwnam(s.installation.user)
        assert uid_of(proc.pid) == user.pw_uid
        for name in ("pfrest-aliases", "pfrest-policy", "pfrest-auth"):
            st = os.stat(s.spool / "private" / name)
            assert (st.st_uid, st.st_mode & 0o777) == (user.pw_uid, 0o666)
        # the backend timeout case tests pfrest rather than the files: on the repository's only
        check_policy_transaction(s.backend, s.smtp_unix, slow=s.installation.name == "checkout")
        check_policy_transaction(s.backend, s.smtp_inet, slow=False)
        check_lookups(s)
        check_login(s)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        notify.wait_for("STOPPING=1")
    finally:
        stop_process(proc)
    text = (s.root / "serve.log").read_text()
    assert "Traceback" not in text and f"running as user {s.installation.user}" in text


def test_pfrest_socket_passes_the_sockets(site, notify):
    """systemd-socket-activate holds pfrest.socket's sockets and starts pfrest.service's ExecStart on the
    first connection, as systemd does; the fds carry the unit's name, as systemd names them when the
    unit has no FileDescriptorName=, and pfrest matches them to endpoints by address."""
    s = site
    sock = unit_settings(substituted("systemd/pfrest.socket", s))
    service = unit_settings(substituted("systemd/pfrest.service", s))
    assert sock["Accept"] == ["no"] and service["Type"] == ["notify"]
    listen = sock["ListenStream"]
    for path in listen:
        if path.startswith("/") and os.path.exists(path):
            os.unlink(path)  # left by the previous test's pfrest serve
    args = [need_binary("systemd-socket-activate")]
    for address in listen:
        args += ["-l", address]
    args += [f"--fdname={':'.join(['pfrest.socket'] * len(listen))}", "-E", f"NOTIFY_SOCKET={notify.path}",
             *sandbox(service), *shlex.split(service["ExecStart"][0])]
    log = open(s.root / "activate.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=log, env={"PATH": "/usr/bin:/bin"})
    try:
        for path in listen:
            if path.startswith("/"):  # SocketUser=, SocketGroup=, SocketMode=: applied by systemd
                wait_path(path)
                os.chown(path, pwd.getpwnam(sock["SocketUser"][0]).pw_uid,
                         grp.getgrnam(sock["SocketGroup"][0]).gr_gid)
                os.chmod(path, int(sock["SocketMode"][0], 8))
        socket.create_connection(("127.0.0.1", s.tcp_port), timeout=10).close()  # the first connection
        notify.wait_for("READY=1")
        check_lookups(s)
        check_policy_transaction(s.backend, s.smtp_unix, slow=False)
        check_login(s)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stop_process(proc)
    text = (s.root / "activate.log").read_text()
    assert text.count("(from systemd)") == 4, text
    assert "Traceback" not in text
