"""The request side of the metrics address and the control socket (ops/httprequest.py), sans-I/O:
requests in any pieces, and every bound (head, fields, chunk framing, trailers, body) refused with its
status, whatever the bytes."""

import pytest

from pfrest.ops.httprequest import MAX_FIELDS, MAX_HEAD, RequestReader

CHUNKED = b"POST /cache/t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"


def read(data, max_body=1 << 20, piece=None):
    """The reader once ``data`` is fed in pieces of ``piece`` bytes (all at once by default)."""
    reader = RequestReader(max_body)
    piece = piece or len(data)
    for start in range(0, len(data), piece):
        if reader.feed(data[start:start + piece]):
            break
    return reader


@pytest.mark.parametrize("piece", [1, 7, None])
def test_a_request_in_any_pieces(piece):
    reader = read(b"POST /cache/t?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nflush", piece=piece)
    assert (reader.done, reader.error, reader.method, reader.target, reader.body) == \
        (True, None, "POST", "/cache/t?x=1", b"flush")
    reader = read(CHUNKED + b"3;name=value\r\nflu\r\n2\r\nsh\r\n0\r\nTrailer: x\r\n\r\n", piece=piece)
    assert (reader.error, reader.body) == (None, b"flush")


def test_not_done_until_the_request_is_complete():
    reader = read(b"GET /metrics HTTP/1.1\r\nHost: h\r\n")
    assert not reader.done and reader.method is None


@pytest.mark.parametrize("data, status", [
    (b"GET /metrics HTTP/1.1\r\nX: " + b"x" * MAX_HEAD, 431),
    (b"GET /" + b"u" * MAX_HEAD, 431),
    (b"GET / HTTP/1.1\r\n" + b"a: b\r\n" * (MAX_FIELDS + 1) + b"\r\n", 431),
    (CHUNKED + b"1;" + b"e" * MAX_HEAD, 431),
    (CHUNKED + b"1\r\nc\r\n0\r\n" + b"t: v\r\n" * (MAX_FIELDS + 1), 431),
    (CHUNKED + b"1\r\nc\r\n0\r\nT: " + b"v" * MAX_HEAD, 431),
    (b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", 413),
    (CHUNKED + b"b\r\n" + b"c" * 11 + b"\r\n", 413),
    (b"\x16\x03\x01\x02\x00", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
])
@pytest.mark.parametrize("piece", [1, None])
def test_what_goes_over_a_bound_is_refused_with_its_status(data, status, piece):
    reader = read(data, max_body=10, piece=piece)
    assert reader.done and reader.error[0] == status, reader.error
    assert reader.body == b"" and reader.method is None


def test_chunk_framing_counts_against_the_head_bound():
    assert read(CHUNKED + b"1\r\nc\r\n" * MAX_HEAD).error[0] == 431


def test_connect_and_upgrade_end_the_reading():
    """llhttp (httptools 0.2 on) reads them as plain requests (httpd: 405 for CONNECT, the upgrade
    ignored); http-parser (0.1.1) stops at their head: 400.  Never a wait for more."""
    reader = read(b"CONNECT h:1 HTTP/1.1\r\n\r\n")
    assert reader.method == "CONNECT" or reader.error[0] == 400
    reader = read(b"GET /healthz HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
    assert (reader.error, reader.target) == (None, "/healthz") or reader.error[0] == 400


def test_a_server_that_takes_no_body_refuses_one():
    assert read(b"GET /metrics HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", max_body=0).error[0] == 413
    assert read(b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", max_body=0).error is None


def test_only_the_first_of_pipelined_requests_is_read():
    reader = read(b"GET /a HTTP/1.1\r\n\r\n" + b"GET /b HTTP/1.1\r\nX: " + b"x" * (2 * MAX_HEAD))
    assert (reader.error, reader.target) == (None, "/a")
    assert reader.feed(b"more") and reader.target == "/a"
