"""Turn one decoded Postfix request into one backend call and one reply, and log it.

A Responder is what the dialogue calls for every request; it is the same object for ``pfrest handle``
(stdin/stdout) and for the listener.  It never raises: whatever goes wrong becomes a temporary answer.
"""

import logging
import time
from urllib.parse import urlsplit

from pfrest import config
from pfrest.protocol import socketmap, tcptable, verdict
from pfrest.log import add_secret
from pfrest.protocol import policy as policy_codec
from pfrest.legacy_backend import new_request_id

log = logging.getLogger("pfrest")

_REFUSALS = ("REJECT", "DEFER", "DEFER_IF_PERMIT", "DEFER_IF_REJECT")
_CONTROL = {i: f"\\x{i:02x}" for i in list(range(32)) + [127]}


def printable(data: bytes, limit: int = 200) -> str:
    """Bytes for a log line: UTF-8 where it is, escapes for the rest, never a line break."""
    text = data[:limit].decode("utf-8", "backslashreplace").translate(_CONTROL)
    return text + ("..." if len(data) > limit else "")


def with_reference(action: str, request_id: str) -> str:
    """Add the request id to a refusal's text, where Postfix shows text; other actions stay verbatim
    (their argument is an address, a header or a transport)."""
    word = action.split(None, 1)[0]
    if word.upper() in _REFUSALS or word.isdigit():
        return f"{action} (ref {request_id})"
    return action


class Responder:
    """Answers the requests of one endpoint."""

    def __init__(self, endpoint, backend, observer=None):
        self.endpoint = endpoint
        self.backend = backend
        # whatever an HTTP library puts in an exception text, these never reach a log line
        add_secret(endpoint.auth_token)
        add_secret(urlsplit(endpoint.proxy).password if endpoint.proxy else None)
        # observer(verdict, ms, backend_result) after each answered request: the listener's counters
        self.observer = observer
        self.answer = {config.TCP: self.tcp, config.SOCKETMAP: self.socketmap,
                       config.POLICY: self.policy}[endpoint.mode]

    def __call__(self, request) -> bytes:
        try:
            return self.answer(request)
        except Exception:  # a bug in pfrest must still give Postfix a temporary answer
            log.exception("endpoint=%s internal error; answering with a temporary error",
                          self.endpoint.name)
            return self.internal_error_reply()

    def internal_error_reply(self) -> bytes:
        mode = self.endpoint.mode
        if mode == config.TCP:
            return tcptable.reply(tcptable.TEMPORARY, b"internal error")
        if mode == config.SOCKETMAP:
            return socketmap.temp(b"internal error")
        return policy_codec.reply(self.endpoint.temporary_error_action)

    # --- one method per mode: request in, reply bytes out -------------------------------------

    def tcp(self, key: bytes) -> bytes:
        rid, start = new_request_id(), time.monotonic()
        if not key:
            return self._done(rid, start, key, None, verdict.Verdict(verdict.NOTFOUND, "empty key"),
                              tcptable.reply(tcptable.NOT_FOUND, b"empty key"))
        result = self.backend.lookup((("key", key),), rid)
        v = verdict.lookup(result, self.endpoint.list_separator)
        if v.kind == verdict.FOUND:
            reply = tcptable.reply(tcptable.FOUND, v.value)
            if not reply.startswith(tcptable.FOUND):
                v = verdict.Verdict(verdict.TEMP, "value too long for tcp_table", v.status)
        elif v.kind == verdict.NOTFOUND:
            reply = tcptable.reply(tcptable.NOT_FOUND, b"not found")
        else:
            reply = tcptable.reply(tcptable.TEMPORARY, f"{v.value} (ref {rid})".encode())
        return self._done(rid, start, key, result, v, reply)

    def socketmap(self, request) -> bytes:
        name, key = request
        rid, start = new_request_id(), time.monotonic()
        if not key:
            return self._done(rid, start, key, None, verdict.Verdict(verdict.NOTFOUND, "empty key"),
                              socketmap.NOTFOUND, name)
        result = self.backend.lookup((("name", name), ("key", key)), rid)
        v = verdict.lookup(result, self.endpoint.list_separator)
        text = f"{v.value} (ref {rid})".encode() if v.is_error else b""
        if v.kind == verdict.FOUND:
            reply = socketmap.ok(v.value)
            if not reply.startswith(b"%d:OK " % (len(v.value) + 3)):
                v = verdict.Verdict(verdict.TEMP, "value too long for socketmap", v.status)
        elif v.kind == verdict.NOTFOUND:
            reply = socketmap.NOTFOUND
        elif v.kind == verdict.TIMEOUT:
            reply = socketmap.timeout(text)
        elif v.kind == verdict.PERM:
            reply = socketmap.perm(text)
        else:
            reply = socketmap.temp(text)
        return self._done(rid, start, key, result, v, reply, name)

    def policy(self, attrs) -> bytes:
        rid, start = new_request_id(), time.monotonic()
        result = self.backend.policy(attrs, rid)
        v = verdict.policy(result)
        if v.kind == verdict.ACTION:
            action = v.value
        elif v.kind == verdict.PERM:
            action = with_reference(self.endpoint.permanent_error_action, rid)
        else:
            action = with_reference(self.endpoint.temporary_error_action, rid)
        first = {}
        for name, value in attrs:
            first.setdefault(name, value)
        who = " ".join(f"{n}={printable(first.get(n.encode(), b''))}"
                       for n in ("client_address", "sender", "recipient"))
        return self._done(rid, start, None, result, v, policy_codec.reply(action), who=who,
                          action=action)

    def _done(self, rid, start, key, result, v, reply, mapname=None, who=None, action=None):
        ms = (time.monotonic() - start) * 1000
        if self.observer is not None:
            self.observer(v, ms, result)
        if log.isEnabledFor(logging.INFO):
            subject = who if who is not None else (
                (f"map={printable(mapname)} " if mapname is not None else "") + f"key={printable(key)}")
            status = getattr(result, "status", None) or "-"
            extra = ""
            if isinstance(result, verdict.Failure):
                extra = f" error={result.kind}: {result.detail}"[:300]
            elif getattr(result, "cached", False):
                extra = " cache=hit"
            elif getattr(result, "location", None) and 300 <= result.status < 400:
                extra = f" location={printable(result.location.encode(), 300)}"
            outcome = f"action={printable(action.encode())}" if action is not None else \
                f"reply={v.kind}" + ("" if not v.is_error else f" ({v.value})")
            log.info("endpoint=%s id=%s %s status=%s %s ms=%.1f%s", self.endpoint.name, rid,
                     subject, status, outcome, ms, extra)
        return reply
