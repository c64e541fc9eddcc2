"""Spawn mode of pfrest-bench: how soon a ``pfrest handle`` started per connection answers, next to a bare
``python -c "import requests"``, and how much private memory one holds after its first answer.

The handle and the bare import are started by socat per connection, as Postfix's spawn(8) or xinetd
would, and their connections alternate (one of each in turn), so that the drift of a shared machine
touches both alike and their ratio holds.  Memory is RssAnon (private, not shared with the other
handles) of a handle given a socketpair as stdin and stdout, read from /proc after the first reply:
the least of a few processes, with this Python and with Debian's /usr/bin/python3 (the Python of the
Debian package) where that one has pfrest's dependencies.  Imported by pfrest-bench.
"""

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

WARM_UP = 2           # connections of each kind not counted: they warm the page cache
PAUSE = 0.05          # seconds between connections: one handler at a time, as on a quiet host
MEMORY_PROCESSES = 5  # handles started to read RssAnon from (the least counts)
SYSTEM_PYTHON = "/usr/bin/python3"
REQUEST = b"get spawn@example.com\n"


def first_replies(jobs, runs, workdir, start_socat, stop):
    """Median ms from connect to the first reply (to EOF when the payload is None) of each
    (command, payload) of ``jobs``, each started per connection by its own socat; connections
    alternate between the jobs."""
    socats = []
    try:
        for command, _ in jobs:
            socats.append(start_socat(command, workdir))
        times = [[] for _ in jobs]
        for _ in range(runs + WARM_UP):
            for (command, payload), (_, port), taken in zip(jobs, socats, times):
                taken.append(_one(port, command, payload))
                time.sleep(PAUSE)
        return [statistics.median(taken[WARM_UP:]) for taken in times]
    finally:
        for proc, _ in socats:
            stop(proc)


def _one(port, command, payload):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        start = time.monotonic()
        if payload:
            s.sendall(payload)
        data = s.recv(65536)
        if payload and not data:
            raise RuntimeError(f"no reply from {' '.join(command)}")
        while payload is None and data:
            data = s.recv(65536)
        return (time.monotonic() - start) * 1000


def pythons():
    """This Python, and Debian's where it differs and can import what pfrest needs."""
    found = [sys.executable]
    if os.path.realpath(SYSTEM_PYTHON) != os.path.realpath(sys.executable) and shutil.which(SYSTEM_PYTHON) and \
            subprocess.run([SYSTEM_PYTHON, "-c", "import httptools"], capture_output=True).returncode == 0:
        found.append(SYSTEM_PYTHON)
    return found


def handle_memory(python, root, config_path, endpoint, log_file):
    """The least RssAnon in MiB of MEMORY_PROCESSES handles after their first reply (``python`` runs
    pfrest from ``root``), and that reply."""
    least, reply = None, None
    env = dict(os.environ, PYTHONPATH=root)
    for _ in range(MEMORY_PROCESSES):
        ours, theirs = socket.socketpair()
        with ours:
            proc = subprocess.Popen([python, "-m", "pfrest", "handle", "-c", config_path, "--log-file", log_file,
                                     endpoint], stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL, env=env,
                                    cwd=root)
            theirs.close()
            try:
                ours.settimeout(30)
                ours.sendall(REQUEST)
                reply = ours.recv(4096)
                with open(f"/proc/{proc.pid}/status") as status:
                    kib = next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))
            finally:
                ours.shutdown(socket.SHUT_WR)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        least = kib if least is None else min(least, kib)
    return least / 1024, reply
