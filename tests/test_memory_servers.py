"""The metrics address and the control socket of a real `pfrest serve` against hostile clients, in a single
process and in the arbiter of `--workers 2` (which serves both there): a finished request keeps nothing
(300 requests with 1 MiB bodies), slow-drip clients cannot lock `/healthz` and `/metrics` out, and 4 s
of each server's worst input (huge heads, endless header fields, endless chunked bodies, chunk extensions
and trailers, slow drip, many connections) keep the serving process's memory under a named bound, and
it answers as before."""

import http.client
import json
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from hostile import ServeProcess
from postfix_instance import free_port

MIB = 1 << 20
REQUESTS, SENDERS = 300, 8     # requests with a 1 MiB body, and the clients sending them at once
MAX_KEPT_KIB = 48 * 1024       # RSS after the 300 requests over RSS before (it kept 330 MiB for 110 s)
SLOW_CLIENTS = 40              # slow-drip clients at once: more than httpd.MAX_CLIENTS
DRIP_INTERVAL = 0.2            # seconds between two bytes of a slow-drip client
ANSWER_WITHIN = 10.0           # seconds a health check may take while the slow clients drip (it hung)
# of each server's worst input: the peak is reached within 2.5-4.5 s (over 97% of a 10 s run's), and
# 4 s are some 5,000 exchanges of 1-4 MiB each, so that keeping even 10 KiB of each passes the bound
ATTACK_SECONDS = 4.0
# peak RSS over RSS before the attack: the control socket may hold a 1 MiB body per connection
# (httpd.MAX_CLIENTS, 32), the metrics address none; both read at most 64 KiB at once
MAX_GROWTH_KIB = 48 * 1024


@pytest.fixture(params=["single", "workers"])
def serve(request, tmp_path):
    """A `pfrest serve` (one process, or --workers 2) with a metrics address and a control socket;
    yields (process, metrics (host, port), control socket path)."""
    short = tempfile.mkdtemp(prefix="pfrest-mem-")   # a unix socket's path is short
    control, metrics = os.path.join(short, "control.sock"), ("127.0.0.1", free_port())
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({
        "metrics-address": "%s:%d" % metrics, "control-socket": control,
        "endpoints": [{"name": "t", "mode": "tcp-lookup", "target": "http://127.0.0.1:9/", "cache-ttl": 60,
                       "bind-address": "127.0.0.1", "bind-port": free_port()}]}))
    config.chmod(0o600)
    proc = ServeProcess(str(config), str(tmp_path / "serve.log"),
                        args=("--workers", "2") if request.param == "workers" else ())
    try:
        yield proc, metrics, control
    finally:
        assert proc.stop() == 0
        shutil.rmtree(short, ignore_errors=True)


def connect(address, timeout=10.0):
    """A connection to the metrics address ((host, port)) or the control socket (a path)."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address)
        return sock
    return socket.create_connection(address, timeout=timeout)


def exchange(address, data, timeout=10.0):
    """Send ``data`` and read until pfrest closes; what came back (b"" for a close or a reset), the
    sending cut short where pfrest closed first."""
    try:
        with connect(address, timeout) as sock:
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            reply = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return reply
                reply += chunk
    except (ConnectionResetError, BrokenPipeError, socket.timeout):
        return b""


def get(address, path="/healthz"):
    """(status, body) of a GET to the metrics address, as a monitoring system asks."""
    conn = http.client.HTTPConnection(*address, timeout=ANSWER_WITHIN)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def in_parallel(work, count):
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def test_a_finished_request_keeps_nothing(serve):
    proc, metrics, control = serve
    body = b"x" * MIB
    requests = {metrics: b"GET /metrics HTTP/1.1\r\nHost: m\r\nContent-Length: %d\r\n\r\n" % MIB + body,
                control: b"POST /cache/t HTTP/1.1\r\nHost: c\r\nContent-Length: %d\r\n\r\n" % MIB + body}
    assert get(metrics) == (200, b"ok\n")
    before = proc.status("VmRSS")
    replies = []

    def send(index):
        for number in range(index, REQUESTS, SENDERS):
            address = (metrics, control)[number % 2]
            replies.append(exchange(address, requests[address]).split(b"\r\n", 1)[0])
    in_parallel(send, SENDERS)
    kept = proc.status("VmRSS") - before
    assert kept < MAX_KEPT_KIB, f"RSS grew by {kept} KiB after {REQUESTS} requests"
    assert len(replies) == REQUESTS
    # the metrics address takes no body; the control socket reads it, and says it is no invalidation
    assert set(replies) <= {b"", b"HTTP/1.1 413 Content Too Large", b"HTTP/1.1 400 Bad Request"}, set(replies)
    assert b"HTTP/1.1 400 Bad Request" in replies
    assert get(metrics) == (200, b"ok\n")


class SlowClients:
    """``count`` clients on ``address`` sending a request head one byte every DRIP_INTERVAL seconds, a
    new connection for each one pfrest closes, until ``stop()``."""

    HEAD = b"GET /metrics HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"s" * 100000

    def __init__(self, address, count):
        self.address, self.count, self.connected = address, count, 0
        self.socks = [self._connect() for _ in range(count)]
        self.sent = [0] * count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self._thread.start()

    def _connect(self):
        sock = connect(self.address)
        self.connected += 1
        return sock

    def _drip(self):
        while not self._stop.wait(DRIP_INTERVAL):
            for i, sock in enumerate(self.socks):
                try:
                    sock.send(self.HEAD[self.sent[i]:self.sent[i] + 1])
                    self.sent[i] += 1
                except OSError:   # closed by pfrest: in again
                    sock.close()
                    try:
                        self.socks[i], self.sent[i] = self._connect(), 0
                    except OSError:
                        pass

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        for sock in self.socks:
            sock.close()


def test_slow_drip_clients_do_not_lock_out_the_health_check(serve):
    proc, metrics, _ = serve
    slow = SlowClients(metrics, SLOW_CLIENTS)
    try:
        time.sleep(3 * DRIP_INTERVAL)   # every slow client has its connection and drips
        for _ in range(5):
            assert get(metrics) == (200, b"ok\n")
            status, text = get(metrics, "/metrics")
            assert status == 200 and b"pfrest_build_info" in text
    finally:
        slow.stop()
    proc.wait_log(r"metrics-address: 32 connections at once: closed the oldest of peer 127\.0\.0\.1 ")


# --- each server's worst input, for ATTACK_SECONDS ---------------------------------------------------

def chunked(path, framing):
    return b"POST %s HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n%s" % (path, framing)


def worst_input(path):
    """{name: (bytes, status the metrics address answers, status the control socket answers)} of the
    hostile requests to a server whose requests go to ``path``.  The metrics address takes no body."""
    return {
        "huge head": (b"GET %s HTTP/1.1\r\nX: %s\r\n\r\n" % (path, b"h" * (4 * MIB)), 431, 431),
        "huge request line": (b"GET /%s HTTP/1.1\r\n\r\n" % (b"u" * (4 * MIB)), 431, 431),
        "endless header fields": (b"GET %s HTTP/1.1\r\n%s\r\n" % (path, b"a: b\r\n" * 200000), 431, 431),
        "body over the limit": (b"POST %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (
            path, 4 * MIB, b"b" * (4 * MIB)), 413, 413),
        "body at the limit": (b"POST %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (path, MIB, b"d" * MIB),
                              413, 400),   # 400: no invalidation
        "endless chunked body": (chunked(path, b"100000\r\n%s\r\n" % (b"c" * 0x100000) * 4), 413, 413),
        "endless small chunks": (chunked(path, b"1\r\nc\r\n" * 400000), 413, 431),
        "endless chunk extension": (chunked(path, b"1;%s\r\nc\r\n0\r\n\r\n" % (b"e" * (4 * MIB))), 431, 431),
        "endless trailers": (chunked(path, b"1\r\nc\r\n0\r\n%s\r\n" % (b"t: v\r\n" * 400000)), 413, 431),
        "huge trailer": (chunked(path, b"1\r\nc\r\n0\r\nT: %s\r\n\r\n" % (b"v" * (4 * MIB))), 413, 431),
        "pipelined requests": (b"GET %s HTTP/1.1\r\n\r\n" % path * 100000, 200, 405),   # the first one only
        "garbage": (b"\x16\x03\x01" + os.urandom(4096), 400, 400),   # TLS to a plain HTTP port, say
    }


def status_of(reply):
    """The status of a reply (``HTTP/1.1 413 ...``), 0 for none: pfrest closed first (or reset the
    connection, the rest of the request unread), or, while slow clients take every slot, a new
    connection took this one's."""
    return int(reply[9:12]) if reply.startswith(b"HTTP/1.1 ") else 0


def attack(address, inputs, seconds):
    """Every input over and over from its own client, SLOW_CLIENTS slow-drip clients and as many idle
    connections, for ``seconds``; returns the statuses seen."""
    deadline, seen = time.monotonic() + seconds, set()

    def hammer(index):
        while time.monotonic() < deadline:
            seen.add(status_of(exchange(address, inputs[index], timeout=5)))
    slow = SlowClients(address, SLOW_CLIENTS)
    idle = []
    try:
        for _ in range(SLOW_CLIENTS):
            try:
                idle.append(connect(address))
            except OSError:
                pass
        in_parallel(hammer, len(inputs))
    finally:
        slow.stop()
        for sock in idle:
            sock.close()
    return seen


@pytest.mark.parametrize("server", ["metrics-address", "control-socket"])
def test_sustained_worst_input_stays_within_bounds(serve, server):
    proc, metrics, control = serve
    address, path, column = (metrics, b"/metrics", 1) if server == "metrics-address" else \
        (control, b"/cache/t", 2)
    cases = worst_input(path)
    assert get(metrics) == (200, b"ok\n")
    before, mark = proc.status("VmRSS"), proc.mark()
    seen = attack(address, [case[0] for case in cases.values()], ATTACK_SECONDS)
    growth = proc.status("VmHWM") - before
    assert proc.proc.poll() is None
    assert growth < MAX_GROWTH_KIB, f"peak RSS grew by {growth} KiB"
    assert seen <= {case[column] for case in cases.values()} | {0}, seen
    # and then, one at a time, each its own answer, as a health check and pfrest cache get theirs
    answers = {name: status_of(exchange(address, case[0])) for name, case in cases.items()}
    assert answers == {name: case[column] for name, case in cases.items()}
    assert get(metrics) == (200, b"ok\n")
    good = exchange(control, b"POST /cache/t HTTP/1.1\r\nContent-Length: 6\r\n\r\nflush\n")
    assert good.startswith(b"HTTP/1.1 200 OK") and good.endswith(b'{"processes": %d, "dropped": 0}' % (
        2 if "--workers" in proc.proc.args else 1)), good
    proc.wait_log(rf"{server}: bad request from peer .*: 4\d\d ", since=mark)
    print(f"{server}: peak RSS {growth} KiB over RSS before; statuses seen {sorted(seen)}")
