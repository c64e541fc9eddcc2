"""pfrest-bench --steps: the CPU each step of a request's hot path costs, in-process, without sockets.

For one tcp_table lookup, one socketmap lookup and one policy request, each step is run on its own
(best of --steps-rounds rounds of --steps-iterations calls, time.perf_counter_ns; the machine's other
load makes rounds slower, never faster, so the best is the figure): decoding Postfix's request, the
request id, building the backend request's bytes, reading the backend's answer (httptools), the
verdict, the answer (verdict and reply bytes), stats.record, the log line (formatted and handed to
the line handler, whose stream is a null one), and then the whole conversation in memory (a
Conversation on a transport that only records its writes, a backend that answers at once, uvloop's
loop as under ``serve``): what it costs beyond the steps it runs is its own overhead.  Then the backend
client's whole call, its connection's transport in memory answering in the next turn of the loop
(echoing the X-Request-Id, as the pool then reuses the connection): its own overhead is what it costs
beyond building the request and reading the answer.  Last, the two ways a request can wait for its
backend: an asyncio task per request against a future and a callback.

Figures in ns per request; they move with the machine, not with its load as much as throughput does.
"""

import asyncio
import gc
import logging
import socket
import time

from pfrest import config
from pfrest import log as logs
from pfrest.backend import client as clients
from pfrest.backend import route as routes
from pfrest.backend.connection import Connection
from pfrest.backend.request import Template, new_request_id
from pfrest.backend.response import ResponseReader
from pfrest.conversation import requestlog
from pfrest.conversation.conversation import Conversation
from pfrest.conversation.services import Origin, Services
from pfrest.ops.counters import Stats
from pfrest.protocol import verdict
from pfrest.protocol.answers import mode_for
from pfrest.protocol.verdict import HttpResult
from pfrest.system.eventloop import new_loop

USER_AGENT = "pfrest-bench"
LOGGER = logging.getLogger("pfrest")
FOUND_ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 07 Dec 2026 05:00:00 GMT\r\n"
                b"Content-Type: application/json\r\nContent-Length: 9\r\nConnection: keep-alive\r\n\r\n"
                b'["value"]')
POLICY_ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 07 Dec 2026 05:00:00 GMT\r\n"
                 b"Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nDUNNO")
# What smtpd sends at RCPT TO (Postfix 3.7), one attribute per line
POLICY_REQUEST = b"".join(b"%s=%s\n" % pair for pair in (
    (b"request", b"smtpd_access_policy"), (b"protocol_state", b"RCPT"), (b"protocol_name", b"ESMTP"),
    (b"client_address", b"192.0.2.10"), (b"client_name", b"mail.example.com"),
    (b"client_port", b"40312"), (b"reverse_client_name", b"mail.example.com"),
    (b"server_address", b"198.51.100.1"), (b"server_port", b"25"), (b"helo_name", b"mail.example.com"),
    (b"sender", b"alice@example.com"), (b"recipient", b"bob@example.net"), (b"recipient_count", b"0"),
    (b"queue_id", b""), (b"instance", b"1f2e.5fd5a1c0.8f3a1.0"), (b"size", b"1234"),
    (b"etrn_domain", b""), (b"stress", b""), (b"sasl_method", b""), (b"sasl_username", b""),
    (b"sasl_sender", b""), (b"ccert_subject", b""), (b"ccert_issuer", b""), (b"ccert_fingerprint", b""),
    (b"ccert_pubkey_fingerprint", b""), (b"encryption_protocol", b"TLSv1.3"),
    (b"encryption_cipher", b"TLS_AES_256_GCM_SHA384"), (b"encryption_keysize", b"256"),
    (b"policy_context", b""), (b"server_hostname", b"mx.example.net"), (b"compatibility_level", b"3.6"),
    (b"mail_version", b"3.7.11"))) + b"\n"
KEY = b"user@example.com"
CASES = (   # name, endpoint mode, a request as Postfix sends it, the backend's answer
    ("tcp", "tcp-lookup", b"get " + KEY + b"\n", FOUND_ANSWER),
    ("socketmap", "socketmap-lookup", b"%d:virtual %s," % (len(KEY) + 8, KEY), FOUND_ANSWER),
    ("policy", "policy", POLICY_REQUEST, POLICY_ANSWER),
)
STEPS = ("decode", "request id", "backend request", "backend answer", "verdict", "answer (verdict+reply)",
         "stats.record", "log line", "sum of the steps", "conversation, in memory", "its own overhead",
         "backend client, in memory", "client's own overhead")
TASK_ROWS = ("asyncio task per request", "future + callback")


class NullStream:
    """The log handler's stream: takes every line, keeps nothing."""

    def write(self, text):
        pass

    def flush(self):
        pass


def best_ns(call, iterations, rounds):
    """The fastest round's time per call, in ns (garbage collection off while timing, as timeit does)."""
    best = None
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            start = time.perf_counter_ns()
            call(iterations)
            took = (time.perf_counter_ns() - start) / iterations
            best = took if best is None or took < best else best
    finally:
        if gc_was:
            gc.enable()
    return best


async def best_async_ns(run, iterations, rounds):
    """best_ns for a coroutine function ``run(iterations)``, on the running loop."""
    best = None
    gc.disable()
    try:
        for _ in range(rounds):
            start = time.perf_counter_ns()
            await run(iterations)
            took = (time.perf_counter_ns() - start) / iterations
            best = took if best is None or took < best else best
    finally:
        gc.enable()
    return best


def repeat(function, *args):
    """A call of ``iterations`` times ``function(*args)``."""
    def run(iterations):
        for _ in range(iterations):
            function(*args)
    return run


class InstantBackend:
    """Answers every lookup and policy request at once, with the result the case's answer reads as."""

    def __init__(self, result):
        self.result = result

    async def lookup(self, params, request_id):
        return self.result

    async def policy(self, pairs, request_id):
        return self.result

    def close(self):
        pass


class CountingTransport(asyncio.Transport):
    """Records nothing but that a reply was written, and wakes the driver waiting for it."""

    def __init__(self):
        super().__init__()
        self.waiter = None

    def write(self, data):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def is_closing(self):
        return False

    def close(self):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def endpoint(mode):
    return config.Endpoint(name="bench", mode=mode, target="http://127.0.0.1:8080/lookup")


def read_answer(answer, request_id):
    reader = ResponseReader(request_id, False)
    reader.feed(answer)
    return reader.result


def measure_case(mode_name, request, answer, iterations, rounds):
    """{step: ns} for one kind of request."""
    ep = endpoint(mode_name)
    mode = mode_for(ep)
    decoder = mode.decoder()
    item = decoder.feed(request)[0]
    request_id = new_request_id()
    call = mode.call(item)
    template = Template(ep, USER_AGENT, routes.for_target(ep.targets[0], ep.proxy))
    build = template.lookup if call.kind == "lookup" else template.policy
    rid = request_id.encode("ascii")
    result = read_answer(answer, rid)
    assert result.__class__ is HttpResult and result.status == 200, result
    judge = (lambda r: verdict.lookup(r, ep.list_separator)) if call.kind == "lookup" else verdict.policy
    reply = mode.answer(item, result, request_id)
    stats = Stats(mode_name)
    service_name, subject = ep.name, mode.subject

    def log_line(_):
        warning = requestlog.warns(result, reply)
        if LOGGER.isEnabledFor(logging.WARNING if warning else logging.INFO):
            logs.request(requestlog.line(service_name, request_id, subject(item), result, reply, 1.25), warning)

    figures = {
        "decode": best_ns(repeat(decoder.feed, request), iterations, rounds),
        "request id": best_ns(repeat(new_request_id), iterations, rounds),
        "backend request": best_ns(repeat(build, call.params, request_id), iterations, rounds),
        "backend answer": best_ns(repeat(read_answer, answer, rid), iterations, rounds),
        "verdict": best_ns(repeat(judge, result), iterations, rounds),
        "answer (verdict+reply)": best_ns(repeat(mode.answer, item, result, request_id), iterations, rounds),
        "stats.record": best_ns(repeat(stats.record, reply.verdict, 1.25, result, reply.action, 1.0),
                                iterations, rounds),
        "log line": best_ns(repeat(log_line, None), iterations, rounds),
    }
    figures["sum of the steps"] = sum(figures[step] for step in STEPS[:8] if step != "verdict")
    figures["conversation, in memory"] = conversation_ns(ep, request, result, iterations, rounds)
    # the conversation runs decode, request id, answer, stats and log line, not the backend's steps
    figures["its own overhead"] = figures["conversation, in memory"] - sum(
        figures[step] for step in ("decode", "request id", "answer (verdict+reply)", "stats.record", "log line"))
    figures["backend client, in memory"] = client_ns(ep, call.params, answer, iterations, rounds)
    figures["client's own overhead"] = figures["backend client, in memory"] - figures["backend request"] \
        - figures["backend answer"]
    return figures


def conversation_ns(ep, request, result, iterations, rounds):
    """Per request: one read of one request, answered through a backend that answers at once, on
    uvloop's loop (asyncio's where it is missing), up to the reply's write."""
    loop = new_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_conversation(ep, request, result, iterations, rounds))
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def _conversation(ep, request, result, iterations, rounds):
    backend = InstantBackend(result)
    services = Services(backend_for=lambda _: backend)
    services.apply([ep], USER_AGENT)
    conversation = Conversation(services, Origin(ep.name), "bench")
    transport = CountingTransport()
    conversation.connection_made(transport)
    loop = asyncio.get_running_loop()

    async def run(iterations):
        for _ in range(iterations):
            transport.waiter = loop.create_future()
            conversation.data_received(request)
            await transport.waiter

    return await best_async_ns(run, iterations, rounds)


class AnsweringTransport(asyncio.Transport):
    """A backend connection's transport that answers each request in the next turn of the loop, with
    the request's own X-Request-Id echoed (so that the pool reuses the connection as it would a real
    backend's), and a socket with nothing to read for the pool's look before a policy request."""

    def __init__(self, loop, answer, sock):
        super().__init__()
        self.loop, self.answer, self.sock, self.protocol = loop, answer, sock, None

    def write(self, data):
        start = data.index(b"X-Request-Id: ") + len(b"X-Request-Id: ")
        head, _, body = self.answer.partition(b"\r\n\r\n")
        echoed = b"%s\r\nX-Request-Id: %s\r\n\r\n%s" % (head, data[start:data.index(b"\r\n", start)], body)
        self.loop.call_soon(self.protocol.data_received, echoed)

    def get_extra_info(self, name, default=None):
        return self.sock if name == "socket" else default

    def is_closing(self):
        return False

    def abort(self):
        pass

    close = abort


def client_ns(ep, params, answer, iterations, rounds):
    """Per request: the backend client's whole call (request bytes, pool, exchange, reading the
    answer, deadline, observer), its connection's transport answering in the next turn of the loop."""
    loop = new_loop()
    asyncio.set_event_loop(loop)
    quiet, other = socket.socketpair()   # nothing is ever written to it: the look finds it quiet
    real = clients.open_connection

    async def connected(loop, route, files, user_agent):
        conn = Connection(loop)
        transport = AnsweringTransport(loop, answer, quiet)
        transport.protocol = conn
        conn.connection_made(transport)
        return conn

    clients.open_connection = connected   # the one seam without a socket: a connection made in memory
    try:
        client = clients.Client(ep, USER_AGENT, observer=Stats(ep.mode))
        ask = client.lookup if ep.mode != "policy" else client.policy
        return loop.run_until_complete(_client(ask, params, iterations, rounds))
    finally:
        clients.open_connection = real
        quiet.close()
        other.close()
        asyncio.set_event_loop(None)
        loop.close()


async def _client(ask, params, iterations, rounds):
    request_id = new_request_id()
    result = await ask(params, request_id)
    assert result.__class__ is HttpResult and result.status == 200, result

    async def run(iterations):
        for _ in range(iterations):
            await ask(params, request_id)

    return await best_async_ns(run, iterations, rounds)


def task_vs_callback(iterations, rounds):
    """{row: ns}: a request waiting for an instant answer in a task of its own, and with a future."""
    loop = new_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_task_vs_callback(iterations, rounds))
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def _task_vs_callback(iterations, rounds):
    loop = asyncio.get_running_loop()

    async def answered():
        return None

    async def ask(done):
        await answered()
        done()

    async def by_task(n):
        for _ in range(n):
            waiter = loop.create_future()
            loop.create_task(ask(partial_set(waiter)))
            await waiter

    async def by_callback(n):
        for _ in range(n):
            waiter = loop.create_future()
            asked = loop.create_future()
            asked.add_done_callback(lambda _f, w=waiter: w.set_result(None))
            loop.call_soon(asked.set_result, None)
            await waiter

    return {row: await best_async_ns(driver, iterations, rounds)
            for row, driver in zip(TASK_ROWS, (by_task, by_callback))}


def partial_set(future):
    return lambda: future.set_result(None)


def run(iterations=20000, rounds=5, out=None):
    """Measure and print the table; returns {case: {step: ns}}."""
    import sys
    out = out or sys.stdout
    logs._install(logs.LineHandler(NullStream(), logs.FORMAT_STDERR), logging.INFO)
    figures = {name: measure_case(mode, request, answer, iterations, rounds)
               for name, mode, request, answer in CASES}
    tasks = task_vs_callback(iterations, rounds)
    names = [name for name, *_ in CASES]
    print(f"\nper-step CPU, ns per request (best of {rounds} rounds of {iterations}; in-process, no sockets)",
          file=out)
    print(f"{'step':<26}" + "".join(f"{name:>11}" for name in names), file=out)
    for step in STEPS:
        print(f"{step:<26}" + "".join(f"{figures[name][step]:>11.0f}" for name in names), file=out)
    print("waiting for an instant backend answer:", file=out)
    for row in TASK_ROWS:
        print(f"  {row:<24}{tasks[row]:>11.0f}", file=out)
    return figures
