"""The README's "First deployment, step by step", run as the README writes it: every ```sh block of that
section, in order, in one bash session (``set -e``: a command that fails fails the test), against the
reference backend of contrib/backends and Postfix's own postconf and postmap.

What cannot run here as written is mapped, and only that (GUIDE_MAPS; a command of the guide that is
neither runnable nor mapped fails the test):
- the package's install is the checkout's pfrest (a ``pfrest`` on PATH), and what the package put in place
  is made in a temporary directory: ``/etc/pfrest/pfrest.json`` (the placeholder config, as debian/rules
  makes it) and ``/usr/share/doc/pfrest/examples/backends`` (contrib/backends);
- ``/etc/pfrest`` and ``/opt`` are under that directory (a path without quotes or spaces), the ports free ones;
- systemctl starts, reloads and signals ``pfrest serve`` itself, with the unit's command line, and
  journalctl reads its log file; ``postfix reload`` has no running Postfix to reload;
- Postfix's configuration is a private directory (MAIL_CONFIG) with a main.cf and Debian's master.cf,
  as on a configured Postfix.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT, need_binary
from postfix_instance import backdate, free_port
from test_contrib_backends import free_port_base

SECTION = "## First deployment, step by step"
PORTS = ("9001", "9002", "9003", "8081", "9100")

# command of the guide -> what the test runs instead (bash; $T is the temporary root, $SERVE_LOG the log)
GUIDE_MAPS = {
    "apt-get install ../pfrest_*_all.deb": ":   # the checkout's pfrest is on PATH",
    "systemctl enable --now pfrest.service":
        'pfrest serve -c "$T/etc/pfrest/pfrest.json" --workers 2 >>"$SERVE_LOG" 2>&1 &\n'
        'echo $! >"$T/serve.pid"; echo $! >>"$T/pids"\n'
        'wait_log "ready: serving"',
    "systemctl reload pfrest": 'kill -HUP "$(cat "$T/serve.pid")"; wait_log "reloaded "',
    "journalctl -u pfrest -p warning": 'grep -E ": (WARNING|ERROR|CRITICAL): " "$SERVE_LOG" || true',
    "journalctl -u pfrest -n 5": 'tail -n 5 "$SERVE_LOG"',
    "postfix reload": ":   # no Postfix runs here",
}

PRELUDE = r"""
set -euo pipefail
trap 'for p in $(cat "$T/pids" 2>/dev/null); do kill "$p" 2>/dev/null || true; done; wait' EXIT
wait_port() {   # the guide's reader waits for a background program to listen; so does the test
    for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
    echo "nothing listens on port $1" >&2; return 1
}
wait_log() {
    for _ in $(seq 400); do grep -q "$1" "$SERVE_LOG" 2>/dev/null && return 0; sleep 0.05; done
    echo "pfrest serve never logged '$1':" >&2; cat "$SERVE_LOG" >&2; return 1
}
"""


def guide_commands(readme):
    """The commands of the section's ```sh blocks, in order; a line ending in a backslash goes on."""
    section = readme.split("\n" + SECTION + "\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"(?ms)^```sh\n(.*?)^```", section):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            if command.strip():
                commands.append(command.strip())
    return commands


def test_the_guide_names_the_first_deployment_steps():
    with open(os.path.join(ROOT, "README.md")) as f:
        commands = guide_commands(f.read())
    for step in ("apt-get install", "pfrest init -c /etc/pfrest/pfrest.json", "stdlib_backend.py", "pfrest check",
                 "pfrest query", "systemctl enable --now pfrest.service", "postmap -q", "postconf -e",
                 "pfrest check -c /etc/pfrest/pfrest.json --postfix", "postfix reload", "journalctl -u pfrest -p warning",
                 "pfrest stats", "systemctl reload pfrest"):
        assert any(step in c for c in commands), step
    mapped = [c for c in commands if c in GUIDE_MAPS]
    assert len(mapped) == len(GUIDE_MAPS), set(GUIDE_MAPS) - set(commands)   # no stale mapping


def script(commands, ports, root):
    """The bash script: each command echoed (to find its output), then run, mapped where it must be."""
    out = [PRELUDE]
    for command in commands:
        run = GUIDE_MAPS.get(command)
        if run is None:
            for port in PORTS:
                command = re.sub(rf"\b{port}\b", ports[port], command)
            run = (command.replace("/usr/share/doc/pfrest/examples/backends", os.path.join(ROOT, "contrib", "backends"))
                   .replace("/etc/pfrest/", f"{root}/etc/pfrest/").replace("/opt/", f"{root}/opt/"))
            if re.search(r"(^|\s)(systemctl|journalctl|apt-get|apt|dpkg)\s", " " + run):
                raise AssertionError(f"the guide's command {command!r} cannot run here: map it (GUIDE_MAPS)")
            if run.endswith("&"):   # a background program: its output to a file, its port awaited
                port = re.search(r"127\.0\.0\.1:(\d+)", run).group(1)
                run = f'{run[:-1].rstrip()} >>"$T/background.log" 2>&1 &\necho $! >>"$T/pids"\nwait_port {port}'
        out.append(f"echo {shquote('>>> ' + command)}\n{run}\n")
    return "\n".join(out)


def shquote(text):
    return "'" + text.replace("'", "'\\''") + "'"


def outputs(stdout):
    """{command: its output} from the script's stdout."""
    parts = re.split(r"(?m)^>>> (.*)\n", stdout)
    return {command: output for command, output in zip(parts[1::2], parts[2::2])}


@pytest.fixture
def root():
    """The temporary root: what the package would have installed, and a configured Postfix's directory.
    Readable on the way down by pfrest's account (serve drops to it and reloads from here)."""
    need_binary("postmap")
    need_binary("postconf")
    top = tempfile.mkdtemp(prefix="pfrest-guide-")
    os.chmod(top, 0o755)
    try:
        os.makedirs(f"{top}/etc/pfrest")
        os.makedirs(f"{top}/opt")
        with open(os.path.join(ROOT, "pfrest.json.example")) as f, open(f"{top}/etc/pfrest/pfrest.json", "w") as g:
            g.write(f.read().replace("https://rest.example.com", "http://127.0.0.1:8080"))   # as debian/rules
        os.makedirs(f"{top}/postfix")
        with open(f"{top}/postfix/main.cf", "w") as f:
            f.write("compatibility_level = 3.6\n")
        backdate(f"{top}/postfix/main.cf")
        master = next((p for p in ("/usr/share/postfix/master.cf.dist", "/etc/postfix/master.cf")
                       if os.path.exists(p)), None)
        if master is None:
            pytest.fail("no master.cf to start from (postfix installs /usr/share/postfix/master.cf.dist)")
        shutil.copy(master, f"{top}/postfix/master.cf")
        os.makedirs(f"{top}/bin")
        with open(f"{top}/bin/pfrest", "w") as f:   # the checkout's pfrest, as the package's would be
            f.write(f'#!/bin/sh\nPYTHONPATH={shquote(ROOT)} exec {shquote(sys.executable)} -m pfrest "$@"\n')
        os.chmod(f"{top}/bin/pfrest", 0o755)
        yield top
    finally:
        for line in (open(f"{top}/pids").read().split() if os.path.exists(f"{top}/pids") else []):
            stop_pid(int(line))
        shutil.rmtree(top, ignore_errors=True)


def stop_pid(pid):
    """A process the script left behind (it stops them itself): SIGTERM, then SIGKILL after 10 s."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def normal(query_output):
    return re.sub(r"(?m)^(request id|time): .*$", r"\1: ...", query_output)


def test_first_deployment_as_the_readme_writes_it(root):
    with open(os.path.join(ROOT, "README.md")) as f:
        commands = guide_commands(f.read())
    base = free_port_base()   # pfrest init --port-base N takes N, N+1, N+2
    ports = {"9001": str(base), "9002": str(base + 1), "9003": str(base + 2), "8081": str(free_port()),
             "9100": str(free_port())}
    env = {"PATH": f"{root}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": root, "T": root, "SERVE_LOG": f"{root}/serve.log", "MAIL_CONFIG": f"{root}/postfix"}
    started = time.monotonic()
    proc = subprocess.run(["bash", "-c", script(commands, ports, root)], capture_output=True, text=True, env=env,
                          cwd=root, timeout=120)
    log = open(f"{root}/serve.log").read() if os.path.exists(f"{root}/serve.log") else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log
    said = outputs(proc.stdout)

    def out(start):
        """The output of the first command that starts so."""
        return said[next(c for c in said if c.startswith(start))]

    assert "valid; domains (tcp-lookup), aliases (socketmap-lookup), policy (policy)" in out(
        "pfrest check -c /etc/pfrest/pfrest.json")
    # the query output the README shows is what query prints (but for the request id, the time, the port)
    with open(os.path.join(ROOT, "README.md")) as f:
        shown = re.search(r"(?ms)^```text\n(endpoint: domains .*?)^```", f.read()).group(1)
    printed = out("pfrest query -c /etc/pfrest/pfrest.json domains")
    assert normal(printed).replace(ports["8081"], "8081") == normal(shown)
    assert "value: alice@example.com,bob@example.com" in out("pfrest query -c /etc/pfrest/pfrest.json aliases")
    assert "result: action REJECT" in out("pfrest query -c /etc/pfrest/pfrest.json policy")
    # what the README says postmap prints
    assert out("postmap -q example.com ") == "example.com\n"
    assert out("postmap -q info@example.com ") == "alice@example.com,bob@example.com\n"
    assert "mismatch" not in out("pfrest check -c /etc/pfrest/pfrest.json --postfix")
    stats = out("pfrest stats")
    assert re.search(r"^domains +tcp-lookup .* found 1 ", stats, re.M), stats
    assert "reloaded " in log and "ready: serving 3 endpoint(s)" in log
    # Postfix's configuration has the lines of step 6
    main = subprocess.run(["postconf", "-n", "virtual_mailbox_domains"], capture_output=True, text=True,
                          env=env, check=True).stdout
    assert main == f"virtual_mailbox_domains = tcp:127.0.0.1:{ports['9001']}\n"
    assert time.monotonic() - started < 20
