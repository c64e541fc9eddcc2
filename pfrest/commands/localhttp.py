"""One HTTP exchange of a pfrest command with a running ``pfrest serve``: ``pfrest stats`` with its metrics
address, ``pfrest cache`` with its control socket (a unix socket's path).  Whatever answers there (the
port or path may be another program's), the whole exchange ends by one deadline, and the reply's body
is read up to a bound: http.client bounds the head (a line at most 64 KiB, at most 100 header fields),
but its timeout is per read, which a peer sending a byte at a time would never reach.
"""

import http.client
import socket
import time


class _DeadlineSocket(socket.socket):
    """A socket each of whose reads may take what is left until ``deadline`` (time.monotonic())."""
    deadline = 0.0

    def recv_into(self, buffer, nbytes=0, flags=0):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("no complete reply in time")
        self.settimeout(left)
        return super().recv_into(buffer, nbytes, flags)


class _Connection(http.client.HTTPConnection):
    def __init__(self, address, seconds):
        super().__init__("localhost" if isinstance(address, str) else address[0],
                         None if isinstance(address, str) else address[1], timeout=seconds)
        self.address = address
        self.deadline = time.monotonic() + seconds

    def connect(self):
        if isinstance(self.address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection(self.address, self.timeout)
        self.sock = _DeadlineSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.sock.deadline = self.deadline
        self.sock.settimeout(self.timeout)


def exchange(address, method, path, body=None, seconds=5.0, max_body=1 << 20):
    """(status, reason, body) of one request to ``address`` ((host, port) or a unix socket's path), all
    of it within ``seconds``; OSError (socket.timeout too) or http.client.HTTPException if it fails,
    ValueError for a body over ``max_body`` bytes."""
    connection = _Connection(address, seconds)
    try:
        connection.request(method, path, body)
        response = connection.getresponse()
        data = response.read(max_body + 1)
        if len(data) > max_body:
            raise ValueError(f"a reply over {max_body} bytes")
        return response.status, response.reason, data
    finally:
        connection.close()
