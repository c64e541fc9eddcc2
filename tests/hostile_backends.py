"""Hostile HTTP/1.1 lookup backends for the pipelining tests: raw asyncio servers that read pipelined
requests and answer them wrongly in one chosen way (out of order, a close mid-pipeline, a slow key, 1xx
interim answers, a copy of an answer, a malformed answer, only the first request of a read, no
X-Request-Id echo), or
rightly but in a way that strains the reading of answers one after another (chunked and large).  Some keys
tell any of them what to do: "missing..." 404, "error..." 500; with SLOW, "slow..." takes SLOW_SECONDS
("slow-copy..." then comes with a copy of its answer) and "late-copy..." has its answer sent once more
LATE_COPY seconds later.

Each is a real server on 127.0.0.1, a port of the kernel's choosing, TCP_NODELAY, on its own event loop
in a thread of the test process.  It answers like the other lookup backends of tests/pipeline_backends.py
(GET /lookup?key=K: 200 ["value-of-K"], 404 for a key starting "missing"; /policy: OK policy-RECIPIENT,
the recipient from the form body, whatever the method: pfrest's policy requests are GET by default)
and records every request: its connection, key, X-Request-Id, whether it is a policy request, the time
it was read and how many requests of its connection were waiting with it.  The hostility acts on a
*batch*: two requests or more read and not yet answered on one connection, which only pipelining makes;
one request at a time is answered right (so a temporary error the clients get is one the design accounts
for), but by ECHO_ONCE (no echo after a connection's first answer) and FIRST_OF_READ (a read's first).
A batch's answers go out in one write, as a server buffering its output sends them.
"""

import asyncio
import json
import re
import socket
import threading
import time
from collections import Counter
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

SLOW_SECONDS = 1.5          # how long a key starting "slow" takes, on its connection (which waits with it)
LATE_COPY = 0.05            # seconds after its answer that a key starting "late-copy" has it sent again
HEAD_END = b"\r\n\r\n"
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
REQUEST_ID = re.compile(rb"\r\nx-request-id:\s*([^\r\n]*)", re.I)
REASONS = {200: b"OK", 404: b"Not Found", 500: b"Internal Server Error"}
INTERIMS = (b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")

PADDING = 200_000           # bytes of white space after a BULKY answer's JSON: it takes several reads

MALFORMED_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n"

HONEST, OUT_OF_ORDER, CLOSE_MID, SLOW, INTERIM, COPY, FIRST_OF_READ, NO_ECHO, ECHO_ONCE, BULKY, MALFORMED = (
    "honest", "out-of-order", "close-mid-pipeline", "slow-first-key", "interim-1xx", "copy", "first-of-read",
    "no-echo", "echo-once", "chunked-and-large", "malformed")
BEHAVIOURS = (HONEST, OUT_OF_ORDER, CLOSE_MID, SLOW, INTERIM, COPY, FIRST_OF_READ, NO_ECHO, ECHO_ONCE, BULKY,
              MALFORMED)


class Seen(NamedTuple):
    connection: int
    policy: bool      # a policy request (to /policy), else a lookup
    key: str          # the lookup key, or the policy recipient
    request_id: bytes
    arrived: float    # time.monotonic() when it was read
    waiting: int      # requests of its connection read and not yet answered, itself included


def answer_for(request: Seen, echo: bool, bulky=None) -> bytes:
    """The right answer to a request, as bytes; ``bulky``: "chunked" (in three chunks) or "large" (its
    JSON padded with PADDING bytes of white space)."""
    if request.policy:
        status, kind, body = 200, b"text/plain", b"OK policy-" + request.key.encode()
    elif request.key.startswith("missing"):
        status, kind, body = 404, b"text/plain", b""
    elif request.key.startswith("error"):   # a backend's own failure, on a connection it keeps alive
        status, kind, body = 500, b"text/plain", b"failed"
    else:
        status, kind, body = 200, b"application/json", json.dumps(["value-of-" + request.key]).encode()
    echoed = b"X-Request-Id: %s\r\n" % request.request_id if echo and request.request_id else b""
    if bulky == "chunked":
        thirds = (body[:len(body) // 3], body[len(body) // 3:len(body) * 2 // 3], body[len(body) * 2 // 3:])
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in thirds if part)
        return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n%s\r\n%s0\r\n\r\n" % (
            status, REASONS[status], kind, echoed, chunks)
    if bulky == "large" and status == 200:
        body += b" " * PADDING
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status, REASONS[status], kind, len(body), echoed, body)


def parse(buffer: bytes):
    """(target, head, body, rest) of the first whole request in ``buffer``, or None."""
    end = buffer.find(HEAD_END)
    if end < 0:
        return None
    head = buffer[:end]
    match = CONTENT_LENGTH.search(head)
    length = int(match.group(1)) if match else 0
    if len(buffer) < end + 4 + length:
        return None
    target = head.split(b" ", 2)[1]
    return target, head, buffer[end + 4:end + 4 + length], buffer[end + 4 + length:]


def is_policy(target) -> bool:
    return target.startswith(b"/policy")


def key_of(target, body) -> str:
    if is_policy(target):
        return dict(parse_qsl(body.decode("latin-1"))).get("recipient", "")
    return dict(parse_qsl(urlsplit(target.decode("latin-1")).query)).get("key", "")


class _Connection(asyncio.Protocol):
    """One backend connection: reads requests into a queue, answers them in order (``_answer``)."""

    def __init__(self, server, number):
        self.server, self.number = server, number
        self.buffer, self.queue, self.answered = b"", asyncio.Queue(), 0
        self.out = []   # the answers of a batch, written at once as a server with output buffering does
        self.waiting = 0
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.task = asyncio.ensure_future(self._answer())
        self.server.transports.add(transport)

    def connection_lost(self, exc):
        self.task.cancel()
        self.server.transports.discard(self.transport)

    def data_received(self, data):
        now = time.monotonic()
        self.buffer += data
        first, read = True, []
        self.server.reads.append(read)
        while True:
            parsed = parse(self.buffer)
            if parsed is None:
                return
            target, head, body, self.buffer = parsed
            match = REQUEST_ID.search(head)
            ignored = self.server.behaviour == FIRST_OF_READ and not first
            self.waiting += not ignored
            seen = Seen(self.number, is_policy(target), key_of(target, body), match.group(1) if match else b"",
                        now, self.waiting + ignored)   # an ignored request waits with the others, forever
            self.server.seen.append(seen)
            read.append(seen.key)
            if seen.key.startswith("slow"):
                self.server.slow_seen.set()
            if ignored:
                self.server.ignored.append(seen)
                self.server.hostile_events.add(self.number)
                self.server.victims.add(seen.key)
            else:
                self.queue.put_nowait(seen)
            first = False

    def _write(self, request, echo=None):
        echo = self.server.echoes(self.answered) if echo is None else echo
        if not echo and self.server.behaviour == ECHO_ONCE:
            self.server.victims.add(request.key)   # pfrest may take it for a stray answer
        bulky = ("chunked", "large")[self.answered % 2] if self.server.behaviour == BULKY else None
        self.out.append(answer_for(request, echo, bulky))
        self.answered += 1
        self.waiting -= 1

    async def _answer(self):
        server = self.server
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            if len(batch) > 1 and server.behaviour in (OUT_OF_ORDER, CLOSE_MID, COPY, MALFORMED):
                server.hostile_events.add(self.number)
                if server.behaviour == OUT_OF_ORDER:
                    server.victims.add(batch[0].key)   # the answer read as its own is another's
                    for request in reversed(batch):
                        self._write(request)
                    self._flush()
                    continue
                self._write(batch[0])
                if server.behaviour == CLOSE_MID:
                    self._flush()
                    self.transport.close()
                    return
                # the copy, or a malformed answer: read as the next one's answer
                self.out.append(answer_for(batch[0], True) if server.behaviour == COPY else MALFORMED_ANSWER)
                server.victims.add(batch[1].key)
                batch = batch[1:]
            for request in batch:
                if server.behaviour == SLOW and request.key.startswith("slow"):
                    self._flush()
                    await asyncio.sleep(SLOW_SECONDS)
                    server.slow_answered[request.key] = time.monotonic()
                if server.behaviour == INTERIM and self.answered % 2 == 0:
                    self.out.append(INTERIMS[self.answered // 2 % 2])
                self._write(request)
                if server.behaviour == SLOW and request.key.startswith("slow-copy"):   # in the answer's write
                    self.out.append(answer_for(request, True))
                if server.behaviour == SLOW and request.key.startswith("late-copy"):   # on an idle connection
                    copy = answer_for(request, True)
                    asyncio.get_running_loop().call_later(LATE_COPY, self.transport.write, copy)
            self._flush()

    def _flush(self):
        if self.out:
            self.transport.write(b"".join(self.out))
            self.out = []


class HostileBackend:
    """A lookup backend with one ``behaviour`` of BEHAVIOURS, running until ``stop()``.

    ``seen``: every request read (Seen); ``hostile_events``: the connections it misbehaved on;
    ``ignored``: the requests FIRST_OF_READ dropped; ``slow_answered``: key -> when a slow key's answer
    was written; ``victims``: the keys whose answer it spoilt (a request pfrest may have to answer with a
    temporary error, by the design); ``slow_seen``: set when a slow key came; ``reads``: the keys of the
    requests completed by each read, in order."""

    def __init__(self, behaviour):
        assert behaviour in BEHAVIOURS, behaviour
        self.behaviour = behaviour
        self.seen, self.ignored, self.hostile_events, self.slow_answered = [], [], set(), {}
        self.victims, self.slow_seen, self.reads = set(), threading.Event(), []
        self.transports, self.connections = set(), 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True, name=f"backend-{behaviour}")
        self.thread.start()
        assert ready.wait(10), "the hostile backend did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def echoes(self, answered: int) -> bool:
        """Whether the answer after ``answered`` others on its connection echoes X-Request-Id."""
        return self.behaviour != NO_ECHO and not (self.behaviour == ECHO_ONCE and answered)

    def _protocol(self):
        self.connections += 1
        return _Connection(self, self.connections)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(self.loop.create_server(self._protocol, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def stop(self):
        def end():
            self.server.close()
            for transport in list(self.transports):
                transport.abort()
            self.loop.call_later(0.05, self.loop.stop)   # lets the connections' tasks see their cancellation
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(end)
            self.thread.join(10)
        self.loop.close()

    # --- what it saw ---

    def batches(self) -> int:
        """The requests that came while another of their connection was waiting: pipelined ones."""
        return sum(1 for s in self.seen if s.waiting > 1)

    def policy_ids(self) -> Counter:
        return Counter(s.request_id for s in self.seen if s.policy)

    def policy_pipelined(self):
        """Requests that shared a batch on a connection that carried a policy request: none may."""
        carried = {s.connection for s in self.seen if s.policy}
        return [s for s in self.seen if s.connection in carried and s.waiting > 1]

    def arrivals(self, key):
        return [s.arrived for s in self.seen if s.key == key]
