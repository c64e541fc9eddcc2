"""Reads from a replica (``cache-read-url``), writes and invalidations to the primary (``cache-url``),
against a real primary and a real replica of it (redis-server --replicaof) and a real HTTP backend:

- the lookups' reads hit the replica (counted by store, in the metrics of a real serve too), the writes
  and the probe the primary, and what one host wrote the other reads from the replica;
- the replica stopped: reads go to the primary, with one log line; nothing else changes (no wrong
  answer, the hosts still share), and it is read again once it is back;
- a replica whose link to its primary is down (it would fall further behind) is never read;
- invalidations still reach the processes (subscribed on the primary).
"""

import asyncio
import re
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from postfix_instance import free_port
from redis_server import RedisServer, binaries, streams_to
from test_fleet import until
from test_sentinel import backend  # noqa: F401 (a fixture: every key's answer is val-KEY)
from test_serve import connect, served, tcp_get  # noqa: F401 (served is a fixture)
from test_shared_cache import Events, ask, closed, endpoint, host, pfrest_log, quick_backoff, ready, value  # noqa: F401

NAME = "users"


class Pair:
    """A primary and its replica, each in its own directory."""

    def __init__(self, directory, binary):
        (directory / "primary").mkdir()
        (directory / "replica").mkdir()
        self.primary = RedisServer(directory / "primary", binary)
        self.replica = RedisServer(directory / "replica", binary,
                                   extra=("--replicaof", "127.0.0.1", str(self.primary.port)))
        self.linked()

    def linked(self):
        until(lambda: self.replica.client().role()[3] == b"connected" and streams_to(self.primary, self.replica),
              "the replica follows its primary")

    def calls(self, server, command):
        return server.client().info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)

    def stop(self):
        self.replica.stop()
        self.primary.stop()


@pytest.fixture(params=binaries())
def pair(request, tmp_path):
    servers = Pair(tmp_path, request.param)
    yield servers
    servers.stop()


async def replicas_read(*clients):
    """Until each client's read replica has been probed and is read from (on the event loop: the probes
    run there)."""
    deadline = time.monotonic() + 10
    while not all(client.shared.replica.up for client in clients):
        assert time.monotonic() < deadline, "the replica is not read"
        await asyncio.sleep(0.01)


def reading(pair, backend, **extra):
    return endpoint(pair.primary.url, backend, cache_read_url=pair.replica.url, **extra)


def test_reads_hit_the_replica_and_writes_the_primary(pair, backend):
    async def scenario():
        ep = reading(pair, backend)
        a, b = host(ep, observer=Events()), host(ep, observer=Events())
        await ready(a, b)
        await replicas_read(a, b)
        await ask(a, "k")
        await asyncio.sleep(0.1)                      # written to the primary, copied to the replica
        result = await ask(b, "k")
        await closed(a, b)
        return result, a.shared.observer.events, b.shared.observer.events
    mget = {server: pair.calls(server, "mget") for server in (pair.primary, pair.replica)}
    result, a_events, b_events = asyncio.run(scenario())
    assert value(result) == "val-k" and result.cached and len(backend.requests) == 1
    assert a_events.count("shared-read-replica") == 1 and b_events.count("shared-read-replica") == 1
    assert "shared-read-primary" not in a_events + b_events and "shared-error" not in a_events + b_events
    assert pair.calls(pair.primary, "mget") == mget[pair.primary]      # no read went to the primary
    assert pair.calls(pair.replica, "mget") == mget[pair.replica] + 2
    assert pair.calls(pair.primary, "eval") >= 1 and pair.calls(pair.replica, "eval") == 0


def test_a_stopped_replica_costs_nothing_but_its_skip(pair, backend, pfrest_log, quick_backoff):
    async def scenario():
        ep = reading(pair, backend)
        a, b = host(ep, observer=Events()), host(ep, observer=Events())
        await ready(a, b)
        await replicas_read(a, b)
        pair.replica.kill()
        answers = []
        for i in range(20):                           # a's answers, then b's from the primary
            answers.append(value(await ask(a, f"k{i}")))
            await asyncio.sleep(0.02)
            answers.append(await ask(b, f"k{i}"))
        up = a.shared.up and b.shared.up and not a.shared.replica.up
        pair.replica.start()
        pair.linked()
        deadline, n = time.monotonic() + 10, 0
        while not (a.shared.replica.up and b.shared.replica.up):   # probed again after the back-off
            n += 1
            await asyncio.gather(ask(a, f"again{n}"), ask(b, f"again{n}"))   # new keys: local misses
            assert time.monotonic() < deadline, "the replica is not read again"
            await asyncio.sleep(0.05)
        await closed(a, b)
        return answers, up
    answers, up = asyncio.run(scenario())
    assert answers[0::2] == [f"val-k{i}" for i in range(20)]
    assert [value(r) for r in answers[1::2]] == answers[0::2]
    assert sum(r.cached for r in answers[1::2]) >= 18, "b did not read what a wrote, from the primary"
    assert up, "the primary was skipped with the replica"
    lines = [r.getMessage() for r in pfrest_log.records if "shared cache" in r.getMessage()]
    assert len([line for line in lines if "skipped" in line]) == 2, lines          # one per process
    assert all(f"127.0.0.1:{pair.replica.port}/0 (reads)" in line for line in lines), lines
    assert all("reads go to the primary meanwhile" in line for line in lines if "skipped" in line), lines
    assert len([line for line in lines if "answers again" in line]) == 2, lines


def test_a_replica_cut_off_from_its_primary_is_never_read(tmp_path, backend, pfrest_log):
    primary = RedisServer(tmp_path)
    (tmp_path / "lost").mkdir()
    lost = RedisServer(tmp_path / "lost", extra=("--replicaof", "127.0.0.1", str(free_port())))
    try:
        async def scenario():
            a = host(endpoint(primary.url, backend, cache_read_url=lost.url), observer=Events())
            await ready(a)
            await asyncio.sleep(0.1)
            answers = [value(await ask(a, "k")), value(await ask(a, "k"))]
            await closed(a)
            return answers, a.shared.observer.events
        answers, events = asyncio.run(scenario())
        assert answers == ["val-k", "val-k"] and "shared-read-replica" not in events
        lines = [r.getMessage() for r in pfrest_log.records if "skipped" in r.getMessage()]
        assert len(lines) == 1 and "a replica whose link to its primary is" in lines[0] and "lags" in lines[0], lines
    finally:
        lost.stop()
        primary.stop()


def test_a_serve_counts_its_reads_by_store_and_hears_invalidations(pair, backend, write_config, served, tmp_path):
    import subprocess

    from conftest import ROOT, pfrest_cmd, pfrest_env
    port, metrics = free_port(), free_port()
    path = write_config([{"name": NAME, "mode": "tcp-lookup", "target": backend.url + "/lookup", "bind-port": port,
                          "cache-ttl": 600, "cache-url": pair.primary.url, "cache-read-url": pair.replica.url,
                          "cache-local-ttl": 0, "cache-timeout": 50}],
                        **{"control-socket": str(tmp_path / "c.sock"), "metrics-address": f"127.0.0.1:{metrics}"})
    proc = served("-c", path)
    proc.wait_for(r"ready: serving 1 endpoint")
    with connect(("127.0.0.1", port)) as sock:
        n = [0]

        def warm():   # the first reads go to the primary, until the replica's probe is done
            n[0] += 1
            assert tcp_get(sock, f"warm{n[0]}".encode()) == f"200 val-warm{n[0]}\n".encode()
            return reads(metrics).get("replica", 0) >= 1
        until(warm, "the replica is read")
        before = reads(metrics)
        assert tcp_get(sock, b"k") == b"200 val-k\n"
        time.sleep(0.1)                                # written to the primary, copied to the replica
        for _ in range(4):                             # cache-local-ttl 0: each one read from the store
            assert tcp_get(sock, b"k") == b"200 val-k\n"
        backend.answers["k"] = (200, ["new"])
        dropped = subprocess.run(pfrest_cmd("cache", "-c", path, "drop", NAME, "k"), capture_output=True, text=True,
                                 timeout=60, env=pfrest_env(), cwd=ROOT)
        assert "1 pfrest process(es) heard it" in dropped.stdout, dropped
        # the replica may lag the removal by a moment (docs/fleet-cache.md), never more
        until(lambda: tcp_get(sock, b"k") == b"200 new\n", "the new answer", 1)
    after = reads(metrics)
    assert after["replica"] - before["replica"] >= 6 and after["primary"] == before["primary"], (before, after)
    assert sum(backend.key_of(r) == "k" for r in backend.requests) == 2
    assert not re.search(r"Traceback|ERROR", proc.log), proc.log


def reads(port):
    """{store: keys read} of the endpoint, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.labels["store"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "pfrest_shared_cache_reads_total" and s.labels.get("endpoint") == NAME}
