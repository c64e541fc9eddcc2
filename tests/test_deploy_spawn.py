"""master.cf.example as shipped (only paths, ports and the user substituted) in a private Postfix
instance, with its main.cf lines applied: spawn(8) runs `pfrest handle` for every connection.

Policy through a real smtpd and SMTP client, tcp and socketmap through `postmap -q`, and a whole message
whose recipient the socketmap alias table rewrites in cleanup(8).  Each test runs on the repository's
master.cf.example and on the one the Debian package installed, running /usr/sbin/pfrest as pfrest
(conftest.py: installation)."""

import pwd
import re
import subprocess
import time
import types
from pathlib import Path

import pytest

from postfix_instance import (PostfixInstance, RoutedBackend, check_policy_transaction, commented_main_cf,
                              free_port, master_entries, processes_with, remove_tree, world_tmpdir)


@pytest.fixture(scope="module")
def spawned(installation):
    """A private Postfix whose master.cf and main.cf carry what master.cf.example says (the repository's,
    or the one the package installed, with /usr/sbin/pfrest)."""
    root = world_tmpdir("pfrest-spawn-")
    backend = RoutedBackend()
    instance = PostfixInstance(root)
    d = types.SimpleNamespace()
    d.backend, d.instance, d.tcp_port, d.installation = backend, instance, free_port(), installation
    try:
        d.config = root / "pfrest.json"
        d.config.write_text(installation.config(backend.url))
        d.config.chmod(0o644)  # read by the handlers, which run as master.cf's user=
        substituted = installation.substitute(installation.shipped("master.cf.example"), config=d.config,
                                              ports={"tcp": d.tcp_port})
        instance.services += master_entries(substituted)
        d.main_lines = commented_main_cf(substituted)
        instance.main.update(d.main_lines)
        d.smtp_port = instance.add_smtpd()
        instance.start()
        yield d
    finally:
        instance.stop()
        backend.stop()
        remove_tree(root)


@pytest.fixture
def deployment(spawned):
    spawned.backend.answers.clear()
    spawned.backend.requests.clear()
    return spawned


def test_shipped_lines_are_what_postfix_expects(deployment):
    main = deployment.main_lines
    port = deployment.tcp_port
    assert main == {
        "virtual_mailbox_domains": f"tcp:127.0.0.1:{port}",
        "virtual_alias_maps": "socketmap:unix:private/pfrest-aliases:aliases",
        "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination, "
                                        "check_policy_service unix:private/pfrest-policy",
        "smtpd_sasl_type": "dovecot", "smtpd_sasl_path": "private/pfrest-auth", "smtpd_tls_auth_only": "yes",
        f"127.0.0.1:{port}_time_limit": "3600s", "pfrest-aliases_time_limit": "3600s",
        "pfrest-policy_time_limit": "3600s", "pfrest-auth_time_limit": "86400s"}
    shipped = deployment.installation.shipped("master.cf.example")
    services = [line.split() for line in master_entries(shipped).splitlines()
                if not line[0].isspace()]
    assert [s[:3] for s in services] == [["127.0.0.1:9001", "inet", "n"], ["pfrest-aliases", "unix", "-"],
                                         ["pfrest-policy", "unix", "-"], ["pfrest-auth", "unix", "-"]]
    for fields in services:  # unpriv n, chroot n, wakeup -, no process limit, spawn
        assert fields[3:] == ["n", "n", "-", "0", "spawn"]
    # Postfix knows every line: no "unused parameter" for the _time_limit lines, nothing to warn about
    etc = str(deployment.instance.etc)
    for args in (["postconf", "-c", etc, "-n"], ["postfix", "-c", etc, "check"]):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "warning" not in proc.stderr, (args, proc.stderr)


def test_policy_through_smtpd_and_spawn(deployment):
    # the backend timeout case tests pfrest rather than the files: on the repository's only
    check_policy_transaction(deployment.backend, deployment.smtp_port,
                             slow=deployment.installation.name == "checkout")
    # the handler spawn(8) started for smtpd's policy connection runs as user= (nobody, or the package's
    # pfrest), not as root
    # (spawn itself, whose command line holds argv=..., runs as root)
    handlers = [pid for pid in processes_with(str(deployment.config))
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] != b"spawn"]
    assert len(handlers) >= 3  # smtpd's policy, trivial-rewrite's tcp and smtpd's socketmap connections
    uid = pwd.getpwnam(deployment.installation.user).pw_uid
    for pid in handlers:
        assert Path(f"/proc/{pid}").stat().st_uid == uid, Path(f"/proc/{pid}/cmdline").read_bytes()


def test_tcp_lookup_through_spawn(deployment):
    backend = deployment.backend
    backend.answers["domains example.com"] = (200, ["example.com"])
    backend.answers["domains hello world"] = (200, ["spaced value %"])
    backend.answers["domains down.example"] = (503, "")
    table = deployment.main_lines["virtual_mailbox_domains"]
    assert table == f"tcp:127.0.0.1:{deployment.tcp_port}"
    pm = deployment.instance.postmap
    found = pm("example.com", table)
    assert (found.stdout, found.returncode) == ("example.com\n", 0)
    assert pm("missing.example", table).returncode == 1
    down = pm("down.example", table)
    assert down.returncode == 1 and "query error" in down.stderr
    many = pm("-", table, stdin="example.com\nmissing.example\nhello world\n")
    assert many.stdout == "example.com\texample.com\nhello world\tspaced value %\n"
    keys = [dict(r.query)["key"] for r in backend.requests if r.path == "/postfix/domains"]
    assert {"example.com", "missing.example", "hello world", "down.example"} <= set(keys)


def test_socketmap_lookup_through_spawn(deployment):
    backend = deployment.backend
    backend.answers["aliases info@example.com"] = (200, ["alice@example.com", "bob@example.com"])
    table = deployment.main_lines["virtual_alias_maps"]
    assert table == "socketmap:unix:private/pfrest-aliases:aliases"
    # postmap does not chdir to the queue directory as the daemons do: give the absolute path
    table = table.replace("unix:private/", f"unix:{deployment.instance.spool}/private/")
    pm = deployment.instance.postmap
    found = pm("info@example.com", table)
    assert (found.stdout, found.returncode) == ("alice@example.com,bob@example.com\n", 0)
    assert pm("nobody@example.com", table).returncode == 1
    request = [r for r in backend.requests if r.path == "/postfix/aliases"][0]
    assert dict(request.query) == {"name": "aliases", "key": "info@example.com"}
    assert request.headers["x-auth-token"] == "change-me"


def test_message_rewritten_by_the_alias_table_in_cleanup(deployment):
    """A whole message: cleanup(8) asks the socketmap (unix:private/..., relative to the queue
    directory), smtpd the policy, and the discard transport logs the rewritten recipient."""
    import smtplib
    backend = deployment.backend
    backend.answers["aliases team@dest.example"] = (200, ["carol@elsewhere.example"])
    backend.answers["policy team@dest.example"] = (200, "DUNNO")
    with smtplib.SMTP("127.0.0.1", deployment.smtp_port, local_hostname="client.example",
                      timeout=60) as smtp:
        smtp.sendmail("sender@source.example", ["team@dest.example"],
                      b"Subject: pfrest\r\n\r\nhello\r\n")
    deadline = time.monotonic() + 15
    pattern = re.compile(r"to=<carol@elsewhere\.example>, orig_to=<team@dest\.example>.*status=sent")
    while not pattern.search(deployment.instance.log()):
        assert time.monotonic() < deadline, deployment.instance.log()
        time.sleep(0.1)
