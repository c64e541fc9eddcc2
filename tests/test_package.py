"""The Debian package (debian/) as installed, and the units' sandbox.

- The units' sandbox as `systemd-analyze security` rates the files: at most 2.5 for the per-connection
  handlers, 3.5 for pfrest.service, in the repository and as installed.
- What the package installed: /usr/sbin/pfrest, the units (disabled), the examples and reference backends
  (executable, run by Debian's python3), the man pages (`man -w`) with every option and config key of the
  installed pfrest, the conffile root:pfrest 0640, the account.
- The installed units run by systemd itself, their whole sandbox applied: a container (systemd-nspawn,
  its own loopback) boots the machine's /usr with systemd as PID 1, and tests/units_probe.py starts each
  deployment style there and asks every endpoint (the deployment tests run the units' ExecStart= under
  systemd-socket-activate, which applies no sandbox).

The package tests need it installed (.ci/run builds and installs it; elsewhere they skip). Upgrade,
remove and purge are .ci/package-lifecycle's, which .ci/run runs before the suite: it installs the
package again at its end, for these tests.
"""

import json
import os
import pwd
import re
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, need_binary, need_package
from postfix_instance import EXAMPLES, need_root, stop_process, unit_settings
from test_manpages import has_entry, render, sections

LIMITS = {"pfrest.service": 3.5, "pfrest-tcp@.service": 2.5, "pfrest-socketmap@.service": 2.5,
          "pfrest-policy@.service": 2.5, "pfrest-auth@.service": 2.5}
UNITS = sorted(os.listdir(os.path.join(ROOT, "systemd")))
SYSTEM = "/lib/systemd/system"


def exposure(path):
    analyze = need_binary("systemd-analyze")
    proc = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(path)], capture_output=True,
                          text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


def test_every_service_unit_has_a_limit():
    assert sorted(u for u in UNITS if u.endswith(".service")) == sorted(LIMITS)


@pytest.mark.parametrize("unit", sorted(LIMITS))
def test_sandbox_rating(unit):
    assert exposure(Path(ROOT, "systemd", unit)) <= LIMITS[unit]


def test_the_serve_unit_stops_as_the_arbiter_stops_its_workers():
    """KillMode=mixed: SIGTERM to the arbiter alone (systemd's default would signal the workers while it
    may still pass them connections); the arbiter kills a worker STOP_GRACE past the drain timeout, and
    systemd's SIGKILL comes after that."""
    from pfrest.process.arbiter import STOP_GRACE
    with open(os.path.join(ROOT, "systemd", "pfrest.service")) as f:
        unit = unit_settings(f.read())
    assert unit["KillMode"] == ["mixed"]
    drain = re.search(r"--drain-timeout (\S+)", unit["ExecStart"][0])
    assert float(unit["TimeoutStopSec"][0]) > (float(drain.group(1)) if drain else 10.0) + STOP_GRACE


def test_package_version_is_the_code_version():
    """debian/changelog names the version the package gets: the one pyproject.toml and pfrest say."""
    from pfrest import __version__
    with open(os.path.join(ROOT, "debian", "changelog")) as f:
        package_version = re.match(r"pfrest \(([^)]+)\)", f.readline()).group(1)
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        project_version = re.search(r'(?m)^version = "([^"]+)"', f.read()).group(1)
    assert package_version == project_version == __version__


@pytest.fixture(scope="module")
def package():
    need_package()
    """The package's files."""
    return subprocess.run(["dpkg", "-L", "pfrest"], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.parametrize("unit", sorted(LIMITS))
def test_installed_sandbox_rating(package, unit):
    assert exposure(f"{SYSTEM}/{unit}") <= LIMITS[unit]


def test_installed_files(package):
    assert "/usr/sbin/pfrest" in package and not any(p.startswith("/usr/bin/") for p in package)
    with open("/usr/sbin/pfrest") as f:
        assert f.readline() == "#!/usr/bin/python3\n"   # Debian's Python, with Debian's httptools and uvloop
    assert subprocess.run(["/usr/sbin/pfrest", "--version"], capture_output=True, text=True,
                          timeout=30).stdout.startswith("pfrest ")
    for unit in UNITS:
        assert f"{SYSTEM}/{unit}" in package
        text = Path(SYSTEM, unit).read_text()
        for exec_line in unit_settings(text).get("ExecStart", []):
            assert exec_line.startswith("/usr/sbin/pfrest "), exec_line
    for relpath in ("master.cf.example", "pfrest.json.example", "xinetd.d/pfrest-tcp", "backends/README.md",
                    "backends/table.json", "backends/stdlib_backend.py", "backends/flask_backend.py"):
        assert f"{EXAMPLES}/{relpath}" in package, relpath   # as they are: not compressed
    for script in ("stdlib_backend.py", "flask_backend.py"):   # runnable as the README's first deployment runs them
        path = f"{EXAMPLES}/backends/{script}"
        assert os.stat(path).st_mode & 0o111 and Path(path).read_text().startswith("#!/usr/bin/python3\n"), path
    # the repository's files name /usr/local/bin/pfrest (the venv route); nothing installed does
    for path in package:
        if path.startswith((SYSTEM + "/pfrest", EXAMPLES + "/")) and os.path.isfile(path):
            assert "/usr/local/bin/pfrest" not in Path(path).read_text(), path


def test_units_are_installed_disabled(package):
    units = [u for u in UNITS if "@" not in u]
    proc = subprocess.run(["systemctl", "--root=/", "is-enabled", *units], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.split() == ["disabled"] * len(units), proc.stdout + proc.stderr


def test_conffile_and_account(package):
    conffiles = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}", "pfrest"], capture_output=True,
                               text=True).stdout
    assert [line.split()[0] for line in conffiles.strip().splitlines()] == ["/etc/pfrest/pfrest.json"]
    account = pwd.getpwnam("pfrest")
    assert account.pw_uid < 1000 and (account.pw_shell, account.pw_dir) == ("/usr/sbin/nologin", "/nonexistent")
    st = os.stat("/etc/pfrest/pfrest.json")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, account.pw_gid, 0o640)
    # the example's endpoints, their backend a loopback placeholder (debian/rules), and valid
    with open("/etc/pfrest/pfrest.json") as f, open(f"{EXAMPLES}/pfrest.json.example") as g:
        example = g.read().replace("https://rest.example.com", "http://127.0.0.1:8080")
        assert json.load(f) == json.loads(example), "/etc/pfrest/pfrest.json was edited?"
    check = subprocess.run(["/usr/sbin/pfrest", "check"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    # ... but not yet deployed: check says which placeholders to set
    assert "auth-token: still the example's placeholder 'change-me'" in check.stderr, check.stderr
    assert "target: http://127.0.0.1:8080/postfix/domains is the example's placeholder backend" in check.stderr


# What the installed pfrest has: the options of each command, the config keys (its own Python, -I: not
# this checkout)
INSTALLED_NAMES = """
import argparse, json
from pfrest import cli, config
parser = cli._parser()
(sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
options = {name: [o for a in p._actions for o in a.option_strings] for name, p in sub.choices.items()}
options[""] = [o for a in parser._actions for o in a.option_strings]
print(json.dumps({"options": options, "top": list(config.TOP_KEYS), "endpoint": list(config.ENDPOINT_KEYS)}))
"""


def test_man_pages_document_the_installed_pfrest(package):
    found = {}
    for page in ("pfrest", "pfrest.json"):
        path = subprocess.run(["man", "-w", page], capture_output=True, text=True, timeout=30).stdout.strip()
        assert path in package, (page, path)
        troff = subprocess.run(["zcat", path], capture_output=True, text=True, check=True).stdout
        found[page] = sections(render(troff))
    names = json.loads(subprocess.run(["/usr/bin/python3", "-I", "-c", INSTALLED_NAMES], capture_output=True,
                                      text=True, check=True, cwd="/").stdout)
    for command, options in names["options"].items():
        text = found["pfrest"]["OPTIONS" if command == "" else "COMMANDS"]
        for option in options:
            assert has_entry(text, option), (command, option)
    for section, keys in (("TOP-LEVEL KEYS", names["top"]), ("ENDPOINT KEYS", names["endpoint"])):
        for key in keys:
            assert re.search(rf"(?m)^       {re.escape(key)}\b", found["pfrest.json"][section]), key


# --- the installed units under systemd ------------------------------------------------------------

PROBE_UNITS = {
    "probe.target": "[Unit]\nRequires=probe.service\nAfter=probe.service\n",
    "probe.service": "[Service]\nType=oneshot\nExecStart=/usr/bin/python3 -I /probe.py /out\n"
                     "StandardOutput=append:/out/probe.log\nStandardError=append:/out/probe.log\n"
                     "TimeoutStartSec=120\nExecStopPost=/bin/systemctl poweroff --no-block\n",
}
EXPECTED = {"tcp": "200 domains:example.com\n", "socketmap": "27:OK aliases:info@example.com,",
            "policy": "action=REJECT probe b@example.com\n\n", "auth": "OK\t1\tuser=probe:alice\n"}
SERVE_CAPS = 0xc3   # CapabilityBoundingSet= of pfrest.service: CHOWN, DAC_OVERRIDE, SETGID, SETUID


def test_units_under_systemd(package, tmp_path):
    need_root()
    nspawn = need_binary("systemd-nspawn")
    units, out = tmp_path / "units", tmp_path / "out"
    units.mkdir()
    out.mkdir()
    for name, text in PROBE_UNITS.items():
        (units / name).write_text(text)
    # The machine's /usr (read-only) and /etc, an empty /var and /run: the units and the config as
    # installed; /etc/systemd/system holds only the probe, so nothing else of the machine starts.
    argv = [nspawn, "--directory=/", "--volatile=yes", "--private-network", "--register=no", "--keep-unit",
            "--link-journal=no", "--quiet", f"--machine=pfrest-test-{os.getpid()}",
            f"--uuid={uuid.uuid4().hex}",
            "--bind-ro=/etc", f"--bind-ro={units}:/etc/systemd/system",
            f"--bind-ro={ROOT}/tests/units_probe.py:/probe.py", f"--bind={out}:/out",
            "--boot", "systemd.unit=probe.target"]
    with open(tmp_path / "nspawn.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            proc.wait(timeout=180)
        finally:
            stop_process(proc)   # SIGTERM powers the container off
    probe_log = (out / "probe.log").read_text() if (out / "probe.log").exists() else ""
    assert (out / "probe.json").exists(), (tmp_path / "nspawn.log").read_text() + probe_log
    report = json.loads((out / "probe.json").read_text())
    journal = (out / "journal.txt").read_text()
    assert "error" not in report, report["error"] + journal
    uid = str(pwd.getpwnam("pfrest").pw_uid)
    assert list(report["steps"].values()) == [True] * 7, report["steps"]
    for style in ("per-connection", "serve", "serve reloaded", "socket"):
        for mode, (reply, process) in report[style].items():
            assert reply == EXPECTED[mode], (style, mode, reply, journal)
            # as pfrest, no capability left, no_new_privs, a seccomp filter
            assert (process["Uid"], int(process["CapEff"], 16), process["NoNewPrivs"], process["Seccomp"]) \
                == (uid, 0, "1", "2"), (style, mode, process)
            bounding = 0 if style == "per-connection" else SERVE_CAPS
            assert int(process["CapBnd"], 16) == bounding, (style, mode, process)
    assert report["sockets left after stop"] == []   # the janitor removed them
    assert report["failed units"] == []
    # the handlers' syslog reached the journal through the private /dev
    assert re.search(r"pfrest\[\d+\]: endpoint=aliases id=\w+ map=aliases key=info@example.com status=200 ",
                     journal)
    assert "reloaded /etc/pfrest/pfrest.json" in journal   # ExecReload= reached pfrest serve
    assert "Traceback" not in journal
    for unit, line in report["security"].items():
        score = float(re.search(r": (\d+\.\d+) ", line).group(1))
        assert score <= LIMITS[re.sub(r"@\w+", "@", unit)], line
