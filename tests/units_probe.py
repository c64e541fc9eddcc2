"""Runs inside a container whose PID 1 is systemd (test_package.py: test_units_under_systemd), as the
one service there: starts the installed units as an admin would, one deployment style after the other,
with the installed /etc/pfrest/pfrest.json unchanged, and asks every endpoint through them.  The backend
listens where that config's placeholder targets point (the container has its own loopback).

Writes OUT/probe.json (what each step answered and how the processes ran) and OUT/journal.txt, for the
test to judge.  Standard library and the installed pfrest only: it runs with the container's Python."""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from urllib.parse import urlsplit

from pfrest.commands import minihttp

CONFIG = "/etc/pfrest/pfrest.json"
PRIVATE = "/var/spool/postfix/private"
PER_CONNECTION = ["pfrest-tcp.socket", "pfrest-socketmap.socket", "pfrest-policy.socket", "pfrest-auth.socket"]
PASSWORD = b"probe-password"
# What smtpd sends on its auth connection for one AUTH PLAIN with an initial response
LOGIN = b"VERSION\t1\t2\nCPID\t4242\nAUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=127.0.0.1\tresp=" \
    + base64.b64encode(b"\0alice\0" + PASSWORD) + b"\n"


def backend(request):
    """Found values that name the endpoint and the key; a policy verdict that names the recipient; a
    login accepted for PASSWORD, as the user name given prefixed with "probe:"."""
    endpoint = request.path.rsplit("/", 1)[-1]
    if endpoint == "auth":
        fields = dict(minihttp.form_bytes(request))
        if fields[b"password"] != PASSWORD:
            return 401, {}, b""
        return 200, {"Content-Type": "application/json"}, json.dumps(["probe:" + fields[b"username"].decode()]).encode()
    if endpoint == "policy":
        recipient = dict(minihttp.form_bytes(request))[b"recipient"].decode()
        return 200, {"Content-Type": "text/plain"}, f"REJECT probe {recipient}".encode()
    found = [f"{endpoint}:{dict(request.query)['key']}"]
    return 200, {"Content-Type": "application/json"}, json.dumps(found).encode()


def systemctl(*args):
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)
    return proc.returncode == 0 or f"systemctl {' '.join(args)}: {proc.stderr.strip()}"


def connect(address):
    """A connection to (host, port) or to a unix socket's path, retried for up to 10 s."""
    deadline = time.monotonic() + 10
    while True:
        s = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET)
        s.settimeout(10)
        try:
            s.connect(address)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def exchange(address, request, until, unit):
    """Send one request on a new connection and read until the reply ends with ``until``; returns the
    reply, and how the process of ``unit`` that answered runs, looked at while the connection is open."""
    try:
        with connect(address) as s:
            s.sendall(request)
            reply = b""
            while not reply.endswith(until):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
            return reply.decode(errors="replace"), status_of(main_pid(unit))
    except OSError as exc:
        return f"error: {exc}", None


def main_pid(pattern):
    """The main process of the first loaded unit matching ``pattern`` (an Accept=yes instance)."""
    units = subprocess.run(["systemctl", "list-units", "--plain", "--no-legend", pattern], capture_output=True,
                           text=True).stdout.split()
    if not units:
        return None
    pid = subprocess.run(["systemctl", "show", "-P", "MainPID", units[0]], capture_output=True,
                         text=True).stdout
    return int(pid) if pid.strip().isdigit() else None


def status_of(pid):
    """What a sandbox sets, from /proc/PID/status: uid, capabilities, no_new_privs, seccomp mode."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return None
    return {k: fields[k].split()[0] for k in ("Uid", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp")}


def ask_all(per_connection=False):
    """One request to each endpoint of the config, where pfrest.json.example puts them."""
    netstring = b"24:aliases info@example.com,"
    policy = b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n" \
             b"client_address=192.0.2.1\nsender=a@example.org\nrecipient=b@example.com\n\n"
    def unit(mode):
        return f"pfrest-{mode}@*" if per_connection else "pfrest.service"
    # the auth server greets first (its pid and a random cookie in it): only the answer to the AUTH
    greeted, process = exchange(f"{PRIVATE}/pfrest-auth", LOGIN, b"user=probe:alice\n", unit("auth"))
    return {"tcp": exchange(("127.0.0.1", 9001), b"get example.com\n", b"\n", unit("tcp")),
            "socketmap": exchange(f"{PRIVATE}/pfrest-aliases", netstring, b",", unit("socketmap")),
            "policy": exchange(f"{PRIVATE}/pfrest-policy", policy, b"\n\n", unit("policy")),
            "auth": (greeted.split("\nDONE\n", 1)[-1], process)}


def main(out):
    with open(CONFIG) as f:
        target = urlsplit(json.load(f)["endpoints"][0]["target"])
    server = minihttp.serve_app(backend, target.hostname, target.port)
    # Postfix's private directory, as Postfix makes it (the container's /var is empty)
    os.makedirs(PRIVATE, exist_ok=True)
    shutil.chown(PRIVATE, "postfix", "root")
    os.chmod(PRIVATE, 0o700)
    report = {"steps": {}}
    try:
        probe(report)
    except Exception:   # what it found so far, and where it stopped
        report["error"] = traceback.format_exc()
    finally:
        server.stop()
        with open(os.path.join(out, "probe.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(out, "journal.txt"), "w") as f:
            subprocess.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic"], stdout=f, timeout=60)


def probe(report):
    def step(*args):   # a systemctl command, as "start pfrest.service": True, or what went wrong
        report["steps"][" ".join(args)] = systemctl(*args)

    step("start", *PER_CONNECTION)
    report["per-connection"] = ask_all(per_connection=True)
    step("stop", *PER_CONNECTION)

    step("start", "pfrest.service")
    report["serve"] = ask_all()
    step("reload", "pfrest.service")
    time.sleep(0.5)
    report["serve reloaded"] = ask_all()
    step("stop", "pfrest.service")
    report["sockets left after stop"] = sorted(os.listdir(PRIVATE))

    step("start", "pfrest.socket")
    report["socket"] = ask_all()
    step("stop", "pfrest.service", "pfrest.socket")

    report["failed units"] = subprocess.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend"],
                                            capture_output=True, text=True).stdout.split()
    # systemd's own rating of the units it loaded (test_package.py rates the files offline too)
    report["security"] = {}
    for unit in ("pfrest.service", "pfrest-tcp@probe.service"):
        text = subprocess.run(["systemd-analyze", "security", "--no-pager", unit], capture_output=True,
                              text=True).stdout
        report["security"][unit] = text.strip().splitlines()[-1] if text.strip() else None


if __name__ == "__main__":
    main(sys.argv[1])
