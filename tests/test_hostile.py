"""Hostile input from the Postfix side, over `pfrest serve` (real sockets) and `pfrest handle` (a real
process per conversation): every case of hostile.CASES gets its exact reply or the close, a log line,
bounded time and memory, while well-behaved clients keep being answered."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

import hostile
from conftest import Backend, pfrest_cmd, pfrest_env
from hostile import CASES, GOOD, GoodClients, HandlePeer, ServeProcess, SocketPeer, play
from postfix_instance import free_port

MAX_SECONDS = 8.0           # any one case, slowloris included (the machine may be busy)
MAX_GROWTH_KIB = 40 * 1024  # peak RSS of pfrest serve over its RSS before the attacks


@pytest.fixture(scope="module")
def truth():
    backend = Backend()
    backend.answers.update(hostile.ANSWERS)
    yield backend
    backend.stop()


def write(path, endpoints):
    path.write_text(json.dumps({"endpoints": endpoints}))
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def serve_three(truth, tmp_path):
    """A `pfrest serve` with one TCP endpoint per mode; yields (process, {mode: address})."""
    endpoints = hostile.endpoints(truth.url + "/lookup")
    for ep in endpoints:
        ep["bind-port"] = free_port()
    proc = ServeProcess(write(tmp_path / "serve.json", endpoints), str(tmp_path / "serve.log"))
    try:
        yield proc, {ep["mode"]: ("127.0.0.1", ep["bind-port"]) for ep in endpoints}
    finally:
        assert proc.stop() == 0


def check(case, problems, elapsed, log_text):
    if elapsed > MAX_SECONDS:
        problems.append(f"took {elapsed:.1f} s")
    if hostile.log_line_for(case, log_text) is None:
        problems.append(f"no log line like {case.log!r} in:\n{log_text[-1500:]}")
    return problems


def test_hostile_input_over_serve(serve_three):
    proc, addresses = serve_three
    before = proc.status("VmRSS")
    good = GoodClients(addresses)
    failures = {}
    for case in CASES:
        mark, start = proc.mark(), hostile.time.monotonic()
        peer = SocketPeer(addresses[case.mode])
        try:
            problems = play(peer, case)
        finally:
            peer.close()
        problems = check(case, problems, hostile.time.monotonic() - start, proc.log(mark))
        if problems:
            failures[case.name] = problems
    good.stop()
    assert failures == {}
    assert good.problems == [] and good.answered > 100, good.problems
    assert good.slowest < 3.0, f"a good client waited {good.slowest:.2f} s during the attacks"
    growth = proc.status("VmHWM") - before
    assert growth < MAX_GROWTH_KIB, f"peak RSS grew by {growth} KiB"


def test_hostile_input_over_handle(truth, tmp_path):
    config_path = write(tmp_path / "handle.json", hostile.endpoints(truth.url + "/lookup"))

    def one(case):
        log = tmp_path / f"{case.name}.log"
        peer = HandlePeer(pfrest_cmd("handle", "-c", config_path, "--log-file", str(log),
                                     case.mode.split("-")[0]), env=pfrest_env())
        request, answer = GOOD[case.mode]
        problems = []
        try:  # a first good request: the process is up before the clock of the case starts
            if not peer.send(request) or hostile.read_exactly(peer, len(answer), 20) != answer:
                problems.append("the warm-up request got no right answer")
            start = hostile.time.monotonic()
            problems += play(peer, case)
            elapsed = hostile.time.monotonic() - start
        finally:
            status = peer.close()
        if status != 0 or peer.stderr:
            problems.append(f"exit status {status}, stderr {peer.stderr[:300]!r}")
        return case, check(case, problems, elapsed, log.read_text()), peer.rusage.ru_maxrss

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, CASES))
    assert {case.name: problems for case, problems, _ in results if problems} == {}
    peaks = {case.name: peak for case, _, peak in results}
    baseline = min(peaks.values())
    assert {name: peak for name, peak in peaks.items() if peak > baseline + MAX_GROWTH_KIB // 2} == {}


def test_handle_exits_after_idle_timeout(truth, tmp_path):
    """`pfrest handle` applies idle-timeout too: a connection left idle ends, with exit status 0."""
    config_path = write(tmp_path / "idle.json", hostile.endpoints(truth.url + "/lookup", **{"idle-timeout": 0.5}))
    peer = HandlePeer(pfrest_cmd("handle", "-c", config_path, "--log-file", str(tmp_path / "idle.log"), "tcp"),
                      env=pfrest_env())
    request, answer = GOOD[hostile.TCP]
    try:
        assert peer.send(request) and hostile.read_exactly(peer, len(answer), 20) == answer
        started = hostile.time.monotonic()
        assert hostile.read_to_close(peer, 5) == (b"", True)  # stdin still open: it ended by itself
        assert 0.4 < hostile.time.monotonic() - started < 3
    finally:
        assert peer.close() == 0
