"""Refresh ahead (RFC 5861 stale-while-revalidate: cache-stale-while-revalidate, or the backend's
Cache-Control), against a real HTTP backend and, for the fleet, a real redis-server:

- within the window past an answer's lifetime, a lookup is answered from the cache at once and the
  answer is refreshed in the background, once however many lookups come; past the window, a lookup
  waits for the backend as before;
- the backend's stale-while-revalidate=N sets the window per answer;
- a refresh that fails keeps the old answer only as stale-if-error allows;
- at most MAX_REFRESHES refreshes in flight per endpoint; lookups are answered from the cache all the
  same;
- four hosts sharing a store, a backend taking 200 ms per answer, hot keys: after warm-up no lookup asks
  the backend itself (no request carries a lookup's request id), and the backend sees about one request
  per key per lifetime for the whole fleet (one host refreshes each key: the lock in the store); the
  same with two real serve hosts, every backend request after warm-up counted as a refresh in their
  metrics;
- a failed refresh cuts the store's entry too, for the other hosts.

Counts, not times: which requests reached the backend and which answers came from the cache.
"""

import asyncio
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pfrest import config
from pfrest.backend.client import Client
from pfrest.cache import refresh
from pfrest.cache.local import CachingClient
from pfrest.ops import metrics
from postfix_instance import free_port
from redis_server import RedisServer
from test_fleet import until
from test_serve import connect, served, tcp_get  # noqa: F401 (served is a fixture)
from test_shared_cache import Events, endpoint, host, params, ready, value

NAME = "users"
LOOKUP_ID = "lookup-id"   # the request id of the tests' lookups; refreshes make their own


@pytest.fixture
def backend(reset_backend):
    return reset_backend


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def local(backend, clock, observer=None, **extra):
    """One process's cache of an endpoint with no shared store, on ``clock``."""
    values = dict(name="ep", mode=config.TCP, target=backend.url + "/lookup", cache_ttl=10.0)
    values.update(extra)
    ep = config.Endpoint(**values)
    observer = observer or Events()
    return CachingClient(Client(ep, "UA", observer), ep.cache_ttl, ep.cache_negative_ttl, 100, clock=clock,
                         stale_if_error=ep.cache_stale_if_error, observer=observer,
                         stale_while_revalidate=ep.cache_stale_while_revalidate)


async def ask(client, key):
    return await client.lookup(params(key), LOOKUP_ID)


async def refreshed(client):
    """Until no refresh is in flight."""
    while client.refresher.flights:
        await asyncio.wait(list(client.refresher.flights.values()))


def test_within_the_window_the_cache_answers_and_refreshes_once(backend):
    clock, events = Clock(), Events()
    backend.answers["k"] = (200, ["v1"])

    async def scenario():
        client = local(backend, clock, events, cache_stale_while_revalidate=30.0)
        first = await ask(client, "k")
        backend.answers["k"] = (200, ["v2"])
        clock.now += 15                           # past its lifetime (10 s), within the window (30 s)
        at_once = [await ask(client, "k") for _ in range(5)]
        asked_meanwhile = len(backend.requests)
        await refreshed(client)
        after = await ask(client, "k")
        clock.now += 100                          # past the window: the lookup waits for the backend
        backend.answers["k"] = (200, ["v3"])
        late = await ask(client, "k")
        client.close()
        return first, at_once, asked_meanwhile, after, late
    first, at_once, asked_meanwhile, after, late = asyncio.run(scenario())
    assert value(first) == "v1" and [value(r) for r in at_once] == ["v1"] * 5 and all(r.cached for r in at_once)
    assert asked_meanwhile <= 2                    # the refresh may have gone out already, once
    assert value(after) == "v2" and after.cached
    assert value(late) == "v3" and not late.cached
    ids = [r.headers.get("x-request-id") for r in backend.requests]
    assert len(ids) == 3 and ids[0] == ids[2] == LOOKUP_ID and ids[1] != LOOKUP_ID   # one refresh
    assert events.events.count("refresh-refreshed") == 1


def test_the_backends_stale_while_revalidate_sets_the_window(backend):
    clock = Clock()
    backend.answers["k"] = (200, ["v"], {"Content-Type": "application/json",
                                         "Cache-Control": "max-age=5, stale-while-revalidate=20"})

    async def scenario():
        client = local(backend, clock)            # no cache-stale-while-revalidate of its own
        await ask(client, "k")
        clock.now += 15                           # past max-age, within the backend's window
        within = await ask(client, "k")
        await refreshed(client)
        clock.now += 30                           # past the refreshed answer's window too
        past = await ask(client, "k")
        client.close()
        return within, past
    within, past = asyncio.run(scenario())
    assert within.cached and not past.cached and len(backend.requests) == 3


@pytest.mark.parametrize("stale_if_error", [0.0, 100.0])
def test_a_failed_refresh_keeps_the_old_answer_only_as_stale_if_error_allows(backend, stale_if_error):
    clock, events = Clock(), Events()
    backend.answers["k"] = (200, ["v"])

    async def scenario():
        client = local(backend, clock, events, cache_stale_while_revalidate=30.0,
                       cache_stale_if_error=stale_if_error)
        await ask(client, "k")
        backend.answers["k"] = (503, b"")
        clock.now += 15
        at_once = await ask(client, "k")          # answered from the cache; the refresh fails
        await refreshed(client)
        after = await ask(client, "k")
        client.close()
        return at_once, after
    at_once, after = asyncio.run(scenario())
    assert value(at_once) == "v" and at_once.cached and "refresh-failed" in events.events
    if stale_if_error:
        assert value(after) == "v"                # within stale-if-error: the old answer still
    else:
        assert value(after) == "TEMP" and after.status == 503   # no stale answer allowed: the error


@pytest.mark.parametrize("stale_if_error", [0.0, 100.0])
def test_a_failed_refresh_ends_the_window_for_the_whole_fleet(tmp_path, backend, stale_if_error):
    """Host A's refresh fails; host B, which never asked the backend for the key, reads the store's
    entry: it gives the old answer only within stale-if-error (with none, B waits for the backend)."""
    server = RedisServer(tmp_path)
    backend.answers["k"] = (200, ["v"])
    now, events = [1000.0], Events()
    try:
        async def scenario():
            ep = endpoint(server.url, backend, cache_ttl=10.0, cache_stale_while_revalidate=60.0,
                          cache_stale_if_error=stale_if_error, cache_timeout=50)
            a, b = host(ep, clock=lambda: now[0], observer=events), host(ep, clock=lambda: now[0])
            await ready(a, b)
            await a.lookup(params("k"), LOOKUP_ID)
            await asyncio.sleep(0.05)
            backend.answers["k"] = (503, b"")
            now[0] += 15                          # past the lifetime (on the store's clock), in the window
            a.refresher.start(params("k"), params("k"))   # A's refresh, as a lookup in the window starts it
            await refreshed(a)
            await asyncio.sleep(0.05)                   # the cut entry reaches the store
            asked = len(backend.requests)
            on_b = await b.lookup(params("k"), LOOKUP_ID)
            await asyncio.wait([a.close(), b.close()])
            return asked, on_b
        asked, on_b = asyncio.run(scenario())
    finally:
        server.stop()
    assert "refresh-failed" in events.events and asked == 2
    if stale_if_error:   # the old answer within stale-if-error, while the backend fails
        assert value(on_b) == "v"
    else:                # none: B waited for the backend, and got its error
        assert value(on_b) == "TEMP" and on_b.status == 503 and len(backend.requests) == 3


def test_at_most_a_few_refreshes_in_flight_and_lookups_answered_all_the_same(backend):
    clock, events = Clock(), Events()
    keys = [f"k{i}" for i in range(3 * refresh.MAX_REFRESHES)]
    backend.default = lambda request: (200, [f"v-{backend.key_of(request)}"])

    async def scenario():
        client = local(backend, clock, events, cache_stale_while_revalidate=30.0)
        for key in keys:
            await ask(client, key)
        backend.default = lambda request: (time.sleep(0.2), (200, [f"v-{backend.key_of(request)}"]))[1]
        clock.now += 15
        answers = [await ask(client, key) for key in keys]
        in_flight = len(client.refresher.flights)
        await refreshed(client)
        client.close()
        return answers, in_flight
    answers, in_flight = asyncio.run(scenario())
    assert all(r.cached for r in answers) and [value(r) for r in answers] == [f"v-{k}" for k in keys]
    assert in_flight == refresh.MAX_REFRESHES
    assert events.events.count("refresh-busy") == len(keys) - refresh.MAX_REFRESHES
    assert len(backend.requests) == len(keys) + refresh.MAX_REFRESHES


def test_a_fleet_of_four_refreshes_each_hot_key_once_per_lifetime(tmp_path, backend):
    """Four hosts on one store; a backend taking 200 ms; hot keys asked all the time by every host."""
    server = RedisServer(tmp_path)
    hot = [f"hot{i}" for i in range(6)]
    ttl, run_for = 1.0, 5.0
    backend.default = lambda request: (time.sleep(0.2), (200, [f"v-{backend.key_of(request)}"]))[1]
    try:
        async def scenario():
            ep = endpoint(server.url, backend, cache_ttl=ttl, cache_local_ttl=0.2, cache_timeout=50,
                          cache_stale_while_revalidate=60.0)
            hosts = [host(ep) for _ in range(4)]
            await ready(*hosts)
            # warm-up: one host fetches (the keys together), the others read them from the store
            await asyncio.gather(*(hosts[0].lookup(params(key), LOOKUP_ID) for key in hot))
            await asyncio.sleep(0.05)
            for client in hosts[1:]:
                for key in hot:
                    await client.lookup(params(key), LOOKUP_ID)
            warm = len(backend.requests)
            answers, started = [], time.monotonic()
            while time.monotonic() - started < run_for:
                for client in hosts:
                    for key in hot:
                        answers.append((key, await client.lookup(params(key), LOOKUP_ID)))
                await asyncio.sleep(0.01)
            for client in hosts:
                await refreshed(client)
            await asyncio.wait([client.close() for client in hosts])
            return warm, answers, [client.observer.events for client in hosts]
        warm, answers, events = asyncio.run(scenario())
    finally:
        server.stop()
    assert warm == len(hot)
    assert all(value(result) == f"v-{key}" for key, result in answers) and len(answers) > 1000
    after = backend.requests[warm:]
    # no lookup asked the backend itself: every request after warm-up is a refresh
    assert [r for r in after if r.headers.get("x-request-id") == LOOKUP_ID] == []
    per_key = {key: sum(backend.key_of(r) == key for r in after) for key in hot}
    lifetimes = run_for / ttl
    # about one per lifetime (a refresh comes with the first lookup past it, and lasts 200 ms): not
    # one per host (that would be four times as many)
    assert all(lifetimes / 2 <= count <= lifetimes + 1 for count in per_key.values()), per_key
    refreshed_by = [sum(e.count("refresh-refreshed") for e in events)]
    assert refreshed_by == [len(after)]


def test_the_metrics_say_every_refresh_outcome_and_read_back_as_written():
    """Each outcome as a sample of pfrest_cache_refreshes_total, read back as counted (the arbiter adds
    up its workers' that way; pfrest stats reads them so)."""
    from pfrest.ops.counters import Figures, Stats
    assert metrics.REFRESH_OUTCOMES == refresh.OUTCOMES
    stats = Stats()
    stats.mode = config.TCP
    for n, outcome in enumerate(refresh.OUTCOMES, 1):
        stats.cache_events[f"refresh-{outcome}"] += n
    stats.cache_events["hit"] += 1
    stats.shared_events.update({"read-primary": 2, "read-replica": 5})
    text = metrics.exposition(Figures({"ep": stats}, {}, {})).decode()
    for n, outcome in enumerate(refresh.OUTCOMES, 1):
        assert f'pfrest_cache_refreshes_total{{endpoint="ep",outcome="{outcome}"}} {n}.0' in text, text
    assert 'pfrest_shared_cache_reads_total{endpoint="ep",store="replica"} 5.0' in text
    again = metrics.read(text).endpoints["ep"]
    assert {k: v for k, v in again.cache_events.items() if v} == dict(stats.cache_events)
    assert {k: v for k, v in again.shared_events.items() if k.startswith("read-") and v} == \
        {"read-primary": 2, "read-replica": 5}


def test_entries_carry_their_window_and_read_as_before_without_one():
    from pfrest.cache import sharedformat
    from pfrest.protocol.verdict import HttpResult
    rkey, answer = b"pfrest:ep:0123:key=k", HttpResult(200, b'["v"]')
    plain, plain_ms = sharedformat.entry(rkey, answer, 1000, 10, 5)
    windowed, windowed_ms = sharedformat.entry(rkey, answer, 1000, 10, 5, 60)
    assert plain.split(b"\n")[1] == b"200 11000 16000" and plain_ms == 15000   # as older versions write it
    assert windowed.split(b"\n")[1] == b"200 11000 16000 71000" and windowed_ms == 70000
    assert sharedformat.decode(rkey, plain).revalidate_until == 0
    assert sharedformat.decode(rkey, windowed).revalidate_until == 71000
    assert sharedformat.decode(rkey, windowed.replace(b"71000", b"71000 9")) is None   # another format


def test_serve_hosts_answer_hot_keys_from_their_caches_while_one_refreshes(tmp_path, backend, write_config,
                                                                          served):
    """Two real serve hosts (one with two workers) on one store, a backend taking 200 ms, hot keys asked
    all the time: every backend request after warm-up is a refresh (the hosts' metrics count them: the
    sum equals the backend's count), about one per key per lifetime for the fleet, and no wrong answer."""
    server = RedisServer(tmp_path)
    hot, ttl = [f"hot{i}" for i in range(5)], 1
    backend.default = lambda request: (time.sleep(0.2), (200, [f"v-{backend.key_of(request)}"]))[1]
    try:
        hosts = []
        for label, workers in (("a", 1), ("b", 2)):
            port, scrape = free_port(), free_port()
            path = write_config([{"name": NAME, "mode": "tcp-lookup", "target": backend.url + "/lookup",
                                  "bind-port": port, "cache-ttl": ttl, "cache-url": server.url,
                                  "cache-local-ttl": 0.3, "cache-timeout": 50, "cache-stale-while-revalidate": 60}],
                                name=f"{label}.json", **{"control-socket": str(tmp_path / f"{label}.sock"),
                                                         "metrics-address": f"127.0.0.1:{scrape}"})
            hosts.append((port, scrape, served("-c", path, "--workers", str(workers))))
        for _, _, proc in hosts:
            proc.wait_for(r"ready: serving 1 endpoint")
        socks = [connect(("127.0.0.1", port)) for port, _, _ in hosts for _ in range(2)]
        try:
            for key in hot:                                   # warm-up: A fetches, B reads the store
                assert tcp_get(socks[0], key.encode()) == f"200 v-{key}\n".encode()
            time.sleep(0.05)
            for sock in socks[2:]:
                for key in hot:
                    assert tcp_get(sock, key.encode()) == f"200 v-{key}\n".encode()
            warm, started, wrong, count = len(backend.requests), time.monotonic(), 0, 0
            while time.monotonic() - started < 4:
                for sock in socks:
                    for key in hot:
                        count += 1
                        wrong += tcp_get(sock, key.encode()) != f"200 v-{key}\n".encode()
        finally:
            for sock in socks:
                sock.close()
        after = len(backend.requests) - warm
        # B's arbiter adds up what its workers report every second
        until(lambda: sum(refreshes(scrape) for _, scrape, _ in hosts) == after,
              lambda: f"refreshes {[refreshes(scrape) for _, scrape, _ in hosts]}, backend {after}", 5)
    finally:
        server.stop()
    assert wrong == 0 and count > 500
    assert 2 * len(hot) <= after <= len(hot) * (4 / ttl + 1), after   # about one per key per lifetime


def refreshes(port):
    """pfrest_cache_refreshes_total{outcome="refreshed"} of a host, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "pfrest_cache_refreshes_total" and s.labels.get("outcome") == "refreshed")
