"""The event-loop backend client (pfrest.backend) against real servers on loopback, on plain asyncio
and on uvloop: the behaviour table of the threaded client, 1xx interim responses, every deadline
stage, Happy Eyeballs, the pool's rules, cancellation, TLS, proxies and the cache.

Servers are raw sockets in threads (tests/rogue.py) unless a test needs its own loop; DNS and
/etc/hosts are replaced for real in a private mount namespace (root and unshare; never skipped in CI).
"""

import asyncio
import gzip
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import zlib

import pytest
import uvloop

import rogue
from conftest import IN_CI, ROOT, Backend
from pfrest import config
from pfrest.backend import MAX_BODY, Client, new_request_id, pool
from pfrest.cache import CachingClient, for_endpoint
from pfrest.backend.connection import Connection
from pfrest.backend.response import MAX_HEAD, ResponseReader
from pfrest.protocol import verdict
from pfrest.protocol.verdict import Failure, HttpResult
from rogue import CLOSE, Scripted, response
from test_faults_backend import BEHAVIOURS

TOKEN = "SECRET-TOKEN"
SHORT_MS = 300        # request-timeout where the timeout is the point
STALE_AFTER = 0.5     # when stalled servers finally answer: after SHORT_MS, to catch stale bytes


# --- fixtures and helpers ------------------------------------------------------------------------

@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """run(coroutine): its result, on a new event loop of each kind; the loop is closed afterwards."""
    loops = []

    def run(coro):
        loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
        loops.append(loop)
        return loop.run_until_complete(coro)
    yield run
    for loop in loops:
        _close_loop(loop)


def _close_loop(loop):
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


@pytest.fixture
def serve():
    """serve(answer, **kw) -> a rogue.Scripted server, stopped after the test."""
    started = []

    def start(answer=None, **kw):
        server = Scripted(answer or echo, **kw)
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


def endpoint(url, timeout_ms=3000, mode="tcp-lookup", **extra):
    return config.Endpoint(name="t", mode=mode, target=url + "/api", request_timeout=timeout_ms,
                           auth_token=TOKEN, **extra)


def found(key, **headers):
    return response(200, json.dumps([key]).encode(), dict({"Content-Type": "application/json"},
                                                          **headers))


def echo(request):
    """200 ["<key>"] for every request: an answer that tells whose it is."""
    return found(request.key)


async def ask(client, key):
    return await client.lookup((("key", key.encode()),), new_request_id())


async def policy(client, recipient):
    return await client.policy([(b"request", b"smtpd_access_policy"), (b"recipient",
                                                                        recipient.encode())],
                               new_request_id())


def value(result):
    """What Postfix would get: the found value, else the verdict kind."""
    v = verdict.lookup(result)
    return v.value.decode() if v.kind == verdict.FOUND else v.kind


def need_namespaces():
    """Private mount namespaces need root and unshare; in CI both must be there."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        return
    if IN_CI:
        pytest.fail("tests must run as root with unshare(1) in CI")
    pytest.skip("needs root and unshare(1)")


def run_isolated(tmp_path, script, args, hosts="127.0.0.1 localhost\n", resolv="", timeout=30):
    """Run ``script`` with a Python of this venv in a private mount namespace whose /etc/hosts and
    /etc/resolv.conf are the given texts; the JSON it prints last."""
    need_namespaces()
    (tmp_path / "hosts").write_text(hosts)
    (tmp_path / "resolv.conf").write_text(resolv)
    (tmp_path / "script.py").write_text(script)
    mounts = 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", mounts, "sh", str(tmp_path / "hosts"),
                           str(tmp_path / "resolv.conf"), sys.executable, str(tmp_path / "script.py"),
                           json.dumps(args)],
                          capture_output=True, timeout=timeout, cwd=ROOT, env=_clean_env())
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout.splitlines()[-1])


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and not k.startswith("SSL_")}
    env["PYTHONPATH"] = os.pathsep.join((ROOT, os.path.join(ROOT, "tests")))
    env.update(extra)
    return env


# What every subprocess scenario starts with: both loops, a client per endpoint, JSON out.
SCENARIO_PRELUDE = """
import asyncio, json, os, sys, time
import uvloop
from pfrest import config
from pfrest.backend import Client, new_request_id
from pfrest.protocol import verdict
ARGS = json.loads(sys.argv[1])

def endpoint(url, timeout_ms, **extra):
    return config.Endpoint(name="t", mode="tcp-lookup", target=url + "/api",
                           request_timeout=timeout_ms, **extra)

async def ask(client, key):
    result = await client.lookup((("key", key.encode()),), new_request_id())
    v = verdict.lookup(result)
    return v.value.decode() if v.kind == verdict.FOUND else getattr(result, "kind", v.kind)

def both_loops(scenario):
    out = {}
    for kind, new_loop in (("asyncio", asyncio.new_event_loop), ("uvloop", uvloop.new_event_loop)):
        loop = new_loop()
        out[kind] = loop.run_until_complete(scenario(kind))
    print(json.dumps(out), flush=True)
    os._exit(0)   # a resolver thread may still wait for its answer: nothing to wait for here
"""


# --- 1. the behaviour table of the threaded client --------------------------------------------------

FAILURE_KINDS = {
    "reset": "reset", "close-early": "reset", "no-answer-close": "reset", "garbage": "protocol",
    "status-99": "protocol", "silent": "timeout", "slow": "timeout", "drip": "timeout",
    "drip-headers": "timeout", "length-lie": "timeout", "gzip-bomb": "too-large",
    "bad-gzip": "protocol", "huge": "too-large", "huge-chunked": "too-large",
}


def test_the_rogue_behaviour_table(run):
    """Every row gives the kind the threaded client gave, except interim, which is now found."""
    server, elsewhere = rogue.Rogue(), rogue.Rogue("127.0.0.2")
    server.redirect_to = elsewhere.url + "/steal"

    async def scenario():
        client = Client(endpoint(server.url, timeout_ms=1000), "UA")
        results = await asyncio.gather(*(ask(client, key) for key in BEHAVIOURS))
        client.close()
        return dict(zip(BEHAVIOURS, results))
    try:
        results = run(scenario())
    finally:
        server.stop()
        elsewhere.stop()
    assert {k: verdict.lookup(r).kind for k, r in results.items()} == dict(BEHAVIOURS, interim="FOUND")
    assert {k: results[k].kind for k in FAILURE_KINDS} == FAILURE_KINDS
    assert elsewhere.heads == []   # redirects are not followed
    assert results["redirect"].location == elsewhere.url + "/steal"
    assert all(TOKEN not in r.detail for r in results.values() if isinstance(r, Failure))


# --- 2. interim responses --------------------------------------------------------------------------

@pytest.mark.parametrize("interim", [b"HTTP/1.1 102 Processing\r\n\r\n",
                                     b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"])
def test_an_interim_response_never_makes_one_request_read_anothers_answer(run, serve, interim):
    """The review's wrong answer: A's 1xx came in one write and its final answer in a later one; the
    threaded client took the 1xx as A's answer, pooled the connection, and B read A's answer."""
    def answer(request):
        return [interim, 0.1, found("A")] if request.key == "A" else found(request.key)
    server = serve(answer)

    async def scenario():
        client = Client(endpoint(server.url), "UA")
        sequential = [value(await ask(client, "A")), value(await ask(client, "B"))]
        late = asyncio.ensure_future(ask(client, "A"))   # B asked while A waits on its connection
        await asyncio.sleep(0.05)
        concurrent = [value(await ask(client, "B")), value(await late)]
        return sequential, concurrent, value(await ask(client, "C"))
    sequential, concurrent, after = run(scenario())
    assert sequential == ["A", "B"] and concurrent == ["B", "A"] and after == "C"
    assert server.keys(1)[:3] == ["A", "B", "A"] and server.keys(2) == ["B"]


INTERIMS = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")


def test_interim_responses_split_at_every_byte(run, serve):
    """Several 1xx in a row, then the answer, in two writes cut at each index; one connection."""
    def answer(request):
        whole = INTERIMS + found(request.key)
        cut = int(request.key.split("-")[1])
        return [whole[:cut], 0.002, whole[cut:]]
    server = serve(answer)
    cuts = range(1, len(INTERIMS + found("cut-000")))

    async def scenario():
        client = Client(endpoint(server.url), "UA")
        return [value(await ask(client, f"cut-{cut:03}")) for cut in cuts]
    assert run(scenario()) == [f"cut-{cut:03}" for cut in cuts]
    assert server.connections == 1


def test_101_is_a_protocol_failure_and_its_connection_is_not_reused(run, serve):
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    server = serve(lambda r: upgrade + found(r.key) if r.key == "up" else found(r.key))

    async def scenario():
        client = Client(endpoint(server.url), "UA")
        return [await ask(client, k) for k in ("a", "up", "b")]
    a, up, b = run(scenario())
    assert value(a) == "a" and up.kind == "protocol" and "101" in up.detail and value(b) == "b"
    assert server.keys(1) == ["a", "up"] and server.keys(2) == ["b"]


# --- 3. responses split anywhere --------------------------------------------------------------------

SPLIT_RESPONSES = {
    "plain": response(200, b'["plain"]', {"Content-Type": "application/json", "Cache-Control":
                                          "public, max-age=30", "X-Long": "y" * 40}),
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                b"3;name=value\r\n[\"c\r\n5\r\nhunke\r\n3;x\r\nd\"]\r\n0\r\nX-Sum: 1\r\n\r\n"),
    "gzip": response(200, gzip.compress(b'["gzip"]'), {"Content-Encoding": "gzip"}),
}
SPLIT_VALUES = {"plain": "plain", "chunked": "chunked", "gzip": "gzip"}


@pytest.mark.parametrize("name", SPLIT_RESPONSES)
def test_a_response_split_in_two_at_every_byte_reads_the_same(name):
    """Sans-I/O, so that every cut of every response is cheap to try."""
    whole = SPLIT_RESPONSES[name]
    for cut in range(1, len(whole)):
        reader = ResponseReader()
        reader.feed(whole[:cut])
        assert not reader.done
        reader.feed(whole[cut:])
        assert reader.done and reader.keep_alive and value(reader.result) == SPLIT_VALUES[name], cut


def test_an_answer_is_its_requests_by_its_echoed_x_request_id():
    """An echoed id must be the request's own (an interim response's is not looked at); without one
    the answer stands, unless it is required."""
    def read(headers, request_id=b"00ff", require=False, interim=b""):
        reader = ResponseReader(request_id, require)
        reader.feed(interim + response(200, b'["v"]', headers))
        return reader
    own = read({"X-Request-Id": "00ff"})
    assert value(own.result) == "v" and own.echoed and own.keep_alive
    assert value(read({"x-request-id": "00ff"}, interim=b"HTTP/1.1 100 Continue\r\nX-Request-Id: 1\r\n\r\n")
                 .result) == "v"
    for headers, require in (({"X-Request-Id": "0100"}, False), ({"X-Request-Id": "00FF"}, False),
                             ({}, True)):
        refused = read(headers, require=require)
        assert refused.result.kind == "stray" and not refused.keep_alive and not refused.echoed
    twice = ResponseReader(b"00ff")
    twice.feed(b"HTTP/1.1 200 OK\r\nX-Request-Id: 00ff\r\nX-Request-Id: 00ff\r\nContent-Length: 0\r\n\r\n")
    assert twice.result.kind == "stray"
    silent = read({})
    assert value(silent.result) == "v" and not silent.echoed and silent.keep_alive


def test_a_response_dripped_one_byte_per_write_reads_the_same(run, serve):
    """Through a socket: each byte in its own write (TCP_NODELAY), so every boundary occurs."""
    def answer(request):
        return [step for byte in SPLIT_RESPONSES[request.key] for step in (bytes([byte]), 0.0005)]
    server = serve(answer)

    async def scenario():
        client = Client(endpoint(server.url), "UA")
        return [(await ask(client, name)) for name in SPLIT_RESPONSES]
    results = run(scenario())
    assert [value(r) for r in results] == list(SPLIT_VALUES.values())
    assert results[0].max_age == 30
    assert server.connections == 1


# --- 4. a deadline at each stage, with another request completing meanwhile ---------------------------

def slow_or_echo(request):
    return [0.15, found(request.key)] if request.key.startswith("slow") else found(request.key)


async def stage_scenario(client, stall_key):
    """A warm connection; then a slow request on it while ``stall_key`` needs a new one and stalls at
    the stage under test; then requests answered right, after the stalled server spoke too late."""
    warm = value(await ask(client, "warm"))
    slow = asyncio.ensure_future(ask(client, "slow"))
    await asyncio.sleep(0)   # the slow request takes the warm connection
    start = time.monotonic()
    stalled = await ask(client, stall_key)
    elapsed = time.monotonic() - start
    during = value(await slow)
    await asyncio.sleep(STALE_AFTER + 0.1 - elapsed)
    after = [value(await ask(client, f"after-{i}")) for i in range(3)]
    return warm, stalled, elapsed, during, after


def check_stage(outcome):
    warm, stalled, elapsed, during, after = outcome
    assert warm == "warm" and during == "slow" and after == ["after-0", "after-1", "after-2"]
    assert stalled.kind == "timeout" and SHORT_MS / 1000 - 0.05 < elapsed < SHORT_MS / 1000 + 0.25


def test_deadline_while_connecting(run, serve):
    """Connect stage: the listener's backlog is full, so the SYN gets no answer."""
    server = serve(slow_or_echo, backlog=0)

    async def scenario():
        client = Client(endpoint(server.url, SHORT_MS), "UA")
        await ask(client, "prime")        # accepted before the backlog is filled
        server.pause()
        filler = rogue.fill_backlog(server.address)
        try:
            return await stage_scenario(client, "never-sent")
        finally:
            server.resume()
            await asyncio.sleep(0.05)
            for sock in filler:
                sock.close()
    outcome = run(scenario())
    check_stage(outcome)
    assert "never-sent" not in server.keys()   # nothing of it was ever written


def test_deadline_during_the_tls_handshake(run, serve, certificate):
    """TLS stage: a server that accepts and never says a word."""
    cert, key = certificate
    server = serve(slow_or_echo, tls=server_context(cert, key))

    async def scenario():
        client = Client(endpoint(server.url, SHORT_MS, ca_file=cert), "UA")
        await ask(client, "prime")
        server.mute = True
        try:
            return await stage_scenario(client, "handshake")
        finally:
            server.mute = False
    outcome = run(scenario())
    check_stage(outcome)
    assert "handshake" not in server.keys()


@pytest.mark.parametrize("stall", ["headers", "body"])
def test_deadline_waiting_for_headers_or_body(run, serve, stall):
    """Headers stage: the request is read and never answered; body stage: headers, then nothing.
    Both answer in full once the deadline has passed: those bytes must reach no one."""
    late = found("stale")
    partial = {"headers": [], "body": [late[:-3]]}[stall]

    def answer(request):
        if request.key == "stall":
            return partial + [STALE_AFTER, late]
        return slow_or_echo(request)
    server = serve(answer)

    async def scenario():
        client = Client(endpoint(server.url, SHORT_MS), "UA")
        await ask(client, "prime")
        return await stage_scenario(client, "stall")
    outcome = run(scenario())
    check_stage(outcome)
    assert server.keys(2) == ["stall"] and wait_for(lambda: 2 in server.ended)   # aborted with it


DNS_SCENARIO = SCENARIO_PRELUDE + """
async def scenario(kind):
    client = Client(endpoint(f"http://{kind}.backend.test:{ARGS['port']}", ARGS["timeout_ms"]), "UA")
    warm = await ask(client, "warm")                 # resolved while the name server still answers
    slow = asyncio.ensure_future(ask(client, "slow"))
    await asyncio.sleep(0)                           # on the warm connection
    start = time.monotonic()
    stalled = await ask(client, "never-sent")        # a new connection: DNS gets no answer
    elapsed = time.monotonic() - start
    during = await slow
    after = [await ask(client, f"after-{i}") for i in range(3)]
    return [warm, stalled, elapsed, during, after]

both_loops(scenario)
"""


def test_deadline_while_resolving(serve, tmp_path):
    """DNS stage, for real: a name server that answers each question once, then never again."""
    need_namespaces()
    server = serve(slow_or_echo)
    dns = rogue.Dns("127.0.0.153", {"asyncio.backend.test": "127.0.0.1",
                                   "uvloop.backend.test": "127.0.0.1"})
    try:
        out = run_isolated(tmp_path, DNS_SCENARIO, {"port": server.port, "timeout_ms": SHORT_MS},
                           resolv="nameserver 127.0.0.153\noptions timeout:1 attempts:1\n")
    finally:
        dns.stop()
    for kind, (warm, stalled, elapsed, during, after) in out.items():
        assert (warm, stalled, during, after) == ("warm", "timeout", "slow",
                                                  ["after-0", "after-1", "after-2"]), kind
        assert SHORT_MS / 1000 - 0.05 < elapsed < SHORT_MS / 1000 + 0.25, kind
    assert dns.ignored >= 2 and "never-sent" not in server.keys()


# --- 5. Happy Eyeballs ------------------------------------------------------------------------------

HAPPY_EYEBALLS_SCENARIO = SCENARIO_PRELUDE + """
import socket, rogue

def listeners():
    # the address getaddrinfo gives first gets a full backlog (SYNs dropped), the other one answers
    first, second = [i[4][0] for i in socket.getaddrinfo("he.test", 80, type=socket.SOCK_STREAM)]
    live = rogue.Scripted(lambda r: rogue.response(200, b'["live"]'), host=second)
    dead = socket.socket(socket.AF_INET6 if ":" in first else socket.AF_INET)
    dead.bind((first, live.port))
    dead.listen(0)
    return live, dead, rogue.fill_backlog(dead.getsockname()[:2]), first

live, dead, filler, first = listeners()

async def scenario(kind):
    times, answers = [], []
    for _ in range(3):
        client = Client(endpoint(f"http://he.test:{live.port}", ARGS["timeout_ms"]), "UA")
        start = time.monotonic()
        answers.append(await ask(client, "k"))
        times.append(time.monotonic() - start)
        client.close()
    return [answers, times, live.connections, first]

both_loops(scenario)
"""


def test_happy_eyeballs_gets_past_a_dead_address(tmp_path):
    """The name has a dead address (first) and a live one: answered in about ATTEMPT_DELAY."""
    out = run_isolated(tmp_path, HAPPY_EYEBALLS_SCENARIO, {"timeout_ms": 3000},
                       hosts="::1 he.test\n127.0.0.1 he.test\n127.0.0.1 localhost\n",
                       resolv="nameserver 127.0.0.1\n")
    for kind, (answers, times, connections, first) in out.items():
        assert answers == ["live"] * 3, kind
        assert all(0.2 < t < 1.0 for t in times), (kind, times, first)   # not the 3 s timeout
    assert out["uvloop"][2] == 6   # a new connection each time, on the live address


# --- 6. the pool's rules ----------------------------------------------------------------------------

POOL_ANSWERS = {
    "ok": lambda key: found(key),
    "missing": lambda key: response(404),
    "error": lambda key: response(500, b"oops"),
    "moved": lambda key: response(302, b"", {"Location": "/elsewhere"}),
    "close": lambda key: [found(key, Connection="close"), CLOSE],
    "extra": lambda key: found(key) + response(200, b'["unasked"]'),
    "eof-body": lambda key: [b"HTTP/1.1 200 OK\r\n\r\n" + json.dumps([key]).encode(), CLOSE],
    "too-big": lambda key: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            + rogue.chunked(b"x" * (MAX_BODY + 10), 65536)),
    "stall": lambda key: [STALE_AFTER, found(key)],
    "http10": lambda key: response(200, json.dumps([key]).encode()).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
}


def pool_answer(request):
    return POOL_ANSWERS.get(request.key, POOL_ANSWERS["ok"])(request.key)


@pytest.mark.parametrize("first, reused", [
    ("ok", True), ("missing", True), ("error", False), ("moved", False), ("close", False),
    ("extra", False), ("eof-body", False), ("too-big", False), ("stall", False), ("http10", False),
])
def test_a_connection_is_reused_only_after_a_clean_200_or_404(run, serve, first, reused):
    server = serve(pool_answer)

    async def scenario():
        client = Client(endpoint(server.url, SHORT_MS), "UA")
        one = await ask(client, first)
        return one, value(await ask(client, "ok-next"))
    one, nxt = run(scenario())
    assert nxt == "ok-next"
    assert server.keys(1)[-1] == ("ok-next" if reused else first)
    assert server.connections == (1 if reused else 2)
    if first == "extra":
        assert one.kind == "stray" and "after the response" in one.detail


def test_a_cancelled_exchange_leaves_nothing_behind(run, serve):
    """The caller's task cancelled mid-exchange: the connection is aborted, nothing more is written
    on it, the next request gets a new connection and its own answer."""
    server = serve(pool_answer)

    async def scenario():
        client = Client(endpoint(server.url), "UA")
        await ask(client, "ok-first")
        task = asyncio.ensure_future(ask(client, "stall"))
        while "stall" not in server.keys():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return value(await ask(client, "ok-next"))
    assert run(scenario()) == "ok-next"
    time.sleep(STALE_AFTER + 0.1)
    assert server.keys(1) == ["ok-first", "stall"] and server.ended[1] in ("eof", "reset")
    assert server.keys(2) == ["ok-next"]


def dropping(serve):
    """A server that answers, but takes the request after an "arm..." one on the same connection as
    the moment to close it: the backend closing an idle connection just as a request goes out."""
    def answer(request):
        before = [r.key for r in server.requests if r.connection == request.connection][:-1]
        if before and before[-1].startswith("arm") and not request.key.startswith("arm"):
            return [CLOSE]
        return [STALE_AFTER, found("late")] if request.key == "stall" else found(request.key)
    server = serve(answer)
    return server


def test_a_lookup_the_backend_dropped_unanswered_is_sent_again_on_a_new_connection(run, serve):
    server = dropping(serve)

    async def scenario():
        client = Client(endpoint(server.url), "UA")
        return [value(await ask(client, key)) for key in ("arm-1", "victim-1", "arm-2", "victim-2")]
    assert run(scenario()) == ["arm-1", "victim-1", "arm-2", "victim-2"]
    assert server.keys().count("victim-1") == 2 and server.connections == 3


def test_a_policy_request_is_never_sent_twice(run, serve):
    server = dropping(serve)

    async def scenario():
        client = Client(endpoint(server.url, SHORT_MS, mode="policy", method="POST"), "UA")
        return [await policy(client, r) for r in ("arm", "victim", "stall", "after")]
    arm, victim, stall, after = run(scenario())
    assert arm.status == 200 and victim.kind == "reset" and stall.kind == "timeout"
    assert after.status == 200 and server.keys() == ["arm", "victim", "stall", "after"]
    head, body = server.requests[1].head, server.requests[1].body
    assert head.startswith(b"POST /api HTTP/1.1\r\n")
    assert body == b"request=smtpd_access_policy&recipient=victim"
    assert head.endswith(b"\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 44")


def test_a_backend_closing_idle_connections_costs_no_lookup(run, serve):
    """Closed right after each answer: whether the client saw the FIN or not, no lookup fails."""
    server = serve(lambda r: [found(r.key), CLOSE])

    async def scenario():
        client = Client(endpoint(server.url), "UA")
        answers = []
        for i in range(20):
            answers.append(value(await ask(client, f"k{i}")))
            await asyncio.sleep(0.001 * (i % 3))
        return answers
    assert run(scenario()) == [f"k{i}" for i in range(20)]


def test_a_connection_with_unread_bytes_or_eof_is_not_taken_unless_its_answers_echo_the_request_id(run):
    """The pool looks at the socket itself before a reuse: the backend's FIN, or a copy of its last
    answer, may be there before the event loop has read it (the next request of a conversation
    follows at once).  A policy request (never sent twice) always gets the look; a lookup wherever
    the last answer did not echo its X-Request-Id (where it did, the id check catches a copy, and a
    lookup is sent again after a FIN).  Bytes found are told as stray, a FIN is not."""
    import socket

    async def scenario():
        loop = asyncio.get_running_loop()
        taken, strays = [], []
        for look, echoes in ((True, False), (False, False), (True, True), (False, True)):
            for arrives in (None, b"", b"stray"):
                ours, theirs = socket.socketpair()
                _, conn = await loop.create_connection(lambda: Connection(loop), sock=ours)
                conn.echoes, conn.on_stray = echoes, lambda: strays.append(arrives)
                idle = pool.Pool()
                idle.put(conn, loop.time())
                if arrives == b"":  # the backend's FIN, and no turn of the loop before the next take
                    theirs.shutdown(socket.SHUT_WR)
                elif arrives:
                    theirs.sendall(arrives)
                taken.append(idle.take(loop.time(), look=look) is conn)
                conn.abort()
                theirs.close()
        return taken, strays
    taken, strays = run(scenario())
    assert taken == [True, False, False] * 3 + [True, True, True]
    assert strays == [b"stray"] * 3


def test_a_client_moves_to_a_new_loop_without_its_connections(run, serve):
    """As after a fork, or a second asyncio.run: what was pooled on the old loop is left alone."""
    server = serve()
    client = Client(endpoint(server.url), "UA")
    assert [value(run(ask(client, k))) for k in ("a", "b")] == ["a", "b"]
    assert server.keys(1) == ["a"] and server.keys(2) == ["b"]


def test_a_connection_idle_too_long_is_not_reused(run, serve, monkeypatch):
    monkeypatch.setattr(pool, "IDLE_REUSE_LIMIT", 0.2)   # 1.5 s in production
    server = serve()

    async def scenario():
        client = Client(endpoint(server.url), "UA")
        for key, pause in (("a", 0.05), ("b", 0.3), ("c", 0.0)):
            await ask(client, key)
            await asyncio.sleep(pause)
        await asyncio.sleep(0.05)
    run(scenario())
    assert server.keys(1) == ["a", "b"] and server.keys(2) == ["c"]
    assert wait_for(lambda: 1 in server.ended)   # closed, not left to the server


def test_close_closes_idle_connections_and_busy_ones_after_their_exchange(run, serve):
    server = serve(slow_or_echo)

    async def scenario():
        client = Client(endpoint(server.url), "UA")
        await asyncio.gather(ask(client, "slow-1"), ask(client, "slow-2"))   # two idle connections
        busy = asyncio.ensure_future(ask(client, "slow-3"))   # on one of them
        await asyncio.sleep(0.05)
        client.close()
        client.close()
        await asyncio.sleep(0.05)
        closed_at_once = dict(server.ended)
        return closed_at_once, [value(await busy), value(await ask(client, "after"))]
    closed_at_once, answers = run(scenario())
    assert answers == ["slow-3", "after"] and server.connections == 3
    assert len(closed_at_once) == 1   # the idle one; the busy one finished its exchange
    assert wait_for(lambda: set(server.ended) == {1, 2, 3})   # never pooled again


def wait_for(condition, seconds=2.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- 8. TLS and proxies ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


def server_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def test_tls_needs_a_trusted_certificate(run, serve, certificate):
    cert, key = certificate
    server = serve(tls=server_context(cert, key))

    async def scenario():
        untrusted = Client(endpoint(server.url), "UA")
        trusted = Client(endpoint(server.url, ca_file=cert), "UA")
        return [await ask(untrusted, "k"), await ask(trusted, "k"), await ask(trusted, "k2")]
    untrusted, *trusted = run(scenario())
    assert untrusted.kind == "tls" and "certificate verify failed" in untrusted.detail
    assert [value(r) for r in trusted] == ["k", "k2"] and server.keys() == ["k", "k2"]


TLS_ENV_SCENARIO = SCENARIO_PRELUDE + """
import ssl, urllib.request
async def scenario(kind):
    return await ask(Client(endpoint(ARGS["url"], 3000), "UA"), "k")
# the environment works for anything that reads it: the test would prove nothing otherwise
urllib.request.urlopen(ARGS["url"] + "/api?key=probe", context=ssl.create_default_context())
both_loops(scenario)
"""


def test_ssl_cert_file_and_dir_in_the_environment_are_not_trusted(serve, certificate, tmp_path):
    cert, key = certificate
    server = serve(tls=server_context(cert, key))
    hashed = tmp_path / "certs"
    hashed.mkdir()
    subject_hash = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", cert],
                                  capture_output=True, text=True, check=True).stdout.strip()
    shutil.copy(cert, hashed / f"{subject_hash}.0")
    (tmp_path / "script.py").write_text(TLS_ENV_SCENARIO)
    proc = subprocess.run([sys.executable, str(tmp_path / "script.py"), json.dumps({"url": server.url})],
                          capture_output=True, timeout=30, cwd=ROOT,
                          env=_clean_env(SSL_CERT_FILE=cert, SSL_CERT_DIR=str(hashed)))
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == {"asyncio": "tls", "uvloop": "tls"}
    assert server.keys() == ["probe"]


@pytest.fixture
def proxy():
    p = rogue.Proxy()
    yield p
    p.stop()


def test_an_http_target_through_a_proxy_gets_absolute_form_requests(run, serve, proxy, monkeypatch):
    server = serve()
    decoy = serve()   # where the environment's proxy variables point: never contacted
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, decoy.url)
    monkeypatch.setenv("NO_PROXY", "")
    url = proxy.url.replace("http://", "http://user:p%40ss@")

    async def scenario():
        client = Client(endpoint(server.url, proxy=url), "UA")
        direct = Client(endpoint(server.url), "UA")
        return [value(await ask(client, k)) for k in ("a", "b")] + [value(await ask(direct, "c"))]
    assert run(scenario()) == ["a", "b", "c"]
    assert proxy.heads[0].startswith(f"GET {server.url}/api?key=a HTTP/1.1\r\n".encode())
    assert f"GET {server.url}/api?key=b HTTP/1.1\r\n".encode() in proxy.seen   # same connection
    assert b"Proxy-Authorization: Basic dXNlcjpwQHNz\r\n" in proxy.heads[0]   # user:p@ss
    assert decoy.connections == 0


def test_an_https_target_through_a_proxy_is_tunnelled(run, serve, proxy, certificate, monkeypatch):
    cert, key = certificate
    server = serve(tls=server_context(cert, key))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.2:9")

    async def scenario():
        client = Client(endpoint(server.url, proxy=proxy.url.replace("//", "//u:pw@"), ca_file=cert),
                        "UA")
        return [value(await ask(client, k)) for k in ("a", "b")]
    assert run(scenario()) == ["a", "b"]
    authority = server.url.split("//")[1]
    assert proxy.heads == [f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: UA\r\n"
                           "Proxy-Authorization: Basic dTpwdw==".encode()]
    assert TOKEN.encode() not in proxy.seen and b"key=a" not in proxy.seen
    assert server.requests[0].head.startswith(b"GET /api?key=a HTTP/1.1\r\n")
    assert b"Proxy-Authorization" not in server.requests[0].head


def test_a_proxy_refusing_connect_is_a_failure(run, serve, certificate):
    cert, key = certificate
    refusing = serve(lambda r: response(407, b"", {"Proxy-Authenticate": "Basic"}))

    async def scenario():
        client = Client(endpoint("https://127.0.0.1:1", proxy=refusing.url, ca_file=cert), "UA")
        return await ask(client, "k")
    result = run(scenario())
    assert result.kind == "refused" and "407" in result.detail


# --- 9. framing, encodings, bounds -------------------------------------------------------------------

FRAMING_ANSWERS = {
    "length-short": response(200, b'["ok"]', {"Content-Length": "3"}),
    "length-long": [response(200, b'["ok"]', {"Content-Length": "60"}), 0.05, CLOSE],
    "chunk-extras": SPLIT_RESPONSES["chunked"],
    "deflate": response(200, zlib.compress(b'["deflated"]'), {"Content-Encoding": "deflate"}),
    "x-gzip": response(200, gzip.compress(b'["zipped"]'), {"Content-Encoding": "x-gzip"}),
    "brotli": response(200, b"...", {"Content-Encoding": "br"}),
    "truncated-gzip": response(200, gzip.compress(b'["zipped"]')[:-6], {"Content-Encoding": "gzip"}),
    "bomb": None,   # made by the test: 20 MB of JSON in 20 kB
    "max-body": response(200, b'["' + b"m" * (MAX_BODY - 4) + b'"]'),
    "until-eof": [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[\"eof\"]", CLOSE],
    "until-eof-1.0": [b"HTTP/1.0 200 OK\r\n\r\n[\"eof\"]", CLOSE],
    "gzip-until-eof": [b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n"
                       + gzip.compress(b'["eof"]'), CLOSE],
    "te-gzip": response(200, gzip.compress(b'["x"]'), {"Transfer-Encoding": "gzip"}),
    "interim-body": b"HTTP/1.1 150 Odd\r\nContent-Length: 4\r\n\r\nabcd" + found("x"),
    "no-store": found("x", **{"Cache-Control": "no-store"}),
    "endless-head": b"HTTP/1.1 200 OK\r\nX-Long: " + b"y" * (MAX_HEAD + 10),
    "endless-interims": b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_HEAD // 20),
}
FRAMING_RESULTS = {
    "length-short": "stray", "length-long": "reset", "chunk-extras": "chunked",
    "deflate": "deflated", "x-gzip": "zipped", "brotli": "protocol", "truncated-gzip": "protocol",
    "bomb": "too-large", "max-body": "m" * (MAX_BODY - 4), "until-eof": "eof", "until-eof-1.0": "eof",
    "gzip-until-eof": "eof", "te-gzip": "protocol", "interim-body": "protocol", "no-store": "x",
    "endless-head": "too-large", "endless-interims": "too-large",
}


@pytest.fixture(scope="module")
def bomb():
    return response(200, gzip.compress(b'["' + b"0" * (20 << 20) + b'"]'), {"Content-Encoding": "gzip"})


def test_framing_encodings_and_bounds(run, serve, bomb):
    server = serve(lambda r: FRAMING_ANSWERS[r.key] or bomb)

    async def scenario():
        client = Client(endpoint(server.url, 5000), "UA")
        results = {}
        for key in FRAMING_ANSWERS:
            start = time.process_time()
            results[key] = (await ask(client, key), time.process_time() - start)
        return results
    results = run(scenario())
    got = {k: value(r) if isinstance(r, HttpResult) else r.kind for k, (r, _) in results.items()}
    assert got == FRAMING_RESULTS
    assert results["bomb"][1] < 0.3   # inflating stopped at MAX_BODY: not 20 MB worth of CPU
    assert results["no-store"][0].max_age == -1


def test_a_huge_body_is_not_read_to_its_end(run, serve):
    huge = b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * (16 << 20)
    server = serve(lambda r: [huge, CLOSE])

    async def scenario():
        return await ask(Client(endpoint(server.url), "UA"), "k")
    assert run(scenario()).kind == "too-large"
    assert wait_for(lambda: server.ended) and server.ended == {1: "reset"}   # cut off long before 16 MB


# --- the requests themselves ----------------------------------------------------------------------

def test_the_exact_request_bytes(run, serve):
    server = serve()

    async def scenario():
        client = Client(config.Endpoint(name="t", mode="socketmap-lookup", auth_token=TOKEN,
                                        target=server.url.replace("127.0.0.1", "localhost") + "/m?x=1"),
                        "agent/1")
        return await client.lookup((("name", b"map"), ("key", b"a b/\xff+&=")), "0123456789abcdef")
    assert run(scenario()).status == 200
    assert server.requests[0].head == (
        b"GET /m?x=1&name=map&key=a%20b%2F%FF%2B%26%3D HTTP/1.1\r\n"
        b"Host: localhost:" + str(server.port).encode() + b"\r\nUser-Agent: agent/1\r\nAccept: */*\r\n"
        b"X-Auth-Token: SECRET-TOKEN\r\nConnection: keep-alive\r\nX-Request-Id: 0123456789abcdef")


def test_host_header_for_ipv6_and_default_ports():
    from pfrest.backend.route import for_endpoint as route
    assert route(endpoint("http://[::1]:80")).target.host_header == "[::1]"
    assert route(endpoint("https://[::1]:8443")).target.authority == "[::1]:8443"
    assert route(endpoint("https://bücher.example")).target.host_header == "xn--bcher-kva.example"
    assert route(endpoint("http://h:443")).target.host_header == "h:443"
    unusable = Client(endpoint("http://" + "ü" * 70 + ".example"), "UA")   # a label IDNA refuses
    assert asyncio.run(ask(unusable, "k")).kind == "dns"


def test_new_request_ids():
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


# --- 10. the cache ------------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Counting:
    """A stand-in for Client (the cache's seam): answers by key, after ``delay``, counting calls."""

    def __init__(self, answers, delay=0.0):
        self.answers, self.delay, self.calls, self.closed = answers, delay, 0, False

    async def lookup(self, params, request_id):
        self.calls += 1
        await asyncio.sleep(self.delay)
        return self.answers[dict(params)["key"]]

    async def policy(self, pairs, request_id):
        self.calls += 1
        return HttpResult(200, b"DUNNO")

    def close(self):
        self.closed = True


CACHE_ANSWERS = {
    b"found": HttpResult(200, b'["v"]'),
    b"missing": HttpResult(404, b""),
    b"empty": HttpResult(200, b"[]"),
    b"down": HttpResult(503, b""),
    b"timeout": Failure("timeout"),
    b"invalid": HttpResult(200, b"nope"),
    b"short": HttpResult(200, b'["v"]', max_age=5),
    b"nostore": HttpResult(200, b'["v"]', max_age=-1),
}


def cached(ttl=60, negative=10, entries=100, inner=None):
    inner = inner or Counting(CACHE_ANSWERS)
    clock = Clock()
    return CachingClient(inner, ttl, negative, entries, clock=clock), inner, clock


def lookup(cache, key):
    return cache.lookup((("key", key),), "id")


def test_cache_ttl_and_negative_ttl():
    async def scenario():
        cache, inner, clock = cached()
        firsts = [await lookup(cache, k) for k in (b"found", b"missing", b"empty")]
        again = [await lookup(cache, k) for k in (b"found", b"missing", b"empty")]
        calls = inner.calls
        clock.now += 11
        await lookup(cache, b"found"), await lookup(cache, b"missing")
        after_negative = inner.calls - calls
        clock.now += 50
        await lookup(cache, b"found")
        return firsts, again, calls, after_negative, inner.calls
    firsts, again, calls, after_negative, total = asyncio.run(scenario())
    assert [r.cached for r in firsts] == [False] * 3 and [r.cached for r in again] == [True] * 3
    assert again[0].body == b'["v"]' and calls == 3 and after_negative == 1 and total == 5


@pytest.mark.parametrize("key", [b"down", b"timeout", b"invalid", b"nostore"])
def test_cache_never_keeps_errors_or_no_store(key):
    async def scenario():
        cache, inner, clock = cached()
        await lookup(cache, key), await lookup(cache, key)
        return inner.calls, len(cache)
    assert asyncio.run(scenario()) == (2, 0)


def test_cache_max_age_shortens_the_ttl():
    async def scenario():
        cache, inner, clock = cached()
        await lookup(cache, b"short")
        clock.now += 4
        await lookup(cache, b"short")
        calls = inner.calls
        clock.now += 2
        await lookup(cache, b"short")
        return calls, inner.calls
    assert asyncio.run(scenario()) == (1, 2)


def test_cache_evicts_the_least_recently_used():
    async def scenario():
        answers = {str(i).encode(): HttpResult(200, b'["v"]') for i in range(5)}
        cache, inner, clock = cached(entries=3, inner=Counting(answers))
        for k in (b"0", b"1", b"2", b"0", b"3"):   # 1 is now the least recently used: evicted
            await lookup(cache, k)
        size, calls = len(cache), inner.calls
        for k in (b"0", b"2", b"3"):
            await lookup(cache, k)
        hits = inner.calls == calls
        await lookup(cache, b"1")
        return size, hits, inner.calls - calls
    assert asyncio.run(scenario()) == (3, True, 1)


def test_cache_passes_policy_and_close_through():
    async def scenario():
        cache, inner, clock = cached()
        await cache.policy([], "id"), await cache.policy([], "id")
        cache.close()
        return inner.calls, inner.closed
    assert asyncio.run(scenario()) == (2, True)


def test_identical_lookups_in_flight_share_one_request_and_a_cancelled_caller_cancels_no_one(run):
    async def scenario():
        cache, inner, clock = cached(inner=Counting(CACHE_ANSWERS, delay=0.1))
        callers = [asyncio.ensure_future(lookup(cache, b"found")) for _ in range(20)]
        errors = [asyncio.ensure_future(lookup(cache, b"down")) for _ in range(5)]
        await asyncio.sleep(0.02)
        callers[0].cancel()   # the first, whose miss started the request
        callers[7].cancel()
        results = await asyncio.gather(*callers[1:7], *callers[8:], *errors)
        shared = inner.calls
        await lookup(cache, b"down")   # shared while in flight, but not kept
        return results, shared, inner.calls, callers[0].cancelled()
    results, shared, total, cancelled = run(scenario())
    assert cancelled and shared == 2 and total == 3
    assert [r.body for r in results[:18]] == [b'["v"]'] * 18
    assert all(r.status == 503 for r in results[18:])
    assert [r.cached for r in results[:18]] == [True] * 18   # none of them sent a request


def test_for_endpoint_caches_lookups_only_when_configured(run):
    backend = Backend()
    backend.answers["k"] = (200, ["v"], {"Cache-Control": "max-age=60"})

    def ep(mode="tcp-lookup", **extra):
        return config.Endpoint(name="t", mode=mode, target=backend.url + "/x", **extra)

    async def scenario():
        plain, cache = for_endpoint(ep(), "UA"), for_endpoint(ep(cache_ttl=60.0), "UA")
        negative_only = for_endpoint(ep(cache_negative_ttl=5.0), "UA")
        policy_client = for_endpoint(ep("policy"), "UA")
        answers = await asyncio.gather(*(ask(cache, "k") for _ in range(10)))
        answers.append(await ask(cache, "k"))
        kinds = [type(c).__name__ for c in (plain, cache, negative_only, policy_client)]
        for c in (plain, cache, negative_only, policy_client):
            c.close()
        return answers, kinds
    try:
        answers, kinds = run(scenario())
    finally:
        backend.stop()
    assert kinds == ["Client", "CachingClient", "CachingClient", "Client"]
    assert [value(a) for a in answers] == ["v"] * 11 and answers[-1].cached
    assert len(backend.requests) == 1


def test_a_finished_response_reader_leaves_no_cycle_behind():
    """The parser refers back to its reader: a reader done (answered, closed, broken) lets go of it, so
    that a body up to MAX_BODY is freed when the exchange ends, not at the next garbage collection."""
    import gc
    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            answered = ResponseReader(b"0123456789abcdef", False)
            answered.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000)
            closed = ResponseReader(b"0123456789abcdef", False)
            closed.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nxx")
            closed.eof()
            assert answered.done and closed.done
        assert gc.collect() == 0
    finally:
        gc.enable()
    answered.feed(b"HTTP/1.1 200 OK\r\n")   # fed once more after it was done: a stray answer
    assert answered.result.kind == "stray"


def test_a_tls_backend_closing_an_idle_connection_is_no_stray_answer(run, certificate):
    """Over TLS the bytes waiting on an idle connection may be the backend's close_notify (TLS 1.3
    encrypts it: it cannot be told from data unread): the connection is not taken, and no stray answer
    is reported for it; over plain TCP, bytes there are one (the socketpair test above)."""
    import socket
    import threading
    cert, key = certificate
    listener = socket.create_server(("127.0.0.1", 0))
    port, go = listener.getsockname()[1], threading.Event()

    def backend():   # the handshake; when told, the end of the connection: close_notify, then FIN
        conn, _ = listener.accept()
        with server_context(cert, key).wrap_socket(conn, server_side=True) as tls:
            go.wait(10)
            tls.settimeout(0.2)   # unwrap sends close_notify, then waits for the client's, which never comes
            try:
                tls.unwrap()
            except (OSError, ssl.SSLError):
                pass
    thread = threading.Thread(target=backend, daemon=True)
    thread.start()

    async def scenario():
        loop = asyncio.get_running_loop()
        ctx = ssl.create_default_context(cafile=cert)
        _, conn = await loop.create_connection(lambda: Connection(loop), "127.0.0.1", port, ssl=ctx)
        strays = []
        conn.echoes, conn.on_stray = False, lambda: strays.append(True)
        await asyncio.sleep(0.2)   # the handshake's last bytes out, its session tickets read
        idle = pool.Pool()
        idle.put(conn, loop.time())
        go.set()
        thread.join(10)   # blocking: no turn of the loop, so the close_notify waits unread for the take
        taken = idle.take(loop.time(), look=True) is conn
        conn.abort()
        return taken, strays
    try:
        assert run(scenario()) == (False, [])
    finally:
        listener.close()
