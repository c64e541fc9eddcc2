"""A misbehaving Postfix side: hostile clients and the harness that plays them against `pfrest serve`
(real sockets) and `pfrest handle` (a real process on pipes).  Used by tests/test_hostile.py and by
bin/pfrest-soak; standard library and pfrest only, no pytest.

Every Case says exactly what pfrest answers (``reply``, maybe nothing), whether it then closes the
conversation (``closes``; if not, a good request sent after it must be answered) and which log line it
causes.  ``play`` runs one Case over a Peer and returns what went differently, as a list of strings.
"""

import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCP, SOCKETMAP, POLICY = "tcp-lookup", "socketmap-lookup", "policy"
PARTIAL_TIMEOUT = 1.0   # the partial-request-timeout the configs below set, seconds
MIB = 1 << 20


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def policy_request(recipient: bytes, line_end=b"\n", extra=b"") -> bytes:
    lines = [b"request=smtpd_access_policy", b"protocol_state=RCPT", b"client_address=192.0.2.1",
             b"sender=a@example.com", b"recipient=" + recipient]
    return b"".join(line + line_end for line in lines) + extra + line_end


# The backend's truth for the good requests below and for the binary keys the Cases send.
# Keys are as the conftest Backend sees them: UTF-8 with surrogateescape.
ANSWERS = {"k": (200, ["v"]), "\udcff\udcfe\x01 k": (200, ["bin"]), "good@example.com": (200, b"OK fine"),
           "\udcff\udcfe@example.com": (200, b"REJECT binary")}
GOOD = {TCP: (b"get k\n", b"200 v\n"),
        SOCKETMAP: (netstring(b"map k"), b"4:OK v,"),
        POLICY: (policy_request(b"good@example.com"), b"action=OK fine\n\n")}


class Drip(NamedTuple):
    """Send ``data`` one byte every ``interval`` seconds (slowloris), until pfrest closes."""
    data: bytes
    interval: float


class Case(NamedTuple):
    name: str
    mode: str
    send: object      # bytes, or a Drip
    reply: bytes      # exactly what pfrest sends back for it
    closes: bool      # pfrest ends the conversation after the reply
    log: str          # regex of the log line it causes
    asks: bool = False  # the reply holds a backend answer (ANSWERS), so it depends on the backend


def _tcp400(text):
    return b"400 " + text.replace(b"%", b"%25").replace(b" ", b"%20") + b"\n"


CASES = [
    # --- tcp_table -------------------------------------------------------------------------------
    Case("tcp-oversized-line", TCP, b"get " + b"x" * 100000 + b"\n", b"500 request%20too%20long\n", False,
         r"bad request: request over the size limit"),
    Case("tcp-endless-line", TCP, b"get " + b"x" * (2 * MIB), b"", True,
         r"protocol error, closing: request over 1048576 bytes without a newline"),
    Case("tcp-slowloris", TCP, Drip(b"get slowloris-key-never-ends", 0.2), b"", True,
         r"closing: timeout with a partial request"),
    Case("tcp-binary-key", TCP, b"get %FF%FE%01%20k\n", b"200 bin\n", False,
         r"key=\\xff\\xfe\\x01 k status=200 reply=FOUND", asks=True),
    Case("tcp-raw-non-utf8-key", TCP, b"get \xff\xfe\x80x\n", b"500 not%20found\n", False,
         r"key=\\xff\\xfe\\x80x status=404 reply=NOTFOUND", asks=True),
    Case("tcp-%00", TCP, b"get a%00b\n", _tcp400(b"malformed request: %00 in key"), False,
         r"bad request: %00 in key"),
    Case("tcp-raw-nul", TCP, b"get a\0b\n", _tcp400(b"malformed request: NUL in key"), False,
         r"bad request: NUL in key"),
    Case("tcp-bad-escapes", TCP, b"get a%zzb\nget a%4\nget a%\n",
         _tcp400(b"malformed request: bad %XX escape") * 3, False,
         r"bad request: bad %XX escape"),
    Case("tcp-crlf", TCP, b"get k\r\n", b"200 v\n", False, r"key=k status=200 reply=FOUND", asks=True),
    Case("tcp-pipelined-after-malformed", TCP, b"bogus\nget %zz\nput k v\nget k\n",
         _tcp400(b"malformed request: expected get SP key")
         + _tcp400(b"malformed request: bad %XX escape")
         + b"500 update%20rejected:%20table%20is%20read-only\n200 v\n", False,
         r"bad request: put request", asks=True),
    # --- socketmap -------------------------------------------------------------------------------
    Case("sm-declared-10^12", SOCKETMAP, b"1000000000000:map k,", b"", True,
         r"protocol error, closing: netstring length is not 1 to 10 decimal digits"),
    Case("sm-declared-9999999999", SOCKETMAP, b"9999999999:" + b"x" * 65536, b"", True,
         r"protocol error, closing: netstring length 9999999999 over the limit of 1048576"),
    Case("sm-oversized", SOCKETMAP, netstring(b"map " + b"x" * 100000), b"9:NOTFOUND ,", False,
         r"bad request: request over the size limit"),
    Case("sm-endless-payload", SOCKETMAP, b"1048576:" + b"x" * (2 * MIB), b"", True,
         r"protocol error, closing: netstring not terminated by ','"),
    Case("sm-endless-digits", SOCKETMAP, b"1" * 100000, b"", True,
         r"protocol error, closing: netstring length is not 1 to 10 decimal digits"),
    Case("sm-leading-zero", SOCKETMAP, b"05:map k,", b"", True,
         r"protocol error, closing: netstring length is empty or has a leading zero"),
    Case("sm-missing-comma", SOCKETMAP, b"5:map k;", b"", True,
         r"protocol error, closing: netstring not terminated by ','"),
    Case("sm-pipelined-after-broken-netstring", SOCKETMAP,
         netstring(b"map k") + b"5:map k;" + netstring(b"map k"), b"4:OK v,", True,
         r"protocol error, closing: netstring not terminated by ','", asks=True),
    Case("sm-pipelined-after-malformed-request", SOCKETMAP, netstring(b"mapk") + netstring(b"map k"),
         netstring(b"PERM malformed request: expected NAME SP KEY") + b"4:OK v,", False,
         r"bad request: request without a space", asks=True),
    Case("sm-binary-key", SOCKETMAP, netstring(b"map \xff\xfe\x01 k"), b"6:OK bin,", False,
         r"map=map key=\\xff\\xfe\\x01 k status=200 reply=FOUND", asks=True),
    Case("sm-nul", SOCKETMAP, netstring(b"map a\0b"), netstring(b"PERM malformed request: NUL in request"),
         False, r"bad request: NUL in request"),
    Case("sm-crlf", SOCKETMAP, netstring(b"map k") + b"\r\n", b"4:OK v,", True,
         r"protocol error, closing: netstring length is not 1 to 10 decimal digits", asks=True),
    Case("sm-slowloris", SOCKETMAP, Drip(netstring(b"map slowloris-key-never-ends"), 0.2), b"", True,
         r"closing: timeout with a partial request"),
    # --- policy ------------------------------------------------------------------------------------
    Case("policy-10000-attributes", POLICY, policy_request(b"x@example.com", extra=b"a=b\n" * 10000),
         b"", True, r"protocol error, closing: more than 1024 attributes"),
    Case("policy-1MB-value", POLICY, policy_request(b"x" * MIB), b"", True,
         r"protocol error, closing: line over 16384 bytes"),
    Case("policy-crlf", POLICY, policy_request(b"good@example.com", line_end=b"\r\n"),
         b"action=OK fine\n\n", False, r"recipient=good@example.com status=200 action=OK fine", asks=True),
    Case("policy-binary-value", POLICY, policy_request(b"\xff\xfe@example.com"), b"action=REJECT binary\n\n",
         False, r"recipient=\\xff\\xfe@example.com status=200 action=REJECT binary", asks=True),
    Case("policy-nul", POLICY, policy_request(b"a\0b@example.com"), b"", True,
         r"protocol error, closing: NUL in request"),
    Case("policy-pipelined-after-malformed", POLICY, b"no equals sign\n" + policy_request(b"good@example.com"),
         b"", True, r"protocol error, closing: line without name=value"),
    Case("policy-not-smtpd-access-policy", POLICY, b"recipient=good@example.com\n\n", b"", True,
         r"protocol error, closing: request attribute missing or not smtpd_access_policy"),
    Case("policy-slowloris", POLICY, Drip(policy_request(b"good@example.com"), 0.2), b"", True,
         r"closing: timeout with a partial request"),
]


def endpoints(target, **extra):
    """Config entries for the three modes (no bind keys), with the partial-request timeout of CASES."""
    return [dict({"name": mode.split("-")[0], "mode": mode, "target": target, "request-timeout": 2000,
                  "partial-request-timeout": PARTIAL_TIMEOUT}, **extra) for mode in (TCP, SOCKETMAP, POLICY)]


# --- peers: one conversation with pfrest --------------------------------------------------------

def readable(fd, timeout) -> bool:
    """poll(), not select(): a test holding thousands of connections has descriptors above 1024."""
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(max(timeout, 0) * 1000))


class SocketPeer:
    """A connection to `pfrest serve`."""

    def __init__(self, address, timeout=10.0):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.settimeout(timeout)
        self.sock.connect(address)

    def send(self, data) -> bool:
        """False once pfrest no longer takes input."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _recv(self, timeout):
        """Some bytes; b"" at EOF or reset; None on timeout."""
        if not readable(self.sock.fileno(), timeout):
            return None
        try:
            return self.sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return b""

    def close(self):
        self.sock.close()


class HandlePeer:
    """A `pfrest handle` process: its stdin and stdout are the conversation."""

    def __init__(self, command, env=None):
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=ROOT)
        self.rusage = self.stderr = None

    def send(self, data) -> bool:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, ValueError):
            return False

    def _recv(self, timeout):
        fd = self.proc.stdout.fileno()
        if not readable(fd, timeout):
            return None
        return os.read(fd, 65536)

    def close(self, timeout=10.0):
        """End stdin, wait for the exit; returns the exit status.  ``rusage`` then holds the process's
        own resource usage (ru_maxrss: its peak RSS in KiB)."""
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        deadline = time.monotonic() + timeout
        while self.rusage is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.rusage, self.proc.returncode = usage, os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                self.proc.kill()
            else:
                time.sleep(0.01)
        self.proc.stdout.close()
        self.stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        return self.proc.returncode


def closed(peers, timeout, enough=None):
    """Those of ``peers`` (SocketPeers) that pfrest closes within ``timeout`` seconds (or until
    ``enough`` of them are), watched with one poll."""
    poll, by_fd, gone = select.poll(), {peer.sock.fileno(): peer for peer in peers}, []
    for fd in by_fd:
        poll.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while by_fd and time.monotonic() < deadline and len(gone) != enough:
        for fd, _ in poll.poll(max(deadline - time.monotonic(), 0) * 1000):
            if by_fd[fd]._recv(0) == b"":
                gone.append(by_fd.pop(fd))
                poll.unregister(fd)
    return gone


def read_exactly(peer, size, timeout):
    """Up to ``size`` bytes, fewer if pfrest closes or nothing comes for ``timeout`` seconds."""
    got, deadline = b"", time.monotonic() + timeout
    while len(got) < size:
        chunk = peer._recv(deadline - time.monotonic())
        if not chunk:
            break
        got += chunk
    return got


def read_to_close(peer, timeout):
    """Everything until pfrest closes: (bytes, closed within ``timeout``)."""
    got, deadline = b"", time.monotonic() + timeout
    while True:
        chunk = peer._recv(deadline - time.monotonic())
        if chunk is None:
            return got, False
        if not chunk:
            return got, True
        got += chunk


def send_case(peer, case):
    """Send what the Case sends; for a Drip, until pfrest closes.  Returns (bytes read while dripping,
    seconds from the first byte to the close)."""
    if not isinstance(case.send, Drip):
        peer.send(case.send)
        return b"", None
    start, got = time.monotonic(), b""
    for i in range(len(case.send.data)):
        if not peer.send(case.send.data[i:i + 1]):
            break
        chunk = peer._recv(case.send.interval)
        if chunk == b"":
            break
        got += chunk or b""
    return got, time.monotonic() - start


def play(peer, case, timeout=15.0, follow_up=True):
    """Run one Case over ``peer``; returns the list of things that went differently (empty: as meant).
    ``follow_up``: after a Case that keeps the connection, a good request must be answered too."""
    problems = []
    got, dripped = send_case(peer, case)
    if case.closes:
        more, closed = read_to_close(peer, timeout)
        got += more
        if not closed:
            problems.append(f"not closed within {timeout} s")
    else:
        got += read_exactly(peer, len(case.reply), timeout)
    if got != case.reply:
        problems.append(f"reply {got[:200]!r}, expected {case.reply[:200]!r}")
    if dripped is not None and not PARTIAL_TIMEOUT - 0.05 <= dripped <= PARTIAL_TIMEOUT + 2.0:
        problems.append(f"a dripping client was dropped after {dripped:.2f} s, not the "
                        f"partial-request timeout ({PARTIAL_TIMEOUT} s)")
    if follow_up and not case.closes:
        request, answer = GOOD[case.mode]
        if not peer.send(request) or read_exactly(peer, len(answer), timeout) != answer:
            problems.append("a good request after it got no right answer")
    return problems


def log_line_for(case, log_text):
    """The log line the Case caused, or None."""
    match = re.search(r"[^\n]*" + case.log + r"[^\n]*", log_text)
    return match.group(0) if match else None


# --- the `pfrest serve` process -------------------------------------------------------------------

PFREST = [sys.executable, os.path.join(ROOT, "bin", "pfrest")]  # runs the checkout, installed or not


class ServeProcess:
    """`pfrest serve -c CONFIG --log-file LOG [ARGS]`, started and waited for; ``stop()`` ends it."""

    def __init__(self, config_path, log_path, preexec_fn=None, ready_timeout=20.0, args=()):
        self.log_path = log_path
        with open(log_path, "wb") as out:  # the log, and whatever reaches stderr (a fatal error)
            self.proc = subprocess.Popen([*PFREST, "serve", "-c", config_path, "--log-file", log_path, *args],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT,
                                         preexec_fn=preexec_fn)
        self.pid = self.proc.pid
        self.wait_log(r"ready: serving", timeout=ready_timeout)

    def log(self, since=0):
        with open(self.log_path, errors="replace") as f:
            return f.read()[since:]

    def mark(self):
        return len(self.log())

    def wait_log(self, pattern, since=0, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log(since))
            if match:
                return match
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no log line like {pattern!r} (exit status {self.proc.poll()}):\n"
                                     + self.log(since)[-3000:])
            time.sleep(0.02)

    def status(self, field):
        """A /proc/PID/status figure in KiB (VmRSS, VmHWM: peak RSS) or a count (Threads)."""
        return proc_status(self.pid, field)

    def open_fds(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))


    def stop(self, timeout=15.0):
        """SIGTERM, SIGKILL if it does not end in time; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode


def cpu_seconds(pid):
    """User and system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


# --- well-behaved clients ---------------------------------------------------------------------------

class GoodClients:
    """One Postfix-like client per address, on a persistent connection, asking the GOOD request of its
    mode over and over until ``stop()``; records wrong answers and the slowest answer."""

    def __init__(self, addresses, pause=0.01):
        self.addresses, self.pause = addresses, pause
        self.answered, self.problems, self.slowest = 0, [], 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(mode, address), daemon=True)
                         for mode, address in addresses.items()]
        for thread in self._threads:
            thread.start()

    def _run(self, mode, address):
        request, answer = GOOD[mode]
        try:
            peer = SocketPeer(address)
        except OSError as exc:
            self.problems.append(f"{mode}: cannot connect: {exc}")
            return
        try:
            while not self._stop.wait(self.pause):
                start = time.monotonic()
                got = read_exactly(peer, len(answer), 10) if peer.send(request) else b""
                elapsed = time.monotonic() - start
                with self._lock:
                    self.slowest = max(self.slowest, elapsed)
                    if got == answer:
                        self.answered += 1
                    else:
                        self.problems.append(f"{mode}: got {got!r}")
                        return
        finally:
            peer.close()

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        return self
