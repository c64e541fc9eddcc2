"""Dovecot's authentication protocol, the server side, as Postfix's smtpd speaks it to ``smtpd_sasl_path``
(``smtpd_sasl_type = dovecot``, src/xsasl/xsasl_dovecot_server.c).  No I/O here.

TAB-separated lines ended by LF.  The server greets at once (as Dovecot does: Exim reads before it
writes, Postfix writes first; both work): ``VERSION 1 2``, one ``MECH`` per mechanism, ``SPID``, ``CUID``,
``COOKIE``, ``DONE``.  The client sends ``VERSION 1 x`` and ``CPID pid``, then one exchange per login:

    AUTH  id  PLAIN  service=smtp  nologin  lip=..  rip=..  [secured]  [resp=BASE64]
    CONT  id  BASE64                                  (the client's answer to a challenge)
    ->  OK id user=NAME  |  FAIL id [user=NAME] reason=TEXT  |  CONT id BASE64 (a challenge)

Postfix sends one AUTH at a time and waits up to 10 s for its answer.  It ignores ``temp`` on FAIL: every
FAIL is a hard ``535`` to the SMTP client.  Only a lost connection gives the client ``454`` (try later),
so a temporary failure is answered by closing the connection (answers.DovecotSasl); Postfix reconnects
for the next login.

``Decoder.feed`` returns, in order: ``Login`` (credentials for the backend), ``Prompt`` (a challenge,
sent as is), ``Reject`` (a FAIL decided here: bad base64, an unknown mechanism, a user name Postfix
would misread) and at most one final ``Close`` (the peer does not speak the protocol, or broke a limit).
"""

import binascii
from base64 import b64decode, b64encode
from collections import OrderedDict, deque

from pfrest.protocol.framing import Close, Prompt, Reject

VERSION = (1, 2)               # the protocol version Dovecot 2.3 announces; Postfix checks the major only
MECHANISMS = ("PLAIN", "LOGIN")
MAX_LINE = 16384               # Dovecot's own limit for a client's line
MAX_SECRET = 4096              # bytes of a decoded response: user names and passwords are far shorter
MAX_NAME = 512                 # bytes of a user name or authorization id
MAX_PENDING = 16               # logins waiting for a CONT (a client that gave up with "*" leaves one)
MAX_ATTEMPTS = 1000000         # AUTH lines per connection: an smtpd lives for at most a few thousand
REMEMBERED_IDS = 64            # recent AUTH ids, to tell a reused one
REJECTED = b"Invalid credentials"   # says nothing of which part was wrong
PROMPT_USERNAME = b64encode(b"Username:")
PROMPT_PASSWORD = b64encode(b"Password:")
# Bytes a name Postfix puts in its OK/FAIL parsing and its log must not hold: TAB and LF end fields and
# lines, NUL ends a C string, CR is a line end to some.
_UNSAFE_IN_NAME = (b"\t", b"\n", b"\r", b"\0")


def greeting(mechanisms, pid: int, cuid: int, cookie: str) -> bytes:
    """The server's handshake, sent at connect.  PLAIN and LOGIN carry ``plaintext``, so that Postfix's
    ``smtpd_sasl_security_options = noplaintext`` can filter them out."""
    lines = [b"VERSION\t%d\t%d" % VERSION]
    lines += [b"MECH\t" + m.encode("ascii") + b"\tplaintext" for m in mechanisms]
    lines += [b"SPID\t%d" % pid, b"CUID\t%d" % cuid, b"COOKIE\t" + cookie.encode("ascii"), b"DONE", b""]
    return b"\n".join(lines)


def ok(auth_id: bytes, user: bytes) -> bytes:
    """Authenticated as ``user`` (which safe_name has passed); Postfix fails a login without ``user=``."""
    return b"OK\t" + auth_id + b"\tuser=" + user + b"\n"


def fail(auth_id: bytes, reason: bytes = REJECTED, user: bytes = b"") -> bytes:
    """Not authenticated: ``535`` to the SMTP client; ``user`` (when safe) goes into Postfix's warning."""
    named = b"\tuser=" + user if user and safe_name(user) else b""
    return b"FAIL\t" + auth_id + named + b"\treason=" + reason + b"\n"


def safe_name(name: bytes) -> bool:
    """Whether Postfix reads ``name`` back as it was meant: not empty, short, no field or line breaks."""
    return 0 < len(name) <= MAX_NAME and not any(c in name for c in _UNSAFE_IN_NAME)


class Login:
    """One set of credentials to check.  The password never shows in a repr, a log line or a metric."""
    __slots__ = ("auth_id", "mechanism", "username", "authzid", "password", "service", "client_address",
                 "server_address", "secured")

    def __init__(self, auth_id, mechanism, username, authzid, password, params):
        self.auth_id, self.mechanism = auth_id, mechanism
        self.username, self.authzid, self.password = username, authzid, password
        self.service = params.get(b"service", b"")
        self.client_address = params.get(b"rip", b"")
        self.server_address = params.get(b"lip", b"")
        self.secured = b"secured" in params

    def form(self):
        """The fields of the backend request (the HTTP contract), in order, as (bytes, bytes) pairs."""
        fields = [(b"mechanism", self.mechanism.encode("ascii")), (b"username", self.username)]
        if self.authzid:
            fields.append((b"authzid", self.authzid))
        fields += [(b"password", self.password), (b"service", self.service),
                   (b"client_address", self.client_address), (b"server_address", self.server_address),
                   (b"secured", b"yes" if self.secured else b"no")]
        return fields

    def __repr__(self):
        return f"Login(id={self.auth_id!r}, mechanism={self.mechanism}, username={self.username!r})"


def _decode(data: bytes):
    """A client response as bytes, or None when it is not base64 (or too long).  ``=`` is the empty
    response (RFC 4954)."""
    if data == b"=":
        return b""
    if len(data) > MAX_SECRET * 4 // 3 + 4:
        return None
    try:
        return b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


class _Pending:
    """A login waiting for the client's next response (PLAIN without an initial one, LOGIN's rounds)."""
    __slots__ = ("mechanism", "params", "username")

    def __init__(self, mechanism, params):
        self.mechanism, self.params, self.username = mechanism, params, None


class Decoder:
    """One client connection's side of the protocol.  ``feed(bytes)`` returns what to do, in order."""

    def __init__(self, mechanisms=MECHANISMS):
        self.mechanisms = {m.upper(): m.upper() for m in mechanisms}
        self._buf = b""
        self._versioned = self._cpid = self._closed = False
        self._pending = OrderedDict()   # id -> _Pending, oldest first
        self._recent = deque(maxlen=REMEMBERED_IDS)
        self._attempts = 0

    @property
    def pending(self) -> bool:
        """True while part of a line has been received."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list:
        items = []
        if self._closed or not data:
            return items
        lines = (self._buf + data).split(b"\n")
        self._buf = lines.pop()
        for line in lines:
            if len(line) > MAX_LINE:
                return self._close(items, f"line over {MAX_LINE} bytes")
            item = self._line(line[:-1] if line.endswith(b"\r") else line)
            if isinstance(item, str):
                return self._close(items, item)
            if item is not None:
                items.append(item)
        if len(self._buf) > MAX_LINE:
            return self._close(items, f"line over {MAX_LINE} bytes")
        return items

    def _close(self, items, why):
        self._closed, self._buf = True, b""
        items.append(Close(why))
        return items

    def _line(self, line):
        """What one line asks for: an item, None (nothing to answer), or why the connection must close."""
        fields = line.split(b"\t")
        command = fields[0]
        if not self._versioned:
            if command != b"VERSION" or len(fields) < 3:
                return "not a Dovecot auth client: its first line is not VERSION"
            if fields[1] != b"%d" % VERSION[0]:
                return f"protocol version {fields[1][:16]!r} is not {VERSION[0]}"
            self._versioned = True
            return None
        if command == b"AUTH":
            return self._auth(fields)
        if command == b"CONT":
            return self._cont(fields)
        if command == b"CPID" and not self._cpid:
            self._cpid = True
            return None
        return f"unexpected line {printable_command(command)}"

    def _auth(self, fields):
        if len(fields) < 3 or not _is_id(fields[1]):
            return "AUTH without a numeric id and a mechanism"
        auth_id = fields[1]
        if auth_id in self._pending or auth_id in self._recent:
            return f"AUTH id {auth_id.decode()} reused"
        self._attempts += 1
        if self._attempts > MAX_ATTEMPTS:
            return f"more than {MAX_ATTEMPTS} AUTH on one connection"
        self._recent.append(auth_id)
        params, resp = {}, None
        for field in fields[3:]:
            name, sep, value = field.partition(b"=")
            if name == b"resp" and sep:   # the initial response: the last field (Dovecot reads no further)
                resp = value
                break
            params[name] = value if sep else b""
        mechanism = self.mechanisms.get(fields[2].decode("ascii", "replace").upper())
        if mechanism is None:
            return Reject(fail(auth_id, b"Unsupported authentication mechanism"),
                          f"mechanism {printable_command(fields[2])} is not offered")
        if not params.get(b"service"):
            return Reject(fail(auth_id, b"Service not given"), "AUTH without service=")
        pending = _Pending(mechanism, params)
        if resp is None:
            return self._wait(auth_id, pending, PROMPT_USERNAME if mechanism == "LOGIN" else b"")
        return self._respond(auth_id, pending, resp, b"Invalid base64 data in initial response")

    def _cont(self, fields):
        if len(fields) < 2 or fields[1] not in self._pending:
            return "CONT for no authentication in progress"
        auth_id = fields[1]
        pending = self._pending.pop(auth_id)
        return self._respond(auth_id, pending, fields[2] if len(fields) > 2 else b"",
                             b"Invalid base64 data in continued response")

    def _wait(self, auth_id, pending, challenge):
        while len(self._pending) >= MAX_PENDING:   # abandoned ones (the client sent "*"): the oldest go
            self._pending.popitem(last=False)
        self._pending[auth_id] = pending
        return Prompt(b"CONT\t" + auth_id + b"\t" + challenge + b"\n")

    def _respond(self, auth_id, pending, encoded, bad_base64):
        """The client's response to the login ``pending``: the next challenge, or the credentials."""
        data = _decode(encoded)
        if data is None:
            return Reject(fail(auth_id, bad_base64), "response not base64 (or over %d bytes)" % MAX_SECRET)
        if pending.mechanism == "PLAIN":
            parts = data.split(b"\0")
            if len(parts) != 3:
                return Reject(fail(auth_id, b"Invalid PLAIN response"), "PLAIN response not authzid NUL "
                                                                        "authcid NUL password")
            return self._login(auth_id, pending, parts[1], parts[0], parts[2])
        if pending.username is None:   # LOGIN, first round: the user name
            pending.username = data
            return self._wait(auth_id, pending, PROMPT_PASSWORD)
        return self._login(auth_id, pending, pending.username, b"", data)

    @staticmethod
    def _login(auth_id, pending, username, authzid, password):
        if not safe_name(username):
            return Reject(fail(auth_id), "user name empty, too long, or holding TAB, CR, LF or NUL")
        if authzid and not safe_name(authzid):
            return Reject(fail(auth_id, user=username), "authorization id too long or holding TAB, CR or LF")
        if not password:   # never asked: an empty password is how an LDAP bind behind a backend lets anyone in
            return Reject(fail(auth_id, user=username), "empty password")
        if b"\0" in password:
            return Reject(fail(auth_id, user=username), "NUL in the password")
        return Login(auth_id, pending.mechanism, username, authzid, password, pending.params)


def _is_id(field: bytes) -> bool:
    return 0 < len(field) <= 10 and field.isdigit()


def printable_command(data: bytes) -> str:
    """The start of an unexpected field, for a log line."""
    return repr(data[:32].decode("ascii", "backslashreplace"))
