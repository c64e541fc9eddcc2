"""Faults of pfrest's own process and of the connections to it, with real `pfrest serve` processes:
floods beyond the connection cap, thousands of idle connections, running out of file descriptors, and
a restart while Postfix holds connections.  (SIGTERM during a request: tests/test_serve.py.)"""

import json
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest

import hostile
from conftest import ROOT, Backend, need_binary, pfrest_env
from hostile import GOOD, TCP, GoodClients, ServeProcess, SocketPeer, read_exactly
from postfix_instance import free_port

MIB_KIB = 1024


def serve_config(path, backend, **extra):
    """One tcp-lookup endpoint on a free port; returns (config path, address)."""
    ep = dict(hostile.endpoints(backend.url + "/lookup")[0], **{"bind-port": free_port()}, **extra)
    path.write_text(json.dumps({"endpoints": [ep]}))
    path.chmod(0o600)
    return str(path), ("127.0.0.1", ep["bind-port"])


@pytest.fixture
def truth():
    backend = Backend()
    backend.answers.update(hostile.ANSWERS)
    yield backend
    backend.stop()


@pytest.fixture
def serving(tmp_path):
    """serving(config_path, preexec_fn=None) -> a ServeProcess, stopped (and checked) at teardown."""
    started = []

    def start(config_path, preexec_fn=None):
        started.append(ServeProcess(config_path, str(tmp_path / f"serve{len(started)}.log"), preexec_fn))
        return started[-1]
    yield start
    for proc in started:
        assert proc.stop() == 0, proc.log()[-2000:]


def ask(peer, mode=TCP):
    request, answer = GOOD[mode]
    return read_exactly(peer, len(answer), 10) if peer.send(request) else b""


def closed_at_once(peer, timeout=5.0):
    """pfrest closed the connection without a byte (a refusal)."""
    return hostile.read_to_close(peer, timeout) == (b"", True)


def raise_own_fd_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        unlimited = hard == resource.RLIM_INFINITY or hard >= need
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard if unlimited else need))
        except (ValueError, OSError):
            pytest.skip(f"this test needs {need} open files; the limit is {soft}/{hard}")


def test_connection_flood_beyond_the_cap(truth, serving, tmp_path):
    """Hundreds of connections a second against a cap of 20: the excess is closed at once, and a client
    connected before keeps its answers, fast."""
    config_path, address = serve_config(tmp_path / "flood.json", truth, **{"max-connections": 20})
    proc = serving(config_path)
    good = GoodClients({TCP: address})
    deadline = time.monotonic() + 10
    while not good.answered and time.monotonic() < deadline:  # the good client holds its slot
        time.sleep(0.01)
    before = proc.status("VmRSS")
    held = [SocketPeer(address) for _ in range(40)]  # 19 get the slots left, 21 are closed at once
    stop, refused = threading.Event(), []

    def flood():
        while not stop.is_set():
            try:
                peer = SocketPeer(address, timeout=5)
            except OSError:
                continue
            refused.append(closed_at_once(peer, 2))
            peer.close()
    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(10)
    good.stop()
    assert good.problems == [] and good.answered > 50 and good.slowest < 2.0, (good.problems, good.slowest)
    assert len(refused) > 100 and all(refused)
    assert len(hostile.closed(held, 0.5)) == 21
    proc.wait_log(r"endpoint=tcp peer=127\.0\.0\.1:\d+ refused: max-connections \(20\) reached "
                  r"\(\d+ refused so far\)")
    assert proc.status("VmHWM") - before < 20 * MIB_KIB
    for peer in held:
        peer.close()
    time.sleep(0.3)
    peer = SocketPeer(address)
    assert ask(peer) == b"200 v\n"  # the flood is over: served again
    peer.close()


def test_ten_thousand_idle_connections(truth, serving, tmp_path):
    """10,000 idle connections (or as many as the open-file limit lets one process answer: each is
    reserved a backend socket, listener.connection_room) and 500 more against that cap, in one process
    with one thread: all held but the 500, closed at once, within 150 MiB; a busy client keeps its
    answers; the idle ones are closed after idle-timeout."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cap = min(10000, (hard - 64) // 2 - 1) if hard != resource.RLIM_INFINITY else 10000
    raise_own_fd_limit(cap + 1000)
    config_path, address = serve_config(tmp_path / "idle.json", truth,
                                        **{"max-connections": cap, "idle-timeout": 8})
    proc = serving(config_path)
    busy = SocketPeer(address)
    assert ask(busy) == b"200 v\n"
    idle = [SocketPeer(address) for _ in range(cap + 499)]
    started = time.monotonic()
    assert ask(busy) == b"200 v\n"
    refused = set(hostile.closed(idle, 20, enough=500))
    assert len(refused) == 500
    held = [peer for peer in idle if peer not in refused]
    assert hostile.closed(held, 0.2) == []
    proc.wait_log(rf"refused: max-connections \({cap}\) reached")
    assert proc.status("VmHWM") < 150 * MIB_KIB, f"{proc.status('VmHWM')} KiB"
    assert proc.status("Threads") < 8  # no thread per connection: one event loop
    answered = 0
    while time.monotonic() - started < 4.0:  # busy, so never idle for long
        assert ask(busy) == b"200 v\n"
        answered += 1
    assert len(hostile.closed(held, 20, enough=cap - 1)) == cap - 1  # idle-timeout, 8 s
    assert ask(busy) == b"200 v\n"
    for peer in [busy, *idle]:
        peer.close()
    fresh = SocketPeer(address)
    assert ask(fresh) == b"200 v\n"
    fresh.close()


def test_open_file_limit_refuses_before_descriptors_run_out(truth, serving, tmp_path):
    """With RLIMIT_NOFILE at 80, pfrest takes (80 - 64) / 2 = 8 connections and refuses the next ones,
    so that each connection it holds still has a descriptor for its backend call."""
    config_path, address = serve_config(tmp_path / "fds.json", truth)
    proc = serving(config_path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (80, 80)))
    proc.wait_log(r"the open-file limit \(80\) is below what max-connections may need")
    peers = [SocketPeer(address) for _ in range(8)]
    assert [ask(peer) for peer in peers] == [b"200 v\n"] * 8
    extra = [SocketPeer(address) for _ in range(4)]
    assert all(closed_at_once(peer) for peer in extra)
    proc.wait_log(r"refused: the open-file limit leaves room for 8 connections, all taken; raise LimitNOFILE=")
    assert [ask(peer) for peer in peers] == [b"200 v\n"] * 8  # no EMFILE for those held
    for peer in peers[:2] + extra:
        peer.close()
    time.sleep(0.3)
    again = [SocketPeer(address) for _ in range(2)]
    assert [ask(peer) for peer in again + peers[2:]] == [b"200 v\n"] * 8
    for peer in again + peers[2:]:
        peer.close()


EXHAUST = r"""
import asyncio, dataclasses, os, sys, threading
from pfrest import config, log
from pfrest.process.serving import Server
from pfrest.system import eventloop
log.for_foreground(log_file=sys.argv[2])
cfg = config.load(sys.argv[1])
cfg = dataclasses.replace(cfg, endpoints=tuple(dataclasses.replace(ep, bind_port=0) for ep in cfg.endpoints))
loop = eventloop.new_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()
async def start():
    return Server(cfg).start()
server = asyncio.run_coroutine_threadsafe(start(), loop).result()
print(server.addresses["tcp"][1], flush=True)
hogs = []
for line in sys.stdin:
    if line == "exhaust\n":  # every descriptor left, as a leak elsewhere in the process would
        try:
            while True:
                hogs.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
    elif line == "free\n":
        for fd in hogs[:8]:
            os.close(fd)
        del hogs[:8]
    print("done", flush=True)
asyncio.run_coroutine_threadsafe(server.stop(2), loop).result()
"""


def test_accept_failing_with_emfile_backs_off_and_recovers(truth, tmp_path):
    """When accept() itself fails (EMFILE), the listener logs it, does not spin, keeps serving the
    connections it has, and takes the waiting one once descriptors are free again."""
    config_path, _ = serve_config(tmp_path / "emfile.json", truth)
    log_path = tmp_path / "emfile.log"
    harness = subprocess.Popen([sys.executable, "-c", EXHAUST, config_path, str(log_path)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=pfrest_env(),
                               cwd=ROOT, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                               (256, 256)))
    try:
        address = ("127.0.0.1", int(harness.stdout.readline()))
        held = SocketPeer(address)
        assert ask(held) == b"200 v\n"

        def command(word):
            harness.stdin.write(word + "\n")
            harness.stdin.flush()
            assert harness.stdout.readline() == "done\n"
        command("exhaust")
        waiting = SocketPeer(address)  # the kernel completes the handshake; it waits in the backlog
        cpu = hostile.cpu_seconds(harness.pid)
        time.sleep(0.8)  # less than the pool's IDLE_REUSE_LIMIT: the backend connection stays usable
        assert hostile.cpu_seconds(harness.pid) - cpu < 0.3, "the accept loop spins"
        assert ask(held) == b"200 v\n"  # its backend connection is pooled: no new descriptor needed
        assert "cannot accept connections: Too many open files" in log_path.read_text()
        command("free")
        assert ask(waiting) == b"200 v\n"
        held.close()
        waiting.close()
    finally:
        harness.stdin.close()
        assert harness.wait(20) == 0


def test_restart_while_postfix_holds_connections(truth, serving, tmp_path, postmap_conf):
    """The old process closes its idle connections cleanly and answers the one in flight; the new one
    serves whoever reconnects: a real postmap holding its connection, and socketmap and policy clients."""
    postmap = need_binary("postmap")
    new_truth = Backend()
    try:
        truth.answers["slow"] = lambda request: (time.sleep(1.0), (200, ["late"]))[1]
        new_truth.answers.update(hostile.ANSWERS, k=(200, ["new"]), k2=(200, ["new2"]))
        endpoints = hostile.endpoints(truth.url + "/lookup")
        ports = {ep["mode"]: free_port() for ep in endpoints}
        sm_path = str(tmp_path / "sm.sock")
        for ep in endpoints:
            if ep["mode"] == hostile.SOCKETMAP:
                ep["bind-path"] = sm_path
            else:
                ep["bind-port"] = ports[ep["mode"]]
        config_path = tmp_path / "restart.json"

        def write(target):
            config_path.write_text(json.dumps({"endpoints": [dict(ep, target=target) for ep in endpoints]}))
            config_path.chmod(0o600)
            return str(config_path)
        old = serving(write(truth.url + "/lookup"))
        addresses = {hostile.TCP: ("127.0.0.1", ports[hostile.TCP]), hostile.SOCKETMAP: sm_path,
                     hostile.POLICY: ("127.0.0.1", ports[hostile.POLICY])}
        held = {mode: SocketPeer(address) for mode, address in addresses.items()}
        assert {mode: ask(peer, mode) for mode, peer in held.items()} == {m: GOOD[m][1] for m in held}
        def lookups_of_k():
            return sum(1 for r in truth.requests if "key=k" in r.raw_query.split("&"))
        seen = lookups_of_k()
        lookups = subprocess.Popen([postmap, "-c", postmap_conf, "-q", "-", f"tcp:127.0.0.1:{ports[TCP]}"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lookups.stdin.write(b"k\n")
        lookups.stdin.flush()  # postmap prints only at exit: wait for the backend to see the lookup
        deadline = time.monotonic() + 10
        while lookups_of_k() == seen:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        in_flight = SocketPeer(addresses[TCP])
        in_flight.send(b"get slow\n")
        time.sleep(0.3)

        old.proc.send_signal(signal.SIGTERM)
        for mode, peer in held.items():
            assert closed_at_once(peer), mode  # an idle connection: closed at once, cleanly
        new = serving(write(new_truth.url + "/lookup"))  # while the old one still drains
        assert read_exactly(in_flight, 9, 5) == b"200 late\n" and closed_at_once(in_flight)
        assert old.proc.wait(10) == 0
        again = {mode: SocketPeer(address) for mode, address in addresses.items()}
        assert ask(again[TCP]) == b"200 new\n"
        assert ask(again[hostile.SOCKETMAP], hostile.SOCKETMAP) == b"6:OK new,"
        assert ask(again[hostile.POLICY], hostile.POLICY) == GOOD[hostile.POLICY][1]
        assert any(b"recipient=" in r.body for r in new_truth.requests)  # the policy answer came from it too
        out, err = lookups.communicate(b"k2\n", timeout=30)  # on the connection the old process closed
        assert (lookups.returncode, out) == (0, b"k\tv\nk2\tnew2\n"), err
        assert b"unexpected EOF" in err  # postmap noticed, reconnected and got its answer
        new.wait_log("key=k2 status=200 reply=FOUND")  # written after the reply went out: may come later
        for peer in [*held.values(), *again.values(), in_flight]:
            peer.close()
    finally:
        new_truth.stop()
