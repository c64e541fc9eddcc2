"""`pfrest stats` and `pfrest cache` against whatever answers at the metrics address or the control socket
(pfrest/commands/localhttp.py): a peer that drips its reply, or sends an endless one, costs them their deadline and
a bounded read, never a hang or all the memory.  Real servers on loopback and on a unix socket."""

import os
import socket
import tempfile
import threading
import time

import pytest

from pfrest.commands import localhttp, stats

SECONDS = 1.0         # the deadline the clients are given here
ENDS_WITHIN = 10.0    # seconds the test waits for them (they used to hang)


class RoguePeer:
    """Listens on 127.0.0.1 (``address``) or on a unix socket (``path``); every connection gets the
    reply head ``head`` at once, then ``more`` every DRIP seconds until the client goes."""
    DRIP = 0.05

    def __init__(self, head, more, unix=False):
        self.head, self.more, self.stopped = head, more, threading.Event()
        if unix:
            self.directory = tempfile.mkdtemp(prefix="pfrest-rogue-")
            self.address = os.path.join(self.directory, "s")
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(self.address)
        else:
            self.directory = None
            self.sock = socket.create_server(("127.0.0.1", 0))
            self.address = self.sock.getsockname()
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(self.head)
                    while not self.stopped.wait(self.DRIP):
                        conn.sendall(self.more)
                except OSError:   # the client gave up
                    pass

    def stop(self):
        self.stopped.set()
        self.thread.join(10)
        self.sock.close()
        if self.directory:
            os.unlink(self.address)
            os.rmdir(self.directory)


def ends(function, *args):
    """What ``function(*args)`` raised, run in a thread that must end within ENDS_WITHIN seconds."""
    raised = []

    def run():
        try:
            function(*args)
        except Exception as exc:
            raised.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(ENDS_WITHIN)
    assert not thread.is_alive(), f"still reading after {time.monotonic() - started:.0f} s"
    return raised[0] if raised else None


DRIPPED_HEAD = (b"HTTP/1.1 200 OK\r\nX-Drip: ", b"d")
ENDLESS_BODY = (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n", b"b" * 65536)


@pytest.mark.parametrize("reply", [DRIPPED_HEAD, ENDLESS_BODY], ids=["dripped head", "endless body"])
def test_pfrest_stats_ends_by_its_deadline(reply, monkeypatch):
    monkeypatch.setattr(stats, "FETCH_TIMEOUT", SECONDS)
    monkeypatch.setattr(stats, "MAX_METRICS", 1 << 20, raising=False)
    peer = RoguePeer(*reply)
    try:
        assert isinstance(ends(stats.fetch, *peer.address), (OSError, ValueError))
    finally:
        peer.stop()


@pytest.mark.parametrize("reply", [DRIPPED_HEAD, ENDLESS_BODY], ids=["dripped head", "endless body"])
def test_the_control_socket_client_ends_by_its_deadline(reply):
    peer = RoguePeer(*reply, unix=True)
    try:
        raised = ends(localhttp.exchange, peer.address, "POST", "/cache/t", b"flush\n", SECONDS, 1 << 16)
        assert isinstance(raised, (OSError, ValueError)), raised
    finally:
        peer.stop()
