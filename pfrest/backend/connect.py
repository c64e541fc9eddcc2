"""Opening a connection along a route: DNS, Happy Eyeballs, proxy tunnel, TLS.

Happy Eyeballs (RFC 8305) is done here because uvloop's create_connection has no
happy_eyeballs_delay: the addresses of the name, interleaved by family, are tried one after another,
a new attempt every ATTEMPT_DELAY or as soon as the previous one failed; the first to connect wins and
every other is closed.  A dead address (SYNs dropped) then costs ATTEMPT_DELAY, not the whole
request-timeout.  Deadlines are the caller's (cancellation): DNS, connecting, CONNECT and TLS
handshakes all end with it.
"""

import asyncio
import socket
from collections import deque

from pfrest.backend import tls
from pfrest.backend.connection import Connection
from pfrest.backend.errors import Failed
from pfrest.backend.request import connect_request
from pfrest.backend.response import TunnelReply

ATTEMPT_DELAY = 0.25   # seconds; RFC 8305's recommended Connection Attempt Delay


async def open_connection(loop, route, files: tls.Files, user_agent: str) -> Connection:
    """A live Connection to the route's target (through its proxy, TLS done), or an exception.
    Nothing of a request has been written when it raises."""
    hop = route.first_hop
    sock = await first_connected(loop, await addresses(loop, hop.host, hop.port))
    try:
        _, conn = await loop.create_connection(lambda: Connection(loop), sock=sock)
    except BaseException:
        if sock.fileno() != -1:   # not yet owned by a transport
            sock.close()
        raise
    try:
        if hop.tls:
            await _start_tls(loop, conn, files if route.proxy is None else files.for_proxy(), hop.host)
        if route.tunnel:
            await _tunnel(conn, connect_request(route, user_agent))
            await _start_tls(loop, conn, files, route.target.host)
    except BaseException:
        conn.abort()
        raise
    return conn


async def addresses(loop, host: str, port: int):
    """(family, sockaddr) pairs to try, in RFC 8305 order.  IP literals skip the resolver (in plain
    asyncio every getaddrinfo is a trip to a thread)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return [(family, (host, port))]
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return interleave([(family, sockaddr) for family, _, _, _, sockaddr in infos])


def interleave(found):
    """The first family's first address, then alternating families (RFC 8305 4), duplicates dropped."""
    queues = {}
    for family, sockaddr in dict.fromkeys(found):
        queues.setdefault(family, deque()).append((family, sockaddr))
    order, queues = [], list(queues.values())
    while queues:
        order.extend(queue.popleft() for queue in queues)
        queues = [queue for queue in queues if queue]
    return order


async def first_connected(loop, candidates) -> socket.socket:
    """The socket of the first candidate to connect; raises an OSError when none does."""
    if len(candidates) == 1:
        return await _attempt(loop, *candidates[0])
    waiting, running, errors = deque(candidates), set(), []
    try:
        while waiting or running:
            if waiting:
                running.add(loop.create_task(_attempt(loop, *waiting.popleft())))
            done, running = await asyncio.wait(running, timeout=ATTEMPT_DELAY if waiting else None,
                                               return_when=asyncio.FIRST_COMPLETED)
            sock = _winner(done, errors)
            if sock is not None:
                return sock
    finally:
        for task in running:
            _discard(task)
    # the most telling error: a refusal says more than an unreachable network of the other family
    raise next((e for e in errors if isinstance(e, ConnectionRefusedError)), errors[0])


async def _attempt(loop, family, sockaddr) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _winner(done, errors):
    """The first connected socket among finished attempts; the errors of the others are kept, any
    other connected socket closed."""
    winner = None
    for task in done:
        if task.exception() is not None:
            errors.append(task.exception())
        elif winner is None:
            winner = task.result()
        else:
            task.result().close()
    return winner


def _discard(task):
    """An attempt that lost the race: cancelled (it closes its socket), or closed if it won late."""
    if not task.done():
        task.cancel()
    elif not task.cancelled() and task.exception() is None:
        task.result().close()


async def _start_tls(loop, conn, files: tls.Files, server_name: str):
    conn.transport = await loop.start_tls(conn.transport, conn, tls.context(files),
                                          server_hostname=server_name)


async def _tunnel(conn, request: bytes):
    reply = TunnelReply()
    await conn.exchange(request, reply)
    if reply.result is not None:
        raise Failed(reply.result)
