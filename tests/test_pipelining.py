"""Backend pipelining (the endpoint key `pipelining`) is safe: a real `pfrest serve` with pipelining on
its tcp and socketmap endpoints, 32 Postfix-style clients asking distinct keys at once, and a policy
endpoint beside them, against the backends people run (nginx, Go's net/http, uvicorn, gunicorn's sync
worker that does not pipeline, the project's test server; each also without the X-Request-Id echo) and
against hostile ones (tests/hostile_backends.py: answers out of order, a close mid-pipeline, a slow first
key, 1xx interim answers, a copy of an answer, a server that reads only the first request of a read,
no echo, an echo on the first answer only).

Every reply is judged for its own key: its value, its not-found, or a temporary error; never another
key's value (0 wrong answers), every request exactly one reply, no policy request sent twice, and a
temporary error only where the design gives one (a request whose own answer the backend spoilt).
Nothing of a lookup reaches the backend after Postfix got its temporary reply.
"""

import asyncio
import logging
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import NamedTuple, Optional

import pytest

from conftest import ROOT, need_binary, pfrest_cmd, pfrest_env
from hostile import ServeProcess
from hostile_backends import (BULKY, CLOSE_MID, COPY, ECHO_ONCE, FIRST_OF_READ, HONEST, INTERIM, MALFORMED,
                              NO_ECHO, OUT_OF_ORDER, SLOW, HostileBackend)
from pfrest import config
from pfrest.backend import Client as BackendClient, new_request_id
from pfrest.protocol import verdict
from pipeline_backends import (POLICY, SOCKETMAP, TCP, Client, GoServer, Gunicorn, Nginx, ProjectBackend, Uvicorn,
                               build_go, judge, serve_config, traffic)
from postfix_instance import free_port

CLIENTS = 32          # lookup clients at once, tcp and socketmap in turn
REQUESTS = 20         # lookups (or policy requests) each client asks, one after another
POLICY_CLIENTS = 4
# request-timeout under load: its stall time (0.9 s) is past what a busy machine makes an honest backend
# wait (the hostile ones share the test process, and its GIL, with the 36 clients)
LOAD_TIMEOUT = 9000
OFF_LINE = r"endpoint=(tcp|socketmap) backend 127\.0\.0\.1:{port}: pipelining off for 60 s \(([^\n]*)\)"
RELOAD_EVERY = 100     # requests the backend reads between two reloads
STRAY_LINE = "bytes came on an idle connection"   # client.py's report of an answer no request asked for


@pytest.fixture(scope="session")
def go_binary(tmp_path_factory):
    """tests/backends/lookup.go, built once per session."""
    need_binary("go")
    return build_go(tmp_path_factory.mktemp("go"))


@contextmanager
def started(backend):
    try:
        yield backend
    finally:
        backend.stop()


@contextmanager
def serving(tmp_path, url, args=(), **options):
    """`pfrest serve ARGS` with pipelining on its lookup endpoints, toward ``url``; (process, {mode: port})."""
    config, ports = serve_config(tmp_path / "pfrest.json", url, **options)
    serve = ServeProcess(config, str(tmp_path / "serve.log"), args=args)
    try:
        yield serve, ports
    finally:
        serve.stop()


def check_replies(replies, extras, policy_ids=None, clients=CLIENTS, requests=REQUESTS,
                  policy_clients=POLICY_CLIENTS):
    """0 wrong answers, every request exactly one reply, no policy request sent twice; the Counter of
    outcomes."""
    wrong = [r for r in replies if r.outcome == "WRONG"]
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:5]}"
    assert not extras, f"replies beyond those asked for: {extras[:3]}"
    asked = Counter((r.mode, r.key) for r in replies)
    assert len(asked) == len(replies) == (clients + policy_clients) * requests, \
        f"{len(replies)} replies to {(clients + policy_clients) * requests} requests"
    # a policy request is never pipelined: the backend answers each right, and each arrives once
    policy = Counter(r.outcome for r in replies if r.mode == POLICY)
    assert set(policy) <= {"value"}, policy
    if policy_ids is not None:
        twice = {i: n for i, n in policy_ids.items() if n > 1}
        assert not twice, f"policy requests sent more than once: {twice}"
        assert len(policy_ids) == policy_clients * requests, (len(policy_ids), policy_clients * requests)
    return Counter(r.outcome for r in replies)


def off_lines(serve, port):
    return re.findall(OFF_LINE.format(port=port), serve.log())


# --- the backends people run ----------------------------------------------------------------------------

REAL = {
    "nginx": lambda tmp, go: Nginx(tmp / "nginx"),
    "nginx-no-echo": lambda tmp, go: Nginx(tmp / "nginx", echo=False),
    # nginx closes a connection after its keepalive_requests (Connection: close on the last answer),
    # dropping the requests pipelined behind it: they are sent again
    "nginx-keepalive-20": lambda tmp, go: Nginx(tmp / "nginx", keepalive_requests=20),
    "nginx-tls": lambda tmp, go: Nginx(tmp / "nginx", tls=True),
    "go": lambda tmp, go: GoServer(go()),
    "go-no-echo": lambda tmp, go: GoServer(go(), echo=False),
    "uvicorn": lambda tmp, go: Uvicorn(),
    "uvicorn-no-echo": lambda tmp, go: Uvicorn(echo=False),
    "gunicorn-sync": lambda tmp, go: Gunicorn(),
    "test-backend": lambda tmp, go: ProjectBackend(),
    "test-backend-no-echo": lambda tmp, go: ProjectBackend(echo=False),
}


SEEN_PIPELINED = {"nginx": True, "nginx-keepalive-20": True, "nginx-tls": True, "nginx-no-echo": False}


@pytest.mark.parametrize("name", list(REAL))
def test_the_backends_people_run_give_every_lookup_its_own_answer(name, tmp_path, request):
    make = REAL[name]
    with started(make(tmp_path, lambda: request.getfixturevalue("go_binary"))) as backend:
        options = dict(backend.endpoint_options, request_timeout=LOAD_TIMEOUT)
        with serving(tmp_path, backend.url, **options) as (serve, ports):
            replies, extras = traffic(ports, CLIENTS, REQUESTS, POLICY_CLIENTS, backend.expected_policy)
            log = serve.log()
        outcomes = check_replies(replies, extras, backend.policy_ids())
        # an honest backend: no temporary error at all, and pipelining never turned off
        assert outcomes["temporary"] == 0, (outcomes, [r for r in replies if r.outcome == "temporary"][:5])
        assert "pipelining off" not in log and STRAY_LINE not in log, log[-3000:]
        assert outcomes["notfound"] == (CLIENTS * REQUESTS) // 10
        pipelined = backend.pipelined()
    if name in SEEN_PIPELINED:   # nginx's access log tells ($pipe)
        assert (pipelined > 0) == SEEN_PIPELINED[name], \
            f"{pipelined} requests pipelined to it: it does not echo X-Request-Id" if pipelined \
            else "nginx's access log has no pipelined request ($pipe p): the test proves nothing"


# --- hostile backends -----------------------------------------------------------------------------------

class Expect(NamedTuple):
    """What the design says of a hostile backend (None: it does not say, or either may be)."""
    turns_off: Optional[bool]   # pipelining to it turns off, with the WARNING line
    pipelined: Optional[bool]   # requests reach it pipelined (None: it spoils the second answer on a
                                # connection, pipelined or not, and a temporary error must say so)
    strays: bool                # it sends an answer nobody asked for, which pfrest may tell


HOSTILE = {
    HONEST: Expect(False, True, False),
    INTERIM: Expect(False, True, False),
    BULKY: Expect(False, True, False),
    OUT_OF_ORDER: Expect(True, True, False),
    CLOSE_MID: Expect(True, True, False),
    COPY: Expect(True, True, True),
    MALFORMED: Expect(None, True, False),
    FIRST_OF_READ: Expect(True, True, False),
    ECHO_ONCE: Expect(True, None, False),
    NO_ECHO: Expect(False, False, False),
}


@pytest.mark.parametrize("behaviour", list(HOSTILE))
def test_a_hostile_backend_never_makes_a_wrong_answer(behaviour, tmp_path):
    """Among the keys, some the backend answers with a 500 (a failure of its own, on a connection it keeps
    alive): pfrest answers them with a temporary error, and the answers written after them in the same
    batch are the requests sent again, not stray ones."""
    turns_off, pipelined, strays = HOSTILE[behaviour]
    with started(HostileBackend(behaviour)) as backend:
        with serving(tmp_path, backend.url, request_timeout=LOAD_TIMEOUT) as (serve, ports):
            replies, extras = traffic(ports, CLIENTS, REQUESTS, POLICY_CLIENTS, errors=True)
            lines = off_lines(serve, backend.url.rsplit(":", 1)[1])
            log = serve.log()
    outcomes = check_replies(replies, extras, backend.policy_ids())
    assert not backend.policy_pipelined(), "a policy request shared its connection with another in flight"
    temporary = [r for r in replies if r.outcome == "temporary"]
    assert {r.key for r in temporary if not r.key.startswith("error")} <= backend.victims, \
        f"temporary errors for keys the backend answered right: {temporary[:5]} ({outcomes})"
    assert_nothing_sent_after_the_reply(backend, temporary)
    if pipelined:
        assert backend.batches() > 0, "pfrest never pipelined to it: the test proves nothing"
    elif pipelined is False:
        assert backend.batches() == 0, "pfrest pipelined to a backend that does not echo X-Request-Id"
    else:   # the answer without the echo on a proven connection was caught (a temporary error)
        assert temporary, outcomes
    if turns_off:   # (which also says that the backend's hostility came into play)
        assert lines, f"pipelining did not turn off: {outcomes}"
    elif turns_off is False:
        assert not lines, lines
    if not strays:
        assert STRAY_LINE not in log, [line for line in log.splitlines() if STRAY_LINE in line][:3]


def assert_nothing_sent_after_the_reply(backend, temporary):
    late = [(r.key, r.at, arrived) for r in temporary for arrived in backend.arrivals(r.key) if arrived > r.at]
    assert not late, f"lookups sent after Postfix got its temporary reply: {late[:5]}"


def test_a_slow_first_key_holds_none_of_the_lookups_behind_it(tmp_path):
    """One proven connection (a warm-up client), the slow key on it, then lookups from other clients while
    it is in flight: queued behind it, they are sent again elsewhere at the stall time (0.3 s at a
    request-timeout of 3000 ms) and answered before it is; it gets its own value within its
    request-timeout, and pipelining turns off with its WARNING line."""
    with started(HostileBackend(SLOW)) as backend:
        with serving(tmp_path, backend.url) as (serve, ports):
            for mode in (TCP, SOCKETMAP):
                slow_head(backend, mode, ports[mode], [f"behind-{mode}-{n}" for n in range(8)])
            lines = off_lines(serve, backend.url.rsplit(":", 1)[1])
            log = serve.log()
    assert {endpoint for endpoint, _ in lines} == {"tcp", "socketmap"}, lines
    assert all("an answer took over 0.3 s" in reason for _, reason in lines), lines
    # the answers after the slow one, to the requests sent again, are no stray answers
    assert STRAY_LINE not in log, [line for line in log.splitlines() if STRAY_LINE in line]


def test_a_slow_first_key_holds_none_behind_it_when_pipelining_turned_off_meanwhile(tmp_path):
    """As above, with the slow key's connection full (15 behind it) and a lookup beyond them on a
    connection of its own, proven, whose answer then comes twice: pipelining turns off for the target
    (a stray answer) before the slow key's stall time (0.9 s at a request-timeout of 9000 ms); the
    lookups behind the slow key are sent again at their stall time all the same."""
    with started(HostileBackend(SLOW)) as backend:
        with serving(tmp_path, backend.url, request_timeout=9000) as (serve, ports):
            port = ports[TCP]

            def meanwhile():
                mark = serve.mark()
                got = {}
                ask_one(TCP, port, "late-copy-1", got)
                assert got["late-copy-1"][0] == "value", got
                serve.wait_log(r"pipelining off for 60 s \(bytes after the ", since=mark)
            slow_head(backend, TCP, port, [f"behind-{n}" for n in range(15)], meanwhile)


def slow_head(backend, mode, port, behind, meanwhile=None):
    """The slow key on the one proven connection, the ``behind`` keys queued behind it, then
    ``meanwhile()``: each key behind is answered with its value before the slow one is, which gets its
    own value."""
    backend.slow_seen.clear()
    slow_key, got = f"slow-{mode}", {}
    warm = Client(mode, port)
    try:
        for key in (f"warm-{mode}-1", f"warm-{mode}-2"):
            assert judge(mode, key, warm.ask(key)) == "value"
        threads = [threading.Thread(target=ask_one, args=(mode, port, slow_key, got))]
        threads[0].start()
        assert backend.slow_seen.wait(10), "the slow key never reached the backend"
        threads += [threading.Thread(target=ask_one, args=(mode, port, key, got)) for key in behind]
        for thread in threads[1:]:
            thread.start()
        if meanwhile is not None:
            wait_until(lambda: all(backend.arrivals(key) for key in behind), "the keys behind to arrive")
            meanwhile()
        for thread in threads:
            thread.join(30)
    finally:
        warm.close()
    assert got[slow_key][0] == "value", got[slow_key]
    slow_done = backend.slow_answered[slow_key]
    for key in behind:
        assert got[key][0] == "value", (key, got[key])
        assert got[key][1] < slow_done, f"{key} waited for the slow key"
    resent = [key for key in behind if len(backend.arrivals(key)) == 2]
    assert resent, "no lookup was queued behind the slow key: the test proves nothing"
    assert all(len(backend.arrivals(key)) <= 2 for key in behind)


def ask_one(mode, port, key, got):
    client = Client(mode, port)
    try:
        reply = client.ask(key)
        got[key] = (judge(mode, key, reply), time.monotonic(), reply)
    finally:
        client.close()


def wait_until(condition, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited in vain for {what}"
        time.sleep(0.005)


def test_nothing_is_sent_for_a_lookup_after_postfix_got_its_temporary_reply(tmp_path):
    """Slow keys past a short request-timeout (500 ms: the stall time is 0.05 s) among quick ones: each
    slow key gets a temporary error, and the backend never reads a lookup after its client had the
    temporary reply; the quick ones queued behind a slow key get their values."""
    clients, requests = 16, 6
    keys = {n: [f"slow-c{n}-{i}" if i % 3 == 0 else f"c{n}-{i}" for i in range(requests)] for n in range(clients)}
    with started(HostileBackend(SLOW)) as backend:
        with serving(tmp_path, backend.url, request_timeout=500) as (serve, ports):
            replies, extras = traffic(ports, clients, requests, 0, extra_keys=keys)
    outcomes = check_replies(replies, extras, clients=clients, requests=requests, policy_clients=0)
    temporary = [r for r in replies if r.outcome == "temporary"]
    assert {r.key for r in temporary} >= {k for ks in keys.values() for k in ks if k.startswith("slow")}, outcomes
    assert_nothing_sent_after_the_reply(backend, temporary)
    quick = [r for r in replies if not r.key.startswith("slow")]
    assert {r.outcome for r in quick} == {"value"}, (outcomes, [r for r in quick if r.outcome != "value"][:5])
    assert backend.batches() > 0, "pfrest never pipelined to it: the test proves nothing"


# --- the config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["policy", "dovecot-sasl"])
def test_pipelining_is_refused_where_a_request_must_never_be_sent_twice(mode, write_config):
    path = write_config([{"name": "p", "mode": mode, "target": "http://127.0.0.1:9/x", "pipelining": True,
                          "bind-port": free_port()}])
    for command in ("check", "serve"):
        proc = subprocess.run(pfrest_cmd(command, "-c", path), capture_output=True, text=True, timeout=30,
                              env=pfrest_env(), cwd=ROOT)
        assert proc.returncode == 78 and "endpoints[0] (p).pipelining" in proc.stderr, \
            (command, proc.returncode, proc.stderr)


@pytest.mark.parametrize("workers", [1, 2])
def test_reloads_under_load_cost_no_lookup(tmp_path, workers):
    """`pfrest serve` (and `serve --workers 2`, a pipeline in each) reloaded three times (SIGHUP, another
    request-timeout each time: new clients, the old ones closed with pipelined lookups in flight) while
    the clients ask: every lookup its own value."""
    with started(HostileBackend(HONEST)) as backend:
        with serving(tmp_path, backend.url, request_timeout=LOAD_TIMEOUT, args=("--workers", str(workers))) \
                as (serve, ports):
            done = []
            load = threading.Thread(target=lambda: done.append(traffic(ports, CLIENTS, REQUESTS * 2,
                                                                       POLICY_CLIENTS)))
            load.start()
            try:
                for n, timeout in enumerate((3001, 3002, 3003), 1):
                    wait_until(lambda: len(backend.seen) > RELOAD_EVERY * n, "lookups to flow")
                    mark = serve.mark()
                    serve_config(tmp_path / "pfrest.json", backend.url, request_timeout=timeout, ports=ports)
                    serve.proc.send_signal(signal.SIGHUP)
                    serve.wait_log(r"reloaded ", since=mark)
            finally:
                load.join(120)
            log = serve.log()
    replies, extras = done[0]
    outcomes = check_replies(replies, extras, backend.policy_ids(), requests=REQUESTS * 2)
    assert outcomes["temporary"] == 0, [r for r in replies if r.outcome == "temporary"][:5]
    assert "pipelining off" not in log and STRAY_LINE not in log, log[-3000:]
    assert backend.batches() > 0, "pfrest never pipelined to it: the test proves nothing"


# --- a caller that stops waiting ---------------------------------------------------------------------------

def pipelined_client(url):
    """The event-loop client itself (pfrest.backend.Client) of a tcp endpoint with pipelining."""
    return BackendClient(config.Endpoint(name="t", mode="tcp-lookup", target=url + "/lookup",
                                         request_timeout=3000, pipelining=True), "test")


async def ask(client, key):
    """The value Postfix would get, or the verdict's kind."""
    found = verdict.lookup(await client.lookup((("key", key.encode()),), new_request_id()))
    return found.value.decode() if found.kind == verdict.FOUND else found.kind


def test_a_lookup_whose_caller_stopped_waiting_is_never_written_or_its_answer_dropped():
    """The event-loop client: lookups started in one turn of the loop go out in one write; a lookup
    cancelled in the turn it was started (Postfix gone, or its deadline) is never written to the backend;
    one cancelled once written has its answer read and dropped, and the next lookup on that connection
    gets its own."""
    async def cancel(task):
        task.cancel()

    async def main(backend):
        client = pipelined_client(backend.url)
        try:
            assert await ask(client, "warm") == "value-of-warm"   # a proven connection: the pipeline's
            together = [asyncio.ensure_future(ask(client, key)) for key in ("x", "y", "z")]
            assert await asyncio.gather(*together) == ["value-of-x", "value-of-y", "value-of-z"]
            # started in one turn (one write): the canceller runs after both sent, before the write
            first, never = asyncio.ensure_future(ask(client, "first")), asyncio.ensure_future(ask(client, "never"))
            await asyncio.gather(cancel(never), return_exceptions=True)
            assert await first == "value-of-first"
            assert never.cancelled()
            # cancelled once written: its answer comes and is dropped
            dropped = asyncio.ensure_future(ask(client, "dropped"))
            while not backend.arrivals("dropped"):
                await asyncio.sleep(0.001)
            dropped.cancel()
            assert await ask(client, "next") == "value-of-next"
        finally:
            client.close()

    with started(HostileBackend(HONEST)) as backend:
        asyncio.run(main(backend))
    assert not backend.arrivals("never"), "a lookup was written after its caller stopped waiting"
    assert ["x", "y", "z"] in backend.reads, f"not in one write: {backend.reads}"
    connections = {s.connection for s in backend.seen}
    assert len(connections) == 1, f"the pipeline's connection was not kept: {backend.seen}"


def test_a_copy_after_the_last_answer_of_a_stalled_connection_is_told(caplog):
    """A slow key alone on the pipeline's connection: past the stall time that connection takes no more,
    and it ends with the slow answer; a copy of that answer in the same write is an answer no request
    asked for, told as one (its WARNING line, the stray count) and pipelining turns off.  The slow key
    gets its own value."""
    async def main(backend):
        client = pipelined_client(backend.url)
        try:
            assert await ask(client, "warm") == "value-of-warm"
            assert await ask(client, "slow-copy-1") == "value-of-slow-copy-1"
        finally:
            client.close()

    with started(HostileBackend(SLOW)) as backend, caplog.at_level(logging.WARNING, logger="pfrest"):
        asyncio.run(main(backend))
    assert STRAY_LINE in caplog.text and "pipelining off for 60 s (bytes after the" in caplog.text, caplog.text
