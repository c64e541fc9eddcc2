"""The conversation driver over an in-memory transport: requests split at every byte, pipelined requests,
exactly one reply per request, in order, each in one write; and its timeouts, on a real event loop."""

import asyncio
import time

import pytest

from memory import FakeBackend, MemoryTransport, converse, converse_async, endpoint
from pfrest.protocol import netstring
from pfrest.protocol.verdict import HttpResult

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
        backend = FakeBackend(answers)
        assert converse(endpoint(mode), data, backend, size) == expected, size
        assert len(backend.calls) == len(expected)


@pytest.mark.parametrize("mode", list(CASES))
def test_every_split_point_of_two_requests(mode):
    data, answers, expected = CASES[mode]
    for cut in range(1, len(data)):
        writes = asyncio.run(converse_async(endpoint(mode), [data[:cut], data[cut:]], FakeBackend(answers)))
        assert writes == expected, cut


@pytest.mark.parametrize("mode", list(CASES))
def test_partial_request_at_eof_gets_no_reply(mode):
    data, answers, expected = CASES[mode]
    assert converse(endpoint(mode), data[:-1], FakeBackend(answers), 7) == expected[:-1]


def test_policy_backend_timeout_gets_temporary_action():
    writes = converse(endpoint("policy"), POLICY_REQ % b"unknown", FakeBackend({}))
    assert writes[0].startswith(b"action=DEFER_IF_PERMIT Policy service temporarily unavailable (ref ")


def test_internal_error_still_gets_a_temporary_reply_with_its_reference():
    class Broken(FakeBackend):
        async def lookup(self, params, request_id):
            raise RuntimeError("bug")
    for mode, data, reply in (("tcp-lookup", b"get k\nget k\n", rb"400 internal%20error%20(ref%20"),
                              ("socketmap-lookup", netstring.encode(b"m k"), rb"42:TEMP internal error (ref ")):
        writes = converse(endpoint(mode), data, Broken({}))
        assert writes and all(w.startswith(reply) for w in writes), writes


def test_a_request_with_the_backend_is_answered_before_the_next_is_read():
    """Pipelined requests: one at a time through the backend, replies in request order."""
    class Slow(FakeBackend):
        async def lookup(self, params, request_id):
            await asyncio.sleep(0.05 if params[0][1] == b"a b" else 0)
            return await super().lookup(params, request_id)
    assert converse(endpoint("tcp-lookup"), TCP_IN, Slow(TCP_ANSWERS)) == TCP_OUT


def test_a_flood_of_pipelined_requests_pauses_reading_and_loses_none():
    data = b"get x\n" * 1000
    writes = converse(endpoint("tcp-lookup"), data, FakeBackend(TCP_ANSWERS), size=6000)
    assert writes == [b"200 y\n"] * 1000


def test_connection_lost_while_answering_ends_once_the_answer_is_in():
    async def run():
        release = asyncio.Event()

        class Waiting(FakeBackend):
            async def lookup(self, params, request_id):
                await release.wait()
                return HttpResult(200, b'["late"]')
        from pfrest.conversation.conversation import Conversation
        from pfrest.conversation.services import Origin, Services
        services = Services(backend_for=lambda _: Waiting({}))
        services.apply([endpoint("tcp-lookup")], "test")
        ended = []
        conversation = Conversation(services, Origin("ep"), "t", on_end=ended.append)
        transport = MemoryTransport(conversation)
        conversation.connection_made(transport)
        conversation.data_received(b"get k\n")
        await asyncio.sleep(0.01)
        transport.closed = True
        conversation.connection_lost(ConnectionResetError(104, "reset"))
        assert ended == []  # a request is still with the backend
        release.set()
        await asyncio.sleep(0.01)
        assert ended == [conversation] and transport.writes == []  # nowhere to write it
    asyncio.run(run())


def test_idle_and_partial_request_timeouts():
    """The partial-request limit counts from a request's first byte, however it drips; the idle limit
    from the last reply."""
    async def run():
        from pfrest.conversation.conversation import Conversation
        from pfrest.conversation.services import Origin, Services
        services = Services(backend_for=lambda _: FakeBackend(TCP_ANSWERS))
        services.apply([endpoint("tcp-lookup", idle_timeout=0.3, partial_request_timeout=0.4)], "test")
        ended = asyncio.get_running_loop().create_future()
        conversation = Conversation(services, Origin("ep"), "t", on_end=ended.set_result)
        transport = MemoryTransport(conversation)
        conversation.connection_made(transport)
        started = time.monotonic()
        for _ in range(3):  # answered requests keep an idle connection open past its idle limit
            conversation.data_received(b"get x\n")
            await asyncio.sleep(0.2)
        assert not ended.done() and transport.writes == [b"200 y\n"] * 3
        dripped = time.monotonic()
        for byte in b"get xxxxxxxxxx":  # a byte every 0.1 s: cut 0.4 s after the first one
            if ended.done():
                break
            conversation.data_received(bytes([byte]))
            await asyncio.sleep(0.1)
        await asyncio.wait_for(ended, 2)
        assert 0.35 < time.monotonic() - dripped < 0.8
        assert time.monotonic() - started > 0.9
    asyncio.run(run())
