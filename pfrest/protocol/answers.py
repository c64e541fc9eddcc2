"""Per mode, what a decoded Postfix request asks of the backend and the exact reply its answer gives.

The conversation drivers (``pfrest handle``, ``pfrest serve``) do the I/O; everything they say to
Postfix is decided here, from the request, the backend's result and the request id:

    mode = mode_for(endpoint)
    call = mode.call(request)                 # what to ask the backend, or None: no backend request
    answer = mode.answer(request, result, request_id)   # result: HttpResult, Failure, or None
    transport.write(answer.reply)

Every error reply carries the request id (``ref ID``), which is also the backend's ``X-Request-Id`` and
the id in pfrest's log line, so that a deferral in Postfix's log leads to both.
"""

import itertools
import os
import re
from functools import partial
from typing import NamedTuple, Optional

from pfrest.protocol.modes import POLICY, SASL, SOCKETMAP, TCP
from pfrest.protocol import dovecotauth, policy, socketmap, tcptable, verdict
from pfrest.protocol.verdict import Verdict

# Actions whose text Postfix shows to the SMTP client: the ones a request id is added to.
_REFUSALS = ("REJECT", "DEFER", "DEFER_IF_PERMIT", "DEFER_IF_REJECT")
_CONTROL = {i: f"\\x{i:02x}" for i in list(range(32)) + [127]}
_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")


class Answer(NamedTuple):
    reply: bytes              # the exact bytes for Postfix
    verdict: Verdict          # what they mean, for the log and the counters
    action: Optional[str] = None  # policy: the action sent
    close: bool = False       # end the connection once ``reply`` is written (dovecot-sasl's "try later")


class Call(NamedTuple):
    """A backend request: ``kind`` is "lookup" (params: (name, bytes) pairs for the query string), or
    "policy" or "login" (params: the pairs for the form body, sent exactly once)."""
    kind: str
    params: object


def printable(data: bytes, limit: int = 200) -> str:
    """Bytes for a log line: UTF-8 where it is, escapes for the rest, never a line break."""
    cut = data[:limit]
    text = cut.decode("utf-8", "backslashreplace")
    if _CONTROL_BYTES.search(cut):
        text = text.translate(_CONTROL)
    return text + "..." if len(data) > limit else text


def with_reference(action: str, request_id: str) -> str:
    """Add the request id to a refusal's text, where Postfix shows text; other actions stay verbatim
    (their argument is an address, a header or a transport)."""
    word = action.split(None, 1)[0]
    if word.upper() in _REFUSALS or word.isdigit():
        return f"{action} (ref {request_id})"
    return action


def _ref(text: str, request_id: str) -> bytes:
    return f"{text} (ref {request_id})".encode()


INTERNAL_ERROR = Verdict(verdict.TEMP, "internal error")


class Mode:
    """What every mode has: no greeting (the client speaks first), and an internal error (a bug in
    pfrest) answered as the mode's temporary error.  ``refusal``: the verdict a protocol-level refusal
    (framing.Reject) is counted as, or None when it is not a request's answer (a malformed lookup)."""
    refusal = None

    @staticmethod
    def greeting() -> bytes:
        return b""

    def internal_error(self, request_id) -> Answer:
        return Answer(self.temporary(request_id), INTERNAL_ERROR)


class TcpLookup(Mode):
    """tcp_table(5): ``get KEY`` -> ``200 VALUE`` / ``500 ...`` / ``400 ...``."""
    name = TCP
    decoder = tcptable.Decoder

    def __init__(self, endpoint):
        self.separator = endpoint.list_separator

    @staticmethod
    def call(key: bytes) -> Optional[Call]:
        return Call("lookup", (("key", key),)) if key else None

    def answer(self, key, result, request_id) -> Answer:
        if result is None:
            return Answer(tcptable.reply(tcptable.NOT_FOUND, b"empty key"), Verdict(verdict.NOTFOUND, "empty key"))
        v = verdict.lookup(result, self.separator)
        if v.kind == verdict.FOUND:
            reply = tcptable.reply(tcptable.FOUND, v.value)
            if reply.startswith(tcptable.FOUND):
                return Answer(reply, v)
            v = Verdict(verdict.TEMP, "value too long for tcp_table", v.status)
        elif v.kind == verdict.NOTFOUND:
            return Answer(tcptable.reply(tcptable.NOT_FOUND, b"not found"), v)
        return Answer(tcptable.reply(tcptable.TEMPORARY, _ref(v.value, request_id)), v)

    @staticmethod
    def subject(key) -> str:
        return f"key={printable(key)}"

    @staticmethod
    def temporary(request_id) -> bytes:
        return tcptable.reply(tcptable.TEMPORARY, _ref("internal error", request_id))


class SocketmapLookup(Mode):
    """socketmap_table(5): ``NAME KEY`` netstrings -> ``OK VALUE`` / ``NOTFOUND`` / ``TEMP|TIMEOUT|PERM ...``."""
    name = SOCKETMAP
    decoder = socketmap.Decoder

    def __init__(self, endpoint):
        self.separator = endpoint.list_separator

    @staticmethod
    def call(request) -> Optional[Call]:
        mapname, key = request
        return Call("lookup", (("name", mapname), ("key", key))) if key else None

    def answer(self, request, result, request_id) -> Answer:
        if result is None:
            return Answer(socketmap.NOTFOUND, Verdict(verdict.NOTFOUND, "empty key"))
        v = verdict.lookup(result, self.separator)
        if v.kind == verdict.FOUND:
            if len(v.value) + 3 <= socketmap.MAX_REPLY:
                return Answer(socketmap.ok(v.value), v)
            v = Verdict(verdict.TEMP, "value too long for socketmap", v.status)
        elif v.kind == verdict.NOTFOUND:
            return Answer(socketmap.NOTFOUND, v)
        text = _ref(v.value, request_id)
        reply = socketmap.timeout(text) if v.kind == verdict.TIMEOUT else \
            socketmap.perm(text) if v.kind == verdict.PERM else socketmap.temp(text)
        return Answer(reply, v)

    @staticmethod
    def subject(request) -> str:
        return f"map={printable(request[0])} key={printable(request[1])}"

    @staticmethod
    def temporary(request_id) -> bytes:
        return socketmap.temp(_ref("internal error", request_id))


class PolicyCheck(Mode):
    """SMTPD policy delegation: ``name=value`` lines -> ``action=...``; backend faults give the endpoint's
    configured error actions, never an accept or a bounce by accident."""
    name = POLICY
    decoder = policy.Decoder

    def __init__(self, endpoint):
        self.temporary_error_action = endpoint.temporary_error_action
        self.permanent_error_action = endpoint.permanent_error_action

    @staticmethod
    def call(attrs) -> Call:
        return Call("policy", attrs)

    def answer(self, attrs, result, request_id) -> Answer:
        v = verdict.policy(result)
        if v.kind == verdict.ACTION:
            action = v.value
        elif v.kind == verdict.PERM:
            action = with_reference(self.permanent_error_action, request_id)
        else:
            action = with_reference(self.temporary_error_action, request_id)
        return Answer(policy.reply(action), v, action)

    @staticmethod
    def subject(attrs) -> str:
        first = dict(reversed(attrs))  # an attribute sent twice: its first value
        return (f"client_address={printable(first.get(b'client_address', b''))} "
                f"sender={printable(first.get(b'sender', b''))} "
                f"recipient={printable(first.get(b'recipient', b''))}")

    def temporary(self, request_id) -> bytes:
        return policy.reply(with_reference(self.temporary_error_action, request_id))


_connections = itertools.count(1)   # CUID: this process's auth connections, numbered


class DovecotSasl(Mode):
    """SMTP AUTH, Dovecot's auth protocol: credentials -> ``OK id user=NAME`` / ``FAIL id ...``; a
    temporary failure closes the connection, the one way to have Postfix answer ``454`` (try later)
    rather than ``535`` (wrong password), and to have it reconnect for the next login."""
    name = SASL
    # a login refused before the backend (bad base64, an empty password, a name Postfix would misread)
    # is a failed login all the same: the metrics count it with the backend's
    refusal = Verdict(verdict.REJECTED, "refused by pfrest")

    def __init__(self, endpoint):
        self.mechanisms = endpoint.mechanisms
        self.decoder = partial(dovecotauth.Decoder, self.mechanisms)

    def greeting(self) -> bytes:
        return dovecotauth.greeting(self.mechanisms, os.getpid(), next(_connections), os.urandom(16).hex())

    @staticmethod
    def call(login) -> Call:
        return Call("login", login.form())

    @staticmethod
    def answer(login, result, request_id) -> Answer:
        v = verdict.login(result, login.username)
        if v.kind == verdict.AUTHENTICATED:
            return Answer(dovecotauth.ok(login.auth_id, v.value), v)
        if v.kind == verdict.REJECTED:
            return Answer(dovecotauth.fail(login.auth_id, user=login.username), v)
        return Answer(b"", v, close=True)

    @staticmethod
    def subject(login) -> str:
        return (f"user={printable(login.username)} mechanism={login.mechanism} "
                f"client_address={printable(login.client_address)}")

    @staticmethod
    def internal_error(request_id) -> Answer:
        return Answer(b"", INTERNAL_ERROR, close=True)


MODES = {TCP: TcpLookup, SOCKETMAP: SocketmapLookup, POLICY: PolicyCheck, SASL: DovecotSasl}


def mode_for(endpoint):
    return MODES[endpoint.mode](endpoint)
