"""One bearer token, fetched, kept, renewed ahead of time and replaced when refused: TokenSource.

The backend client asks ``line(loop)`` for every request: the Authorization line, encoded once per
token, or None when there is no valid token (the first request, or all expired); then it awaits
``fetched(loop)``, which starts a fetch or joins the one under way (one at a time) within the request's
own deadline, and gives the line or a Failure (kind "token": a temporary answer for Postfix).

Times (a token of lifetime L, from when its answer came):
- used until L less EXPIRY_MARGIN (or MARGIN_SHARE of L, if less): a request never goes out with a
  token about to expire on its way;
- renewed from RENEW_SHARE of L on, in the background, while the current one is still used: no
  request waits for a renewal.  Only if a request came since the last fetch: a token nobody uses is
  let lapse (the next request fetches one, as the first did), so that retired configurations and
  idle processes never ask the provider again;
- a failed fetch is retried after RETRY_FIRST seconds, doubling up to RETRY_MAX: in the background
  while the current token is still good; when there is none, the requests in the meantime get the
  failure at once, without asking the provider, and the first after it fetches again.  A failure and
  the recovery each make one log line: per change, not per request.

A refused token (``refused``: the backend answered 401) is dropped and a new one fetched, but no more
than once in REFUSE_HOLD seconds: a backend that refuses every token (a wrong audience) must not turn
each lookup into a token request.

With a TokenFile (tokenfile.py), processes share the token: before fetching, a process takes the
file's if another has renewed it; fetching takes the file's lock, and a process that finds it taken
waits for the file (polling every POLL seconds), never the provider.  Tokens go to the log's redaction
list while they are used (and leave it when replaced): a library's error text never shows one.
"""

import asyncio
import logging
import os
import time

from pfrest.backend import Client, new_request_id
from pfrest.identity import grant
from pfrest.log import add_secret, forget_secret
from pfrest.protocol.verdict import Failure

log = logging.getLogger("pfrest")

EXPIRY_MARGIN = 30.0   # seconds before its expiry a token is no longer sent
MARGIN_SHARE = 0.1     # of its lifetime, when that is less: a 10 s token is used for 9 s
RENEW_SHARE = 0.75     # of its lifetime, when renewal starts: a 3600 s token is renewed from 2700 s on
RETRY_FIRST = 1.0      # seconds after a failed fetch before the next; doubling while they fail
RETRY_MAX = 60.0
REFUSE_HOLD = 2.0      # seconds: at most one token dropped for a 401 in that time
POLL = 0.02            # seconds between looks at the token file while another process fetches
MAX_SECRET_FILE = 4096  # bytes of a client-secret-file


class TokenSource:
    """The token of one set of credentials, for every endpoint that has them (see pfrest/identity/)."""

    def __init__(self, endpoint, user_agent: str, store=None):
        self._endpoint, self._oauth, self._user_agent = endpoint, endpoint.oauth2, user_agent
        self._store = store
        self._token_url = self._oauth.token_url   # None until discovery told it (issuer)
        self._line = None            # b"Authorization: Bearer ...\r\n" of the current token
        self._value = None           # the current token itself
        self._usable_until = self._renew_at = self._expires = 0.0   # time.monotonic()
        self._loop = self._task = self._timer = None
        self._used = False           # a request asked since the last fetch
        self._failure = None         # the last fetch's Failure, until one succeeds
        self._retry, self._failed_until, self._last_refusal = RETRY_FIRST, 0.0, -REFUSE_HOLD
        self._clients = {}           # (url, secret) -> Client for the token endpoint or discovery
        self.origin = None           # how the current token came: for pfrest query

    # --- the backend client's side ------------------------------------------------------------------

    def line(self, loop):
        """The current Authorization line, or None: then await ``fetched``."""
        if loop is not self._loop:
            self._moved(loop)
        self._used = True
        return self._line if time.monotonic() < self._usable_until else None

    async def fetched(self, loop):
        """The Authorization line once a token is there, or the Failure of the fetch."""
        if loop is not self._loop:
            self._moved(loop)
        if self._line is not None and time.monotonic() < self._usable_until:
            return self._line
        if self._task is None:
            if time.monotonic() < self._failed_until:
                return self._failure
            self._start(None)
        await asyncio.shield(self._task)   # a request's deadline ends its wait, not the fetch
        if self._line is not None and time.monotonic() < self._usable_until:
            return self._line
        return self._failure or Failure("token", "no token could be had")

    def refused(self, line: bytes) -> bool:
        """The backend answered 401 to ``line``: whether a new token is coming (False: it was dropped
        less than REFUSE_HOLD seconds ago already, and this one stays)."""
        if line is not self._line:
            return True   # already replaced, or being replaced
        now = time.monotonic()
        if now - self._last_refusal < REFUSE_HOLD:
            return False
        self._last_refusal = now
        refused, self._line, self._usable_until = self._value, None, 0.0
        log.warning("endpoint=%s the backend refused the oauth2 token (HTTP 401); fetching a new one",
                    self._endpoint.name)
        if self._task is None:
            self._start(refused)
        return True

    def expires_in(self):
        """Seconds until the current token expires (as its provider said), or None without one."""
        return max(self._expires - time.monotonic(), 0.0) if self._line is not None else None

    # --- fetching -----------------------------------------------------------------------------------

    def _moved(self, loop):
        """A new event loop (a forked worker, a new asyncio.run): the old one's task and timer are
        forgotten, never touched; the token stays, and its renewal is armed on this loop."""
        self._loop, self._task, self._timer = loop, None, None
        if self._line is not None:
            self._arm(self._renew_at - time.monotonic())

    def _start(self, refused):
        self._task = self._loop.create_task(self._fetch(refused))

    async def _fetch(self, refused):
        try:
            got = await self._obtain(refused)
        except Exception as exc:   # a bug: the requests still get a Failure, never an exception
            got = Failure("token", f"internal error: {exc.__class__.__name__}")
        finally:
            self._task = None
        if got.__class__ is Failure:
            self._failed(got)
        else:
            self._adopt(*got)

    async def _obtain(self, refused):
        """(value, expires on the wall clock, lifetime, origin) or a Failure."""
        store = self._store
        if store is None:
            return await self._request()
        stored = store.read()
        if self._fresh(stored, refused):
            return (*stored, f"taken from {store.path}")
        deadline = time.monotonic() + self._endpoint.timeout * 2
        while True:
            lock = store.lock()
            if lock is not None:
                break
            await asyncio.sleep(POLL)
            stored = store.read()
            if self._fresh(stored, refused):
                return (*stored, f"taken from {store.path} (another process fetched it)")
            if time.monotonic() > deadline:
                return Failure("token", f"another process has been fetching the token for over "
                                        f"{self._endpoint.timeout * 2:g} s")
        try:
            stored = store.read()   # another process may have just written it
            if self._fresh(stored, refused):
                return (*stored, f"taken from {store.path} (another process fetched it)")
            got = await self._request()
            if got.__class__ is not Failure:
                store.write(got[0], got[2])
            return got
        finally:
            store.unlock(lock)

    @staticmethod
    def _fresh(stored, refused) -> bool:
        """A stored token not yet due for renewal, and not the one the backend refused."""
        return stored is not None and stored.value != refused \
            and stored.expires - time.time() > stored.lifetime * (1 - RENEW_SHARE)

    async def _request(self):
        """Ask the provider: discovery first for an issuer (once), then the token endpoint."""
        secret = self._secret()
        if secret.__class__ is Failure:
            return secret
        if self._token_url is None:
            where = grant.discovery_url(self._oauth.issuer)
            result = await self._client(where, None).lookup((), new_request_id())
            url = grant.token_endpoint(result, where)
            if url.__class__ is Failure:
                return url
            self._token_url = url
        url = self._token_url
        result = await self._client(url, secret).policy(grant.form(self._oauth, secret), new_request_id())
        token = grant.token(result, url)
        if token.__class__ is Failure:
            return token
        return token.value, time.time() + token.lifetime, token.lifetime, f"fetched from {url}"

    def _client(self, url: str, secret):
        key = (url, secret)
        client = self._clients.get(key)
        if client is None:
            for old in self._clients.values():   # a rotated secret: the old one's connections go
                old.close()
            self._clients = {key: Client(grant.transport(self._endpoint, url, secret), self._user_agent)}
            client = self._clients[key]
        return client

    def _secret(self):
        """client-secret, or client-secret-file read now (a rotated secret takes effect at the next
        fetch), its one line without the line end."""
        path = self._oauth.client_secret_file
        if path is None:
            return self._oauth.client_secret
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)   # as root too
            try:
                data = os.read(fd, MAX_SECRET_FILE + 1)
            finally:
                os.close(fd)
        except OSError as exc:
            return Failure("token", f"client-secret-file {path}: {exc.strerror}")
        secret = data.decode("utf-8", "replace").rstrip("\r\n")
        if not secret or len(data) > MAX_SECRET_FILE or any(c in secret for c in "\r\n\0"):
            return Failure("token", f"client-secret-file {path}: must hold the secret, on one line")
        add_secret(secret)
        return secret

    def _adopt(self, value: str, expires: float, lifetime: float, origin: str):
        now = time.monotonic()
        left = expires - time.time()
        if value != self._value:
            forget_secret(self._value)
            add_secret(value)
            self._value = value
        self._line = b"Authorization: Bearer " + value.encode("ascii") + b"\r\n"
        self._expires = now + left
        self._usable_until = now + left - min(EXPIRY_MARGIN, lifetime * MARGIN_SHARE)
        self._renew_at = now + left - lifetime * (1 - RENEW_SHARE)
        self.origin = origin
        if self._failure is not None:
            log.warning("endpoint=%s oauth2 token %s again", self._endpoint.name, origin)
        self._failure, self._retry, self._failed_until, self._used = None, RETRY_FIRST, 0.0, False
        self._arm(self._renew_at - now)

    def _failed(self, failure: Failure):
        if self._failure is None or self._failure.detail != failure.detail:
            valid = self._line is not None and time.monotonic() < self._usable_until
            log.warning("endpoint=%s oauth2 token cannot be had: %s; %s", self._endpoint.name, failure.detail,
                        "the current one is used while it lasts" if valid
                        else "Postfix gets temporary answers until one can")
        self._failure = failure
        now = time.monotonic()
        self._failed_until = now + self._retry
        if self._line is not None and now < self._usable_until:
            self._arm(self._retry)
            self._used = True   # a renewal that failed is tried again, asked for or not
        self._retry = min(self._retry * 2, RETRY_MAX)

    def _arm(self, delay: float):
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(max(delay, 0.0), self._due) if self._loop is not None else None

    def _due(self):
        self._timer = None
        if self._used and self._task is None:
            self._start(None)
