"""The backend client's extra headers, basic auth, client certificates, target lists with failover,
and stale answers from the cache, against real servers on loopback, on plain asyncio and on uvloop.

Servers are rogue.Scripted raw sockets in threads, each stopped by the test; failover scenarios
record at the servers what reached them, so that "counted once" is counted where it matters.
"""

import asyncio
import base64
import logging
import ssl
import subprocess
import time
from collections import Counter
from types import SimpleNamespace

import pytest

import rogue
from pfrest import config
from pfrest.backend import Client, Observer, client as client_module
from pfrest.cache import CachingClient, for_endpoint
from pfrest.conversation import requestlog
from pfrest.protocol import verdict
from pfrest.protocol.verdict import Failure, HttpResult
from rogue import CLOSE, Scripted, response
from test_backend_client import TOKEN, ask, found, policy, run, serve, value  # noqa: F401 (fixtures)

BACKOFF = 0.4   # BACKOFF_FIRST in these tests (5 s in production)


# --- helpers --------------------------------------------------------------------------------------

def endpoint(*urls, timeout_ms=2000, mode="tcp-lookup", **extra):
    targets = tuple(url + "/api" for url in urls)
    return config.Endpoint(name="t", mode=mode, target=targets[0], targets=targets,
                           request_timeout=timeout_ms, auth_token=TOKEN, **extra)


class Recorder(Observer):
    """Every observer call, in order."""

    def __init__(self):
        self.exchanges, self.events = [], []

    def exchange(self, target, outcome, seconds):
        assert 0 <= seconds < 5
        self.exchanges.append((target, outcome))

    def cache(self, event):
        self.events.append(event)


class Tally:
    """Answers for named servers and counts at them what they were asked, across restarts."""

    def __init__(self):
        self.seen = []          # (time, server name, key)
        self.counts = Counter()  # key -> times any server read it

    def answering(self, name, special=None):
        def answer(request):
            self.seen.append((time.monotonic(), name, request.key))
            self.counts[request.key] += 1
            steps = (special or {}).get(request.key.split("-")[0])
            return steps if steps is not None else found(f"{name}:{request.key}")
        return answer

    def times(self, name):
        return [t for t, n, _ in self.seen if n == name]


class Lines(logging.Handler):
    """The WARNING lines of pfrest's logger while in its ``with``."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("pfrest").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("pfrest").removeHandler(self)


@pytest.fixture
def backoff(monkeypatch):
    monkeypatch.setattr(client_module, "BACKOFF_FIRST", BACKOFF)
    monkeypatch.setattr(client_module, "BACKOFF_MAX", 4 * BACKOFF)


# --- headers and basic auth -----------------------------------------------------------------------

HEADERS = (("X-Tenant", "blue-SECRET-1"), ("X-Api-Key", "SECRET-2"))
BASIC = "user:pä:ss-SECRET-3"   # a colon in the password, a non-ASCII letter: UTF-8 (RFC 7617)
EXPECTED_BASIC = "Basic " + base64.b64encode(BASIC.encode("utf-8")).decode()


def authorizing(request):
    """401 unless the request carries the basic auth and both headers."""
    lines = request.head.decode("latin-1").split("\r\n")
    if f"Authorization: {EXPECTED_BASIC}" in lines and all(f"{n}: {v}" in lines for n, v in HEADERS):
        return found(request.key)
    return response(401, b"", {"WWW-Authenticate": "Basic"})


def test_basic_auth_and_headers_go_with_every_request(run, serve):
    server = serve(authorizing)

    async def scenario():
        with_auth = Client(endpoint(server.url, headers=HEADERS, basic_auth=BASIC), "UA")
        without = Client(endpoint(server.url), "UA")
        policy_client = Client(endpoint(server.url, mode="policy", method="POST", headers=HEADERS,
                                        basic_auth=BASIC), "UA")
        return [await ask(with_auth, "a"), await ask(with_auth, "b"), await ask(without, "c"),
                await policy(policy_client, "d")]
    a, b, c, d = run(scenario())
    assert value(a) == "a" and value(b) == "b" and c.status == 401 and d.status == 200
    head = server.requests[0].head
    assert head.endswith(b"X-Request-Id: " + head.split(b"X-Request-Id: ")[1][:16]
                         + f"\r\nAuthorization: {EXPECTED_BASIC}\r\nX-Tenant: blue-SECRET-1"
                           "\r\nX-Api-Key: SECRET-2".encode())
    assert server.requests[3].head.endswith(b"X-Api-Key: SECRET-2\r\nContent-Type: "
                                            b"application/x-www-form-urlencoded\r\nContent-Length: 39")


def test_a_proxy_sees_neither_headers_nor_basic_auth_of_an_https_target(run, serve, pki):
    proxy = rogue.Proxy()
    server = serve(authorizing, tls=server_context(pki))
    try:
        async def scenario():
            client = Client(endpoint(server.url, proxy=proxy.url, ca_file=pki["ca"], headers=HEADERS,
                                     basic_auth=BASIC), "UA")
            return [value(await ask(client, k)) for k in ("a", "b")]
        assert run(scenario()) == ["a", "b"]
    finally:
        proxy.stop()
    assert proxy.heads[0].startswith(b"CONNECT ")
    assert b"SECRET" not in proxy.seen and b"Authorization" not in proxy.seen
    assert EXPECTED_BASIC.split()[1].encode() not in proxy.seen


def test_failure_details_never_show_header_values(run):
    async def scenario():
        client = Client(endpoint("http://127.0.0.1:1", headers=HEADERS, basic_auth=BASIC), "UA")
        return await ask(client, "k")
    result = run(scenario())
    assert result.kind == "refused" and "SECRET" not in result.detail


def test_basic_auth_next_to_an_authorization_header_is_a_config_error():
    raw = {"endpoints": [{"name": "e", "mode": "tcp-lookup", "target": "http://h/x", "basic-auth": "u:p",
                          "headers": {"authorization": "Bearer t"}}]}
    with pytest.raises(config.ConfigError) as err:
        config.parse(raw)
    assert err.value.problems == ["endpoints[0] (e).basic-auth: conflicts with headers' Authorization"]
    del raw["endpoints"][0]["headers"]["authorization"]
    assert config.parse(raw).endpoints[0].basic_auth == "u:p"


# --- client certificates --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA; a
    second, self-signed server certificate nobody trusts; an encrypted copy of the client key."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=pfrest test CA", "-addext",
            "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            "-keyout", "ca.key", "-out", "ca.pem")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        openssl("req", *ec, "-subj", f"/CN={who}", "-keyout", f"{who}.key", "-out", f"{who}.csr")
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{who}.ext", "-out", f"{who}.pem")
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
            "subjectAltName=IP:127.0.0.1", "-keyout", "stranger.key", "-out", "stranger.pem")
    openssl("pkey", "-in", "client.key", "-aes256", "-passout", "pass:pw", "-out", "encrypted.key")
    files = {}
    for name in ("ca", "server", "client", "stranger"):
        files[name], files[f"{name}_key"] = str(d / f"{name}.pem"), str(d / f"{name}.key")
    files["encrypted_key"] = str(d / "encrypted.key")
    return files


def server_context(pki, require_client=False, tls12=False, stranger=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    name = "stranger" if stranger else "server"
    ctx.load_cert_chain(pki[name], pki[f"{name}_key"])
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca"])
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@pytest.mark.parametrize("tls12", [True, False], ids=["tls1.2", "tls1.3"])
def test_a_backend_that_requires_a_client_certificate(run, serve, pki, tls12):
    server = serve(tls=server_context(pki, require_client=True, tls12=tls12))

    def client(**files):
        return Client(endpoint(server.url, ca_file=pki["ca"], **files), "UA")

    async def scenario():
        return {
            "none": await ask(client(), "none"),
            "cert": await ask(client(client_cert=pki["client"], client_key=pki["client_key"]), "cert"),
            "missing key": await ask(client(client_cert=pki["client"], client_key=pki["ca"] + ".nope"),
                                     "k"),
            "no key": await ask(client(client_cert=pki["client"]), "k"),
            "encrypted": await ask(client(client_cert=pki["client"], client_key=pki["encrypted_key"]),
                                   "k"),
        }
    results = run(scenario())
    assert value(results["cert"]) == "cert"
    # TLS 1.3 checks the client's certificate after the client's handshake is done: the server's
    # alert then races its reset, and a reset may be all that arrives
    assert results["none"].kind in (("tls",) if tls12 else ("tls", "reset"))
    missing, no_key, encrypted = results["missing key"], results["no key"], results["encrypted"]
    assert missing.kind == "tls"
    assert f"cannot read client-key {pki['ca']}.nope: no such file" in missing.detail
    assert no_key.kind == "tls" and pki["client"] in no_key.detail and "not a usable" in no_key.detail
    assert encrypted.kind == "tls" and "encrypted" in encrypted.detail
    assert "BEGIN" not in missing.detail + no_key.detail + encrypted.detail   # names, never contents
    assert server.keys() == ["cert"]   # the server read nothing else: no certificate, no request


def test_a_fixed_client_certificate_is_used_from_the_next_connection(run, serve, pki, tmp_path):
    """An unreadable file is a failure of each request, not of the client: once it is there, it works."""
    server = serve(tls=server_context(pki, require_client=True, tls12=True))
    key = tmp_path / "client.key"

    async def scenario():
        client = Client(endpoint(server.url, ca_file=pki["ca"], client_cert=pki["client"],
                                 client_key=str(key)), "UA")
        before = await ask(client, "before")
        key.write_bytes(open(pki["client_key"], "rb").read())
        return before, await ask(client, "after")
    before, after = run(scenario())
    assert before.kind == "tls" and str(key) in before.detail and value(after) == "after"


# --- failover: lookups ----------------------------------------------------------------------------

def test_lookups_under_load_fail_over_and_come_back(run, backoff):
    """Two targets, 16 callers asking all the time; the first target stops and is started again at
    once: every lookup is answered, by the second while the first is in back-off, and by the first
    again once a retry after the back-off found it up."""
    tally = Tally()
    first, second = Scripted(tally.answering("A"), restartable=True), Scripted(tally.answering("B"))
    servers = [first, second]

    async def scenario():
        client = Client(endpoint(first.url, second.url), "UA")
        answers, running = [], True

        async def caller(n):
            i = 0
            while running:
                key = f"c{n}-{i}"
                answers.append((key, await ask(client, key)))
                i += 1
                await asyncio.sleep(0.002)
        callers = [asyncio.ensure_future(caller(n)) for n in range(16)]
        await asyncio.sleep(0.2)
        stopped = time.monotonic()
        first.stop()
        await asyncio.sleep(0.05)
        servers.append(rogue.restarted(first, tally.answering("A2")))
        await asyncio.sleep(BACKOFF + 0.5)
        running = False
        await asyncio.gather(*callers)
        client.close()
        return answers, stopped
    try:
        answers, stopped = run(scenario())
    finally:
        for server in servers:
            server.stop()
    assert [value(result).split(":")[1] for _, result in answers] == [key for key, _ in answers]
    assert min(tally.times("B")) >= stopped and tally.times("A")   # B only once A had stopped
    back = min(tally.times("A2"))
    assert back - stopped >= BACKOFF - 0.05                        # skipped during the back-off
    assert max(tally.times("B")) < back + 0.2                      # then A again, B no more
    assert len(tally.times("A2")) > 50


def test_the_back_off_doubles_while_retries_fail_and_a_success_ends_it():
    """The schedule (production's constants), on a target's own clock: down 5 s, retried by one
    request at a time, then 10, 20, 40, 60 (the most) s while retries fail; failures of requests
    already under way while it is down change nothing; a success makes it up."""
    target = client_module._Target("http://h/x", endpoint("http://h"), "UA")
    first, most = client_module.BACKOFF_FIRST, client_module.BACKOFF_MAX
    now, downs = 100.0, []
    assert target.usable(now)
    target.failed(now)
    target.failed(now + 0.1)   # another request's failure, in the back-off: no change
    for _ in range(6):
        downs.append(round(target.down_until - now, 6))
        assert not target.usable(target.down_until - 0.01)
        now = target.down_until + 0.01
        assert target.usable(now) and not target.usable(now)   # one retry at a time
        target.failed(now)
    assert downs == [5, 10, 20, 40, 60, 60] and (first, most) == (5, 60)
    now = target.down_until + 0.01
    assert target.usable(now)
    target.succeeded()
    assert target.usable(now) and target.usable(now) and target.down_until == 0.0
    target.failed(now)
    assert target.down_until == now + first   # the back-off starts over


def test_a_target_down_for_good_is_retried_one_request_at_a_time_and_used_once_up(run, monkeypatch):
    """Four callers all the time; the first target closes every connection without an answer, then
    answers: it is retried by one request at a time, never before its back-off ran out, less often
    each time, and used again by all once up."""
    unit = 0.1
    monkeypatch.setattr(client_module, "BACKOFF_FIRST", unit)
    monkeypatch.setattr(client_module, "BACKOFF_MAX", 4 * unit)
    tally, tries, up = Tally(), [], []

    def flaky(request):
        if up:
            return tally.answering("A")(request)
        tries.append(time.monotonic())
        return [CLOSE]
    first, second = Scripted(flaky), Scripted(tally.answering("B"))
    warnings = Lines()

    async def scenario():
        client = Client(endpoint(first.url, second.url), "UA")
        answers = []

        async def caller(n, until):
            while time.monotonic() < until:
                answers.append(value(await ask(client, f"c{n}")))
                await asyncio.sleep(0.003)
        start = time.monotonic()   # tries at 0, then 1, 3, 7, 11 units
        answers.append(value(await ask(client, "first")))   # alone: it finds the target down
        await asyncio.gather(*(caller(n, start + 13 * unit) for n in range(4)))
        up.append(True)
        await asyncio.gather(*(caller(n, start + 19 * unit) for n in range(4)))
        return answers
    try:
        with warnings:
            answers = run(scenario())
    finally:
        first.stop()
        second.stop()
    # one line when it went down and one when it came back, not one per failed request or retry
    where = first.url.split("//")[1]
    assert [line for line in warnings.lines if where in line] == [
        f"endpoint=t backend {where} is down (reset: connection closed without an answer); "
        f"retried in {unit:g} s; the other targets are asked meanwhile",
        f"endpoint=t backend {where} is up again"], warnings.lines
    assert all(a.startswith(("A:", "B:")) for a in answers)
    gaps = [(b - a) / unit for a, b in zip(tries, tries[1:])]
    assert len(gaps) >= 3 and all(g >= e - 0.02 for g, e in zip(gaps, [1, 2, 4, 4])), gaps   # one each
    assert len(tally.times("A")) > 20 and set(answers[-4:]) == {"A:c0", "A:c1", "A:c2", "A:c3"}


def test_a_lookup_moves_on_from_a_target_that_hangs_or_drops_syns(run, serve, backoff):
    """A target that accepts and never answers, and one whose backlog is full: with another target
    left, each gets half the time left, then the next one answers, within the one request-timeout."""
    hung = serve(lambda r: [5])
    black_hole = serve(backlog=0)
    second = serve()

    async def scenario():
        black_hole.pause()
        filler = rogue.fill_backlog(black_hole.address)
        try:
            results = []
            for first in (hung, black_hole):
                client = Client(endpoint(first.url, second.url, timeout_ms=500), "UA")
                start = time.monotonic()
                results.append((await ask(client, "k"), time.monotonic() - start))
            return results
        finally:
            black_hole.resume()
            for sock in filler:
                sock.close()
    for result, seconds in run(scenario()):
        assert value(result) == "k" and 0.22 < seconds < 0.5   # half the 500 ms, then the next
    assert hung.keys() == ["k"] and second.keys() == ["k", "k"]


def test_every_target_down_is_still_tried(run, backoff):
    """Both targets fail and are in back-off; the second comes back: the next lookup finds it."""
    tally = Tally()
    first, second = Scripted(tally.answering("A")), Scripted(tally.answering("B"), restartable=True)
    first.stop()
    second.stop()
    servers = [first, second]

    async def scenario():
        client = Client(endpoint(first.url, second.url), "UA")
        down = await ask(client, "down")
        servers.append(rogue.restarted(second))
        return down, await ask(client, "again")
    try:
        down, again = run(scenario())
    finally:
        for server in servers:
            server.stop()
    assert down.kind == "refused" and str(second.port) in down.detail and value(again) == "B:again"


# --- failover: policy requests are counted once ---------------------------------------------------

def test_a_policy_request_moves_on_only_when_it_was_never_sent(run, serve, pki, backoff):
    """Refused, full backlog and failed TLS handshake: never sent, so the next target gets it.
    Read and then closed without an answer, or never answered: sent, so that outcome is final."""
    tally = Tally()
    special = {"close": [CLOSE], "hang": [5]}
    refusing = Scripted(tally.answering("refusing"))
    refusing.stop()
    black_hole = serve(tally.answering("black-hole"), backlog=0)
    stranger = serve(tally.answering("stranger"), tls=server_context(pki, stranger=True))
    closing = serve(tally.answering("closing", special))
    second = serve(tally.answering("B"))
    https_second = serve(tally.answering("B"), tls=server_context(pki))

    async def scenario():
        black_hole.pause()
        filler = rogue.fill_backlog(black_hole.address)
        try:
            results = {}
            for name, first, other, key in (("refused", refusing, second, "p1"),
                                            ("backlog", black_hole, second, "p2"),
                                            ("tls", stranger, https_second, "p3"),
                                            ("close", closing, second, "close-4"),
                                            ("hang", closing, second, "hang-5")):
                client = Client(endpoint(first.url, other.url, timeout_ms=400, mode="policy",
                                         ca_file=pki["ca"]), "UA")
                results[name] = await policy(client, key)
            return results
        finally:
            black_hole.resume()
            for sock in filler:
                sock.close()
    results = run(scenario())
    assert {name: value_or_kind(r) for name, r in results.items()} == {
        "refused": 200, "backlog": 200, "tls": 200, "close": "reset", "hang": "timeout"}
    assert tally.counts == {"p1": 1, "p2": 1, "p3": 1, "close-4": 1, "hang-5": 1}
    assert [n for _, n, k in tally.seen if k.startswith("p")] == ["B", "B", "B"]


def value_or_kind(result):
    return result.status if isinstance(result, HttpResult) else result.kind


def test_policy_requests_under_load_are_counted_once(run, backoff):
    """16 callers send policy requests, each a new recipient; the first target stops (in the middle
    of answering some), is started again; some requests it reads and then drops.  Whatever happened,
    the backends saw each request at most once, and each that was answered exactly once."""
    tally = Tally()
    special = {"drop": [CLOSE]}
    first = Scripted(tally.answering("A", special), restartable=True)
    second = Scripted(tally.answering("B", special))
    servers = [first, second]

    async def scenario():
        client = Client(endpoint(first.url, second.url, mode="policy", method="POST"), "UA")
        results, running = {}, True

        async def caller(n):
            i = 0
            while running:
                key = f"{'drop' if i % 25 == 7 else 'p'}-{n}-{i}"
                results[key] = await policy(client, key)
                i += 1
                await asyncio.sleep(0.002)
        callers = [asyncio.ensure_future(caller(n)) for n in range(16)]
        await asyncio.sleep(0.2)
        first.stop()
        await asyncio.sleep(0.05)
        servers.append(rogue.restarted(first, tally.answering("A2", special)))
        await asyncio.sleep(BACKOFF + 0.3)
        running = False
        await asyncio.gather(*callers)
        return results
    try:
        results = run(scenario())
    finally:
        for server in servers:
            server.stop()
    assert max(tally.counts.values()) == 1 and set(tally.counts) <= set(results)
    answered = {k for k, r in results.items() if isinstance(r, HttpResult)}
    assert all(tally.counts[k] == 1 for k in answered) and len(answered) > 100, len(answered)
    failures = Counter(r.kind for r in results.values() if isinstance(r, Failure))
    assert set(failures) <= {"reset", "timeout"}, failures   # sent, then cut: never "refused"
    assert not any(k.startswith("drop") for k in answered)   # read, closed: final, never sent again
    assert {n for _, n, _ in tally.seen} == {"A", "B", "A2"}


# --- the observer ---------------------------------------------------------------------------------

def test_the_observer_hears_one_exchange_per_attempt(run, serve, backoff):
    first = serve(lambda r: response(503, b"") if r.key == "busy" else found(r.key))
    second = serve()
    closed = Scripted(found)
    closed.stop()
    recorder = Recorder()

    async def scenario():
        client = Client(endpoint(first.url, second.url), "UA", recorder)
        failing = Client(endpoint(closed.url, second.url), "UA", recorder)
        return [await ask(client, "a"), await ask(client, "busy"), await ask(failing, "b"),
                await ask(failing, "c")]
    a, busy, b, c = run(scenario())
    assert value(a) == "a" and busy.status == 503 and value(b) == "b" and value(c) == "c"
    urls = {first.url + "/api": "1", second.url + "/api": "2", closed.url + "/api": "closed"}
    assert [(urls[t], o) for t, o in recorder.exchanges] == [
        ("1", "ok"), ("1", "ok"),              # a 503 is an answer: no failover
        ("closed", "refused"), ("2", "ok"),    # then in back-off: skipped
        ("2", "ok")]


# --- stale answers --------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


STALE_HEADERS = {
    "plain": {},
    "short": {"Cache-Control": "max-age=60, stale-if-error=5"},   # shorter than the endpoint's 30
    "long": {"Cache-Control": "stale-if-error=100"},               # longer
    "nostore": {"Cache-Control": "no-store, stale-if-error=100"},
    "nocache": {"Cache-Control": "no-cache, stale-if-error=100"},
}


def stale_backend(serve, state):
    def answer(request):
        if state["mode"] == "503":
            return response(503, b"busy")
        if state["mode"] == "403":
            return response(403, b"")
        if state["mode"] == "reset":
            return [CLOSE]
        if request.key == "missing":
            return response(404, b"")
        return found(f"{request.key}-{state['version']}", **STALE_HEADERS[request.key])
    return serve(answer)


def test_stale_answers_while_the_backend_fails(run, serve):
    state = {"mode": "up", "version": 1}
    server = stale_backend(serve, state)
    recorder, clock = Recorder(), Clock()
    keys = ("plain", "short", "long", "nostore", "nocache", "missing")

    async def scenario():
        cache = CachingClient(Client(endpoint(server.url), "UA", recorder), 10, 10, 100, clock=clock,
                              stale_if_error=30, observer=recorder)

        async def round_(mode, advance=0):
            state["mode"], clock.now = mode, clock.now + advance
            return {k: await ask(cache, k) for k in keys}
        fresh = await round_("up")
        peeked = [cache.peek((("key", k.encode()),)) for k in keys]
        clock.now += 11   # every entry expired; in its stale window
        expired_peek = [cache.peek((("key", k.encode()),)) for k in keys]
        kept = len(cache)
        rounds = [await round_("503"), await round_("reset"), await round_("503", 5),
                  await round_("reset", 25)]
        return fresh, peeked, expired_peek, rounds, (kept, len(cache))
    fresh, peeked, expired_peek, rounds, sizes = run(scenario())
    assert [value(fresh[k]) for k in keys] == ["plain-1", "short-1", "long-1", "nostore-1", "nocache-1",
                                               "NOTFOUND"]
    assert [p is not None for p in peeked] == [True, True, True, False, False, True]
    assert expired_peek == [None] * 6   # peek: fresh entries only
    stale = [{k for k, r in got.items() if getattr(r, "stale", False)} for got in rounds]
    assert stale == [{"plain", "short", "long", "missing"},   # +11 s: within every window
                     {"plain", "short", "long", "missing"},   # the same for a Failure
                     {"plain", "long", "missing"},            # +16 s: past short's own 5 s
                     {"long"}]                                # +41 s: past the endpoint's 30 s
    for got, stale_keys in zip(rounds, stale):
        for k, r in got.items():
            if k in stale_keys:
                assert r.cached and value(r) == ("NOTFOUND" if k == "missing" else f"{k}-1")
            else:
                assert isinstance(r, Failure) or r.status == 503
    assert sizes == (4, 1)   # expired entries are kept while their stale window lasts, no longer
    assert recorder.events.count("stale") == 12 and recorder.events.count("hit") == 4   # the peeks
    assert recorder.events.count("miss") == 6 * 5 and "eviction" not in recorder.events
    assert Counter(o for _, o in recorder.exchanges) == {"ok": 18, "reset": 12}


def test_a_stale_answer_follows_the_backends_last_word(run, serve):
    """The endpoint allows no stale answers, the answer's stale-if-error does; a later answer that is
    not kept (a 4xx) removes the entry; a fresh answer replaces it; policy answers are never stale."""
    state = {"mode": "up", "version": 1}
    server = stale_backend(serve, state)
    clock = Clock()

    async def scenario():
        cache = CachingClient(Client(endpoint(server.url), "UA"), 10, 10, 100, clock=clock)
        policy_cache = CachingClient(Client(endpoint(server.url, mode="policy"), "UA"), 10, 10, 100,
                                     clock=clock, stale_if_error=30)
        out = [await ask(cache, "long"), await ask(cache, "plain"), await policy(policy_cache, "plain")]
        clock.now += 11
        state["mode"] = "503"
        out += [await ask(cache, "long"), await ask(cache, "plain"), await policy(policy_cache, "plain")]
        state["mode"], state["version"] = "up", 2
        out.append(await ask(cache, "long"))
        clock.now += 11
        state["mode"] = "503"
        out.append(await ask(cache, "long"))
        state["mode"] = "403"
        out.append(await ask(cache, "long"))
        state["mode"] = "503"
        out.append(await ask(cache, "long"))
        return out
    out = run(scenario())
    assert [value(out[0]), value(out[1]), out[2].status] == ["long-1", "plain-1", 200]
    assert out[3].stale and value(out[3]) == "long-1"   # the answer's stale-if-error=100
    assert [(r.status, r.stale) for r in out[4:6]] == [(503, False), (503, False)]   # none for plain
    assert value(out[6]) == "long-2" and not out[6].stale and out[7].stale and value(out[7]) == "long-2"
    assert out[8].status == 403 and out[9].status == 503 and not out[9].stale


def test_cache_events_and_evictions(run, serve):
    server = serve()
    recorder = Recorder()

    async def scenario():
        cache = CachingClient(Client(endpoint(server.url), "UA"), 60, 60, 2, observer=recorder)
        for key in ("a", "b", "a", "c", "b"):   # c evicts b (a was used more recently); b evicts a
            await ask(cache, key)
        shared = await asyncio.gather(*(ask(cache, "d") for _ in range(3)))
        return [value(r) for r in shared]
    assert run(scenario()) == ["d"] * 3
    assert recorder.events == ["miss", "miss", "hit", "miss", "eviction", "miss", "eviction",
                               "miss", "hit", "hit", "eviction"]


def test_for_endpoint_wires_the_observer_and_the_stale_window(run, serve):
    server = serve()
    recorder = Recorder()
    ep = endpoint(server.url, cache_ttl=60.0, cache_stale_if_error=30.0)

    async def scenario():
        cache = for_endpoint(ep, "UA", recorder)
        await ask(cache, "k"), await ask(cache, "k")
        cache.close()
        return cache
    cache = run(scenario())
    assert cache.stale_if_error == 30.0
    assert recorder.events == ["miss", "hit"] and recorder.exchanges == [(server.url + "/api", "ok")]


def test_the_request_log_line_tells_a_stale_answer():
    result = HttpResult(200, b'["v"]', cached=True, stale=True)
    answer = SimpleNamespace(verdict=verdict.lookup(result), action=None)
    line = requestlog.line("e", "0123456789abcdef", "key=k", result, answer, 1.0)
    assert line.endswith(" cache=stale")
    assert requestlog.line("e", "i", "key=k", result._replace(stale=False), answer, 1.0).endswith(
        " cache=hit")
    # served in place of the backend's failed answer: a WARNING line; a fresh hit is not
    assert requestlog.warns(result, answer) and not requestlog.warns(result._replace(stale=False), answer)


def test_the_verdicts_of_cached_answers_are_remembered_within_their_bounds():
    """Worked out once per cached answer, but never holding more than MAX_REMEMBERED_BYTES of bodies
    (an answer may be 1 MiB, and every endpoint's cache may hold thousands), nor MAX_REMEMBERED."""
    remembered = verdict._REMEMBERED
    small = HttpResult(200, b'["small"]', cached=True)
    assert verdict.lookup(small) is verdict.lookup(small)   # remembered: the same object
    big = [HttpResult(200, b'["%s"]' % (b"%d" % i * (100_000 // len(b"%d" % i))), cached=True)
           for i in range(1, 200)]
    for result in big:
        assert verdict.lookup(result).kind == verdict.FOUND
        assert remembered.size <= verdict.MAX_REMEMBERED_BYTES
        assert remembered.size == sum(2 * len(body) for _, body, _ in remembered.verdicts)
    assert len(remembered.verdicts) < len(big)
    for i in range(verdict.MAX_REMEMBERED + 5):
        verdict.lookup(HttpResult(200, b'["%d"]' % i, cached=True))
        assert len(remembered.verdicts) <= verdict.MAX_REMEMBERED
