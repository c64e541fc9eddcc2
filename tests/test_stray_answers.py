"""Answers bound to their request, through `pfrest serve` (and its workers): a backend that sends every
answer twice, the copy some time later, never gets a value to another key or a policy action to another
message.  Echoing X-Request-Id lets pfrest catch every copy, whenever it comes; without the echo, the
look at a pooled connection before its reuse catches a copy that came while the connection was idle."""

import json
import re
import socket
import threading
import time
import urllib.request

import pytest

from hostile import ServeProcess, policy_request
from postfix_instance import free_port
from rogue import Scripted

CLIENTS = 4          # Postfix connections per endpoint, each asking its own keys one after another
REQUESTS = 120       # per client
COPY_DELAYS = (0.0001, 0.0005, 0.002)   # seconds between an answer and its copy
# generous: a timed-out exchange closes its connection before its copy is caught, and a loaded machine
# must not make that happen
TIMEOUT_MS = 10000
SETTLE = 0.05        # seconds for bytes sent on loopback to reach the receiving socket, on a busy machine
REQUEST_ID = re.compile(rb"\r\nX-Request-Id: ([0-9a-f]+)", re.I)


def twice(delay, echo=True, copies=True, copied=None):
    """The backend's script: each answer (naming its key) once, then again ``delay`` seconds later
    (then ``copied(key)``)."""
    def answer(request):
        if request.head.startswith(b"GET /lookup"):
            body, kind = json.dumps([f"v-{request.key}"]).encode(), b"application/json"
        else:
            body, kind = b"OK v-" + request.key.encode(), b"text/plain"
        echoed = b""
        if echo:
            echoed = b"X-Request-Id: " + REQUEST_ID.search(request.head).group(1) + b"\r\n"
        response = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
            kind, len(body), echoed, body)
        if not copies:
            return [response]
        return [response, delay, response] + ([lambda: copied(request.key)] if copied else [])
    return answer


class Postfix:
    """One Postfix-like client connection: asks, reads the one reply."""

    def __init__(self, port, mode):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.mode, self.buffer = mode, b""

    def ask(self, key: str) -> bytes:
        if self.mode == "tcp-lookup":
            self.sock.sendall(b"get %s\n" % key.encode())
            end = b"\n"
        else:
            self.sock.sendall(policy_request(key.encode()))
            end = b"\n\n"
        while end not in self.buffer:
            data = self.sock.recv(65536)
            assert data, "pfrest closed the connection"
            self.buffer += data
        reply, _, self.buffer = self.buffer.partition(end)
        return reply

    def close(self):
        self.sock.close()


def right(mode, key, reply) -> str:
    """"right", "temporary" or "WRONG" for the reply to ``key``."""
    if mode == "tcp-lookup":
        if reply.startswith(b"400 "):
            return "temporary"
        return "right" if reply == b"200 v-" + key.encode() else "WRONG"
    if reply.startswith(b"action=DEFER_IF_PERMIT "):
        return "temporary"
    return "right" if reply == b"action=OK v-" + key.encode() else "WRONG"


def traffic(ports, pause=0.0, clients=CLIENTS, between=None):
    """``clients`` clients per endpoint asking REQUESTS keys each, ``pause`` seconds apart (and after
    ``between(key)`` returns); a count of their outcomes per mode."""
    outcomes, lock = {}, threading.Lock()

    def client(mode, port, number):
        peer = Postfix(port, mode)
        try:
            for i in range(REQUESTS):
                key = f"c{number}-{i}@example.com"
                outcome = right(mode, key, peer.ask(key))
                with lock:
                    outcomes[mode, outcome] = outcomes.get((mode, outcome), 0) + 1
                time.sleep(pause)
                if between is not None:
                    between(key)
        finally:
            peer.close()
    threads = [threading.Thread(target=client, args=(mode, port, n))
               for mode, port in ports.items() for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes


def strays(metrics_port, backend, timeout=5.0) -> int:
    """The answers /metrics says were refused as stray, once it counts one per backend connection or
    ``timeout`` has passed (the last copies come on idle connections; workers report every second)."""
    deadline = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        counted = sum(int(float(v)) for v in re.findall(
            r"^pfrest_backend_stray_answers_total\{[^}]*\} (\S+)$", text, re.M))
        if counted >= backend.connections or time.monotonic() > deadline:
            return counted
        time.sleep(0.1)


@pytest.fixture
def served(tmp_path):
    """serve(backend_url, workers) -> (ServeProcess, {mode: port}, metrics port); stopped at the end."""
    started = []

    def serve(url, workers=1, **extra):
        ports = {"tcp-lookup": free_port(), "policy": free_port()}
        metrics = free_port()
        endpoints = [dict({"name": mode.split("-")[0], "mode": mode, "target": f"{url}/{mode.split('-')[-1]}",
                           "bind-port": port, "request-timeout": TIMEOUT_MS}, **extra) for mode, port in ports.items()]
        path = tmp_path / f"serve{len(started)}.json"
        path.write_text(json.dumps({"endpoints": endpoints, "metrics-address": f"127.0.0.1:{metrics}"}))
        started.append(ServeProcess(str(path), str(tmp_path / f"serve{len(started)}.log"),
                                    args=("--workers", str(workers)) if workers > 1 else ()))
        return started[-1], ports, metrics
    yield serve
    for proc in started:
        assert proc.stop() == 0


@pytest.mark.parametrize("delay", COPY_DELAYS)
@pytest.mark.parametrize("workers", (1, 2))
def test_every_copy_of_an_echoing_backend_is_caught(served, delay, workers):
    backend = Scripted(twice(delay))
    try:
        proc, ports, metrics = served(backend.url, workers)
        outcomes = traffic(ports)
        caught = strays(metrics, backend)
        connections = backend.connections
        log = proc.log()
    finally:
        backend.stop()
    assert not any(outcome == "WRONG" for _, outcome in outcomes), outcomes
    assert sum(outcomes.values()) == len(ports) * CLIENTS * REQUESTS
    assert all(outcomes.get((mode, "right"), 0) > 0 for mode in ports), outcomes
    # each connection carried answers until its first copy came, which was caught and closed it
    assert caught == connections > 1
    assert len(re.findall(r"connection closed", log)) == caught


def test_a_backend_without_the_echo_has_its_idle_copies_caught(served):
    """Without X-Request-Id a copy that arrives after the next request went out cannot be told from
    its answer (docs/http-contract.md says so): one client per endpoint here, which asks its next key only once
    the copy of the last answer was sent and has had SETTLE to arrive, so that the connection is idle
    until it came (a fixed pause from the reply let a loaded machine deliver a copy after the next
    request, 1 in 120: the very race the echo is for)."""
    copies, sent = threading.Condition(), set()

    def copied(key):
        with copies:
            sent.add(key)
            copies.notify_all()

    def after_its_copy(key):
        with copies:
            assert copies.wait_for(lambda: key in sent, timeout=10), key
        time.sleep(SETTLE)   # sent is not yet received: loopback delivers it in a softirq, maybe later

    backend = Scripted(twice(0.002, echo=False, copied=copied))
    try:
        _, ports, metrics = served(backend.url)
        outcomes = traffic(ports, clients=1, between=after_its_copy)
        caught = strays(metrics, backend)
        connections = backend.connections
    finally:
        backend.stop()
    # a copy read with its answer (a busy machine) makes that request's answer temporary: still right
    assert not any(outcome == "WRONG" for _, outcome in outcomes), outcomes
    assert all(outcomes.get((mode, "right"), 0) > REQUESTS / 2 for mode in ports), outcomes
    assert caught == connections > 1


@pytest.mark.parametrize("echo", (True, False))
def test_require_request_id_refuses_an_answer_without_it(served, echo):
    backend = Scripted(twice(0, echo=echo, copies=False))
    try:
        _, ports, metrics = served(backend.url, **{"require-request-id": True})
        outcomes = traffic(ports, clients=1)
        caught = strays(metrics, backend, timeout=0 if echo else 5.0)
    finally:
        backend.stop()
    if echo:
        assert outcomes == {(mode, "right"): REQUESTS for mode in ports} and caught == 0
    else:   # each answer refused closes its connection
        assert outcomes == {(mode, "temporary"): REQUESTS for mode in ports}
        assert caught == len(ports) * REQUESTS == backend.connections
