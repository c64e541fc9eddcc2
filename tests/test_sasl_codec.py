"""dovecot-sasl: the codec (pfrest/protocol/dovecotauth.py) on its own, and the conversation around it in
memory: exact bytes, every split of the input, hostile input and its limits, PLAIN and LOGIN decoding as
properties.  Through sockets and real Postfix: test_sasl_serve.py, test_sasl_postfix.py."""

import asyncio
from base64 import b64encode

import pytest
from hypothesis import given, settings, strategies as st

from memory import MemoryTransport, converse_async, endpoint
from pfrest.protocol import dovecotauth
from pfrest.protocol.dovecotauth import Decoder, Login
from pfrest.protocol.framing import Close, Prompt, Reject
from pfrest.protocol.verdict import Failure, HttpResult

HELLO = b"VERSION\t1\t0\nCPID\t4242\n"
PARAMS = b"service=smtp\tnologin\tlip=192.0.2.25\trip=198.51.100.7"


def plain(user, password, authzid=b""):
    return b64encode(authzid + b"\0" + user + b"\0" + password)


def auth(auth_id, mech=b"PLAIN", resp=None, extra=b""):
    line = b"AUTH\t%d\t%s\t%s%s" % (auth_id, mech, PARAMS, extra)
    return line + (b"\tresp=" + resp if resp is not None else b"") + b"\n"


def feed(data, mechanisms=dovecotauth.MECHANISMS):
    return Decoder(mechanisms).feed(data)


# --- the codec --------------------------------------------------------------------------------------

def test_greeting_is_what_postfix_reads_mechanisms_first_then_done():
    hello = dovecotauth.greeting(("PLAIN", "LOGIN"), 77, 3, "00ff")
    assert hello == (b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t77\nCUID\t3\n"
                     b"COOKIE\t00ff\nDONE\n")


def test_plain_with_an_initial_response_gives_the_credentials_and_the_fields():
    [login] = feed(HELLO + auth(1, resp=plain(b"alice", b"s3cret")) )
    assert isinstance(login, Login)
    assert (login.auth_id, login.mechanism, login.username, login.password) == (b"1", "PLAIN", b"alice", b"s3cret")
    assert login.form() == [(b"mechanism", b"PLAIN"), (b"username", b"alice"), (b"password", b"s3cret"),
                            (b"service", b"smtp"), (b"client_address", b"198.51.100.7"),
                            (b"server_address", b"192.0.2.25"), (b"secured", b"no")]
    assert "s3cret" not in repr(login)


def test_plain_without_one_gets_an_empty_challenge_then_the_credentials():
    d = Decoder()
    assert d.feed(HELLO + auth(7)) == [Prompt(b"CONT\t7\t\n")]
    [login] = d.feed(b"CONT\t7\t" + plain(b"bob", b"pw", authzid=b"boss") + b"\n")
    assert (login.username, login.authzid, login.password) == (b"bob", b"boss", b"pw")
    assert (b"authzid", b"boss") in login.form()


def test_login_asks_for_the_user_name_then_the_password():
    d = Decoder()
    assert d.feed(HELLO + auth(2, b"LOGIN", extra=b"\tsecured")) == [Prompt(b"CONT\t2\tVXNlcm5hbWU6\n")]
    assert d.feed(b"CONT\t2\t" + b64encode(b"carol") + b"\n") == [Prompt(b"CONT\t2\tUGFzc3dvcmQ6\n")]
    [login] = d.feed(b"CONT\t2\t" + b64encode(b"pa ss") + b"\n")
    assert (login.mechanism, login.username, login.password, login.secured) == ("LOGIN", b"carol", b"pa ss", True)


def test_login_with_an_initial_response_takes_it_as_the_user_name():
    d = Decoder()
    assert d.feed(HELLO + auth(3, b"login", resp=b64encode(b"dave"))) == [Prompt(b"CONT\t3\tUGFzc3dvcmQ6\n")]
    [login] = d.feed(b"CONT\t3\t" + b64encode(b"pw") + b"\n")
    assert login.username == b"dave"


def test_replies_are_exact():
    assert dovecotauth.ok(b"5", b"alice@example.com") == b"OK\t5\tuser=alice@example.com\n"
    assert dovecotauth.fail(b"5", user=b"alice") == b"FAIL\t5\tuser=alice\treason=Invalid credentials\n"
    assert dovecotauth.fail(b"5", user=b"a\tb") == b"FAIL\t5\treason=Invalid credentials\n"


@pytest.mark.parametrize("data, why", [
    (b"AUTH\t1\tPLAIN\tservice=smtp\n", "first line is not VERSION"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "first line is not VERSION"),
    (b"VERSION\t2\t0\n", "version"),
    (HELLO + b"AUTH\tx\tPLAIN\tservice=smtp\n", "numeric id"),
    (HELLO + b"AUTH\t1\n", "numeric id"),
    (HELLO + b"CONT\t9\tAAAA\n", "no authentication in progress"),
    (HELLO + b"CPID\t1\n", "unexpected line"),
    (HELLO + b"BOGUS\n", "unexpected line"),
    (HELLO + auth(1, resp=plain(b"a", b"b")) + auth(1, resp=plain(b"a", b"b")), "reused"),
    (HELLO + b"A" * (dovecotauth.MAX_LINE + 1), "line over"),
    (HELLO + b"A" * (dovecotauth.MAX_LINE + 1) + b"\n", "line over"),
])
def test_what_is_not_the_protocol_closes_the_connection(data, why):
    items = feed(data)
    assert isinstance(items[-1], Close) and why in items[-1].why, items
    assert not any(isinstance(i, Close) for i in items[:-1])


@pytest.mark.parametrize("line, reason", [
    (auth(4, b"CRAM-MD5"), b"Unsupported authentication mechanism"),
    (auth(4, resp=b"not*base64"), b"Invalid base64 data in initial response"),
    (auth(4, resp=b64encode(b"no nul at all")), b"Invalid PLAIN response"),
    (auth(4, resp=b64encode(b"\0a\0b\0c")), b"Invalid PLAIN response"),
    (auth(4, resp=plain(b"", b"pw")), b"Invalid credentials"),
    (auth(4, resp=plain(b"al\tice", b"pw")), b"Invalid credentials"),
    (auth(4, resp=plain(b"al\nice", b"pw")), b"Invalid credentials"),
    (auth(4, resp=plain(b"bob\tuser=admin", b"pw")), b"Invalid credentials"),
    (auth(4, resp=plain(b"x" * 600, b"pw")), b"Invalid credentials"),
    (auth(4, resp=plain(b"bob", b"")), b"Invalid credentials"),
    (auth(4, resp=plain(b"bob", b"pw", authzid=b"a\tuser=root")), b"Invalid credentials"),
    (auth(4, resp=b"=" * 9000), b"Invalid base64 data in initial response"),
    (b"AUTH\t4\tPLAIN\tnologin\tresp=" + plain(b"a", b"b") + b"\n", b"Service not given"),
])
def test_bad_credentials_fail_without_the_backend_and_the_connection_goes_on(line, reason):
    d = Decoder()
    items = d.feed(HELLO + line)
    assert len(items) == 1 and isinstance(items[0], Reject), items
    assert items[0].reply.startswith(b"FAIL\t4\t") and items[0].reply.endswith(b"reason=" + reason + b"\n")
    assert b"\tuser=admin" not in items[0].reply and b"user=root" not in items[0].reply
    [login] = d.feed(auth(5, resp=plain(b"ok", b"pw")))
    assert login.username == b"ok"


def test_a_mechanism_not_configured_is_not_offered_nor_taken():
    items = feed(HELLO + auth(1, b"LOGIN"), mechanisms=("PLAIN",))
    assert isinstance(items[0], Reject) and b"Unsupported" in items[0].reply


def test_abandoned_logins_are_bounded_and_the_newest_still_completes():
    d = Decoder()
    d.feed(HELLO)
    for i in range(1, 200):   # a client that gives up every time with "*": Postfix never sends the CONT
        assert d.feed(auth(i, b"LOGIN")) == [Prompt(b"CONT\t%d\tVXNlcm5hbWU6\n" % i)]
    assert len(d._pending) <= dovecotauth.MAX_PENDING
    assert d.feed(b"CONT\t199\t" + b64encode(b"u") + b"\n") == [Prompt(b"CONT\t199\tUGFzc3dvcmQ6\n")]
    assert isinstance(d.feed(b"CONT\t199\t" + b64encode(b"p") + b"\n")[0], Login)
    assert isinstance(d.feed(b"CONT\t1\t" + b64encode(b"u") + b"\n")[-1], Close)   # evicted long ago


def test_a_cont_after_its_login_completed_closes():
    d = Decoder()
    d.feed(HELLO + auth(1))
    d.feed(b"CONT\t1\t" + plain(b"a", b"b") + b"\n")
    assert isinstance(d.feed(b"CONT\t1\t" + plain(b"a", b"b") + b"\n")[-1], Close)


def test_nothing_is_read_after_close():
    d = Decoder()
    assert isinstance(d.feed(b"junk\n" + HELLO)[-1], Close)
    assert d.feed(HELLO + auth(1, resp=plain(b"a", b"b"))) == []


def test_crlf_clients_are_read_as_lf_clients():
    [login] = feed(HELLO.replace(b"\n", b"\r\n") + auth(1, resp=plain(b"a", b"b")).replace(b"\n", b"\r\n"))
    assert login.password == b"b"


# --- properties -------------------------------------------------------------------------------------

_names = st.binary(min_size=1, max_size=dovecotauth.MAX_NAME).filter(lambda b: not any(
    c in b for c in (b"\t", b"\n", b"\r", b"\0")))
_passwords = st.binary(min_size=1, max_size=1000).filter(lambda b: b"\0" not in b)


@settings(max_examples=300)
@given(_names, _passwords, st.one_of(st.just(b""), _names), st.booleans())
def test_plain_gives_back_exactly_what_the_client_encoded(user, password, authzid, initial):
    d = Decoder()
    if initial:
        [login] = d.feed(HELLO + auth(9, resp=plain(user, password, authzid)))
    else:
        assert d.feed(HELLO + auth(9)) == [Prompt(b"CONT\t9\t\n")]
        [login] = d.feed(b"CONT\t9\t" + plain(user, password, authzid) + b"\n")
    assert (login.username, login.password, login.authzid) == (user, password, authzid)


@settings(max_examples=300)
@given(_names, _passwords)
def test_login_gives_back_exactly_what_the_client_encoded(user, password):
    d = Decoder()
    d.feed(HELLO + auth(3, b"LOGIN"))
    d.feed(b"CONT\t3\t" + b64encode(user) + b"\n")
    [login] = d.feed(b"CONT\t3\t" + b64encode(password) + b"\n")
    assert (login.username, login.password) == (user, password)


@settings(max_examples=300)
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=97))
def test_any_input_in_any_chunking_gives_the_same_items_and_never_raises(data, size):
    data = HELLO + data
    whole = Decoder().feed(data)
    d, parts = Decoder(), []
    for i in range(0, len(data), size):
        parts += d.feed(data[i:i + size])
    assert [repr(i) for i in parts] == [repr(i) for i in whole]
    assert all(isinstance(i, (Login, Prompt, Reject, Close)) for i in whole)
    assert sum(isinstance(i, Close) for i in whole) <= 1


# --- the conversation, in memory --------------------------------------------------------------------

class Auth:
    """A backend for logins: password -> HttpResult or Failure; records the form fields."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    async def policy(self, pairs, request_id):
        fields = dict(pairs)
        self.calls.append(fields)
        return self.answers.get(fields[b"password"], HttpResult(401, b""))

    def close(self):
        pass


ANSWERS = {b"good": HttpResult(200, b""), b"canon": HttpResult(200, b'["alice@example.com"]'),
           b"down": Failure("refused", "connect"), b"slow": Failure("timeout"),
           b"five": HttpResult(500, b""), b"many": HttpResult(429, b""), b"html": HttpResult(200, b"<html>"),
           b"two": HttpResult(200, b'["a","b"]'), b"tab": HttpResult(200, b'["a\\tuser=root"]'),
           b"forbid": HttpResult(403, b""), b"gone": HttpResult(404, b""), b"bad": HttpResult(400, b"")}


def converse(data, size=None, backend=None):
    chunks = [data] if size is None else [data[i:i + size] for i in range(0, len(data), size)]
    return b"".join(asyncio.run(converse_async(endpoint("dovecot-sasl"), chunks, backend or Auth(ANSWERS))))


def body(writes):
    return writes.split(b"DONE\n", 1)[1]


@pytest.mark.parametrize("password, reply", [
    (b"good", b"OK\t1\tuser=alice\n"),
    (b"canon", b"OK\t1\tuser=alice@example.com\n"),
    (b"wrong", b"FAIL\t1\tuser=alice\treason=Invalid credentials\n"),
    (b"forbid", b"FAIL\t1\tuser=alice\treason=Invalid credentials\n"),
    (b"gone", b"FAIL\t1\tuser=alice\treason=Invalid credentials\n"),
])
def test_the_backend_decides(password, reply):
    assert body(converse(HELLO + auth(1, resp=plain(b"alice", password)))) == reply


@pytest.mark.parametrize("password", [b"down", b"slow", b"five", b"many", b"html", b"two", b"tab", b"bad"])
def test_anything_else_closes_without_a_reply_so_postfix_says_454_and_reconnects(password):
    # what follows the failed login on that connection is never answered: the connection is gone
    data = HELLO + auth(1, resp=plain(b"alice", password)) + auth(2, resp=plain(b"alice", b"good"))
    assert body(converse(data)) == b""


def test_the_same_replies_however_the_input_is_split():
    data = HELLO + auth(1, resp=plain(b"a", b"good")) + auth(2, b"LOGIN") + b"CONT\t2\t" + b64encode(b"b") \
        + b"\nCONT\t2\t" + b64encode(b"wrong") + b"\n" + auth(3) + b"CONT\t3\t" + plain(b"c", b"canon") + b"\n"
    whole = converse(data)
    assert body(whole) == (b"OK\t1\tuser=a\nCONT\t2\tVXNlcm5hbWU6\nCONT\t2\tUGFzc3dvcmQ6\n"
                           b"FAIL\t2\tuser=b\treason=Invalid credentials\nCONT\t3\t\nOK\t3\tuser=alice@example.com\n")
    for size in (1, 2, 3, 5, 8, 13, 64):
        assert body(converse(data, size)) == body(whole), size


def test_the_greeting_comes_before_anything_is_read_and_each_connection_has_its_own():
    async def run():
        from pfrest.conversation.conversation import Conversation
        from pfrest.conversation.services import Origin, Services
        services = Services(backend_for=lambda _: Auth(ANSWERS))
        services.apply([endpoint("dovecot-sasl")], "test")
        hellos = []
        for _ in range(2):
            conv = Conversation(services, Origin("ep"), "test")
            transport = MemoryTransport(conv)
            conv.connection_made(transport)
            hellos.append(transport.writes)
            transport.close()
        return hellos
    first, second = asyncio.run(run())
    assert len(first) == 1 and first[0].endswith(b"DONE\n") and first[0].startswith(b"VERSION\t1\t")
    assert first[0].split(b"CUID\t")[1][:4] != second[0].split(b"CUID\t")[1][:4]


def test_the_backend_gets_exactly_the_documented_fields():
    backend = Auth(ANSWERS)
    converse(HELLO + auth(1, resp=plain(b"alice", b"good", authzid=b"boss"), extra=b"\tsecured"), backend=backend)
    assert backend.calls == [{b"mechanism": b"PLAIN", b"username": b"alice", b"authzid": b"boss",
                              b"password": b"good", b"service": b"smtp", b"client_address": b"198.51.100.7",
                              b"server_address": b"192.0.2.25", b"secured": b"yes"}]


def test_a_login_refused_before_the_backend_is_counted_as_a_failed_login():
    """Bad base64 or an empty password never reach the backend, but the metrics' failed logins include
    them (a guesser sending empty passwords shows on the dashboard too); a good login counts as OK."""
    async def run():
        from pfrest.conversation.conversation import Conversation
        from pfrest.conversation.services import Origin, Services
        backend = Auth(ANSWERS)
        services = Services(backend_for=lambda _: backend)
        services.apply([endpoint("dovecot-sasl")], "test")
        ended = asyncio.get_running_loop().create_future()
        conv = Conversation(services, Origin("ep"), "test", on_end=lambda c: ended.set_result(None))
        transport = MemoryTransport(conv)
        conv.connection_made(transport)
        conv.data_received(HELLO + auth(1, resp=b"*not base64*") + auth(2, resp=plain(b"a", b""))
                           + auth(3, resp=plain(b"a", b"good")))
        conv.eof_received()
        await asyncio.wait_for(ended, 10)
        return services.stats["ep"], backend.calls
    stats, calls = asyncio.run(run())
    assert stats.replies == {"FAIL": 2, "OK": 1} and len(calls) == 1
