"""Several `pfrest serve` processes (as several hosts: one single process, one with two workers) sharing
one real redis-server with a password, a real HTTP backend, real Postfix-protocol clients:

- a key looked up through one host is answered by the other without a backend request;
- `pfrest cache drop` and `flush`, run with either host's config, remove the answers from the store and
  from every process's own cache within a second;
- the store stopped (SIGSTOP) and killed (SIGKILL), then restarted, while clients keep asking: no
  wrong answer, none unanswered, the latency bounded by cache-timeout, one log line per change of the
  store's state, and the store used again afterwards;
- the password never shows in a log line.
"""

import re
import subprocess
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Backend, pfrest_cmd, pfrest_env
from postfix_instance import free_port
from redis_server import RedisServer
from test_serve import connect, served, tcp_get  # noqa: F401 (served is a fixture)

PASSWORD = "fl33t-s3cret"
TIMEOUT_MS = 50          # cache-timeout of the hosts
NAME = "users"


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("fleet-redis"), password=PASSWORD)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def backend():
    server = Backend()
    server.default = lambda request: (200, [f"val-{server.key_of(request)}"])
    yield server
    server.stop()


@pytest.fixture
def fleet(redis, backend, write_config, served, tmp_path):
    """Two hosts: (port, config path, Served, metrics port) each; A a single process, B with two workers."""
    redis.client().flushall()
    backend.answers.clear()
    backend.requests.clear()
    hosts = []
    for label, workers in (("a", 1), ("b", 2)):
        port, metrics = free_port(), free_port()
        path = write_config([{"name": NAME, "mode": "tcp-lookup", "target": backend.url + "/lookup",
                              "bind-port": port, "request-timeout": 3000, "cache-ttl": 600,
                              "cache-negative-ttl": 600, "cache-url": redis.url, "cache-local-ttl": 60,
                              "cache-timeout": TIMEOUT_MS}],
                            name=f"{label}.json", **{"control-socket": str(tmp_path / f"{label}.sock"),
                                                     "metrics-address": f"127.0.0.1:{metrics}"})
        hosts.append((port, path, served("-c", path, "--workers", str(workers)), metrics))
    for _, _, proc, _ in hosts:
        proc.wait_for(r"ready: serving 1 endpoint")
    until(lambda: subscribers(redis) == 3, "every process listens for invalidations")
    return hosts


def subscribers(redis):
    return sum(count for _, count in redis.client().pubsub_numsub(*redis.client().pubsub_channels()))


def until(predicate, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.02)


def cache(*args):
    return subprocess.run(pfrest_cmd("cache", *args), capture_output=True, text=True, timeout=60,
                          env=pfrest_env(), cwd=ROOT)


def test_hosts_share_answers_and_drop_them_together(fleet, backend, redis):
    (a_port, a_config, a_log, _), (b_port, b_config, b_log, _) = fleet
    backend.answers.update({"k": (200, ["old"]), "x": (200, ["x-old"])})
    a = connect(("127.0.0.1", a_port))
    b = [connect(("127.0.0.1", b_port)) for _ in range(2)]   # one on each worker of B
    try:
        assert tcp_get(a, b"k") == b"200 old\n" and tcp_get(a, b"x") == b"200 x-old\n"
        assert len(backend.requests) == 2
        time.sleep(0.05)   # the entries reach the store
        for sock in b:
            assert tcp_get(sock, b"k") == b"200 old\n" and tcp_get(sock, b"x") == b"200 x-old\n"
        assert len(backend.requests) == 2, "the other host asked the backend"
        assert re.search(r"key=k status=200 reply=FOUND ms=[\d.]+ cache=hit", b_log.log)

        backend.answers.update({"k": (200, ["new"]), "x": (200, ["x-new"])})
        assert [tcp_get(sock, b"k") for sock in (a, *b)] == [b"200 old\n"] * 3   # cached everywhere
        dropped = cache("-c", b_config, "drop", NAME, "k")
        assert dropped.returncode == 0, dropped.stderr
        assert "3 pfrest process(es) heard it" in dropped.stdout, dropped.stdout
        done = time.monotonic()
        until(lambda: all(tcp_get(sock, b"k") == b"200 new\n" for sock in (a, *b)), "dropped everywhere", 1)
        assert time.monotonic() - done < 1
        assert [tcp_get(sock, b"x") for sock in (a, *b)] == [b"200 x-old\n"] * 3   # the others stay

        flushed = cache("-c", a_config, "flush", NAME)
        assert flushed.returncode == 0, flushed.stderr
        until(lambda: all(tcp_get(sock, b"x") == b"200 x-new\n" for sock in (a, *b)), "flushed everywhere", 1)
        assert not [k for k in redis.client().keys("pfrest:*") if b"key=" in k and b"key=x" not in k
                    and b"key=k" not in k]
    finally:
        for sock in (a, *b):
            sock.close()
    for proc in (a_log, b_log):
        assert PASSWORD not in proc.log


class Load:
    """Clients asking both hosts all the time, each on its own connection, lock-step as Postfix does:
    every reply is checked against what the backend answers for its key; latencies are kept."""

    def __init__(self, ports, per_host=3):
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.wrong, self.unanswered, self.latencies, self.count = [], 0, [], 0
        self.threads = [threading.Thread(target=self.client, args=(port, f"{port}-{i}"), daemon=True)
                        for port in ports for i in range(per_host)]
        for thread in self.threads:
            thread.start()

    def client(self, port, tag):
        sock, n = connect(("127.0.0.1", port), timeout=5), 0
        try:
            while not self.stop.is_set():
                n += 1
                key = f"hot{n % 20}" if n % 2 else f"{tag}-{n}"   # half repeated keys, half new ones
                started = time.monotonic()
                try:
                    reply = tcp_get(sock, key.encode())
                except OSError:
                    with self.lock:
                        self.unanswered += 1
                    sock = connect(("127.0.0.1", port), timeout=5)
                    continue
                with self.lock:
                    self.count += 1
                    self.latencies.append((started, time.monotonic() - started))
                    if reply != f"200 val-{key}\n".encode():
                        self.wrong.append((key, reply))
        finally:
            sock.close()

    def end(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def states(proc):
    return re.findall(r"shared cache \S+ (skipped|answers again)", proc.log)


def answering(*procs):
    """Whether every process that skipped the store has said it answers again, a line for each skip."""
    return all(states(proc).count("skipped") == states(proc).count("answers again") for proc in procs)


def test_a_store_stopped_killed_and_restarted_under_load(fleet, backend, redis):
    (a_port, _, a_log, _), (b_port, _, b_log, _) = fleet
    load = Load((a_port, b_port))
    try:
        time.sleep(0.4)
        redis.pause()                 # SIGSTOP: connections stay, nothing answers
        paused = time.monotonic()
        time.sleep(0.8)
        redis.resume()
        until(lambda: answering(a_log, b_log), "the store answers again")  # a probe after the back-off (1 s)
        redis.kill()                  # SIGKILL: connections reset, then refused
        killed = time.monotonic()
        time.sleep(0.6)
        redis.start()                 # empty: nothing persists
        until(lambda: answering(a_log, b_log), "the restarted store answers")
    finally:
        load.end()
    assert load.count > 300 and load.wrong == [] and load.unanswered == 0, (load.count, load.wrong[:5])
    during = [seconds for started, seconds in load.latencies if paused <= started < killed + 0.6]
    assert max(during) < TIMEOUT_MS / 1000 + 0.2, sorted(during)[-5:]   # measured: 56-67 ms at most
    for proc in (a_log, b_log):
        assert states(proc) and answering(proc), [line for line in proc.log.splitlines() if "shared cache" in line]
        assert PASSWORD not in proc.log
    # one line per change of state: in the single process, they alternate
    assert states(a_log) == ["skipped", "answers again"] * (len(re.findall("skipped", a_log.log)))
    # and the store is shared again
    backend.requests.clear()
    with connect(("127.0.0.1", a_port)) as a, connect(("127.0.0.1", b_port)) as b:
        assert tcp_get(a, b"after") == b"200 val-after\n"
        time.sleep(0.05)
        assert tcp_get(b, b"after") == b"200 val-after\n"
    assert len(backend.requests) == 1


def test_handles_of_one_lookup_each_share_answers(fleet, backend, redis, handle):
    """spawn(8) or xinetd with `postmap -q`: one `pfrest handle` per lookup, its only one, asked at once.
    It waits for its first connection to the store (within cache-timeout), and its answer reaches the
    store before it exits: the next handle, and the serve hosts, answer from there."""
    (a_port, a_config, _, _), _ = fleet
    backend.answers["h"] = (200, ["from-backend"])
    assert handle(a_config, NAME, b"get h\n") == b"200 from-backend\n"
    assert len(backend.requests) == 1
    assert handle(a_config, NAME, b"get h\n") == b"200 from-backend\n"
    with connect(("127.0.0.1", a_port)) as a:
        assert tcp_get(a, b"h") == b"200 from-backend\n"
    assert len(backend.requests) == 1, "a handle or the serve asked the backend again"


def test_connections_gone_while_the_store_is_asked(fleet, backend, redis):
    """A Postfix connection that closes while its lookup waits for the store (stopped: the wait lasts
    its cache-timeout) ends cleanly: the process goes on answering, and logs no error."""
    (a_port, _, a_log, _), _ = fleet
    backend.answers["w"] = (200, ["w-val"])
    with connect(("127.0.0.1", a_port)) as a:
        assert tcp_get(a, b"warm") == b"200 val-warm\n"   # the store is in use
    redis.pause()
    try:
        for _ in range(20):
            with connect(("127.0.0.1", a_port)) as gone:
                gone.sendall(b"get w\n")
        time.sleep(TIMEOUT_MS / 1000 * 3)
    finally:
        redis.resume()
    with connect(("127.0.0.1", a_port)) as a:
        assert tcp_get(a, b"w") == b"200 w-val\n"
    assert not re.search(r"Traceback|ERROR|exception", a_log.log), a_log.log[-2000:]


def test_the_shared_cache_in_the_metrics_pfrest_stats_and_the_dashboard(fleet, backend, redis):
    (a_port, a_config, _, a_metrics), (b_port, _, _, b_metrics) = fleet
    backend.answers["m"] = (200, ["m-val"])
    with connect(("127.0.0.1", a_port)) as a, connect(("127.0.0.1", b_port)) as b:
        assert tcp_get(a, b"m") == b"200 m-val\n"
        time.sleep(0.05)
        assert tcp_get(b, b"m") == b"200 m-val\n"    # from the store
    assert cache("-c", a_config, "drop", NAME, "m").returncode == 0
    until(lambda: scrape(a_metrics).get("pfrest_cache_drops_total") == 1, "A counts its dropped entry")
    # B: its arbiter adds up what its two workers report every second
    until(lambda: scrape(b_metrics).get("pfrest_shared_cache_hits_total") == 1, "B counts its store hit")
    a, b = scrape(a_metrics), scrape(b_metrics)
    assert a["pfrest_shared_cache_misses_total"] == 1 and a.get("pfrest_shared_cache_hits_total") == 0
    assert b["pfrest_shared_cache_hits_total"] == 1 and b["pfrest_shared_cache_up"] == 1 == a["pfrest_shared_cache_up"]
    redis.pause()
    try:
        with connect(("127.0.0.1", a_port)) as a:   # calls that fail over SKIP_AFTER: the store is skipped
            for i in range(8):
                assert tcp_get(a, b"stopped%d" % i) == b"200 val-stopped%d\n" % i
                time.sleep(0.05)
        until(lambda: scrape(a_metrics)["pfrest_shared_cache_up"] == 0, "A says it skips the store")
        assert scrape(a_metrics)["pfrest_shared_cache_errors_total"] >= 1
        shown = subprocess.run(pfrest_cmd("stats", "-c", a_config), capture_output=True, text=True, timeout=30,
                               env=pfrest_env(), cwd=ROOT)
        assert re.search(rf"^{NAME}\s+SKIPPED\s+0\s+\d+\s+[1-9]", shown.stdout, re.M), shown.stdout
    finally:
        redis.resume()
    from test_monitoring import dashboard_shared_cache_metrics, exposed_names
    text = fetch(a_metrics)
    assert len(dashboard_shared_cache_metrics()) >= 5 and dashboard_shared_cache_metrics() <= exposed_names(text)


def fetch(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def scrape(port):
    """{metric name: value} of the endpoint's samples (one endpoint, so no two share a name)."""
    return {s.name: s.value for family in text_string_to_metric_families(fetch(port)) for s in family.samples
            if s.labels.get("endpoint") == NAME}


def test_concurrent_misses_of_one_process_make_one_backend_request(fleet, backend, redis):
    """Coalescing stays per process with a shared store: Postfix connections asking one new key at once
    all wait for one backend request (the store had nothing), then the store has it."""
    (a_port, _, _, _), _ = fleet
    backend.answers["co"] = lambda request: (time.sleep(0.3), (200, ["co-val"]))[1]
    socks = [connect(("127.0.0.1", a_port)) for _ in range(6)]
    try:
        for sock in socks:
            sock.sendall(b"get co\n")
        assert [sock.recv(100) for sock in socks] == [b"200 co-val\n"] * 6
    finally:
        for sock in socks:
            sock.close()
    assert sum(backend.key_of(r) == "co" for r in backend.requests) == 1
    until(lambda: [k for k in redis.client().keys("pfrest:*") if k.endswith(b":key=co")], "the store has it", 1)


def test_tenants_of_one_backend_never_read_each_others_answers(redis, backend, write_config, served, tmp_path):
    """Two configs alike but for the auth-token (two tenants of one provider, on one Redis): each gets
    its own answers; a host with the same config shares them; no key name holds the token or a fast
    hash of it; `pfrest cache drop` with one tenant's config drops that tenant's answers only."""
    import hashlib
    redis.client().flushall()
    backend.answers.clear()
    backend.requests.clear()
    backend.answers["k"] = lambda request: (200, [f"{request.headers.get('x-auth-token')}-k"])
    hosts = {}
    for label, token in (("a", "tenant-a"), ("b", "tenant-b"), ("a2", "tenant-a")):
        port = free_port()
        path = write_config([{"name": NAME, "mode": "tcp-lookup", "target": backend.url + "/lookup",
                              "bind-port": port, "request-timeout": 3000, "cache-ttl": 600, "auth-token": token,
                              "cache-url": redis.url, "cache-local-ttl": 60, "cache-timeout": TIMEOUT_MS}],
                            name=f"{label}.json", **{"control-socket": str(tmp_path / f"{label}.sock")})
        hosts[label] = (port, path, served("-c", path))
    for _, _, proc in hosts.values():
        proc.wait_for(r"ready: serving 1 endpoint")
    socks = {label: connect(("127.0.0.1", port)) for label, (port, _, _) in hosts.items()}
    try:
        assert tcp_get(socks["a"], b"k") == b"200 tenant-a-k\n"
        time.sleep(0.05)   # the entry reaches the store
        assert tcp_get(socks["b"], b"k") == b"200 tenant-b-k\n"
        assert len(backend.requests) == 2
        time.sleep(0.05)
        assert tcp_get(socks["a2"], b"k") == b"200 tenant-a-k\n"
        assert len(backend.requests) == 2, "a host of the same config asked the backend"
        names = [k.decode() for k in redis.client().keys("pfrest:*")]
        assert len({name.rsplit(":", 1)[0] for name in names if name.endswith(":key=k")}) == 2, names
        for token in ("tenant-a", "tenant-b"):
            fast = [getattr(hashlib, h)(token.encode()).hexdigest() for h in ("md5", "sha1", "sha256", "sha512")]
            assert not any(token in name or any(f[:8] in name for f in fast) for name in names), names
        dropped = cache("-c", hosts["a"][1], "drop", NAME, "k")
        assert dropped.returncode == 0 and "(1 entries were there)" in dropped.stdout, dropped.stdout
        backend.answers["k"] = lambda request: (200, [f"{request.headers.get('x-auth-token')}-new"])
        until(lambda: tcp_get(socks["a"], b"k") == b"200 tenant-a-new\n", "dropped for tenant a", 2)
        assert tcp_get(socks["b"], b"k") == b"200 tenant-b-k\n"   # tenant b's answer stays
    finally:
        for sock in socks.values():
            sock.close()
    for _, _, proc in hosts.values():
        assert "tenant-" not in proc.log
