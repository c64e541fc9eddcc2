"""Real programs for the deployment tests: a private Postfix instance, a pfrest install that Postfix's
spawn(8) (and xinetd, running as an unprivileged user) can execute, and process clean-up.

Everything here touches only what it created: processes are found by a marker (the temporary directory
of the test) in their command line or environment, never by name.  Each main.cf line of
PostfixInstance says why it is there.
"""

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import IN_CI, ROOT, Backend, need_binary

NOBODY = "nobody"


def need_root():
    """Postfix instances, xinetd and running handlers as another user need root: skip without it,
    except in CI, where the tests must run."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the deployment tests need root (postfix start, xinetd, setuid)")
        pytest.skip("needs root")


# --- sockets ---------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0, host="127.0.0.1"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.02)


def wait_path(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.02)


# --- directories other users can traverse ----------------------------------------------------------

def world_tmpdir(prefix):
    """A new directory that user postfix and nobody can traverse (mkdtemp makes 0700 ones; pytest's
    tmp_path lives under a 0700 directory).  The caller removes it (remove_tree)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    for parent in path.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise RuntimeError(f"{parent} is not searchable by other users; set TMPDIR elsewhere")
    return path


def remove_tree(path):
    reap(str(path))
    shutil.rmtree(path, ignore_errors=True)


def make_readable(path):
    """chmod a+rX, recursively."""
    for dirpath, dirnames, filenames in os.walk(path):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)
        for name in filenames:
            p = os.path.join(dirpath, name)
            os.chmod(p, os.stat(p).st_mode | 0o444)


# --- processes -------------------------------------------------------------------------------------

def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead; PID 1 reaps lazily
    except OSError:
        return False


def processes_with(marker):
    """PIDs of live processes (not this one) whose command line or environment holds ``marker``."""
    needle = marker.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry}/{part}", "rb") as f:
                    if needle in f.read():
                        if _alive(entry):
                            found.append(int(entry))
                        break
            except OSError:
                break
    return found


def reap(marker, timeout=5.0):
    """SIGKILL every process that mentions ``marker`` and wait until they are gone; returns their PIDs."""
    killed = processes_with(marker)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    return killed


def stop_process(proc, timeout=10.0):
    """SIGTERM a Popen, SIGKILL it if it does not exit in time; return its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


# --- pfrest installed where an unprivileged user can run it ---------------------------------------

RUNTIME_PACKAGES = ("httptools", "uvloop", "tomli")


def _run_as(user, args, **kw):
    return subprocess.run(args, user=user, capture_output=True, text=True, timeout=30, cwd="/", **kw)


def interpreter_for(user):
    """An absolute Python that ``user`` can execute, preferring this interpreter's version (the copied
    dependencies may hold compiled modules).  pyenv's Python under /root (0700) is not one."""
    candidates = [os.path.realpath(sys.executable), sys.executable, "/usr/bin/python3",
                  "/usr/local/bin/python3"]
    ours = "%d.%d" % sys.version_info[:2]
    usable = []
    for exe in dict.fromkeys(candidates):
        if os.path.isabs(exe) and os.path.exists(exe):
            try:
                proc = _run_as(user, [exe, "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
            except PermissionError:
                continue
            if proc.returncode == 0:
                usable.append((proc.stdout.strip() != ours, exe))
    if not usable:
        pytest.fail(f"no Python interpreter is executable by {user}: tried {candidates}")
    return sorted(usable)[0][1]


def install_pfrest(dest, user=NOBODY):
    """Copy pfrest and its runtime dependencies into DEST/lib and write DEST/bin/pfrest, a console
    script like the one `pip install` makes, with an interpreter ``user`` can run.  Returns its path."""
    dest = Path(dest)
    lib = dest / "lib"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(ROOT) / "pfrest", lib / "pfrest", ignore=ignore)
    for name in RUNTIME_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue  # optional (chardet, tomli) or absent; the import check below tells
        if spec.submodule_search_locations:
            shutil.copytree(list(spec.submodule_search_locations)[0], lib / name, ignore=ignore)
        else:
            shutil.copy2(spec.origin, lib / os.path.basename(spec.origin))
    python = interpreter_for(user)
    script = dest / "bin" / "pfrest"
    script.parent.mkdir()
    script.write_text(f"#!{python} -I\nimport sys\nsys.path.insert(0, {str(lib)!r})\n"
                      "from pfrest.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    make_readable(dest)
    check = _run_as(user, [python, "-I", "-c", f"import sys; sys.path.insert(0, {str(lib)!r}); "
                                               "import pfrest.commands.handle, pfrest.backend, httptools, uvloop"])
    if check.returncode != 0:
        pytest.fail(f"pfrest copy in {dest} is not importable by {user}: {check.stderr}")
    return str(script)


@contextlib.contextmanager
def installed_for_nobody():
    """install_pfrest() into a new world-readable directory, removed afterwards."""
    need_root()
    dest = world_tmpdir("pfrest-install-")
    try:
        yield install_pfrest(dest)
    finally:
        remove_tree(dest)


# --- the shipped example files -------------------------------------------------------------------

def shipped(relpath):
    """The text of a file as shipped in the repository (master.cf.example, systemd/..., xinetd.d/...)."""
    return (Path(ROOT) / relpath).read_text()


SHIPPED_PORTS = {"tcp": 9001, "socketmap": 9002, "policy": 9003, "auth": 9004}
_ACCOUNT = [(r"(?m)^(\s*user\s*=\s*)pfrest$", r"\1nobody"),     # xinetd
            (r"(?m)^(\s*group\s*=\s*)pfrest$", r"\1nogroup"),
            (r"(?m)^User=pfrest$", "User=nobody"),                # systemd
            (r"(?m)^Group=pfrest$", "Group=nogroup"),
            (r"\buser=pfrest\b", "user=nobody"),                 # master.cf
            (r'"user": "pfrest"', '"user": "nobody"')]            # pfrest.json


def substitute(text, script=None, config=None, ports=None, spool=None, account=True):
    """A shipped file with only what differs on a test machine replaced: the paths of the pfrest program
    and its config, the ports ({mode: port} for the shipped 9001, 9002, 9003), the queue directory, and
    (``account``) the account, where no "pfrest" account exists: nobody/nogroup."""
    for mode, port in (ports or {}).items():
        text = re.sub(rf"(?<!\d){SHIPPED_PORTS[mode]}(?!\d)", str(port), text)
    for shipped_path, path in (("/usr/local/bin/pfrest", script), ("/etc/pfrest/pfrest.json", config),
                               ("/var/spool/postfix", spool)):
        if path is not None:
            text = text.replace(shipped_path, str(path))
    for pattern, replacement in _ACCOUNT if account else ():
        text = re.sub(pattern, replacement, text)
    return text


def shipped_config(backend_url, **substitutions):
    """pfrest.json.example with its targets pointed at a test backend, substituted as substitute() does."""
    text = shipped("pfrest.json.example").replace("https://rest.example.com", backend_url)
    return substitute(text, **substitutions)


# Where the Debian package installs the repository's files (debian/rules)
EXAMPLES = "/usr/share/doc/pfrest/examples"
PACKAGED = (("systemd/", "/lib/systemd/system/"), ("xinetd.d/", f"{EXAMPLES}/xinetd.d/"), ("", f"{EXAMPLES}/"))


def packaged_path(relpath):
    """Where the package installed the repository file ``relpath`` ("systemd/pfrest.service", ...)."""
    prefix, directory = next((p, d) for p, d in PACKAGED if relpath.startswith(p))
    return directory + relpath[len(prefix):]


class Installation:
    """What the deployment tests deploy: the shipped files, the pfrest command they name, the account.

    ``checkout(script)``: the repository's files; pfrest copied where nobody can run it (install_pfrest)
    and nobody for the account pfrest, which need not exist.  ``package()``: the files where the Debian
    package installed them, unchanged: /usr/sbin/pfrest, and the account pfrest that it created."""

    def __init__(self, name, command, locate, user):
        self.name, self.command, self.locate, self.user = name, command, locate, user

    @classmethod
    def checkout(cls, script):
        return cls("checkout", script, lambda relpath: Path(ROOT) / relpath, NOBODY)

    @classmethod
    def package(cls):
        return cls("package", "/usr/sbin/pfrest", packaged_path, "pfrest")

    def shipped(self, relpath):
        return Path(self.locate(relpath)).read_text()

    def substitute(self, text, config=None, ports=None, spool=None):
        return substitute(text, self.command, config, ports, spool, account=self.user == NOBODY)

    def config(self, backend_url, **substitutions):
        """pfrest.json.example with its targets pointed at a test backend, substituted."""
        text = self.shipped("pfrest.json.example").replace("https://rest.example.com", backend_url)
        return self.substitute(text, **substitutions)


def sandbox(service):
    """setpriv options for what of a service unit's sandbox it can apply (``service``: unit_settings()):
    CapabilityBoundingSet= and NoNewPrivileges=, so that the process gets only the capabilities the
    unit grants it.  systemd-socket-activate applies none of the unit's settings itself."""
    caps = " ".join(service.get("CapabilityBoundingSet", [])).lower().replace("cap_", "").split()
    options = ["--bounding-set=" + ",".join(["-all"] + ["+" + c for c in caps])]
    if service.get("NoNewPrivileges") == ["yes"]:
        options.append("--no-new-privs")
    return [need_binary("setpriv"), *options]


class RoutedBackend(Backend):
    """The three targets of pfrest.json.example on one backend: answers are keyed "ENDPOINT KEY", e.g.
    "domains example.com", "aliases info@example.com", "policy RECIPIENT"."""

    def key_of(self, request):
        return request.path.rsplit("/", 1)[-1] + " " + super().key_of(request)


def master_entries(text):
    """The service entries of a master.cf file: every line that is not a comment or blank."""
    return "".join(line + "\n" for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))


_PARAM = re.compile(r"^([A-Za-z0-9_.:-]+) =(?: (.*))?$")


def commented_main_cf(text):
    """The main.cf lines a shipped file gives as comments ("#   name = value", continued on more deeply
    indented comment lines), as {name: value}."""
    found, param, indent = {}, None, 0
    for line in text.splitlines():
        if not line.startswith("#"):
            param = None
            continue
        body = line[1:]
        depth = len(body) - len(body.lstrip())
        match = _PARAM.match(body.strip())
        if match:
            param, indent = match.group(1), depth
            found[param] = (match.group(2) or "").strip()
        elif param and body.strip() and depth > indent:
            found[param] = (found[param] + " " + body.strip()).strip()
        else:
            param = None
    return found


def unit_settings(text):
    """A systemd unit file as {key: [values]} (sections merged; comments and blank lines skipped)."""
    settings = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


class NotifySocket:
    """What systemd listens on for sd_notify(3) (Type=notify): collects the datagrams sent to ``path``
    (made writable for all, as the notifying process may have dropped its privileges)."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)
        self.messages = []

    def wait_for(self, line, timeout=30.0):
        """Wait until a datagram holds ``line`` (e.g. "READY=1"); returns that datagram."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if line in message.splitlines():
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {line} in {self.messages}")
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass

    def close(self):
        self.sock.close()


# --- a private Postfix instance --------------------------------------------------------------------

def backdate(*paths):
    """Postfix programs re-read a main.cf younger than ~2 s every 300 ms until it settles."""
    old = time.time() - 10
    for p in paths:
        os.utime(p, (old, old))


class PostfixInstance:
    """Postfix with its own config, queue and data directories under ``root`` (which every user must be
    able to traverse), listening on loopback only, discarding all mail, logging to ``root/maillog``.

    ``main`` holds main.cf (extend it before start()); ``services`` is extra master.cf text;
    add_smtpd() adds an smtpd on a free loopback port, with optional ``-o`` overrides.
    """

    def __init__(self, root):
        need_root()
        need_binary("postfix")
        self.root = Path(root)
        self.etc = self.root / "etc"
        self.spool = self.root / "spool"
        self.data = self.root / "data"
        self.maillog = self.root / "maillog"
        self.main = {
            "compatibility_level": "3.6",          # no backwards-compatibility warnings in the log
            "queue_directory": str(self.spool),    # private: nothing of a system Postfix is touched
            "data_directory": str(self.data),
            "inet_interfaces": "loopback-only",    # only 127.0.0.1 is ever listened on
            "inet_protocols": "ipv4",
            "myhostname": "postfix.pfrest.test",   # no look-up of this machine's name
            "mydestination": "",                   # no local delivery
            "mynetworks": "192.0.2.0/24",  # no test client is trusted: every restriction runs
            "relay_domains": "static:ALL",         # every recipient is accepted for relay ...
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "permit",
            # ... and discarded: no alias database to build, no mail leaves, nobody notified
            "alias_maps": "", "alias_database": "", "biff": "no",
            "default_transport": "discard:", "relay_transport": "discard:",
            "local_transport": "discard:", "virtual_transport": "discard:",
            "maillog_file": str(self.maillog),     # postlogd's own file: no syslog daemon needed
            "maillog_file_prefixes": str(self.root),
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",   # tests give the SMTP client's address
        }
        self.services = ""
        self.smtpd = {}  # name -> port

    def add_smtpd(self, name="smtpd", maxproc="-", **overrides):
        """An smtpd service on a free loopback port, with ``-o name=value`` overrides; returns the port.
        ``maxproc=1``: every SMTP session goes to one smtpd process, one after the other."""
        port = free_port()
        opts = "".join(f"\n  -o {{ {k} = {v} }}" for k, v in overrides.items())
        self.services += f"127.0.0.1:{port} inet n - n - {maxproc} smtpd{opts}\n"
        self.smtpd[name] = port
        return port

    def write(self):
        for d in (self.etc, self.spool):
            d.mkdir(mode=0o755, exist_ok=True)
        self.data.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(self.data, "postfix", "postfix")
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main.items()))
        (self.etc / "master.cf").write_text(MASTER_CF + self.services)
        backdate(self.etc / "main.cf", self.etc / "master.cf")

    def log(self):
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout=20.0):
        if not self.smtpd:
            self.add_smtpd()
        self.write()
        proc = subprocess.run(["postfix", "-c", str(self.etc), "start"], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"postfix start failed: {proc.stdout}{proc.stderr}\n{self.log()}")
        deadline = time.monotonic() + timeout
        for port in self.smtpd.values():
            while True:
                if "fatal:" in self.log():
                    self.stop()
                    raise RuntimeError(f"Postfix instance {self.root} failed:\n{self.log()}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                        if s.recv(512).startswith(b"220 "):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"no SMTP banner on port {port}:\n{self.log()}")
                time.sleep(0.05)

    def master_pid(self):
        try:
            return int((self.spool / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self):
        """postfix stop, then kill whatever of the instance is left (spawned handlers included)."""
        pid = self.master_pid()
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True, timeout=60)
        deadline = time.monotonic() + 5
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        return reap(str(self.root))

    def postmap(self, key, table, stdin=None):
        return subprocess.run(["postmap", "-c", str(self.etc), "-q", key, table], input=stdin,
                              capture_output=True, text=True, timeout=60)

    def postconf(self, *args):
        return subprocess.run(["postconf", "-c", str(self.etc), *args], capture_output=True, text=True,
                              timeout=60)


# Our own master.cf: nothing chrooted (no files to copy into the spool), postlogd for maillog_file.
MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def smtp_rcpt(port, sender, recipients, helo="client.example"):
    """One SMTP session through a real smtpd: MAIL FROM, then RCPT TO for each recipient.
    Returns [(code, text)] for the RCPTs."""
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=60) as smtp:
        smtp.ehlo()
        code, text = smtp.mail(sender)
        assert code == 250, (code, text)
        replies = [smtp.rcpt(r) for r in recipients]
        smtp.rset()
    return [(code, text.decode()) for code, text in replies]


def _slow(seconds, answer):
    def respond(request):
        time.sleep(seconds)
        return answer
    return respond


_UNAVAILABLE = r"4\.7\.1 <.*>: Recipient address rejected: Policy service temporarily unavailable " \
               r"\(ref [0-9a-f]{16}\)"
# recipient -> (backend answer, SMTP code, SMTP text) for the policy endpoint of pfrest.json.example,
# whose request-timeout is 2000 ms
POLICY_CASES = {
    "reject@dest.example": ((200, "REJECT no thanks"), 554,
                            r"5\.7\.1 <reject@dest\.example>: Recipient address rejected: no thanks"),
    "defer@dest.example": ((200, "DEFER_IF_PERMIT try later"), 450,
                           r"4\.7\.1 <defer@dest\.example>: Recipient address rejected: try later"),
    "dunno@dest.example": ((200, "DUNNO"), 250, r"2\.1\.5 Ok"),
    "ok@dest.example": ((200, "OK"), 250, r"2\.1\.5 Ok"),
    "error@dest.example": ((500, ""), 450, _UNAVAILABLE),
    "slow@dest.example": (_slow(2.5, (200, "OK")), 450, _UNAVAILABLE),
}


def check_policy_transaction(backend, smtp_port, slow=True):
    """An SMTP transaction through a real smtpd whose policy service is pfrest: each recipient of
    POLICY_CASES gets the SMTP reply its backend answer means, and the backend received the attributes
    smtpd sent.  ``backend`` is a RoutedBackend; ``slow=False`` leaves out the 2.5 s timeout case."""
    from pfrest.commands.minihttp import form_bytes
    cases = {r: c for r, c in POLICY_CASES.items() if slow or not r.startswith("slow@")}
    backend.requests.clear()
    for rcpt, (answer, _, _) in cases.items():
        backend.answers["policy " + rcpt] = answer
    replies = smtp_rcpt(smtp_port, "sender@source.example", list(cases))
    for (rcpt, (_, code, text)), (got_code, got_text) in zip(cases.items(), replies):
        assert got_code == code and re.fullmatch(text, got_text), (rcpt, got_code, got_text)
    sent = [{n.decode(): v.decode() for n, v in form_bytes(r)} for r in backend.requests
            if r.path == "/postfix/policy"]
    assert [attrs["recipient"] for attrs in sent] == list(cases)
    for attrs in sent:
        assert attrs["request"] == "smtpd_access_policy" and attrs["protocol_state"] == "RCPT"
        assert attrs["sender"] == "sender@source.example" and attrs["helo_name"] == "client.example"
        assert attrs["client_address"] == "127.0.0.1"


# --- SMTP AUTH (smtpd_sasl_type = dovecot, pfrest's dovecot-sasl endpoints) ------------------------

# smtpd's TLS needs tlsmgr(8) (its session cache and entropy): without it, STARTTLS is refused
TLSMGR = "tlsmgr unix - - n 1000? 1 tlsmgr\n"


def certificate(directory):
    """A self-signed certificate for 127.0.0.1 in ``directory`` (an SMTP client trusts it as its CA):
    (cert path, key path)."""
    need_binary("openssl")
    cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


def smtp_login(port, user, password, mechanism="PLAIN", initial=True, cafile=None, then=None):
    """One SMTP session through a real smtpd: EHLO, (STARTTLS trusting ``cafile``, EHLO), AUTH
    ``mechanism`` (``initial``: with the initial response). Returns (code, text) of the AUTH;
    ``then(smtp)`` runs after a successful one."""
    import smtplib
    import ssl
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=60) as smtp:
        smtp.ehlo()
        if cafile is not None:
            smtp.starttls(context=ssl.create_default_context(cafile=str(cafile)))
            smtp.ehlo()
        smtp.user, smtp.password = user, password
        authobject = {"PLAIN": smtp.auth_plain, "LOGIN": smtp.auth_login}[mechanism]
        try:
            code, text = smtp.auth(mechanism, authobject, initial_response_ok=initial)
        except smtplib.SMTPAuthenticationError as e:
            code, text = e.smtp_code, e.smtp_error
        if code == 235 and then is not None:
            then(smtp)
        return code, text.decode()
