"""The HTTP side: one backend request per Postfix request, with requests' connection pooling.

This is the seam tests replace: anything with ``lookup(params, request_id)`` and
``policy(pairs, request_id)`` returning a verdict.HttpResult or verdict.Failure will do.

Deliberate choices:
- No redirects, no proxies or CA bundles from the environment, no .netrc: spawn(8) and systemd give a
  clean environment, and an admin must never see behaviour change because of one.  ``proxy`` and
  ``ca-file`` are config keys.  The auth token therefore only ever goes to the configured target.
- The whole exchange is bounded by ``request-timeout``: the calling thread waits at most that long
  (DNS and slow-drip answers included) and then answers Postfix with a timeout; the abandoned exchange
  finishes on its own, bounded by the socket timeouts and a deadline check between reads.
- Bodies are read up to MAX_BODY and no further.
"""

import os
import re
import threading
import time
from urllib.parse import quote, quote_plus

from pfrest.verdict import Failure, HttpResult

MAX_BODY = 1 << 20   # bytes; more than any Postfix reply can carry, even JSON-escaped
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)", re.I)
_NO_STORE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache|private)\b", re.I)


def new_request_id() -> str:
    return os.urandom(8).hex()


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


class HttpBackend:
    """Talks to one endpoint's target.  Thread-safe; one instance per endpoint."""

    def __init__(self, endpoint, user_agent: str, concurrency: int = 4):
        import requests
        from requests.adapters import HTTPAdapter
        self._requests = requests
        self.endpoint = endpoint
        self._timeout = endpoint.timeout
        self._adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(concurrency, 1), max_retries=0)
        self._verify = endpoint.ca_file or True
        self._proxies = {"http": endpoint.proxy, "https": endpoint.proxy} if endpoint.proxy else {}
        self._runner = DeadlineRunner(max(concurrency, 1) + 2)
        self._headers = {"User-Agent": user_agent, "Accept": "*/*", "Connection": "keep-alive"}
        if endpoint.auth_token:
            self._headers["X-Auth-Token"] = endpoint.auth_token
        self._joiner = "&" if "?" in endpoint.target else "?"

    def lookup(self, params, request_id):
        """GET target?name=value&... (params: (str, bytes) pairs)."""
        url = self.endpoint.target + self._joiner + query(params)
        return self._call("GET", url, None, request_id)

    def policy(self, pairs, request_id):
        """The policy attributes as a form-encoded body, with the endpoint's method."""
        return self._call(self.endpoint.method, self.endpoint.target, form(pairs), request_id)

    def close(self):
        self._runner.close()
        self._adapter.close()

    def _call(self, method, url, body, request_id):
        deadline = time.monotonic() + self._timeout
        try:
            return self._runner.call(self._timeout, self._exchange, method, url, body, request_id,
                                     deadline)
        except TimeoutError:
            return Failure("timeout", "no answer within request-timeout")

    def _exchange(self, method, url, body, request_id, deadline):
        rx = self._requests.exceptions
        headers = dict(self._headers)
        headers["X-Request-Id"] = request_id
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        prepared = self._requests.PreparedRequest()
        prepared.prepare(method=method, url=url, headers=headers, data=body)
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            response = self._adapter.send(prepared, stream=True, timeout=(remaining, remaining),
                                          verify=self._verify, proxies=self._proxies)
            return self._read(response, deadline)
        except rx.SSLError as exc:
            return Failure("tls", str(exc))
        except (rx.ConnectTimeout, rx.ReadTimeout, rx.Timeout) as exc:
            return Failure("timeout", str(exc))
        except rx.ConnectionError as exc:
            return Failure(_connection_failure(exc), str(exc))
        except (rx.RequestException, OSError) as exc:
            return Failure("reset", str(exc))

    def _read(self, response, deadline):
        from urllib3.exceptions import HTTPError as Urllib3Error, ReadTimeoutError
        raw = response.raw
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            response.close()
            return Failure("too-large", f"Content-Length {length}")
        chunks, size = [], 0
        try:
            while True:
                if time.monotonic() > deadline:
                    response.close()
                    return Failure("timeout", "body not complete within request-timeout")
                chunk = raw.read1(65536, decode_content=True) if hasattr(raw, "read1") \
                    else raw.read(65536, decode_content=True)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_BODY:
                    response.close()
                    return Failure("too-large", f"body over {MAX_BODY} bytes")
                chunks.append(chunk)
        except ReadTimeoutError as exc:
            response.close()
            return Failure("timeout", str(exc))
        except (Urllib3Error, OSError) as exc:
            response.close()
            return Failure("reset", str(exc))
        if response.status_code in (200, 404):
            raw.release_conn()
        else:  # e.g. an interim 1xx taken as final: bytes may follow; never reuse such a connection
            response.close()
        return HttpResult(response.status_code, b"".join(chunks),
                          response.headers.get("Location"), _max_age(response.headers))


def for_endpoint(endpoint, user_agent: str, concurrency: int = 4):
    """The backend for one endpoint: HTTP, behind a cache when the endpoint configures one."""
    backend = HttpBackend(endpoint, user_agent, concurrency)
    if endpoint.mode != "policy" and (endpoint.cache_ttl > 0 or endpoint.cache_negative_ttl > 0):
        from pfrest.cache import CachingBackend
        return CachingBackend(backend, endpoint.cache_ttl, endpoint.cache_negative_ttl,
                              endpoint.cache_max_entries, endpoint.list_separator)
    return backend


def _connection_failure(exc) -> str:
    text = repr(exc)
    if "NameResolution" in text or "getaddrinfo" in text or "Name or service not known" in text:
        return "dns"
    if "Connection refused" in text or "ConnectionRefused" in text:
        return "refused"
    return "reset"
