"""The shared cache (cache-url) in process, against a real redis-server (and valkey-server where
installed) and a real HTTP backend: two clients of one endpoint stand for two hosts.

- what one host looked up, another answers without a backend request; not-found answers too; errors,
  no-store answers never; max-age bounds the entry's life in the store; endpoints and sites (another
  target) never see each other's answers;
- stale answers across the fleet, within the stale window only;
- a reply that is not for the request (an entry naming another key) is never an answer;
- a store that stops answering (SIGSTOP), dies, is full or read-only is skipped with one log line, the
  lookups bounded by cache-timeout and answered by the backend; it is used again once it answers;
- invalidations on the store's channel drop local copies;
- a password, TLS (verified, with the host name), a unix socket;
- without cache-url, redis-py is never imported.
"""

import asyncio
import hashlib
import logging
import subprocess
import sys
import time

import pytest

from conftest import ROOT, Backend, pfrest_env
from pfrest import config
from pfrest.cache import for_endpoint
from pfrest.backend.client import Client
from pfrest.backend.observer import Observer
from pfrest.cache import invalidation, sharedformat
from pfrest.cache import local as cache_module
from pfrest.cache import shared as shared_module
from pfrest.cache import sharedhealth
from pfrest.cache.local import CachingClient
from pfrest.protocol import verdict
from redis_server import RedisServer, binaries, make_pki

TIMEOUT_MS = 40     # cache-timeout of these tests: far below request-timeout, far above loopback


class Events(Observer):
    def __init__(self):
        self.events = []

    def cache(self, event):
        self.events.append(event)

    def shared(self, event):
        self.events.append("shared-" + event)


@pytest.fixture
def backend(reset_backend):
    return reset_backend


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def fresh(redis):
    """The module's store, empty."""
    redis.client().flushall()
    return redis


@pytest.fixture
def pfrest_log(caplog):
    """The pfrest logger's records, each once (whether or not a command set up logging before)."""
    logger = logging.getLogger("pfrest")
    logger.addHandler(caplog.handler)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture
def quick_backoff(monkeypatch):
    monkeypatch.setattr(sharedhealth, "BACKOFF_FIRST", 0.2)
    monkeypatch.setattr(sharedhealth, "SKIP_AFTER", 0.1)


def endpoint(url, backend, name="ep", **extra):
    values = dict(name=name, mode=config.TCP, target=backend.url + "/lookup", cache_ttl=60.0,
                  cache_negative_ttl=30.0, cache_url=url, cache_local_ttl=5.0, cache_timeout=TIMEOUT_MS)
    values.update(extra)
    return config.Endpoint(**values)


def host(ep, clock=time.time, observer=None):
    """The cache of one pfrest process for ``ep`` (a wall clock for its shared entries may be given)."""
    observer = observer or Events()
    store = shared_module.SharedStore(ep, observer, clock=clock)
    return CachingClient(Client(ep, "UA", observer), ep.cache_ttl, ep.cache_negative_ttl, 100,
                         stale_if_error=ep.cache_stale_if_error, observer=observer, shared=store,
                         local_ttl=ep.cache_local_ttl, stale_while_revalidate=ep.cache_stale_while_revalidate)


def params(key):
    return (("key", key.encode()),)


async def ask(client, key):
    return await client.lookup(params(key), "id")


def value(result):
    v = verdict.lookup(result)
    return v.value.decode() if v.kind == verdict.FOUND else v.kind


async def ready(*clients):
    """Until each client's store has been probed (it connects in the background, then is used)."""
    deadline = time.monotonic() + 5
    while not all(client.shared.up for client in clients):
        assert time.monotonic() < deadline, "the shared store is not used"
        await asyncio.sleep(0.01)


async def skipped(client):
    """Until the client's store is skipped (its first probe, in the background, has failed)."""
    deadline = time.monotonic() + 5
    while not client.shared.health.down_until:
        assert time.monotonic() < deadline, "the shared store is not skipped"
        await asyncio.sleep(0.01)


async def closed(*clients):
    """Close the clients and wait until their connections to the store are closed."""
    await asyncio.wait([client.close() for client in clients])


async def settle():
    """Let the writes of the last turn reach the store."""
    await asyncio.sleep(0.05)


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.mark.parametrize("binary", binaries())
def test_what_one_host_looked_up_another_answers_without_a_backend_request(backend, tmp_path, binary):
    server = RedisServer(tmp_path, binary)
    backend.answers.update({"k": (200, ["v"]), "gone": (404, b""), "down": (503, b""),
                            "nostore": (200, ["x"], {"Cache-Control": "no-store"}),
                            "short": (200, ["s"], {"Cache-Control": "max-age=7"})})
    keys = ("k", "gone", "down", "nostore", "short")
    try:
        async def scenario():
            ep = endpoint(server.url, backend)
            a, b = host(ep), host(ep)
            await ready(a, b)
            first = [value(await ask(a, k)) for k in keys]
            await settle()
            asked = len(backend.requests)
            second = [await ask(b, k) for k in keys]
            again = a.peek(params("k"))   # A's own copy: a local hit, no coroutine
            await closed(a, b)
            return first, asked, second, again, b.client
        first, asked, second, again, _ = run(scenario())
        assert first == ["v", "NOTFOUND", "TEMP", "x", "s"] and asked == 5
        assert [value(r) for r in second] == first
        assert [r.cached for r in second] == [True, True, False, False, True]
        assert len(backend.requests) == asked + 2   # only the error and the no-store answer asked again
        assert value(again) == "v"
        store = server.client()
        space = sharedformat.namespace(endpoint(server.url, backend))
        kept = {k.decode().rsplit("=", 1)[1] for k in store.keys(space + ":key=*")}
        assert kept == {"k", "gone", "short"}
        assert 0 < store.pttl(f"{space}:key=short") <= 7000 < store.pttl(f"{space}:key=k") <= 60000
        assert 0 < store.pttl(f"{space}:key=gone") <= 30000
    finally:
        server.stop()


def test_endpoints_and_sites_never_see_each_others_answers(fresh):
    site1, site2 = Backend(), Backend()
    try:
        site1.answers["k"], site2.answers["k"] = (200, ["one"]), (200, ["two"])

        async def scenario():
            clients = [host(endpoint(fresh.url, site1)), host(endpoint(fresh.url, site1, name="other")),
                       host(endpoint(fresh.url, site2))]
            await ready(*clients)
            found = []
            for client in clients:
                found.append(value(await ask(client, "k")))
                await settle()
            await closed(*clients)
            return found
        assert run(scenario()) == ["one", "one", "two"]
        assert (len(site1.requests), len(site2.requests)) == (2, 1)
    finally:
        site1.stop(), site2.stop()


def test_a_host_answers_stale_with_what_another_host_fetched(fresh, backend):
    """Host B never asked the backend for the key; when the backend fails after the answer's lifetime,
    B answers with A's entry while it is within its stale window, and not after."""
    backend.answers["k"] = (200, ["v"])
    now = [1000.0]

    async def scenario():
        ep = endpoint(fresh.url, backend, cache_ttl=10.0, cache_stale_if_error=100.0)
        a, b = host(ep, clock=lambda: now[0]), host(ep, clock=lambda: now[0])
        await ready(a, b)
        await ask(a, "k")
        await settle()
        backend.answers["k"] = (503, b"")
        now[0] += 50     # past the lifetime, within the stale window
        stale = await ask(b, "k")
        now[0] += 100    # past the stale window too
        late = await ask(b, "k")
        await closed(a, b)
        return stale, late
    stale, late = run(scenario())
    assert value(stale) == "v" and stale.stale
    assert value(late) == "TEMP" and late.status == 503


def test_an_entry_of_another_key_is_never_an_answer(fresh, backend, pfrest_log):
    """A reply meant for another request (a connection out of step) carries that request's key: it is
    a failure of the store, and the backend answers."""
    backend.answers.update({"victim": (200, ["right"]), "other": (200, ["WRONG"])})
    ep = endpoint(fresh.url, backend)
    space = sharedformat.namespace(ep)
    wrong = sharedformat.encode(sharedformat.key(space, params("other")),
                                verdict.HttpResult(200, b'["WRONG"]'), int(time.time() * 1000) + 60000,
                                int(time.time() * 1000) + 60000)
    fresh.client().set(sharedformat.key(space, params("victim")), wrong, px=60000)

    async def scenario():
        events = Events()
        client = host(ep, observer=events)
        await ready(client)
        result = await ask(client, "victim")
        await closed(client)
        return result, events.events
    result, events = run(scenario())
    assert value(result) == "right" and not result.cached
    assert "shared-error" in events and len(backend.requests) == 1


def test_a_stopped_store_is_skipped_within_cache_timeout_and_used_again(tmp_path, backend, pfrest_log,
                                                                      quick_backoff):
    server = RedisServer(tmp_path)
    backend.default = (200, ["v"])
    try:
        async def timed(client, key):
            started = time.monotonic()
            result = await ask(client, key)
            return value(result), time.monotonic() - started

        async def scenario():
            client = host(endpoint(server.url, backend))
            await ready(client)
            server.pause()
            stopped = []
            while client.shared.up and len(stopped) < 50:   # until calls have failed for SKIP_AFTER
                stopped.append(await timed(client, f"stopped-{len(stopped)}"))
            skipped = [await timed(client, f"skipped-{i}") for i in range(5)]
            server.resume()
            await asyncio.sleep(0.3)                   # the back-off runs out
            await ask(client, "probe")                 # the probe goes out beside it
            await asyncio.sleep(0.1)
            up = client.shared.up
            await ask(client, "after")
            await settle()
            await closed(client)
            return stopped, skipped, up
        stopped, skipped, up = run(scenario())
        assert all(answer == "v" for answer, _ in stopped + skipped)
        assert sharedhealth.FAILURES_TO_SKIP <= len(stopped) < 50
        # the first lookups wait for the store up to cache-timeout, then it is skipped: no wait at all
        assert max(seconds for _, seconds in stopped) < TIMEOUT_MS / 1000 + 0.2, stopped
        assert max(seconds for _, seconds in skipped) < TIMEOUT_MS / 1000, skipped
        assert up
        lines = [r.getMessage() for r in pfrest_log.records]
        assert sum("shared cache" in line and "skipped: no reply within cache-timeout (40 ms)" in line
                   for line in lines) == 1, lines
        assert sum("answers again" in line for line in lines) == 1, lines
        assert server.client().exists(sharedformat.key(sharedformat.namespace(endpoint(server.url, backend)),
                                                       params("after")))
    finally:
        server.stop()


@pytest.mark.parametrize("trouble", ["killed", "full", "read-only", "wrong password"])
def test_a_store_that_is_gone_full_or_read_only_is_skipped(tmp_path, backend, pfrest_log, quick_backoff,
                                                          trouble):
    server = RedisServer(tmp_path, password="s3cret-pw")
    backend.default = (200, ["v"])
    url = server.url
    try:
        if trouble == "full":
            server.client().config_set("maxmemory", "1")
        elif trouble == "read-only":
            server.client().replicaof("127.0.0.1", "1")   # a replica of a master that is not there
        elif trouble == "wrong password":
            url = url.replace("s3cret-pw", "wrong-pw")
        else:
            server.kill()

        async def scenario():
            client = host(endpoint(url, backend))
            answers = [value(await ask(client, f"k{i}")) for i in range(4)]
            await skipped(client)
            await asyncio.sleep(0.3)
            answers.append(value(await ask(client, "after the back-off")))   # probed: still refused
            await settle()
            up = client.shared.up
            await closed(client)
            return answers, up
        answers, up = run(scenario())
        assert answers == ["v"] * 5 and len(backend.requests) == 5 and not up
        lines = [r.getMessage() for r in pfrest_log.records if "shared cache" in r.getMessage()]
        assert len(lines) == 1 and "skipped" in lines[0], lines
        reason = {"killed": "Connection", "full": "maxmemory", "read-only": "read only replica",
                  "wrong password": "invalid username-password"}[trouble]
        assert reason in lines[0] and "pw" not in lines[0] and "pfrest/1" not in lines[0], lines
    finally:
        server.stop()


def test_invalidations_on_the_channel_drop_the_local_copies(fresh, backend):
    backend.answers.update({"a": (200, ["1"]), "b": (200, ["2"])})
    ep = endpoint(fresh.url, backend)
    space = sharedformat.namespace(ep)
    store = fresh.client()

    async def subscribed():
        while not store.pubsub_numsub(space)[0][1]:
            await asyncio.sleep(0.01)

    async def scenario():
        client = host(ep)
        await ready(client)
        await subscribed()
        await ask(client, "a"), await ask(client, "b")
        held = [client.peek(params(k)) is not None for k in "ab"]
        store.publish(space, sharedformat.drop_message(["key=a"]))
        await asyncio.sleep(0.1)
        dropped = [client.peek(params(k)) is not None for k in "ab"]
        store.publish(space, sharedformat.flush_message())
        await asyncio.sleep(0.1)
        flushed = len(client)
        await closed(client)
        return held, dropped, flushed
    assert run(scenario()) == ([True, True], [False, True], 0)


def test_writes_wait_a_moment_to_go_together_and_an_invalidation_cancels_them(fresh, backend, monkeypatch):
    """Answers reach the store in one call per WRITE_DELAY; one invalidated before its write never
    gets there (it was fetched before the change).  WRITE_DELAY is made long enough here for the
    backend's three answers to come within it on a busy machine (2 ms is less than three requests)."""
    monkeypatch.setattr(shared_module, "WRITE_DELAY", 0.3)
    backend.answers.update({k: (200, [k]) for k in "abc"})
    ep = endpoint(fresh.url, backend)
    space = sharedformat.namespace(ep)
    before = fresh.client().info("commandstats").get("cmdstat_eval", {}).get("calls", 0)

    async def scenario():
        client = host(ep)
        await ready(client)
        await asyncio.gather(ask(client, "a"), ask(client, "b"), ask(client, "c"))
        client.shared.invalidated([params("b")])
        await asyncio.sleep(shared_module.WRITE_DELAY + 0.05)
        await closed(client)
    run(scenario())
    store = fresh.client()
    assert sorted(k.decode().rsplit("=", 1)[1] for k in store.keys(space + ":key=*")) == ["a", "c"]
    assert store.info("commandstats")["cmdstat_eval"]["calls"] == before + 1


def test_the_channel_ends_with_its_store_even_when_a_cancellation_is_lost(fresh, backend, monkeypatch):
    """async-timeout 4.0.2 (under redis-py 4.3's reads, Debian 12's) may swallow a cancellation when its
    own timer fires in the same turn: `pfrest handle` hung at exit 2 times in 100 that way.  So the
    channel also ends when its store is closed: here a second listener nobody cancels."""
    monkeypatch.setattr(invalidation, "POLL", 0.2)   # how often it looks

    async def scenario():
        client = host(endpoint(fresh.url, backend))
        await ready(client)
        store, space = client.shared, client.shared.namespace
        lone = asyncio.get_running_loop().create_task(invalidation.listen(store))
        while fresh.client().pubsub_numsub(space)[0][1] < 2:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await closed(client)
        await asyncio.wait_for(lone, invalidation.POLL + 1)
        return time.monotonic() - started
    assert run(scenario()) < invalidation.POLL + 1


@pytest.mark.parametrize("kind", ["password", "tls", "unix"])
def test_password_tls_and_unix_socket(tmp_path, backend, kind):
    options = {"password": {"password": "pa55-word"}, "tls": {"pki": make_pki(tmp_path)},
               "unix": {"unix": True}}[kind]
    server = RedisServer(tmp_path, **options)
    backend.answers["k"] = (200, ["v"])
    try:
        async def scenario():
            ep = endpoint(server.url, backend)
            a, b = host(ep), host(ep)
            await ready(a, b)
            await ask(a, "k")
            await settle()
            result = await ask(b, "k")
            await closed(a, b)
            return result
        result = run(scenario())
        assert value(result) == "v" and result.cached and len(backend.requests) == 1
    finally:
        server.stop()


def test_tls_verifies_the_certificate_and_its_name(tmp_path, backend, pfrest_log):
    pki = make_pki(tmp_path, names=("elsewhere.example",), ips=())
    server = RedisServer(tmp_path, pki=pki)
    other_ca = make_pki(tmp_path / "other" if (tmp_path / "other").mkdir() is None else None)["ca"]
    backend.default = (200, ["v"])
    try:
        async def scenario(url):
            client = host(endpoint(url, backend))
            answers = [value(await ask(client, f"k{i}")) for i in range(3)]
            await skipped(client)
            await closed(client)
            return answers
        # a certificate for another name, then one from a CA that is not trusted
        for url in (server.url, server.url.replace(pki["ca"], other_ca)):
            assert run(scenario(url)) == ["v"] * 3
        lines = [r.getMessage() for r in pfrest_log.records if "skipped" in r.getMessage()]
        assert len(lines) == 2 and all("certificate" in line.lower() for line in lines), lines
    finally:
        server.stop()


@pytest.mark.parametrize("shared", [False, True])
def test_redis_is_imported_only_for_a_shared_cache(shared):
    code = ("import sys; from pfrest import config; from pfrest.cache import for_endpoint; "
            "ep = config.Endpoint(name='e', mode='tcp-lookup', target='http://127.0.0.1:1/x', cache_ttl=5.0, "
            f"cache_url={'redis://127.0.0.1:1' if shared else None!r}); for_endpoint(ep, 'UA'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'redis')[:1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=pfrest_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("['redis']" if shared else "[]")


def test_for_endpoint_puts_the_store_behind_the_local_cache(redis):
    ep = config.Endpoint(name="e", mode=config.TCP, target="http://127.0.0.1:1/x", cache_ttl=5.0,
                         cache_url=redis.url, cache_local_ttl=2.0)

    async def build():
        client = for_endpoint(ep, "UA")
        await closed(client)
        return client
    client = run(build())
    assert isinstance(client, cache_module.CachingClient) and client.local_ttl == 2.0
    assert isinstance(client.shared, shared_module.SharedStore)


def test_the_namespace_is_everything_that_shapes_an_answer(tmp_path, pfrest_log):
    """Name, mode, targets and credentials; the credentials through scrypt only; the same config gives
    the same namespace (as on every host); a client certificate by its certificates, not its key."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    pki, other = make_pki(tmp_path / "one"), make_pki(tmp_path / "two")
    bundle = tmp_path / "bundle.pem"   # the same certificate, with its key in the file
    bundle.write_bytes(open(pki["cert"], "rb").read() + open(pki["key"], "rb").read())
    (tmp_path / "link.pem").symlink_to(pki["cert"])

    def ns(**extra):
        values = dict(name="ep", mode=config.TCP, target="http://b.example/x", cache_ttl=60.0,
                      cache_url="redis://127.0.0.1:1")
        values.update(extra)
        return sharedformat.namespace(config.Endpoint(**values))
    base = ns()
    variants = [ns(auth_token="t1"), ns(auth_token="t2"), ns(headers=(("X-Tenant", "a"),)),
                ns(headers=(("X-Tenant", "b"),)), ns(basic_auth="u:p1"), ns(basic_auth="u:p2"),
                ns(client_cert=pki["cert"]), ns(client_cert=other["cert"]), ns(mode=config.SOCKETMAP),
                ns(name="other"), ns(targets=("http://b.example/x", "http://c.example/x")), base]
    assert len(set(variants)) == len(variants)
    assert ns(auth_token="t1") == ns(auth_token="t1") and ns(headers=(("X-Tenant", "a"),)) == \
        ns(headers=(("x-tenant", "a"),))
    assert ns(client_cert=str(bundle)) == ns(client_cert=pki["cert"])
    # a link is not followed: no namespace, and a store alone, of this process only, said so
    with pytest.raises(OSError):
        ns(client_cert=str(tmp_path / "link.pem"))
    linked = config.Endpoint(name="ep", mode=config.TCP, target="http://b.example/x", cache_ttl=60.0,
                             cache_url="redis://127.0.0.1:1", client_cert=str(tmp_path / "link.pem"))
    spaces = {shared_module.SharedStore(linked).namespace for _ in range(2)}
    assert len(spaces) == 2 and all(space.startswith("pfrest:ep:alone-") for space in spaces)
    assert pfrest_log.text.count("cannot read client-cert") == 2
    token = b"t1"
    fast = [hashlib.new(h, token).hexdigest()[:8] for h in ("md5", "sha1", "sha256", "sha512")]
    assert not any(f in ns(auth_token="t1") for f in fast) and "t1" not in ns(auth_token="t1")[len("pfrest:ep"):]
