"""The conversation driver with nothing but memory around it: an in-memory transport that records each
write, and a backend answering from a dict.  For tests of the conversation's logic (framing, order,
one reply per request in one write) that need no socket; the sockets are in test_serve and test_handle."""

import asyncio

from pfrest import config
from pfrest.conversation.conversation import Conversation
from pfrest.conversation.services import Origin, Services
from pfrest.protocol.verdict import Failure, HttpResult


class MemoryTransport(asyncio.Transport):
    def __init__(self, protocol):
        super().__init__()
        self.protocol, self.writes = protocol, []
        self.closed = self.paused = False

    def write(self, data):
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def is_closing(self):
        return self.closed

    def close(self):
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    abort = close

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False


class FakeBackend:
    """Answers from a dict (lookup key, or policy recipient), records calls."""

    def __init__(self, answers, default=HttpResult(404, b"")):
        self.answers, self.default, self.calls = answers, default, []

    async def lookup(self, params, request_id):
        self.calls.append(dict(params))
        return self.answers.get(dict(params)["key"], self.default)

    async def policy(self, pairs, request_id):
        self.calls.append(pairs)
        return self.answers.get(dict(pairs).get(b"recipient"), Failure("timeout"))

    def close(self):
        pass


def endpoint(mode, **extra):
    return config.Endpoint(name="ep", mode=mode, target="http://127.0.0.1:1/", **extra)


async def converse_async(ep, chunks, backend, eof=True):
    services = Services(backend_for=lambda _: backend)
    services.apply([ep], "test")
    ended = asyncio.get_running_loop().create_future()
    conversation = Conversation(services, Origin(ep.name), "test", on_end=lambda conv: ended.set_result(None))
    transport = MemoryTransport(conversation)
    conversation.connection_made(transport)
    for chunk in chunks:
        while transport.paused and not transport.closed:
            await asyncio.sleep(0)
        if transport.closed:
            break
        conversation.data_received(chunk)
    if eof and not transport.closed:
        conversation.eof_received()
    await asyncio.wait_for(ended, 10)
    return transport.writes


def converse(ep, data, backend, size=None):
    """The writes of a whole conversation whose input arrives in pieces of ``size`` bytes, then EOF."""
    size = size or max(len(data), 1)
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    return asyncio.run(converse_async(ep, chunks, backend))
