"""The conversation loop over in-memory streams: requests split at every byte, pipelined requests,
exactly one reply per request, in order, each in one write."""

import io

import pytest

from pfrest import config
from pfrest.protocol import netstring
from pfrest.dialogue import serve
from pfrest.responder import Responder
from pfrest.protocol.verdict import Failure, HttpResult


class ChunkedReader:
    """rfile that returns the input in fixed-size pieces, like a socket would."""

    def __init__(self, data, size):
        self.data, self.size = data, size

    def read1(self, n):
        piece, self.data = self.data[:min(n, self.size)], self.data[min(n, self.size):]
        return piece


class Writes(io.RawIOBase):
    def __init__(self):
        self.writes = []

    def writable(self):
        return True

    def write(self, b):
        self.writes.append(bytes(b))
        return len(b)


class FakeBackend:
    """The backend seam: answers from a dict, records calls."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def lookup(self, params, request_id):
        self.calls.append(dict(params))
        return self.answers.get(dict(params)["key"], HttpResult(404, b""))

    def policy(self, pairs, request_id):
        self.calls.append(pairs)
        return self.answers.get(dict(pairs)[b"recipient"], Failure("timeout"))


def endpoint(mode):
    return config.Endpoint(name="ep", mode=mode, target="http://127.0.0.1:1/")


def run(mode, data, answers, size):
    backend = FakeBackend(answers)
    out = Writes()
    why = serve(ChunkedReader(data, size), out, Responder(endpoint(mode), backend))
    return out.writes, backend, why


TCP_IN = b"get a%20b\nget missing\nget x\n"
TCP_ANSWERS = {b"a b": HttpResult(200, b'["v 1"]'), b"x": HttpResult(200, b'["y"]')}
TCP_OUT = [b"200 v%201\n", b"500 not%20found\n", b"200 y\n"]

SM_IN = netstring.encode(b"m a b") + netstring.encode(b"m missing") + netstring.encode(b"m x")
SM_OUT = [b"6:OK v 1,", b"9:NOTFOUND ,", b"4:OK y,"]

POLICY_REQ = b"request=smtpd_access_policy\nsender=s\nrecipient=%s\n\n"
POLICY_IN = POLICY_REQ % b"a b" + POLICY_REQ % b"x"
POLICY_ANSWERS = {b"a b": HttpResult(200, b"REJECT no"), b"x": HttpResult(200, b"DUNNO")}
POLICY_OUT = [b"action=REJECT no\n\n", b"action=DUNNO\n\n"]

CASES = {
    "tcp-lookup": (TCP_IN, TCP_ANSWERS, TCP_OUT),
    "socketmap-lookup": (SM_IN, TCP_ANSWERS, SM_OUT),
    "policy": (POLICY_IN, POLICY_ANSWERS, POLICY_OUT),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_split_at_every_byte_and_all_at_once(mode):
    data, answers, expected = CASES[mode]
    for size in list(range(1, 17)) + [len(data)]:
        writes, backend, why = run(mode, data, answers, size)
        assert writes == expected, size
        assert why == "eof"
        assert len(backend.calls) == len(expected)


@pytest.mark.parametrize("mode", list(CASES))
def test_every_split_point_of_two_requests(mode):
    data, answers, expected = CASES[mode]
    for cut in range(1, len(data)):
        class TwoPieces:
            pieces = [data[:cut], data[cut:]]

            def read1(self, n):
                return self.pieces.pop(0) if self.pieces else b""
        out = Writes()
        serve(TwoPieces(), out, Responder(endpoint(mode), FakeBackend(answers)))
        assert out.writes == expected, cut


@pytest.mark.parametrize("mode", list(CASES))
def test_partial_request_at_eof_gets_no_reply(mode):
    data, answers, expected = CASES[mode]
    writes, backend, why = run(mode, data[:-1], answers, 7)
    assert writes == expected[:-1]
    assert why == "eof"


def test_policy_backend_timeout_gets_temporary_action():
    writes, _, _ = run("policy", POLICY_REQ % b"unknown", {}, 1000)
    assert writes[0].startswith(b"action=DEFER_IF_PERMIT Policy service temporarily unavailable (ref ")


def test_internal_error_still_gets_a_temporary_reply():
    class Broken(FakeBackend):
        def lookup(self, params, request_id):
            raise RuntimeError("bug")
    for mode, data, reply in (("tcp-lookup", b"get k\nget k\n", b"400 internal%20error\n"),
                              ("socketmap-lookup", netstring.encode(b"m k"), b"19:TEMP internal error,")):
        out = Writes()
        serve(ChunkedReader(data, 100), out, Responder(endpoint(mode), Broken({})))
        assert out.writes and set(out.writes) == {reply}


def test_read_errors_end_quietly():
    class Reset:
        def read1(self, n):
            raise ConnectionResetError(104, "reset")

    class Timeout:
        def read1(self, n):
            raise TimeoutError

    responder = Responder(endpoint("tcp-lookup"), FakeBackend({}))
    assert serve(Reset(), Writes(), responder).startswith("read error")
    assert serve(Timeout(), Writes(), responder) == "timeout"


def test_broken_pipe_on_write_ends_quietly():
    class Gone(Writes):
        def write(self, b):
            raise BrokenPipeError(32, "broken pipe")
    responder = Responder(endpoint("tcp-lookup"), FakeBackend({}))
    assert serve(ChunkedReader(b"get a\nget b\n", 100), Gone(), responder) == "write error"


def test_short_writes_are_completed():
    class Short(Writes):
        def write(self, b):
            self.writes.append(bytes(b[:3]))
            return min(3, len(b))
    out = Short()
    serve(ChunkedReader(b"get x\n", 100), out, Responder(endpoint("tcp-lookup"), FakeBackend(TCP_ANSWERS)))
    assert b"".join(out.writes) == b"200 y\n"


def test_before_read_sees_pending_state_and_timeouts():
    seen = []
    serve(ChunkedReader(b"get x\nge", 3), Writes(),
          Responder(endpoint("tcp-lookup"), FakeBackend(TCP_ANSWERS)),
          before_read=lambda pending, timeout: seen.append((pending, timeout)))
    assert [pending for pending, _ in seen] == [False, True, False, True]
    idle, partial = config.DEFAULT_IDLE_TIMEOUT["tcp-lookup"], config.PARTIAL_REQUEST_TIMEOUT
    assert [t for p, t in seen if not p] == [idle, idle]
    assert all(partial - 1 < t <= partial for p, t in seen if p)


def test_partial_request_deadline_counts_from_the_first_byte(monkeypatch):
    """A client dripping a byte at a time gets the partial-request limit in total, not per read."""
    clock = [100.0]
    monkeypatch.setattr("pfrest.dialogue.time.monotonic", lambda: clock[0])

    class Drip(ChunkedReader):
        def read1(self, n):
            clock[0] += 4  # every byte arrives 4 s after the previous one
            return super().read1(n)
    timeouts = []
    ep = config.Endpoint(name="ep", mode="tcp-lookup", target="http://127.0.0.1:1/", partial_request_timeout=10)
    serve(Drip(b"get x\nget yy", 1), Writes(), Responder(ep, FakeBackend(TCP_ANSWERS)),
          before_read=lambda pending, timeout: timeouts.append(timeout))
    # before g, e, t, SP, x, LF (10 - 4k s left, at least 0.001); then idle again, and a new request
    assert timeouts[:6] == [600.0, 10, 6, 2, 0.001, 0.001]
    assert timeouts[6:9] == [600.0, 10, 6]
