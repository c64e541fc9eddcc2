"""The lookup cache: TTLs, negative TTLs, never errors, Cache-Control, bounded size, coalescing."""

import threading
import time

import pytest

from pfrest import config
from pfrest.legacy_cache import CachingBackend
from pfrest.protocol.verdict import Failure, HttpResult


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Counting:
    def __init__(self, answers, delay=0.0):
        self.answers, self.delay, self.calls = answers, delay, 0
        self.lock = threading.Lock()

    def lookup(self, params, request_id):
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        answer = self.answers[dict(params)["key"]]
        return answer() if callable(answer) else answer

    def policy(self, pairs, request_id):
        self.calls += 1
        return HttpResult(200, b"DUNNO")


ANSWERS = {
    b"found": HttpResult(200, b'["v"]'),
    b"missing": HttpResult(404, b""),
    b"empty": HttpResult(200, b"[]"),
    b"down": HttpResult(503, b""),
    b"timeout": Failure("timeout"),
    b"invalid": HttpResult(200, b"nope"),
    b"short": HttpResult(200, b'["v"]', max_age=5),
    b"nostore": HttpResult(200, b'["v"]', max_age=-1),
}


def cache(ttl=60, negative=10, entries=100, backend=None):
    clock = Clock()
    b = backend or Counting(ANSWERS)
    return CachingBackend(b, ttl, negative, entries, clock=clock), b, clock


def ask(c, key):
    return c.lookup((("key", key),), "id")


def test_found_cached_for_ttl():
    c, b, clock = cache()
    assert ask(c, b"found").cached is False
    assert ask(c, b"found").cached is True and ask(c, b"found").body == b'["v"]'
    assert b.calls == 1
    clock.now += 61
    assert ask(c, b"found").cached is False and b.calls == 2


def test_not_found_uses_negative_ttl():
    c, b, clock = cache()
    ask(c, b"missing"), ask(c, b"empty")
    ask(c, b"missing"), ask(c, b"empty")
    assert b.calls == 2
    clock.now += 11
    ask(c, b"missing")
    assert b.calls == 3


@pytest.mark.parametrize("key", [b"down", b"timeout", b"invalid", b"nostore"])
def test_errors_and_no_store_never_cached(key):
    c, b, clock = cache()
    ask(c, key), ask(c, key)
    assert b.calls == 2 and len(c) == 0


def test_max_age_shortens_ttl():
    c, b, clock = cache()
    ask(c, b"short")
    clock.now += 4
    ask(c, b"short")
    assert b.calls == 1
    clock.now += 2
    ask(c, b"short")
    assert b.calls == 2


def test_negative_ttl_zero_caches_only_found():
    c, b, clock = cache(negative=0)
    ask(c, b"missing"), ask(c, b"missing"), ask(c, b"found"), ask(c, b"found")
    assert b.calls == 3


def test_bounded_entries_least_recently_used_go_first():
    answers = {str(i).encode(): HttpResult(200, b'["v"]') for i in range(10)}
    c, b, clock = cache(entries=3, backend=Counting(answers))
    for k in (b"0", b"1", b"2", b"0", b"3"):  # 1 is now the least recently used: evicted
        ask(c, k)
    assert len(c) == 3
    calls = b.calls
    ask(c, b"0"), ask(c, b"2"), ask(c, b"3")
    assert b.calls == calls
    ask(c, b"1")
    assert b.calls == calls + 1


def concurrently(n, fn):
    results = []
    threads = [threading.Thread(target=lambda: results.append(fn())) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_identical_lookups_in_flight_are_coalesced():
    backend = Counting(ANSWERS, delay=0.2)
    c, b, clock = cache(backend=backend)
    results = concurrently(20, lambda: ask(c, b"found"))
    assert backend.calls == 1
    assert len(results) == 20 and all(r.body == b'["v"]' for r in results)


def test_coalesced_errors_are_shared_but_not_kept():
    backend = Counting(ANSWERS, delay=0.2)
    c, b, clock = cache(backend=backend)
    results = concurrently(5, lambda: ask(c, b"down"))
    assert backend.calls == 1 and all(r.status == 503 for r in results)
    ask(c, b"down")
    assert backend.calls == 2


def test_policy_passes_through():
    c, b, clock = cache()
    c.policy([], "id"), c.policy([], "id")
    assert b.calls == 2


def test_policy_endpoints_cannot_configure_a_cache():
    with pytest.raises(config.ConfigError, match=r"endpoints\[0\].cache-ttl: not used by mode policy"):
        config.parse({"endpoints": [{"name": "p", "mode": "policy", "target": "http://h/", "cache-ttl": 5}]})


def test_cache_through_handle(backend, write_config, handle):
    backend.answers["k"] = (200, ["v"], {"Content-Type": "application/json"})
    backend.answers["gone"] = (404, b"")
    path = write_config([{"name": "ep", "mode": "tcp-lookup", "target": backend.url + "/x",
                          "cache-ttl": 60, "cache-negative-ttl": 60}])
    out = handle(path, "ep", b"get k\nget k\nget gone\nget gone\nget k\n")
    assert out == b"200 v\n200 v\n500 not%20found\n500 not%20found\n200 v\n"
    assert len(backend.requests) == 2
    assert handle.log.count("cache=hit") == 3
