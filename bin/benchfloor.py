"""The "Python floor" of pfrest-bench --floor: the least a tcp_table proxy in Python can do, to measure pfrest against.

asyncio on uvloop, httptools for the backend's answers, nothing of pfrest: each Postfix connection gets a
kept-alive HTTP/1.1 connection of its own to the backend, each ``get KEY`` line is one GET there (the key
in the query, as pfrest sends it), and the answer goes back as ``200 VALUE`` (the first value of the JSON
array), ``500 ...`` on a 404 and ``400 ...`` otherwise, with one log line per request (a timestamp, the
key, the status and the time taken) written to a file with the other lines of the same turn of the
event loop in one write, as pfrest writes its own: one write per line would measure the log's system
calls, not the floor.  What it leaves out is what a connector needs and a floor does not: deadlines, a pool shared
by the connections, limits, retries, stats, TLS, any other protocol.

    benchfloor.py PORT BACKEND_PORT LOG_FILE [PROCESSES]

PROCESSES > 1: that many processes, each with its own listener on PORT (SO_REUSEPORT), as ``pfrest
serve --workers N`` has; the first one waits for the others and stops them on SIGTERM.
"""

import asyncio
import collections
import json
import os
import signal
import socket
import sys
import time
from urllib.parse import quote, unquote

import httptools
import uvloop


class Log:
    """The lines of one turn of the loop, written in one ``os.write`` at its end."""

    def __init__(self, fd):
        self.fd, self.lines = fd, []

    def line(self, text: str):
        if not self.lines:
            asyncio.get_running_loop().call_soon(self.flush)
        self.lines.append(text)

    def flush(self):
        lines, self.lines = self.lines, []
        os.write(self.fd, "".join(lines).encode())


log = None


class Upstream(asyncio.Protocol):
    """The backend connection of one Postfix connection; httptools reads its answers one after another."""

    def __init__(self, client):
        self.client, self.body = client, []
        self.parser = httptools.HttpResponseParser(self)

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        body, self.body = b"".join(self.body), []
        self.client.answer(self.parser.get_status_code(), body)

    def connection_lost(self, exc):
        self.client.upstream_lost()


class Client(asyncio.Protocol):
    """One Postfix connection: lines in, one backend request at a time, replies out in order."""

    def __init__(self, backend_port):
        self.backend_port, self.buffer, self.waiting = backend_port, b"", collections.deque()
        self.upstream = self.busy = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        self.waiting.extend(line[4:] for line in lines if line.startswith(b"get "))
        self.next()

    def next(self):
        if self.busy or not self.waiting:
            return
        self.busy = (self.waiting.popleft(), time.monotonic())
        if self.upstream is None:
            self.upstream = asyncio.ensure_future(asyncio.get_running_loop().create_connection(
                lambda: Upstream(self), "127.0.0.1", self.backend_port))
            self.upstream.add_done_callback(self.send)
        elif self.upstream.done():
            self.send(self.upstream)

    def send(self, connected):
        if connected.exception() is not None:
            self.upstream = None
            return self.reply(b"400 backend unreachable", 0)
        key = quote(unquote(self.busy[0].decode(errors="replace")), safe="").encode()
        connected.result()[0].write(b"GET /lookup?key=%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: floor\r\n"
                                    b"Connection: keep-alive\r\n\r\n" % (key, self.backend_port))

    def answer(self, status, body):
        if status == 200:
            self.reply(b"200 " + quote(json.loads(body)[0], safe="@").encode(), status)
        else:
            self.reply(b"500 not found" if status == 404 else b"400 backend status %d" % status, status)

    def reply(self, line, status):
        key, started = self.busy
        self.busy = None
        self.transport.write(line + b"\n")
        log.line("%s floor[%d]: key=%s status=%d ms=%.2f\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), os.getpid(),
                                                                 key.decode(errors="replace"), status,
                                                                 (time.monotonic() - started) * 1000))
        self.next()

    def upstream_lost(self):
        self.upstream = None
        if self.busy:
            self.reply(b"400 backend closed", 0)

    def connection_lost(self, exc):
        if self.upstream is not None and self.upstream.done() and not self.upstream.exception():
            self.upstream.result()[0].close()


async def serve(port, backend_port):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    server = await asyncio.get_running_loop().create_server(lambda: Client(backend_port), sock=listener,
                                                            backlog=1024)
    await server.serve_forever()


def main(argv):
    port, backend_port, log_file = int(argv[0]), int(argv[1]), argv[2]
    processes = int(argv[3]) if len(argv) > 3 else 1
    children = []
    for _ in range(processes - 1):
        pid = os.fork()
        if pid == 0:
            children = None
            break
        children.append(pid)
    if children:   # the first process stops the others with it
        def stop(*_):
            for pid in children:
                os.kill(pid, signal.SIGTERM)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
    global log
    log = Log(os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(serve(port, backend_port))


if __name__ == "__main__":
    main(sys.argv[1:])
