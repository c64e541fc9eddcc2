"""The HTTP side: one backend request per Postfix request, with requests' connection pooling.

This is the seam tests replace: anything with ``lookup(params, request_id)`` and
``policy(pairs, request_id)`` returning a verdict.HttpResult or verdict.Failure will do.

Deliberate choices:
- No redirects, no proxies or CA bundles from the environment, no .netrc: spawn(8) and systemd give a
  clean environment, and an admin must never see behaviour change because of one.  ``proxy`` and
  ``ca-file`` are config keys.  The auth token therefore only ever goes to the configured target.
- The whole exchange is bounded by ``request-timeout``: the calling thread waits at most that long
  (DNS and slow-drip answers included) and then answers Postfix with a timeout.  A Watchdog shuts down
  the socket of an exchange still running at its deadline; connecting (DNS cannot be interrupted) is
  left to a DeadlineRunner thread that the caller can walk away from.
- Bodies are read up to MAX_BODY and no further.
"""

import http.client as _client
import re
import socket
import struct
import threading
import time
import zlib
from random import getrandbits as _random_bits
from urllib.parse import quote, quote_plus

from pfrest.protocol.verdict import Failure, HttpResult

MAX_BODY = 1 << 20   # bytes; more than any Postfix reply can carry, even JSON-escaped
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)", re.I)
_NO_STORE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache|private)\b", re.I)


def new_request_id() -> str:
    """16 hex digits naming a request in the log, the reply and X-Request-Id.  Not a secret, so the
    Mersenne Twister will do (reseeded in each forked worker by the random module): os.urandom is a
    system call that hands the GIL over among busy threads, once per request."""
    return "%016x" % _random_bits(64)


def query(params) -> str:
    """``name=value&...`` with every byte of each value percent-encoded as needed (RFC 3986)."""
    return "&".join(f"{name}={quote(value, safe='')}" for name, value in params)


def form(pairs) -> bytes:
    """An application/x-www-form-urlencoded body from (bytes, bytes) pairs, in order, byte-exact."""
    return "&".join(f"{quote_plus(n, safe='')}={quote_plus(v, safe='')}" for n, v in pairs).encode()


def _max_age(headers):
    value = headers.get("Cache-Control")
    if not value:
        return None
    if _NO_STORE.search(value):
        return -1
    match = _MAX_AGE.search(value)
    return int(match.group(1)) if match else None


class _Job:
    __slots__ = ("fn", "args", "done", "result")

    def __init__(self, fn, args):
        self.fn, self.args, self.result = fn, args, None
        self.done = threading.Lock()
        self.done.acquire()


class DeadlineRunner:
    """Runs calls on a few daemon threads so the caller can stop waiting at a deadline.

    Daemon threads, because an abandoned call must never keep a finished handler process alive.
    """

    def __init__(self, max_threads: int):
        import queue
        self._jobs = queue.SimpleQueue()
        self._max, self._threads, self._idle = max_threads, 0, 0
        self._lock = threading.Lock()

    def call(self, timeout: float, fn, *args):
        """fn(*args), or raise TimeoutError if it has not returned within ``timeout`` seconds."""
        job = _Job(fn, args)
        with self._lock:
            if self._idle == 0 and self._threads < self._max:
                self._threads += 1
                threading.Thread(target=self._work, daemon=True, name="pfrest-http").start()
            else:
                self._idle -= 1
        self._jobs.put(job)
        if not job.done.acquire(timeout=max(timeout, 0.001)):
            raise TimeoutError
        return job.result

    def close(self):
        """Let every thread end once it is done with its current call (a listener reload replaces
        backends; their threads must not pile up)."""
        with self._lock:
            count, self._max = self._threads, 0
        for _ in range(count):
            self._jobs.put(None)

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # reported to the caller as a failure, never lost
                job.result = Failure("internal", f"{type(exc).__name__}: {exc}")
            job.done.release()
            with self._lock:
                self._idle += 1


class _Watch:
    """One exchange that the Watchdog ends at its deadline unless it is done by then."""
    __slots__ = ("deadline", "conn", "done", "expired")

    def __init__(self, deadline):
        self.deadline, self.conn, self.done, self.expired = deadline, None, False, False


class Watchdog:
    """Ends exchanges that run past their deadline by shutting down their socket, which wakes the
    thread blocked on it at once (a slow-drip backend defeats per-read socket timeouts).

    One per backend: all its exchanges have the same request-timeout, so deadlines come in the order
    the watches are made and a FIFO is enough; the thread sleeps until the oldest unfinished deadline.
    Per exchange it costs two uncontended lock round trips, no thread switch.
    """

    def __init__(self):
        from collections import deque
        self._watches = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._sleeping = self._closed = False
        self._thread = None

    def watch(self, deadline) -> _Watch:
        w = _Watch(deadline)
        with self._lock:
            self._watches.append(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="pfrest-watchdog")
                self._thread.start()
            elif self._sleeping:
                self._sleeping = False
                self._wake.set()
        return w

    def attach(self, w, conn):
        """The exchange now uses ``conn``: that is the socket to shut down at the deadline."""
        with self._lock:
            w.conn = conn
            if w.expired:
                _shut(conn)

    def finish(self, w) -> bool:
        """The exchange is over; True if the deadline passed first (its connection is then dead)."""
        with self._lock:
            w.done, w.conn = True, None
            return w.expired

    def close(self):
        with self._lock:
            self._closed = True
            self._wake.set()

    def _run(self):
        watches = self._watches
        while True:
            with self._lock:
                while watches and watches[0].done:
                    watches.popleft()
                if not watches:
                    if self._closed:
                        return
                    self._sleeping = True
                    self._wake.clear()
                    w = None
                else:
                    w = watches[0]
                    delay = w.deadline - time.monotonic()
                    if delay <= 0:
                        watches.popleft()
                        w.expired = True
                        if w.conn is not None:
                            _shut(w.conn)
                        continue
            if w is None:
                self._wake.wait()
            else:
                time.sleep(delay)


def _shut(conn):
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            # the plain socket's shutdown even for TLS: SSLSocket.shutdown would drop its SSL object
            # under the thread that is reading from it
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


class _MustConnect(Exception):
    """An exchange on the calling thread needs a new connection: done on the runner instead."""


_local = threading.local()   # .watch: the exchange of this thread; .inline: must not connect here


def _watched(connection_class, dog, timeout):
    """The pool's connection class, telling ``dog`` which connection an exchange uses, and refusing
    to connect on a calling thread (DNS cannot be interrupted; the runner's caller can walk away)."""
    backstop = struct.pack("ll", int(timeout) + 1, 0)

    class Watched(connection_class):
        def connect(self):
            if getattr(_local, "inline", False):
                raise _MustConnect
            w = getattr(_local, "watch", None)
            if w is not None:
                dog.attach(w, self)
            super().connect()
            # Reused, the connection runs without a Python socket timeout (see _reuse); the kernel's
            # per-call timeouts stay as a backstop behind the watchdog.
            for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
                self.sock.setsockopt(socket.SOL_SOCKET, option, backstop)

        def request(self, *args, **kwargs):
            w = getattr(_local, "watch", None)
            if w is not None:
                dog.attach(w, self)
            return super().request(*args, **kwargs)
    return Watched


class HttpBackend:
    """Talks to one endpoint's target.  Thread-safe; one instance per endpoint.

    requests' HTTPAdapter sets up the urllib3 connection pool, as it always did (TLS verification
    with requests' CA bundle or ``ca-file``, the ``proxy``, pool size); each exchange then calls that
    pool's ``urlopen`` itself, which is all HTTPAdapter.send does in the end.  Skipped per call:
    PreparedRequest.prepare (URL parsing and IDNA, header checks), the pool look-up and Response
    building: about 130 of the 290 us of CPU that HTTPAdapter.send took per lookup here.

    Exchanges on an open pooled connection run on the calling thread, bounded by the Watchdog (and the
    socket timeouts); one that needs a new connection (DNS, connect, TLS handshake) goes to the
    DeadlineRunner, so the caller walks away at the deadline whatever DNS does.  A thread handoff per
    request would cost two thread switches and GIL handovers (about 60 us here) for nothing.
    """

    def __init__(self, endpoint, user_agent: str, concurrency: int = 4):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util import Retry, Timeout
        self.endpoint = endpoint
        self._timeout = endpoint.timeout
        self._adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(concurrency, 1), max_retries=0)
        verify = endpoint.ca_file or True
        proxies = {"http": endpoint.proxy, "https": endpoint.proxy} if endpoint.proxy else {}
        probe = requests.Request("GET", endpoint.target).prepare()
        if hasattr(self._adapter, "get_connection_with_tls_context"):  # requests >= 2.32.2
            self._pool = self._adapter.get_connection_with_tls_context(probe, verify, proxies)
        else:
            self._pool = self._adapter.get_connection(endpoint.target, proxies)
        self._broken = None
        try:
            self._adapter.cert_verify(self._pool, endpoint.target, verify, None)
        except OSError as exc:  # no CA bundle: every request fails, as it would have in send()
            self._broken = Failure("tls", str(exc))
        # the request target: the path, or the whole URL through a plain-HTTP proxy
        self._url = self._adapter.request_url(probe, proxies)
        self._dog = Watchdog()
        self._pool.ConnectionCls = _watched(self._pool.ConnectionCls, self._dog, self._timeout)
        self._runner = DeadlineRunner(max(concurrency, 1) + 2)
        self._retries = Retry(total=False, redirect=False)   # no retries, no redirects: one request
        self._socket_timeout = Timeout(connect=self._timeout, read=self._timeout)
        self._timeout_class = Timeout
        self._headers = {"User-Agent": user_agent, "Accept": "*/*", "Connection": "keep-alive"}
        if endpoint.auth_token:
            self._headers["X-Auth-Token"] = endpoint.auth_token
        self._joiner = "&" if "?" in self._url else "?"
        # Reused connections skip urlopen (its URL re-encoding and retry bookkeeping cost 50 of its
        # 170 us here): urllib3 2's public HTTPConnection.request/getresponse on a connection taken
        # from the pool.  Through a proxy, or with urllib3 1, every exchange goes through urlopen.
        import urllib3
        self._direct = self._pool.proxy is None and not urllib3.__version__.startswith("1.")
        self._response_class = urllib3.response.HTTPResponse
        self._header_dict = urllib3.HTTPHeaderDict

    def lookup(self, params, request_id):
        """GET target?name=value&... (params: (str, bytes) pairs)."""
        return self._call("GET", self._url + self._joiner + query(params), None, request_id)

    def policy(self, pairs, request_id):
        """The policy attributes as a form-encoded body, with the endpoint's method."""
        return self._call(self.endpoint.method, self._url, form(pairs), request_id)

    def close(self):
        self._runner.close()
        self._dog.close()
        self._adapter.close()

    def _call(self, method, url, body, request_id):
        if self._broken:
            return self._broken
        deadline = time.monotonic() + self._timeout
        headers = dict(self._headers)
        headers["X-Request-Id"] = request_id
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if self._direct:
            conn = self._pool._get_conn()  # idle and checked for a dropped connection, or a new one
            if conn.sock is not None:
                return self._reuse(conn, method, url, body, headers, deadline)
            self._pool._put_conn(conn)  # a new one: connecting is the runner's job
        else:
            _local.inline = True
            try:
                return self._exchange(method, url, body, headers, deadline, self._socket_timeout)
            except _MustConnect:
                pass
            finally:
                _local.inline = False
        remaining = deadline - time.monotonic()
        timeout = self._timeout_class(connect=max(remaining, 0.001), read=max(remaining, 0.001))
        try:
            return self._runner.call(remaining, self._exchange, method, url, body, headers, deadline,
                                     timeout)
        except TimeoutError:
            return Failure("timeout", "no answer within request-timeout")

    def _exchange(self, method, url, body, headers, deadline, timeout):
        w = _local.watch = self._dog.watch(deadline)
        try:
            response = self._pool.urlopen(method, url, body=body, headers=headers, retries=self._retries,
                                          redirect=False, assert_same_host=False, timeout=timeout,
                                          preload_content=False, decode_content=False,
                                          release_conn=False)
        except _MustConnect:
            self._dog.finish(w)
            raise
        except Exception as exc:
            return Failure("timeout", "no answer within request-timeout") if self._dog.finish(w) \
                else _failure(exc)
        finally:
            _local.watch = None
        result = self._read(response, deadline)
        if self._dog.finish(w):  # whatever was read, the socket was cut under it
            response.close()
            return Failure("timeout", "no answer within request-timeout")
        if isinstance(result, HttpResult) and result.status in (200, 404):
            response.release_conn()
        else:  # e.g. an interim 1xx taken as final: bytes may follow; never reuse such a connection
            response.close()
        return result

    def _reuse(self, conn, method, url, body, headers, deadline):
        """The exchange on an open pooled connection, on the calling thread."""
        pool = self._pool
        w = self._dog.watch(deadline)
        self._dog.attach(w, conn)
        _local.inline = True
        try:
            if conn.sock.gettimeout() is not None:
                # Blocking mode, once per connection: a Python socket timeout costs a poll() before
                # every send and recv, each a GIL handover among busy threads; the watchdog bounds
                # the exchange (and SO_RCVTIMEO backs it up).
                conn.sock.settimeout(None)
            # http.client's own request/getresponse, on urllib3's connection, wrapped in urllib3's
            # response as urllib3 2 does itself.  urllib3's overrides would add two settimeout()
            # calls per exchange (two ioctls and GIL handovers) and send a body in a second packet.
            _client.HTTPConnection.request(conn, method, url, body, headers)
            raw = _client.HTTPConnection.getresponse(conn)
            response = self._response_class(
                body=raw, headers=self._header_dict(raw.msg.items()), status=raw.status,
                version=raw.version, reason=raw.reason, preload_content=False, decode_content=False,
                original_response=raw, enforce_content_length=True, request_method=method,
                request_url=url)
        except Exception as exc:
            conn.close()
            pool._put_conn(None)
            return Failure("timeout", "no answer within request-timeout") if self._dog.finish(w) \
                else _failure(exc)
        finally:
            _local.inline = False
        result = self._read(response, deadline)
        if self._dog.finish(w):
            result = Failure("timeout", "no answer within request-timeout")
        if isinstance(result, HttpResult) and result.status in (200, 404):
            pool._put_conn(conn)
        else:  # never reuse a connection after an odd status or a failure
            response.close()
            conn.close()
            pool._put_conn(None)
        return result

    @staticmethod
    def _read(response, deadline):
        from urllib3.exceptions import HTTPError as Urllib3Error, ReadTimeoutError
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            return Failure("too-large", f"Content-Length {length}")
        read1 = getattr(response, "read1", None)
        # Content-Encoding is undone here, not by urllib3, so that inflating stops at MAX_BODY: a
        # small gzip bomb must cost neither the memory nor the CPU of its whole inflated size.
        inflate = _inflater(response.headers.get("Content-Encoding", ""))
        if inflate is False:
            return Failure("reset", "unsupported Content-Encoding")
        chunks, size = [], 0
        try:
            while True:
                if time.monotonic() > deadline:
                    return Failure("timeout", "body not complete within request-timeout")
                chunk = read1(65536, decode_content=False) if read1 \
                    else response.read(65536, decode_content=False)
                if inflate is not None:
                    chunk = inflate.decompress(chunk, MAX_BODY + 1 - size) if chunk else inflate.flush()
                    if inflate.unconsumed_tail:  # more inflated data than may be read at all
                        return Failure("too-large", f"inflated body over {MAX_BODY} bytes")
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_BODY:
                    return Failure("too-large", f"body over {MAX_BODY} bytes")
                chunks.append(chunk)
        except ReadTimeoutError as exc:
            return Failure("timeout", str(exc))
        except (Urllib3Error, OSError, zlib.error) as exc:
            return Failure("reset", str(exc))
        headers = response.headers
        return HttpResult(response.status, b"".join(chunks), headers.get("Location"),
                          _max_age(headers))


def _inflater(encoding: str):
    """A decompressor for the Content-Encoding, None for identity, False for one pfrest cannot undo."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    return False


def for_endpoint(endpoint, user_agent: str, concurrency: int = 4):
    """The backend for one endpoint: HTTP, behind a cache when the endpoint configures one."""
    backend = HttpBackend(endpoint, user_agent, concurrency)
    if endpoint.mode != "policy" and (endpoint.cache_ttl > 0 or endpoint.cache_negative_ttl > 0):
        from pfrest.legacy_cache import CachingBackend
        return CachingBackend(backend, endpoint.cache_ttl, endpoint.cache_negative_ttl,
                              endpoint.cache_max_entries, endpoint.list_separator)
    return backend


def _failure(exc) -> Failure:
    """What went wrong, from what urllib3 raised (retries=False: the error itself, not a wrapper)."""
    from urllib3 import exceptions as u3
    reason = getattr(exc, "reason", None)
    if isinstance(exc, u3.MaxRetryError) and isinstance(reason, Exception):
        return _failure(reason)
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, u3.SSLError):
        return Failure("tls", text)
    # raw socket errors come from exchanges on a reused connection, outside urlopen's wrapping
    if isinstance(exc, u3.NewConnectionError) or not isinstance(exc, (u3.TimeoutError, TimeoutError)):
        # NewConnectionError is a ConnectTimeoutError in urllib3 2, for compatibility; it is not one
        if "NameResolution" in text or "getaddrinfo" in text or "Name or service not known" in text:
            return Failure("dns", text)
        if "Connection refused" in text or "ConnectionRefused" in text:
            return Failure("refused", text)
        return Failure("reset", text)
    return Failure("timeout", text)
