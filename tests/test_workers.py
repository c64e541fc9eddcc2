"""`pfrest serve --workers N`: pre-forked processes on shared sockets, balanced, reloaded, replaced,
stopped together."""

import os
import re
import signal
import time

from conftest import Backend
from postfix_instance import free_port
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


def test_workers_share_balance_reload_and_stop(backend, write_config, served):
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

        mark = proc.mark()
        proc.send(signal.SIGUSR1)  # each worker logs its own counters
        proc.wait_for(r"stats endpoint=ep", after=mark)
        deadline = time.monotonic() + 10
        while len(re.findall(r"stats endpoint=ep .*accepted=(\d+)", "\n".join(proc.lines[mark:]))) < 2:
            assert time.monotonic() < deadline, proc.log
            time.sleep(0.05)
        accepted = [int(n) for n in re.findall(r"stats endpoint=ep .*accepted=(\d+)",
                                               "\n".join(proc.lines[mark:]))]
        assert sum(accepted) == 8 and min(accepted) >= 3, accepted  # not all on one worker

        write_config([endpoint(other, **{"bind-port": port})])
        mark = proc.mark()
        proc.send(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "\n".join(proc.lines[mark:]).count("reloaded ") < 2:
            assert time.monotonic() < deadline, proc.log
            time.sleep(0.05)
        with connect(("127.0.0.1", port)) as fresh:
            assert tcp_get(fresh, b"k") == b"200 new\n"
        assert tcp_get(kept[0], b"k") == b"200 old\n"  # connections keep their settings

        write_config([endpoint(other, **{"bind-port": free_port()})])  # a socket the workers lack
        mark = proc.mark()
        proc.send(signal.SIGHUP)
        proc.wait_for(r"reload: keeping the old configuration: with --workers, a reload cannot add",
                      after=mark)
        with connect(("127.0.0.1", port)) as fresh:
            assert tcp_get(fresh, b"k") == b"200 new\n"

        for sock in kept:
            sock.close()
        proc.send(signal.SIGTERM)
        assert proc.exit_status() == 0
        assert not any(alive(pid) for pid in pids)
    finally:
        other.stop()


def test_a_worker_that_dies_is_replaced(backend, write_config, served):
    backend.answers["k"] = (200, ["v"])
    port = free_port()
    proc = served("-c", write_config([endpoint(backend, **{"bind-port": port})]), "--workers", "2")
    proc.wait_for(r"2 workers")
    first = workers_of(proc)
    os.kill(first[0], signal.SIGKILL)
    proc.wait_for(r"worker \d \(pid %d\) ended with status -9; replacing it" % first[0])
    deadline = time.monotonic() + 10
    while len(set(workers_of(proc)) - {first[0]}) < 2:
        assert time.monotonic() < deadline, proc.log
        time.sleep(0.05)
    for _ in range(4):
        with connect(("127.0.0.1", port)) as sock:
            assert tcp_get(sock, b"k") == b"200 v\n"
    proc.send(signal.SIGTERM)
    assert proc.exit_status() == 0


def test_a_stop_signal_to_every_process_still_drains(backend, write_config, served):
    """systemd's default KillMode signals the whole unit; Ctrl-C the whole process group: the workers
    get the signal twice (directly and from the supervisor) and must still drain, not exit at once."""
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
