"""Logging to systemd's journal: when stderr is the stream named by JOURNAL_STREAM, every line pfrest
writes starts with its syslog priority (sd-daemon(3)), on the record path and on the request lines'
fast path, so that `journalctl -p err` finds the errors.  journald itself does not run here: what a real
`pfrest serve` writes to that stream is read instead."""

import io
import re
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import ROOT, pfrest_cmd, pfrest_env
from pfrest import log
from postfix_instance import stop_process, wait_path

TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


class Stderr:
    """A pipe for a child's stderr, its lines collected by a thread; ``journal_stream`` is the
    JOURNAL_STREAM value systemd would set for it (device:inode)."""

    def __init__(self):
        self.read_end, self.write_end = os.pipe()
        st = os.fstat(self.write_end)
        self.journal_stream = f"{st.st_dev}:{st.st_ino}"
        self.lines = []
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self):
        with os.fdopen(self.read_end, "r", errors="replace") as f:
            for line in f:
                self.lines.append(line.rstrip("\n"))

    def wait_for(self, text, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} in {self.lines}"
            time.sleep(0.02)

    def run(self, *args, env):
        proc = subprocess.Popen(pfrest_cmd(*args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=self.write_end, env=env, cwd=ROOT)
        os.close(self.write_end)
        return proc

    def finish(self):
        self.thread.join(20)
        return self.lines


def test_serve_prefixes_every_line_with_its_priority(backend, write_config, tmp_path):
    backend.answers.update({"k": (200, ["v"]), "down": (503, b"")})
    path = tmp_path / "ep.sock"
    config = write_config([{"name": "ep", "mode": "tcp-lookup", "target": backend.url + "/l",
                            "bind-path": str(path), "auth-token": "t0ken-x"}])
    os.chmod(config, 0o644)   # a warning: the token is readable by every user
    stderr = Stderr()
    proc = stderr.run("serve", "-c", config, env=dict(pfrest_env(), JOURNAL_STREAM=stderr.journal_stream))
    try:
        wait_path(str(path))
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(b"get k\n")
            assert sock.recv(100) == b"200 v\n"
            sock.sendall(b"get down\n")
            assert sock.recv(100).startswith(b"400 ")
        stderr.wait_for("reply=TEMP")   # the request line: the handler's fast path
        with open(config, "w") as f:
            json.dump({"endpoints": []}, f)
        proc.send_signal(signal.SIGHUP)
        stderr.wait_for("must list at least one endpoint")
    finally:
        assert stop_process(proc) == 0
    lines = stderr.finish()
    assert lines and all(line[:3] in ("<3>", "<4>", "<6>") for line in lines), lines
    assert any(line.startswith("<6>INFO: endpoint=ep id=") and "key=k status=200 reply=FOUND" in line
               for line in lines)
    # a request the backend failed: at warning priority, for journalctl -p warning
    assert any(line.startswith("<4>WARNING: endpoint=ep id=") and "key=down status=503 reply=TEMP" in line
               for line in lines), lines
    assert any(line.startswith("<4>WARNING: ") and "readable by every user" in line for line in lines)
    assert f"<3>ERROR: reload: keeping the old configuration; {config} is refused:" in lines
    assert "<3>ERROR: endpoints: must list at least one endpoint" in lines
    assert "<6>INFO: stopped" in lines


def test_no_prefix_when_stderr_is_not_the_journal_stream(write_config):
    """JOURNAL_STREAM inherited, stderr redirected elsewhere: plain lines with their time stamps."""
    config = write_config([])
    stderr = Stderr()
    proc = stderr.run("serve", "-c", config, env=dict(pfrest_env(), JOURNAL_STREAM="1:1"))
    assert proc.wait(30) == 78
    lines = stderr.finish()
    assert len(lines) == 1
    assert re.fullmatch(TIMESTAMP + r",\d{3} pfrest: ERROR: endpoints: must list at least one "
                                      r"endpoint", lines[0]), lines


def test_every_level_and_every_line_of_a_record():
    out = io.StringIO()
    handler = log.LineHandler(out, log.FORMAT_JOURNAL, journal=True)
    logger = logging.getLogger("pfrest.test-journal")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
            logger.log(level, "at %s", logging.getLevelName(level))
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
        handler.line("endpoint=ep id=1 key=k status=200 reply=FOUND ms=1.0")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[:5] == ["<7>DEBUG: at DEBUG", "<6>INFO: at INFO", "<4>WARNING: at WARNING",
                         "<3>ERROR: at ERROR", "<2>CRITICAL: at CRITICAL"]
    assert lines[5] == "<3>ERROR: failed" and lines[-2] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in lines[5:-1])   # the traceback too
    assert lines[-1] == "<6>INFO: endpoint=ep id=1 key=k status=200 reply=FOUND ms=1.0"


@pytest.mark.parametrize("native", [False, True], ids=["journal-syslog-socket", "journal-native-socket"])
def test_without_dev_log_syslog_lines_go_to_journald(monkeypatch, native):
    """No /dev/log (a container, a minimal host): libc syslog(3) would drop every line of `handle`
    without a trace; they go to journald's syslog socket, or its native one, a real datagram socket
    here, each line a datagram with facility mail, priority and pfrest[pid]."""
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:   # short: a socket path has 108 bytes
        journald = os.path.join(tmp, "journal")
        monkeypatch.setattr(log, "SYSLOG_SOCKET", os.path.join(tmp, "dev-log"))   # there is none
        monkeypatch.setattr(log, "JOURNAL_SYSLOG_SOCKET", os.path.join(tmp, "none" if native else "journal"))
        monkeypatch.setattr(log, "JOURNAL_NATIVE_SOCKET", os.path.join(tmp, "journal" if native else "none"))
        assert log.log_socket() is None and isinstance(log.syslog_handler(), log.SyslogHandler)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(journald)
            listener.settimeout(5)
            assert log.log_socket() == journald
            handler = log.syslog_handler()
            assert isinstance(handler, log.JournalHandler)
            logger = logging.getLogger("pfrest.test-journald")
            logger.addHandler(handler)
            logger.propagate = False
            log.add_secret("s3cret-token")
            try:
                logger.warning("backend down: s3cret-token\nsecond line")
            finally:
                logger.removeHandler(handler)
                handler.close()
            got = [listener.recv(4096).decode() for _ in range(2)]
    pid = os.getpid()
    if native:
        assert got[0] == (f"PRIORITY=4\nSYSLOG_FACILITY=2\nSYSLOG_IDENTIFIER=pfrest\nSYSLOG_PID={pid}\n"
                          "MESSAGE=warning: backend down: (redacted)\n")
        assert got[1].endswith("MESSAGE=second line\n")
    else:
        assert got == [f"<20>pfrest[{pid}]: warning: backend down: (redacted)", f"<20>pfrest[{pid}]: second line"]
