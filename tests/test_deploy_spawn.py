"""master.cf.example as shipped (only paths, ports and the user substituted) in a private Postfix
instance, with its main.cf lines applied: spawn(8) runs `pfrest handle` for every connection.

Policy through a real smtpd and SMTP client, tcp and socketmap through `postmap -q`, and a whole message
whose recipient the socketmap alias table rewrites in cleanup(8)."""

import re
import time
from pathlib import Path

import pytest

from conftest import ROOT, Backend
from postfix_instance import PostfixInstance, free_port, processes_with, remove_tree, smtp_rcpt, world_tmpdir

SHIPPED = Path(ROOT) / "master.cf.example"
SHIPPED_CONFIG = Path(ROOT) / "pfrest.json.example"
REF = r"\(ref [0-9a-f]{16}\)"


def master_entries(text):
    """The service entries of a master.cf file: every line that is not a comment or blank."""
    return "".join(line + "\n" for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))


def main_cf_blocks(text):
    """The commented main.cf blocks: {block title: {parameter: value}}, continuation lines joined."""
    blocks, current, param = {}, None, None
    for line in text.splitlines():
        if line.startswith("# ----"):
            current = line.strip("#- ") if "main.cf" in line else None
            if current:
                blocks[current] = {}
            param = None
            continue
        if current is None or not line.startswith("#"):
            continue
        body = line[2:]
        match = re.match(r"^([\w.:-]+) =(.*)$", body)
        if match:
            param = match.group(1)
            blocks[current][param] = match.group(2).strip()
        elif param and body.startswith(" ") and body.strip():
            blocks[current][param] = (blocks[current][param] + " " + body.strip()).strip()
        else:
            param = None
    return blocks


def shipped_config(backend_url):
    """pfrest.json.example with the targets pointed at the test backend."""
    return SHIPPED_CONFIG.read_text().replace("https://rest.example.com", backend_url)


class RoutedBackend(Backend):
    """The shipped config's three targets on one backend: answers are keyed "ENDPOINT KEY", e.g.
    "domains example.com", "aliases info@example.com", "policy RECIPIENT"."""

    def key_of(self, request):
        return request.path.rsplit("/", 1)[-1] + " " + super().key_of(request)


class Deployment:
    pass


@pytest.fixture(scope="module")
def spawned(pfrest_for_nobody):
    """A private Postfix whose master.cf and main.cf carry what master.cf.example says."""
    root = world_tmpdir("pfrest-spawn-")
    backend = RoutedBackend()
    instance = PostfixInstance(root)
    d = Deployment()
    d.backend, d.instance, d.tcp_port = backend, instance, free_port()
    try:
        d.config = root / "pfrest.json"
        d.config.write_text(shipped_config(backend.url))
        d.config.chmod(0o644)  # read by the handlers, which run as nobody
        text = SHIPPED.read_text()
        substituted = (text.replace("/usr/local/bin/pfrest", pfrest_for_nobody)
                       .replace("/etc/pfrest/pfrest.json", str(d.config))
                       .replace("127.0.0.1:9001", f"127.0.0.1:{d.tcp_port}")
                       .replace("user=pfrest", "user=nobody"))  # no pfrest account on a test machine
        instance.services += master_entries(substituted)
        blocks = main_cf_blocks(substituted)
        assert len(blocks) == 2, blocks
        d.main_lines = {}
        for block in blocks.values():
            d.main_lines.update(block)
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


def slow(seconds, answer):
    def respond(request):
        time.sleep(seconds)
        return answer
    return respond


def form(request):
    from pfrest.minihttp import form_bytes
    return {n.decode(): v.decode() for n, v in form_bytes(request)}


def test_shipped_lines_are_what_postfix_expects(deployment):
    main = deployment.main_lines
    assert main["smtpd_recipient_restrictions"].endswith(
        "check_policy_service unix:private/pfrest-policy")
    assert {k for k in main if k.endswith("_time_limit")} == {
        f"127.0.0.1:{deployment.tcp_port}_time_limit", "pfrest-aliases_time_limit",
        "pfrest-policy_time_limit"}
    assert all(v == "3600s" for k, v in main.items() if k.endswith("_time_limit"))
    master = master_entries(SHIPPED.read_text())
    for line in master.splitlines():
        if not line[0].isspace():  # service type private unpriv chroot wakeup maxproc command
            fields = line.split()
            assert fields[2:] == ["n", "n", "-", "0", "spawn"] or fields[3:] == ["n", "n", "-", "0", "spawn"]
    # postfix check knows every line: no "unused parameter" for the _time_limit lines, no warning
    check = deployment.instance.postconf("-n")
    assert check.returncode == 0 and "warning" not in check.stderr, check.stderr
    for name in ("pfrest-policy_time_limit", "pfrest-aliases_time_limit"):
        assert f"{name} = 3600s" in check.stdout


def test_policy_through_smtpd_and_spawn(deployment):
    backend = deployment.backend
    answers = {
        "reject@dest.example": ((200, "REJECT no thanks"), 554, r"5\.7\.1 <reject@dest\.example>: "
                                r"Recipient address rejected: no thanks"),
        "defer@dest.example": ((200, "DEFER_IF_PERMIT try later"), 450, r"4\.7\.1 .*: try later"),
        "dunno@dest.example": ((200, "DUNNO"), 250, r"2\.1\.5 Ok"),
        "ok@dest.example": ((200, "OK"), 250, r"2\.1\.5 Ok"),
        "error@dest.example": ((500, ""), 450, r"4\.7\.1 .*: Policy service temporarily unavailable " + REF),
        "slow@dest.example": (slow(2.5, (200, "OK")), 450,
                              r"4\.7\.1 .*: Policy service temporarily unavailable " + REF),
    }
    for rcpt, (answer, _, _) in answers.items():
        backend.answers["policy " + rcpt] = answer
    replies = smtp_rcpt(deployment.smtp_port, "sender@source.example", list(answers))
    for (rcpt, (_, code, text)), (got_code, got_text) in zip(answers.items(), replies):
        assert got_code == code and re.fullmatch(text, got_text), (rcpt, got_code, got_text)
    policy = [form(r) for r in backend.requests if r.path == "/postfix/policy"]
    assert [p["recipient"] for p in policy] == list(answers)
    for p in policy:
        assert p["request"] == "smtpd_access_policy" and p["protocol_state"] == "RCPT"
        assert p["sender"] == "sender@source.example"
        assert p["client_address"] == "127.0.0.1" and p["helo_name"] == "client.example"
    # the handler spawn(8) started for smtpd's policy connection runs as nobody, not as root
    # (spawn itself, whose command line holds argv=..., runs as root)
    handlers = [pid for pid in processes_with(str(deployment.config))
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] != b"spawn"]
    assert len(handlers) >= 3  # smtpd's policy, trivial-rewrite's tcp and smtpd's socketmap connections
    for pid in handlers:
        assert Path(f"/proc/{pid}").stat().st_uid == 65534, Path(f"/proc/{pid}/cmdline").read_bytes()


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
