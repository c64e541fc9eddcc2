"""The shared cache under Redis Sentinel (a ``redis+sentinel://`` cache-url), against real programs: a
primary, its replica and three sentinels on loopback (redis_sentinel.py), a real HTTP backend, and
in the last test two real `pfrest serve` hosts (one with two workers) under a lookup load.

- the store finds the primary through the sentinels, and hosts share answers through it;
- the primary killed: the sentinels promote the replica, the hosts follow within seconds (no restart,
  no reload), with no wrong answer and none unanswered, and share again; the lookups meanwhile bounded
  by cache-timeout plus the backend's time;
- the primary demoted to a replica (a manual failover): its -READONLY skips it, the next probe finds the
  new primary;
- no sentinel answering: the store is skipped with one line saying what each sentinel said;
- `pfrest cache drop` after a failover reaches every process (each re-subscribed on the new primary);
- the password never shows in a log line.
"""

import asyncio
import re
import time

import pytest

from conftest import Backend
from postfix_instance import free_port
from redis_sentinel import SERVICE, SentinelGroup
from redis_server import binaries, make_pki
from test_fleet import Load, cache, until
from test_serve import connect, served, tcp_get  # noqa: F401 (served is a fixture)
from test_shared_cache import (ask, closed, endpoint, host, params, pfrest_log, quick_backoff,  # noqa: F401
                               ready, value)

PASSWORD = "s3ntinel-pw"
NAME = "users"
TIMEOUT_MS = 50
FOLLOW_WITHIN = 10.0   # seconds from a primary's death to hosts that share again (the bound)


@pytest.fixture(params=binaries())
def group(request, tmp_path):
    servers = SentinelGroup(tmp_path / "sentinel", request.param, password=PASSWORD)
    yield servers
    servers.stop()


@pytest.fixture
def backend():
    server = Backend()
    server.default = lambda request: (200, [f"val-{server.key_of(request)}"])
    yield server
    server.stop()


def asked(backend, key):
    return sum(backend.key_of(r) == key for r in backend.requests)


def named_primary(caplog, port):
    return sum(re.search(rf"the sentinels name 127\.0\.0\.1:{port} as the primary", r.getMessage()) is not None
               for r in caplog.records)


def test_hosts_share_through_the_primary_and_follow_its_death(group, backend, pfrest_log):
    async def until_shared(a, b, tag, within):
        """Until a key A fetched is answered by B without a backend request; how many tries it took."""
        deadline, n = time.monotonic() + within, 0
        while True:
            n += 1
            key = f"{tag}-{n}"
            assert value(await ask(a, key)) == f"val-{key}"
            await asyncio.sleep(0.05)
            result = await ask(b, key)
            assert value(result) == f"val-{key}"
            if result.cached and asked(backend, key) == 1:
                return n
            assert time.monotonic() < deadline, "the hosts do not share again"
            await asyncio.sleep(0.1)

    async def scenario():
        ep = endpoint(group.url(), backend, cache_timeout=TIMEOUT_MS)
        a, b = host(ep), host(ep)
        await ready(a, b)
        before = await until_shared(a, b, "before", 2)
        group.primary.kill()
        killed = time.monotonic()
        answers = []
        while time.monotonic() - killed < 2:        # lookups go on meanwhile, answered by the backend
            key = f"during-{len(answers)}"
            answers.append((key, value(await ask(a, key)), value(await ask(b, key))))
            await asyncio.sleep(0.02)
        after = await until_shared(a, b, "after", FOLLOW_WITHIN - (time.monotonic() - killed))
        urls = {a.shared.server_url, b.shared.server_url}
        await closed(a, b)
        return before, answers, after, urls
    before, answers, after, urls = asyncio.run(scenario())
    assert before == 1 and after >= 1
    assert answers and all(x == y == f"val-{key}" for key, x, y in answers)
    assert urls == {f"redis://:{PASSWORD}@127.0.0.1:{group.replica.port}/0"}
    assert named_primary(pfrest_log, group.primary.port) == 2 and named_primary(pfrest_log, group.replica.port) == 2
    assert PASSWORD not in pfrest_log.text


def test_a_primary_demoted_to_a_replica_is_left_for_the_new_one(group, backend, pfrest_log, quick_backoff):
    """A manual failover (SENTINEL FAILOVER): the old primary lives on as a replica and refuses writes
    (-READONLY), which skips it at once; the next probe asks the sentinels and finds the new primary."""
    async def scenario():
        ep = endpoint(group.url(), backend, cache_timeout=TIMEOUT_MS)
        a = host(ep)
        await ready(a)
        group.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", SERVICE)
        deadline, n = time.monotonic() + FOLLOW_WITHIN, 0
        while a.shared.server_url.endswith(f":{group.primary.port}/0") or not a.shared.up:
            n += 1
            assert value(await ask(a, f"k{n}")) == f"val-k{n}"
            assert time.monotonic() < deadline, "the store stays with the demoted primary"
            await asyncio.sleep(0.05)
        await ask(a, "after")
        await asyncio.sleep(0.05)
        await closed(a)
    asyncio.run(scenario())
    assert group.replica.client().get(f"{host_space(group, backend)}:key=after".encode())
    assert named_primary(pfrest_log, group.replica.port) == 1
    lines = [r.getMessage() for r in pfrest_log.records if "skipped" in r.getMessage()]
    assert all("read only replica" in line or "Connection" in line for line in lines), lines


def test_rediss_sentinel_speaks_tls_to_the_sentinels_and_the_primary(tmp_path, backend, pfrest_log):
    """rediss+sentinel://: the sentinels and the primary they name over TLS, each verified with the
    URL's CA and by the address it is reached at (the sentinels name the primary by its IP address)."""
    pki = make_pki(tmp_path)
    tls = SentinelGroup(tmp_path / "tls", password=PASSWORD, pki=pki)
    try:
        async def scenario():
            ep = endpoint(tls.url(), backend, cache_timeout=TIMEOUT_MS)
            a, b = host(ep), host(ep)
            await ready(a, b)
            await ask(a, "k")
            await asyncio.sleep(0.05)
            result = await ask(b, "k")
            urls = {a.shared.server_url, b.shared.server_url}
            await closed(a, b)
            return result, urls
        result, urls = asyncio.run(scenario())
    finally:
        tls.stop()
    assert value(result) == "val-k" and result.cached and asked(backend, "k") == 1
    assert urls == {f"rediss://:{PASSWORD}@127.0.0.1:{tls.primary.port}/0?ssl_ca_certs={pki['ca']}"}
    assert named_primary(pfrest_log, tls.primary.port) == 2 and PASSWORD not in pfrest_log.text


def host_space(group, backend):
    from pfrest.cache import sharedformat
    return sharedformat.namespace(endpoint(group.url(), backend))


def test_no_sentinel_answering_skips_the_store_and_says_why(backend, pfrest_log):
    ports = [free_port(), free_port()]
    url = f"redis+sentinel://:{PASSWORD}@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/{SERVICE}"

    async def scenario():
        a = host(endpoint(url, backend))
        answers = [value(await ask(a, f"k{i}")) for i in range(3)]
        await asyncio.sleep(0.1)
        up = a.shared.up
        await closed(a)
        return answers, up
    answers, up = asyncio.run(scenario())
    assert answers == ["val-k0", "val-k1", "val-k2"] and not up
    lines = [r.getMessage() for r in pfrest_log.records if "shared cache" in r.getMessage()]
    assert len(lines) == 1 and f"no sentinel names a primary of {SERVICE}" in lines[0], lines
    assert all(f"127.0.0.1:{port}: ConnectionError" in lines[0] for port in ports), lines
    assert f"redis+sentinel://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/{SERVICE}" in lines[0]
    assert PASSWORD not in pfrest_log.text


@pytest.fixture
def fleet(group, backend, write_config, served, tmp_path):
    """Two hosts on the service: (port, config path, Served) each; A a single process, B two workers."""
    hosts = []
    for label, workers in (("a", 1), ("b", 2)):
        port = free_port()
        path = write_config([{"name": NAME, "mode": "tcp-lookup", "target": backend.url + "/lookup",
                              "bind-port": port, "request-timeout": 3000, "cache-ttl": 600,
                              "cache-url": group.url(), "cache-local-ttl": 60, "cache-timeout": TIMEOUT_MS}],
                            name=f"{label}.json", **{"control-socket": str(tmp_path / f"{label}.sock")})
        hosts.append((port, path, served("-c", path, "--workers", str(workers))))
    for _, _, proc in hosts:
        proc.wait_for(r"ready: serving 1 endpoint")
    until(lambda: subscribers(group.primary) == 3,
          lambda: "every process listens for invalidations:\n" + "\n".join(proc.log for _, _, proc in hosts))
    return hosts


def subscribers(server):
    """pfrest's subscribers on ``server`` (the sentinels have their own channel there)."""
    client = server.client()
    return sum(count for _, count in client.pubsub_numsub(*client.pubsub_channels("pfrest:*")))


def shared_by_all(backend, a_port, b_port, key):
    """A fetches ``key``; B answers it, on each of its workers, without a backend request."""
    with connect(("127.0.0.1", a_port)) as a:
        assert tcp_get(a, key.encode()) == f"200 val-{key}\n".encode()
    time.sleep(0.05)
    socks = [connect(("127.0.0.1", b_port)) for _ in range(2)]   # one on each worker of B
    try:
        return all(tcp_get(sock, key.encode()) == f"200 val-{key}\n".encode() for sock in socks) \
            and asked(backend, key) == 1
    finally:
        for sock in socks:
            sock.close()


def test_a_fleet_under_load_follows_a_failover_and_hears_invalidations_after_it(fleet, group, backend):
    (a_port, a_config, a_log), (b_port, b_config, b_log) = fleet
    assert shared_by_all(backend, a_port, b_port, "before")
    load = Load((a_port, b_port))
    try:
        time.sleep(0.5)
        group.primary.kill()
        killed = time.monotonic()
        promoted = group.promoted()
        n = [0]

        def again():
            n[0] += 1
            return shared_by_all(backend, a_port, b_port, f"after-{n[0]}")
        until(again, "both hosts share the cache again", FOLLOW_WITHIN - (time.monotonic() - killed))
        shared = time.monotonic() - killed
        time.sleep(0.3)
    finally:
        load.end()
    assert load.count > 300 and load.wrong == [] and load.unanswered == 0, (load.count, load.wrong[:5])
    # no lookup waited for the sentinels or a probe: cache-timeout, then the backend, at most
    slowest = max(seconds for _, seconds in load.latencies)
    assert slowest < TIMEOUT_MS / 1000 + 0.5, (slowest, promoted, shared)

    # an invalidation after the failover reaches all three processes, subscribed on the new primary
    until(lambda: subscribers(group.replica) == 3,
          lambda: f"every process listens on the new primary:\n{a_log.log}\n{b_log.log}")
    key = f"after-{n[0]}"   # the key both hosts shared
    backend.answers[key] = (200, ["changed"])
    dropped = cache("-c", b_config, "drop", NAME, key)
    assert dropped.returncode == 0, dropped.stderr
    assert "3 pfrest process(es) heard it" in dropped.stdout and "(1 entries were there)" in dropped.stdout, \
        dropped.stdout
    socks = [connect(("127.0.0.1", a_port))] + [connect(("127.0.0.1", b_port)) for _ in range(2)]
    try:
        until(lambda: all(tcp_get(sock, key.encode()) == b"200 changed\n" for sock in socks), "dropped everywhere", 2)
    finally:
        for sock in socks:
            sock.close()
    for proc in (a_log, b_log):
        assert f"the sentinels name 127.0.0.1:{group.replica.port} as the primary" in proc.log, proc.log
        assert PASSWORD not in proc.log


def test_pfrest_cache_says_when_no_sentinel_names_a_primary(backend, write_config):
    port = free_port()
    url = f"redis+sentinel://:{PASSWORD}@127.0.0.1:{port}/{SERVICE}/0"
    path = write_config([{"name": NAME, "mode": "tcp-lookup", "target": backend.url + "/lookup", "cache-ttl": 60,
                          "cache-url": url}])
    done = cache("-c", path, "drop", NAME, "k")
    assert done.returncode == 69, done
    assert f"the shared cache redis+sentinel://127.0.0.1:{port}/{SERVICE}/0 of endpoint {NAME} has no primary " \
           f"now: no sentinel names a primary of {SERVICE} (127.0.0.1:{port}: ConnectionError" in done.stderr, \
        done.stderr
    assert PASSWORD not in done.stderr + done.stdout


def test_a_read_url_in_sentinels_form_reads_from_a_replica_they_list(group, backend):
    """cache-read-url redis+sentinel://: the probe asks the sentinels for the service's replicas and reads
    from one that is up and linked (this host's: all are, on loopback); writes go to the primary."""
    from test_read_replica import Pair, replicas_read
    calls = Pair.calls

    async def scenario():
        ep = endpoint(group.url(), backend, cache_timeout=TIMEOUT_MS, cache_read_url=group.url())
        a, b = host(ep), host(ep)
        await ready(a, b)
        await replicas_read(a, b)
        await ask(a, "k")
        await asyncio.sleep(0.1)
        result = await ask(b, "k")
        urls = {a.shared.replica.server_url, b.shared.replica.server_url}
        await closed(a, b)
        return result, urls
    mget = calls(None, group.replica, "mget"), calls(None, group.primary, "mget")
    result, urls = asyncio.run(scenario())
    assert value(result) == "val-k" and result.cached and asked(backend, "k") == 1
    assert urls == {f"redis://:{PASSWORD}@127.0.0.1:{group.replica.port}/0"}
    assert calls(None, group.replica, "mget") == mget[0] + 2 and calls(None, group.primary, "mget") == mget[1]
