"""The conversation with one Postfix client, the same for stdin/stdout and for a listener socket.

``serve(rfile, wfile, responder)`` reads until EOF, hands each complete request to the responder and
writes each reply with one write, in order.  Requests may arrive in pieces or several in one read.
Broken pipes, resets and read timeouts end the conversation quietly; a partial request at the end is
dropped without a reply (Postfix never half-closes, so it is gone anyway).

Read timeouts: ``before_read(pending, timeout)`` is told, before each read, whether part of a request
has arrived and how long the read may wait: the endpoint's idle limit between requests, and within a
request what is left of its partial-request limit, counted from the request's first byte.  A deadline
per request and not per read, so that a client dripping one byte at a time (slowloris) is dropped as
surely as one that stops.  The caller applies it to its input (a socket timeout, a poll).
"""

import logging
import socket
import time

from pfrest import config
from pfrest.protocol import policy, socketmap, tcptable
from pfrest.protocol.framing import Close, Reject

log = logging.getLogger("pfrest")

DECODERS = {config.TCP: tcptable.Decoder, config.SOCKETMAP: socketmap.Decoder,
            config.POLICY: policy.Decoder}
READ_SIZE = 65536
MIN_WAIT = 0.001  # seconds: a read past the deadline still returns what has arrived, then times out
TIMEOUTS = (TimeoutError, socket.timeout)  # the same class since Python 3.10, not on 3.9


def write_all(wfile, data: bytes):
    """One write in the normal case; loop only if the kernel took part of it."""
    view = memoryview(data)
    while view:
        sent = wfile.write(view)
        if sent is None:  # a non-blocking raw file with a full buffer; never the case here
            sent = 0
        view = view[sent:]
    flush = getattr(wfile, "flush", None)
    if flush:
        flush()


def serve(rfile, wfile, responder, before_read=None, peer="stdin") -> str:
    """Serve one connection; returns why it ended (for tests and the log)."""
    endpoint = responder.endpoint
    name = endpoint.name
    decoder = DECODERS[endpoint.mode]()
    started = None  # when the first byte of the request now arriving was read
    while True:
        if not decoder.pending:
            started, timeout = None, endpoint.idle_limit
        else:
            started = started or time.monotonic()
            timeout = max(started + endpoint.partial_limit - time.monotonic(), MIN_WAIT)
        if before_read is not None:
            before_read(decoder.pending, timeout)
        try:
            data = rfile.read1(READ_SIZE)
        except (TimeoutError, OSError, ValueError) as exc:
            why = "timeout" if isinstance(exc, TIMEOUTS) else f"read error: {exc}"
            if decoder.pending or not isinstance(exc, TIMEOUTS):
                log.warning("endpoint=%s peer=%s closing: %s%s", name, peer, why,
                            " with a partial request" if decoder.pending else "")
            return why
        if not data:
            if decoder.pending:
                log.warning("endpoint=%s peer=%s closed the connection in the middle of a request",
                            name, peer)
            return "eof"
        items = decoder.feed(data)
        if items:  # a request ended: the rest, if any, is a new one, counted from now
            started = None
        for item in items:
            if isinstance(item, Close):
                log.warning("endpoint=%s peer=%s protocol error, closing: %s", name, peer, item.why)
                return "protocol error"
            if isinstance(item, Reject):
                log.warning("endpoint=%s peer=%s bad request: %s", name, peer, item.why)
                reply = item.reply
            else:
                reply = responder(item)
            try:
                write_all(wfile, reply)
            except (OSError, ValueError) as exc:
                log.info("endpoint=%s peer=%s gone while answering: %s", name, peer, exc)
                return "write error"
