"""The metrics address of `pfrest serve`: /metrics (checked by promtool and prometheus-client's parser),
/healthz, /readyz, metrics-allow-from, `pfrest stats` and the Grafana dashboard, against a real
`pfrest serve --workers 2` under load (one process for the module, the tests in order) and an
in-process single-process Server, with real backends on loopback."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Backend, ServerThread, need_binary, pfrest_cmd, pfrest_env
from pfrest import config
from pfrest.backend.pool import IDLE_REUSE_LIMIT
from pfrest.commands import minihttp
from pfrest.ops import httpd, monitor
from pfrest.ops.counters import Figures, Stats
from postfix_instance import free_port, stop_process
from test_serve import POLICY_REQUEST, Served, ask, connect, ephemeral, tcp_get

DASHBOARD = os.path.join(ROOT, "contrib", "grafana", "pfrest.json")
CONNECTIONS, UNIQUE, POLICY_CONNECTIONS, POLICY_EACH = 6, 100, 2, 100


def get(port, path="/metrics", source=None, method="GET"):
    """(status, body text) of one request to the metrics address."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def samples(text):
    """{(name, sorted label items): value} through prometheus-client's parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(found, name, **labels):
    return sum(value for (n, items), value in found.items()
               if n == name and all(dict(items).get(k) == v for k, v in labels.items()))


def until(predicate, timeout=10, what=""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def run_pfrest(*args):
    return subprocess.run(pfrest_cmd(*args), capture_output=True, text=True, env=pfrest_env(), cwd=ROOT,
                          timeout=30)


def answer(request):
    """The module's backend: lookups of f* found, others not found; policy REJECT for bad*, else DUNNO."""
    if request.path == "/p":
        recipient = dict(request.form()).get("recipient", "")
        return 200, b"REJECT no" if recipient.startswith("bad") else b"DUNNO", {"Content-Type": "text/plain"}
    key = dict(request.query).get("key", "")
    return (200, ["v"]) if key.startswith("f") else (404, b"")


class Service:
    """`pfrest serve --workers 2` with a cached lookup endpoint ``t``, a policy endpoint ``p`` and
    the metrics address; its backend can be stopped and started again on the same port."""

    def __init__(self, write_config):
        self.backend = Backend()
        self.backend.default = answer
        self.backend_port = self.backend.server.server_address[1]
        self.t_port, self.p_port, self.metrics_port = free_port(), free_port(), free_port()
        url = self.backend.url
        self.config = write_config([
            {"name": "t", "mode": "tcp-lookup", "target": url + "/t", "bind-port": self.t_port, "cache-ttl": 600,
             "request-timeout": 1000},
            {"name": "p", "mode": "policy", "target": url + "/p", "bind-port": self.p_port, "request-timeout": 1000}],
            **{"metrics-address": f"127.0.0.1:{self.metrics_port}"})
        self.proc = Served(("-c", self.config, "--workers", "2"))
        self.proc.wait_for(r"ready: serving 2 endpoint\(s\), 2 workers")

    def scrape(self):
        status, text = get(self.metrics_port)
        assert status == 200
        return text

    def backend_down(self):
        backend_down(self.backend)

    def backend_up(self):
        self.backend.server = minihttp.serve_app(self.backend.app, port=self.backend_port)

    def stop(self):
        stop_process(self.proc.proc)
        self.backend.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    made = []

    def write_config(endpoints, **top):
        path = tmp_path_factory.mktemp("monitoring") / "pfrest.json"
        path.write_text(json.dumps({**top, "endpoints": endpoints}))
        return str(path)
    made.append(Service(write_config))
    yield made[0]
    made[0].stop()


def backend_down(backend):
    """Stop listening; the connections pfrest keeps alive are no longer reused once IDLE_REUSE_LIMIT
    has passed (the server's threads would still answer on them)."""
    backend.server.stop()
    time.sleep(IDLE_REUSE_LIMIT + 0.1)


def tcp_load(port, index):
    with connect(("127.0.0.1", port)) as sock:
        for i in range(UNIQUE):  # half found, half not; then every found key again: from the cache
            tcp_get(sock, f"{'f' if i % 2 else 'n'}{index}-{i}".encode())
        for i in range(1, UNIQUE, 2):
            assert tcp_get(sock, f"f{index}-{i}".encode()) == b"200 v\n"


def policy_load(port, index):
    with connect(("127.0.0.1", port)) as sock:
        for i in range(POLICY_EACH):
            recipient = f"{'bad' if i % 4 == 0 else 'ok'}{index}-{i}@x".encode()
            ask(sock, POLICY_REQUEST % recipient, b"\n\n")


def test_readyz_probes_lookup_backends_through_a_worker(service):
    status, body = get(service.metrics_port, "/healthz")
    assert (status, body) == (200, "ok\n")
    status, body = get(service.metrics_port, "/readyz")  # nothing asked yet: t is probed, p never
    assert status == 200, body
    assert "t: ready: answered a probe" in body and "p: ready: no failed policy request" in body
    probes = [r for r in service.backend.requests if r.raw_query.endswith("key=pfrest-readiness-probe.invalid")]
    assert len(probes) == 1 and all(r.path == "/t" for r in service.backend.requests)
    assert get(service.metrics_port, "/nothing")[0] == 404
    assert get(service.metrics_port, "/metrics", method="POST")[0] == 405
    assert get(service.metrics_port, "/metrics", method="HEAD") == (200, "")


def test_metrics_during_a_load_add_up_to_the_requests_sent(service):
    loads = [threading.Thread(target=tcp_load, args=(service.t_port, i)) for i in range(CONNECTIONS)]
    loads += [threading.Thread(target=policy_load, args=(service.p_port, i)) for i in range(POLICY_CONNECTIONS)]
    scrapes, durations = [], []

    def scraper():
        while any(load.is_alive() for load in loads):
            started = time.monotonic()
            scrapes.append(samples(service.scrape()))   # parses, or fails the test
            durations.append(time.monotonic() - started)
            time.sleep(0.05)
    for load in loads:
        load.start()
    watcher = threading.Thread(target=scraper)
    watcher.start()
    for thread in loads + [watcher]:
        thread.join(60)
    sent_tcp, sent_policy = CONNECTIONS * UNIQUE * 3 // 2, POLICY_CONNECTIONS * POLICY_EACH
    assert len(scrapes) >= 3 and max(durations) < 1.0, durations  # the arbiter answers during the load

    def settled():  # the workers report every second
        found = samples(service.scrape())
        return found if total(found, "pfrest_requests_total") == sent_tcp + sent_policy else None
    found = until(settled, what="the request totals never matched the requests sent")
    assert total(found, "pfrest_requests_total", endpoint="t", mode="tcp-lookup", reply="found") == sent_tcp * 2 / 3
    assert total(found, "pfrest_requests_total", endpoint="t", reply="notfound") == sent_tcp / 3
    assert total(found, "pfrest_requests_total", endpoint="p", mode="policy", reply="reject") == sent_policy / 4
    assert total(found, "pfrest_requests_total", endpoint="p", reply="dunno") == sent_policy * 3 / 4
    assert total(found, "pfrest_request_duration_seconds_count") == sent_tcp + sent_policy
    assert total(found, "pfrest_connections_accepted_total") == CONNECTIONS + POLICY_CONNECTIONS
    # every request the backend got was an exchange; every found answer stayed in a worker's cache
    assert total(found, "pfrest_backend_exchanges_total", outcome="ok") == len(service.backend.requests)
    assert total(found, "pfrest_backend_exchange_duration_seconds_count") == total(
        found, "pfrest_backend_exchanges_total")
    assert total(found, "pfrest_cache_hits_total") == CONNECTIONS * UNIQUE / 2
    assert total(found, "pfrest_cache_misses_total") == CONNECTIONS * UNIQUE
    assert total(found, "pfrest_cache_entries") == CONNECTIONS * UNIQUE / 2
    assert total(found, "pfrest_backend_errors_total") == 0
    assert total(found, "pfrest_worker_open_connections") == total(found, "pfrest_open_connections") == 0
    assert total(found, "pfrest_build_info") == 1


def test_promtool_accepts_the_metrics(service):
    promtool = need_binary("promtool")
    checked = subprocess.run([promtool, "check", "metrics"], input=service.scrape(), capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0 and not checked.stdout + checked.stderr, checked.stdout + checked.stderr


def test_pfrest_stats_prints_the_same_figures(service, tmp_path):
    before = total(samples(service.scrape()), "pfrest_requests_total")
    with connect(("127.0.0.1", service.t_port)) as t, connect(("127.0.0.1", service.p_port)) as p:
        tcp_get(t, b"f-stats"), tcp_get(t, b"n-stats"), tcp_get(t, b"f-stats")
        ask(p, POLICY_REQUEST % b"ok-stats@x", b"\n\n"), ask(p, POLICY_REQUEST % b"bad-stats@x", b"\n\n")
    found = until(lambda: (lambda f: f if total(f, "pfrest_requests_total") == before + 5 else None)(
        samples(service.scrape())))
    proc = run_pfrest("stats", "-c", service.config)
    assert proc.returncode == 0, proc.stderr

    def count(name, **labels):
        return int(total(found, name, **labels))
    for name, mode, replies in (("t", "tcp-lookup", ("found", "notfound")), ("p", "policy", ("dunno", "reject"))):
        listed = ", ".join(f"{reply} {count('pfrest_requests_total', endpoint=name, reply=reply)}" for reply in replies)
        row = (rf"{name}\s+{mode}\s+0\s+{count('pfrest_connections_accepted_total', endpoint=name)}\s+-\s+"
               rf"{count('pfrest_requests_total', endpoint=name)}\s+{listed}\s+[\d.]+\s+[\d.]+")
        assert re.search(rf"^{row}$", proc.stdout, re.M), (row, proc.stdout)
    cache = [count(f"pfrest_cache_{event}_total", endpoint="t") for event in ("hits", "misses")]
    row = (rf"t\s+ok {count('pfrest_backend_exchanges_total', endpoint='t')}\s+-\s+[\d.]+\s+[\d.]+\s+"
           rf"{cache[0]}\s+{cache[1]}\s+0\s+0\s+{count('pfrest_cache_entries', endpoint='t')}\s+0")
    assert re.search(rf"^{row}$", proc.stdout, re.M), (row, proc.stdout)
    assert re.search(r"/metrics: 2 workers \(connections 0,0; 0 replaced\), reloads 0 ok, 0 failed$", proc.stdout,
                     re.M), proc.stdout
    # no metrics-address, or nothing answering there: a clear word and EX_UNAVAILABLE
    raw = json.loads(open(service.config).read())
    for name, top, expected in (("none.json", {}, "sets no metrics-address"),
                                ("gone.json", {"metrics-address": f"127.0.0.1:{free_port()}"}, "no figures from")):
        path = tmp_path / name
        path.write_text(json.dumps({**top, "endpoints": raw["endpoints"]}))
        proc = run_pfrest("stats", "-c", str(path))
        assert proc.returncode == 69 and expected in proc.stderr, proc.stderr


def dashboard_shared_cache_metrics():
    """The shared cache's metrics the dashboard queries."""
    with open(DASHBOARD) as f:
        return set(re.findall(r"\bpfrest_shared_cache_\w+", f.read()))


def exposed_names(text):
    return set(re.findall(r"^(?:# (?:HELP|TYPE) )?(pfrest_\w+)", text, re.M))


def test_the_dashboard_queries_only_metrics_pfrest_exposes(service):
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    used = {name for query in queries for name in re.findall(r"\bpfrest_\w+", query)}
    used -= dashboard_shared_cache_metrics()   # exposed with a cache-url only: tests/test_fleet.py
    assert len(used) >= 12 and used <= exposed_names(service.scrape()), used - exposed_names(service.scrape())
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for subject in ("reply class", "backend latency", "errors by kind", "cache hit ratio", "connections"):
        assert subject in titles


def test_the_documented_scrape_config_and_alerts_pass_promtool(service, tmp_path):
    promtool = need_binary("promtool")
    with open(os.path.join(ROOT, "docs", "monitoring.md")) as f:
        monitoring = f.read()
    scrape, rules = re.findall(r"```yaml\n(.*?)```", monitoring, re.S)
    for kind, text in (("config", scrape), ("rules", rules)):
        path = tmp_path / f"{kind}.yml"
        path.write_text(text)
        checked = subprocess.run([promtool, "check", kind, str(path)], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    used = set(re.findall(r"\bpfrest_\w+", rules))
    assert len(used) >= 4 and used <= exposed_names(service.scrape()), used


def test_counters_outlive_workers_and_readyz_follows_the_backend(service):
    found = samples(service.scrape())
    requests = total(found, "pfrest_requests_total")
    worker = int(open(f"/proc/{service.proc.proc.pid}/task/{service.proc.proc.pid}/children").read().split()[0])
    os.kill(worker, signal.SIGKILL)
    found = until(lambda: (lambda f: f if total(f, "pfrest_worker_restarts_total") == 1 and len(
        [k for k in f if k[0] == "pfrest_worker_open_connections"]) == 2 else None)(samples(service.scrape())))
    assert total(found, "pfrest_requests_total") == requests   # the dead worker's counts stay

    service.backend_down()
    with connect(("127.0.0.1", service.t_port)) as sock:
        assert tcp_get(sock, b"fresh-key").startswith(b"400 ")
    with connect(("127.0.0.1", service.p_port)) as sock:
        assert ask(sock, POLICY_REQUEST % b"x@y", b"\n\n").startswith(b"action=DEFER_IF_PERMIT")

    def readiness(status, head):
        got = get(service.metrics_port, "/readyz")
        return got if got[0] == status and got[1].startswith(head + "\n") else None
    status, body = until(lambda: readiness(503, "not ready: t, p"), what="/readyz never named t and p")
    assert re.search(r"^t: NOT READY: a probe failed: refused", body, re.M), body
    assert "p: NOT READY: the last policy request" in body

    service.backend_up()
    status, body = get(service.metrics_port, "/readyz")
    assert status == 503 and body.startswith("not ready: p\n") and "t: ready: answered a probe" in body, body
    with connect(("127.0.0.1", service.p_port)) as sock:
        assert ask(sock, POLICY_REQUEST % b"x@y", b"\n\n") == b"action=DUNNO\n\n"
    until(lambda: readiness(200, "ready"), what="/readyz never said 200 again")

    # requests answered just before the stop, before any periodic report: the exit report counts them
    with connect(("127.0.0.1", service.t_port)) as sock:
        for key in (b"n-last-1", b"n-last-2"):
            tcp_get(sock, key)
    service.proc.send(signal.SIGTERM)
    assert service.proc.exit_status() == 0
    assert re.search(rf"stats endpoint=t .* requests={int(total(found, 'pfrest_requests_total', endpoint='t')) + 3} ",
                     service.proc.log), service.proc.log


# --- one process, in-process ----------------------------------------------------------------------

def test_single_process_readyz_and_allow_from(backend, tmp_path):
    backend.answers["k"] = (200, ["v"])
    port = free_port()
    cfg = ephemeral([{"name": "t", "mode": "tcp-lookup", "target": backend.url + "/t", "bind-port": 1,
                      "request-timeout": 1000}],
                    **{"metrics-address": f"127.0.0.1:{port}", "metrics-allow-from": ["127.0.0.1/32"],
                       "log-requests": "none"})
    server = ServerThread(cfg)
    try:
        with connect(server.addresses["t"]) as sock:
            assert tcp_get(sock, b"k") == b"200 v\n"
        status, body = get(port, "/readyz")
        assert status == 200 and "t: ready: the backend answered" in body, body
        assert total(samples(get(port)[1]), "pfrest_requests_total", reply="found") == 1  # log-requests none
        with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0), timeout=5) as other:
            try:  # closed at once: nothing comes back (or a reset, the request being unread)
                other.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                assert other.recv(100) == b""
            except (ConnectionResetError, BrokenPipeError):
                pass
        backend_down(backend)
        with connect(server.addresses["t"]) as sock:
            assert tcp_get(sock, b"k2").startswith(b"400 ")
        status, body = get(port, "/readyz")
        assert status == 503 and body.startswith("not ready: t\n"), body
    finally:
        server.stop(drain_timeout=1)


def test_a_metrics_address_beyond_loopback_needs_allow_from():
    def warnings(**top):
        return [w for w in config.warnings(config.parse({**top, "endpoints": [
            {"name": "t", "mode": "tcp-lookup", "target": "http://h/"}]})) if "metrics" in w]
    assert "without metrics-allow-from" in warnings(**{"metrics-address": "0.0.0.0:9100"})[0]
    assert not warnings(**{"metrics-address": "0.0.0.0:9100", "metrics-allow-from": ["10.0.0.0/8"]})
    assert not warnings(**{"metrics-address": "127.0.0.1:9100"}) and not warnings()


def test_the_metrics_address_reads_little_and_waits_for_nobody(backend, monkeypatch):
    monkeypatch.setattr(httpd, "READ_TIMEOUT", 0.5)
    port = free_port()
    server = ServerThread(ephemeral([{"name": "t", "mode": "tcp-lookup", "target": backend.url, "bind-port": 1}],
                                    **{"metrics-address": f"127.0.0.1:{port}"}))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:   # says nothing, stays
            assert get(port, "/healthz") == (200, "ok\n")
            for request, status in ((b"GET /metrics HTTP/1.1\r\nX: " + b"x" * 9000, b"431"),
                                    (b"nonsense\r\n\r\n", b"400")):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(request)
                    reply = b""
                    while not reply.endswith(b"\n") or b"\r\n\r\n" not in reply:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        reply += chunk
                    assert reply.startswith(b"HTTP/1.1 " + status), reply
            assert get(port, "/healthz?x=1")[0] == 200
            started = time.monotonic()
            assert silent.recv(10) == b""   # closed after READ_TIMEOUT
            assert time.monotonic() - started < 2
    finally:
        server.stop(drain_timeout=1)


def test_readiness_checks_at_once_share_one_probe(monkeypatch):
    class Source:   # one lookup endpoint the counters say nothing of: each /readyz needs a probe
        def __init__(self):
            self.probes = []

        def figures(self):
            return Figures({"t": Stats()}, {"t": 0}, {})

        def probe(self, names, done):
            self.probes.append((names, done))

    source, answers = Source(), []
    cfg = config.parse({"metrics-address": "127.0.0.1:9100", "endpoints": [
        {"name": "t", "mode": "tcp-lookup", "target": "http://h/"}]})
    ready = monitor.Monitor(cfg, source)
    for _ in range(monitor.MAX_WAITING + 1):
        ready("GET", "/readyz", b"", lambda status, body: answers.append((status, body)))
    assert len(source.probes) == 1 and answers == [(503, b"too many readiness checks at once\n")]
    source.probes[0][1]({"t": None})
    assert answers[1:] == [(200, b"ready\nt: ready: answered a probe\n")] * monitor.MAX_WAITING
    ready("GET", "/readyz", b"", lambda status, body: answers.append((status, body)))
    assert len(source.probes) == 2   # the next one probes again
    monkeypatch.setattr(monitor, "PROBE_LOST", 0.0)   # that probe never ends: the next /readyz goes on
    ready("GET", "/readyz", b"", lambda status, body: answers.append((status, body)))
    assert len(source.probes) == 3
