"""`pfrest serve --workers N`: the arbiter accepts and passes connections to the least busy worker;
reloads (sockets added, moved, removed) apply to every worker and to connections already open; a worker
that dies is replaced with the current config; a stop drains every worker.  The channels never block a
loop nor lose a message (a stopped arbiter); a worker that goes silent (stopped) gets no connections, is
reported and replaced, and does not hold up a stop; a reload that disowns a connection closes it."""

import os
import pickle
import re
import signal
import socket
import threading
import time

import pytest

from conftest import Backend
from pfrest.process import control
from postfix_instance import free_port
from test_monitoring import get, run_pfrest, samples, total
from test_serve import connect, endpoint, served, tcp_get  # noqa: F401 (served is a fixture)


def workers_of(proc):
    with open(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def counters(proc, pattern, timeout=10):
    """SIGUSR1 until a stats line matches ``pattern`` (the workers report every second)."""
    deadline = time.monotonic() + timeout
    while True:
        mark = proc.mark()
        proc.send(signal.SIGUSR1)
        line = proc.wait_for(r"stats workers connections=.*", after=mark).group(0)
        text = "\n".join(proc.lines[mark:])
        match = re.search(pattern, text)
        if match:
            return match, line
        assert time.monotonic() < deadline, text
        time.sleep(0.3)


def until(predicate, timeout=10, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_workers_balance_reload_in_place_and_stop(backend, write_config, served):
    other = Backend()
    try:
        backend.answers["k"] = (200, ["old"])
        other.answers["k"] = (200, ["new"])
        port = free_port()
        cfg = write_config([endpoint(backend, **{"bind-port": port})])
        proc = served("-c", cfg, "--workers", "2")
        proc.wait_for(r"ready: serving 1 endpoint\(s\), 2 workers")
        pids = workers_of(proc)
        assert len(pids) == 2
        kept = [connect(("127.0.0.1", port)) for _ in range(8)]
        for sock in kept:
            assert tcp_get(sock, b"k") == b"200 old\n"
        # the whole service's counters, added up from both workers; the connections split 4 and 4
        _, workers = counters(proc, r"stats endpoint=ep connections=8 accepted=8 refused=- requests=8 "
                                    r"replies=FOUND:8 ")
        assert workers.endswith("connections=4,4")

        write_config([endpoint(other, **{"bind-port": port})])
        mark = proc.mark()
        proc.send(signal.SIGHUP)
        proc.wait_for(r"reloaded ", after=mark)
        for sock in kept:  # every connection already open, on both workers, gets the new target
            assert tcp_get(sock, b"k") == b"200 new\n"
        with connect(("127.0.0.1", port)) as fresh:
            assert tcp_get(fresh, b"k") == b"200 new\n"

        for sock in kept:
            sock.close()
        proc.send(signal.SIGTERM)
        assert proc.exit_status() == 0
        assert not any(alive(pid) for pid in pids)
        assert proc.log.count("letting requests in progress finish") == 2
        assert re.search(r"stats endpoint=ep connections=0 accepted=9 refused=- requests=17 ", proc.log)
    finally:
        other.stop()


def test_a_burst_of_connections_is_spread_evenly(backend, write_config, served):
    """40 connections opened at once, as Postfix's processes do after a reload: 20 and 20, all served."""
    backend.answers["k"] = (200, ["v"])
    port = free_port()
    proc = served("-c", write_config([endpoint(backend, **{"bind-port": port})]), "--workers", "2")
    proc.wait_for(r"2 workers")
    socks, answers, start = [], [], threading.Barrier(40)

    def client():
        start.wait()
        sock = connect(("127.0.0.1", port))
        socks.append(sock)
        answers.append(tcp_get(sock, b"k"))
    threads = [threading.Thread(target=client) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert answers == [b"200 v\n"] * 40
        _, workers = counters(proc, r"stats endpoint=ep connections=40 .* requests=40 ")
        assert workers.endswith("connections=20,20"), workers
    finally:
        for sock in socks:
            sock.close()


def test_reload_adds_moves_and_removes_sockets_with_workers(backend, write_config, served, tmp_path):
    backend.answers["k"] = (200, ["v"])
    first, moved = free_port(), free_port()
    path = tmp_path / "b.sock"
    proc = served("-c", write_config([endpoint(backend, name="a", **{"bind-port": first}),
                                      endpoint(backend, name="gone", **{"bind-port": free_port()})]),
                  "--workers", "2")
    proc.wait_for(r"2 workers")
    with connect(("127.0.0.1", first)) as held:
        assert tcp_get(held, b"k") == b"200 v\n"
        write_config([endpoint(backend, name="a", **{"bind-port": moved}),
                      dict(endpoint(backend, name="b"), **{"bind-path": str(path)}, **{"bind-port": None})])
        # bind-port null is not valid: the whole reload is refused and nothing changes
        mark = proc.mark()
        proc.send(signal.SIGHUP)
        proc.wait_for(r"reload: keeping the old configuration", after=mark)
        assert tcp_get(held, b"k") == b"200 v\n"
        b = endpoint(backend, name="b")
        del b["bind-port"]
        write_config([endpoint(backend, name="a", **{"bind-port": moved}), dict(b, **{"bind-path": str(path)})])
        mark = proc.mark()
        proc.send(signal.SIGHUP)
        proc.wait_for(r"reloaded ", after=mark)
        assert held.recv(100) == b""  # its endpoint moved: the connection closes at the next boundary
    with connect(("127.0.0.1", moved)) as sock:
        assert tcp_get(sock, b"k") == b"200 v\n"
    with connect(str(path)) as sock:
        assert tcp_get(sock, b"k") == b"200 v\n"
    try:
        connect(("127.0.0.1", first), timeout=2).close()
        raise AssertionError("the old socket still accepts")
    except ConnectionRefusedError:
        pass
    proc.send(signal.SIGTERM)
    assert proc.exit_status() == 0
    assert not path.exists()


def test_a_worker_killed_after_a_reload_comes_back_with_the_new_config(backend, write_config, served):
    other = Backend()
    try:
        backend.answers["k"] = (200, ["old"])
        other.answers["k"] = (200, ["new"])
        port = free_port()
        cfg = write_config([endpoint(backend, **{"bind-port": port})])
        proc = served("-c", cfg, "--workers", "2")
        proc.wait_for(r"2 workers")
        write_config([endpoint(other, **{"bind-port": port})])
        mark = proc.mark()
        proc.send(signal.SIGHUP)
        proc.wait_for(r"reloaded ", after=mark)
        first = workers_of(proc)
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        for pid in first:
            proc.wait_for(r"worker \d \(pid %d\) ended with status -9; replacing it" % pid, after=mark)
        until(lambda: len(set(workers_of(proc)) - set(first)) == 2, what=proc.log)
        answers = []
        until(lambda: _answer(port, answers), what=f"no answer from the new workers: {answers}")
        for _ in range(6):  # both replacements: every connection gets the reloaded config
            with connect(("127.0.0.1", port)) as sock:
                assert tcp_get(sock, b"k") == b"200 new\n"
        proc.send(signal.SIGTERM)
        assert proc.exit_status() == 0
    finally:
        other.stop()


def _answer(port, answers):
    try:
        with connect(("127.0.0.1", port)) as sock:
            answers.append(tcp_get(sock, b"k"))
            return True
    except (OSError, EOFError):
        return False


def test_a_stop_signal_to_every_process_still_drains(backend, write_config, served):
    """systemd's default KillMode (the unit sets mixed) signals the whole unit; Ctrl-C the whole process
    group: the workers get the signal as well as the arbiter's order and must still drain, not exit at
    once."""
    backend.answers["k"] = (200, ["v"])
    port = free_port()
    proc = served("-c", write_config([endpoint(backend, **{"bind-port": port})]), "--workers", "2")
    proc.wait_for(r"2 workers")
    pids = workers_of(proc)
    for pid in [proc.proc.pid, *pids]:
        os.kill(pid, signal.SIGTERM)
    assert proc.exit_status() == 0
    assert proc.log.count("letting requests in progress finish") == 2
    assert "exiting at once" not in proc.log


def channel_capacity():
    """How many "closed" messages a worker's channel (control.py: a SEQPACKET pair, pickles) holds before
    a send would block: the socket's buffer, as this machine sizes it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    message, sent = pickle.dumps(("closed", ("tcp", "127.0.0.1", 1))), 0
    try:
        while True:
            ours.send(message)
            sent += 1
    except BlockingIOError:
        return sent
    finally:
        ours.close()
        theirs.close()


def test_the_channel_keeps_every_message_in_order_and_says_when_it_is_full(monkeypatch):
    """What finds the socket full waits, in order, with its connection; at the bound nothing is taken."""
    monkeypatch.setattr(control, "MAX_BACKLOG", 10)
    ours, theirs = control.pair()
    passed, peer = socket.socketpair()
    try:
        sent = 0   # messages taken, numbered in order
        while not ours.backlog:
            assert ours.send(("closed", sent))
            sent += 1
        assert ours.send(("connection", sent), passed) and passed.fileno() >= 0   # waits: still open
        sent += 1
        while len(ours.backlog) < control.MAX_BACKLOG:
            assert ours.send(("closed", sent))
            sent += 1
        assert not ours.send(("closed", "no room"))   # the owner acts: nothing dropped silently
        got, fds = [], []
        deadline = time.monotonic() + 10
        while len(got) < sent and time.monotonic() < deadline:
            try:
                message, passed_fds = theirs.receive()
            except BlockingIOError:
                ours.flush()
                continue
            got.append(message[1])
            fds += passed_fds
        assert got == list(range(sent)) and not ours.backlog
        assert passed.fileno() == -1 and len(fds) == 1   # closed here once the other end had its copy
        with socket.socket(fileno=fds[0]) as copy:
            copy.sendall(b"x")
            assert peer.recv(1) == b"x"
    finally:
        for sock in (ours, theirs, passed, peer):
            sock.close()


def open_connections(metrics_port):
    return total(samples(get(metrics_port)[1]), "pfrest_open_connections")


def test_a_full_channel_blocks_no_worker_and_loses_no_word(backend, write_config, served):
    """Defect 6: with the arbiter stopped, each worker has more connections end than its channel holds;
    a lookup on a connection still open is answered all the same, and once the arbiter runs again it
    counts exactly the connections open."""
    backend.answers["k"] = (200, ["v"])
    port, metrics_port = free_port(), free_port()
    proc = served("-c", write_config([endpoint(backend, **{"bind-port": port})],
                                     **{"metrics-address": f"127.0.0.1:{metrics_port}"}), "--workers", "2")
    proc.wait_for(r"2 workers")
    each = channel_capacity() + 50
    socks = [connect(("127.0.0.1", port)) for _ in range(2 * each + 2)]
    try:
        until(lambda: open_connections(metrics_port) == len(socks), what="not every connection was passed")
        ending, live = socks[:-2], socks[-2:]   # the live two: one on each worker (they alternate)
        proc.send(signal.SIGSTOP)
        try:
            for sock in ending:
                sock.close()
            for sock in live:
                assert tcp_get(sock, b"k") == b"200 v\n"   # 10 s socket timeout: a blocked loop fails
        finally:
            proc.send(signal.SIGCONT)
        until(lambda: open_connections(metrics_port) == 2, what=f"not 2: {open_connections(metrics_port)}")
        for sock in live:
            assert tcp_get(sock, b"k") == b"200 v\n"
            sock.close()
        until(lambda: open_connections(metrics_port) == 0, what="open connections left counted")
        assert "killing it" not in proc.log   # a stopped arbiter is no silent worker
    finally:
        for sock in socks:
            sock.close()


def stopped(pid):
    os.kill(pid, signal.SIGSTOP)
    return pid


def test_a_stopped_worker_gets_no_connections_is_reported_and_replaced(backend, write_config, served):
    """Defect 7: SIGSTOP one of 2 workers: /readyz and /metrics say so, every new connection is answered
    by the other, the stopped one is killed and replaced; and a stop does not wait for a stopped worker."""
    backend.answers["k"] = (200, ["v"])
    port, metrics_port = free_port(), free_port()
    drain = 4.0
    cfg = write_config([endpoint(backend, **{"bind-port": port})],
                       **{"metrics-address": f"127.0.0.1:{metrics_port}"})
    proc = served("-c", cfg, "--workers", "2", "--drain-timeout", str(drain))
    proc.wait_for(r"2 workers")
    first = workers_of(proc)
    halted = []
    try:
        halted.append(stopped(first[1]))
        silent = r"not ready: worker \d\n(.*\n)*worker \d: NOT READY: pid %d silent for [\d.]+ s" % first[1]
        until(lambda: re.match(silent, get(metrics_port, "/readyz")[1]), what="/readyz never said it")
        assert get(metrics_port, "/readyz")[0] == 503
        assert total(samples(get(metrics_port)[1]), "pfrest_workers_silent") == 1
        assert "replaced, 1 silent)" in run_pfrest("stats", "-c", cfg).stdout
        for _ in range(20):   # none goes to the stopped worker
            with connect(("127.0.0.1", port), timeout=5) as sock:
                assert tcp_get(sock, b"k") == b"200 v\n"
        proc.wait_for(r"worker \d \(pid %d\) silent for [\d.]+ s; killing it" % first[1])
        until(lambda: len(workers_of(proc)) == 2 and first[1] not in workers_of(proc),
              what=f"not replaced: {proc.log}")
        until(lambda: get(metrics_port, "/readyz")[0] == 200, what="not ready again after the replacement")
        assert total(samples(get(metrics_port)[1]), "pfrest_workers_silent") == 0

        # a stop with a stopped worker: over within the drain timeout (the stopped one is killed)
        halted.append(stopped(workers_of(proc)[0]))
        started = time.monotonic()
        proc.send(signal.SIGTERM)
        assert proc.exit_status(timeout=drain + 10) == 0
        assert time.monotonic() - started < drain, proc.log
    finally:
        for pid in halted:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("change", ["peer", "endpoint"])
def test_a_reload_that_disowns_a_partial_request_closes_it(backend, write_config, served, workers, change):
    """Defect 8: a connection holding half a request when a reload takes its peer out of allow-from (or
    removes its endpoint) is closed at once (its request would never be answered), whatever its
    timeouts; one disowned while its request is with the backend gets its answer first; one still
    allowed stays."""
    backend.answers["k"] = (200, ["v"])
    release = threading.Event()
    backend.answers["slow"] = lambda request: (release.wait(10), (200, ["late"]))[1]
    port = free_port()
    ep = endpoint(backend, **{"bind-port": port, "allow-from": ["127.0.0.0/8"], "idle-timeout": 60,
                              "partial-request-timeout": 30})
    proc = served("-c", write_config([ep]), "--workers", workers)
    proc.wait_for(r"ready: serving")
    kept = connect(("127.0.0.1", port), source="127.0.0.2")
    partial = connect(("127.0.0.1", port), source="127.0.0.1", timeout=5)
    busy = connect(("127.0.0.1", port), source="127.0.0.1", timeout=5)
    try:
        assert tcp_get(kept, b"k") == b"200 v\n"
        assert tcp_get(partial, b"k") == b"200 v\n"
        partial.sendall(b"get hal")
        busy.sendall(b"get slow\nget k\n")   # the second one waits behind the first
        until(lambda: "slow" in map(backend.key_of, backend.requests), what="the slow request never came")
        if change == "peer":
            write_config([dict(ep, **{"allow-from": ["127.0.0.2/32"]})])
        else:
            write_config([endpoint(backend, name="other", **{"bind-port": free_port()})])
        mark = proc.mark()
        proc.send(signal.SIGHUP)
        proc.wait_for(r"reloaded ", after=mark)
        assert partial.recv(100) == b""   # within the socket's 5 s: long before the 30 s limits
        proc.wait_for(r"peer=127\.0\.0\.1:\d+ closing: the endpoint no longer takes this connection",
                      after=mark)
        release.set()
        assert busy.recv(100) == b"200 late\n" and busy.recv(100) == b""
        if change == "peer":
            assert tcp_get(kept, b"k") == b"200 v\n"
        else:
            assert kept.recv(100) == b""
    finally:
        release.set()
        for sock in (kept, partial, busy):
            sock.close()
