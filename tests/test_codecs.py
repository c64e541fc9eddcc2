"""Pure codecs: tcp_table hex quoting and framing, netstrings, socketmap, policy, actions."""

import pytest

from pfrest.protocol import actions, netstring, policy, socketmap, tcptable
from pfrest.protocol.framing import Close, Reject


# --- tcp_table ---------------------------------------------------------------------------------

def test_quote_matches_postfix_hex_quote():
    # Only 0x21..0x7E except '%' travel raw (hex_quote.c); upper-case hex
    assert tcptable.quote(b"a b%c") == b"a%20b%25c"
    assert tcptable.quote(b"\t\r\n\x7f\x80\xff~!") == b"%09%0D%0A%7F%80%FF~!"
    assert tcptable.quote(b"smtp:[mx.example.net]:25") == b"smtp:[mx.example.net]:25"
    assert tcptable.quote(bytes(range(256))).count(b"%") == 256 - (0x7F - 0x21 - 1)


def test_unquote_round_trips_every_byte_and_accepts_any_case():
    data = bytes(range(1, 256))
    assert tcptable.unquote(tcptable.quote(data)) == data
    assert tcptable.unquote(b"%c3%A9%2f") == b"\xc3\xa9/"
    assert tcptable.unquote(b"raw\xffbytes") == b"raw\xffbytes"


@pytest.mark.parametrize("bad", [b"%", b"%4", b"%zz", b"a%g0", b"%00", b"x%0"])
def test_unquote_rejects_bad_escapes_and_nul(bad):
    with pytest.raises(ValueError):
        tcptable.unquote(bad)


def test_reply_limits_and_shapes():
    assert tcptable.reply(tcptable.NOT_FOUND, b"") == b"500 \n"
    assert tcptable.reply(tcptable.NOT_FOUND, b"100% no") == b"500 100%25%20no\n"
    assert len(tcptable.reply(tcptable.FOUND, b"x" * 4091)) == 4096
    assert tcptable.reply(tcptable.FOUND, b"x" * 4092).startswith(b"400 ")
    assert tcptable.reply(tcptable.FOUND, b"\xff" * 1363).startswith(b"200 ")  # 4089 + 4 + 1 = 4094
    assert tcptable.reply(tcptable.FOUND, b"\xff" * 1364).startswith(b"400 ")


def test_tcp_decoder_frames_requests():
    d = tcptable.Decoder()
    assert d.feed(b"get a") == [] and d.pending
    assert d.feed(b"b\nget c%20d\r\nget e\n") == [b"ab", b"c d", b"e"]
    assert not d.pending
    items = d.feed(b"put k v\nfoo\nget\n")
    assert [type(i) for i in items] == [Reject] * 3
    assert items[0].reply.startswith(b"500 ") and items[1].reply.startswith(b"400 ")


def test_tcp_oversized_line_is_read_through_and_answered_not_found():
    d = tcptable.Decoder()
    big = b"get " + b"x" * (tcptable.SOFT_REQUEST_LIMIT + 10)
    items = []
    for i in range(0, len(big), 1000):
        items += d.feed(big[i:i + 1000])
    assert items == []
    assert d.feed(b"\nget ok\n") == [tcptable.TOO_LONG, b"ok"]


def test_tcp_endless_line_closes_at_hard_limit():
    d = tcptable.Decoder()
    chunk = b"x" * 65536
    items = []
    for _ in range(tcptable.HARD_REQUEST_LIMIT // len(chunk) + 2):
        items += d.feed(chunk)
        if items:
            break
    assert len(items) == 1 and isinstance(items[0], Close)


# --- netstrings and socketmap -----------------------------------------------------------------

def test_netstring_encode_and_decode():
    assert netstring.encode(b"") == b"0:,"
    assert netstring.encode(b"OK a b") == b"6:OK a b,"
    d = netstring.Decoder()
    assert d.feed(b"3:abc,0:,5:he") == [b"abc", b""]
    assert d.pending
    assert d.feed(b"llo,") == [b"hello"]


@pytest.mark.parametrize("bad", [b":abc,", b"05:hello,", b"a:", b"3:abc;", b"12345678901:",
                                 b"-1:", b" 3:abc,", b"3:abc"  b"x"])
def test_netstring_rejects_invalid_input(bad):
    items = netstring.Decoder().feed(bad)
    assert items and isinstance(items[-1], netstring.NetstringError)


def test_netstring_never_allocates_declared_length():
    d = netstring.Decoder(soft_limit=100, hard_limit=1 << 20)
    assert isinstance(d.feed(b"999999999999:")[-1], netstring.BadLength)  # 12 digits
    d = netstring.Decoder(soft_limit=100, hard_limit=1 << 20)
    assert isinstance(d.feed(b"1000000000:")[-1], netstring.TooLong)     # 10^9 > hard limit
    d = netstring.Decoder(soft_limit=100, hard_limit=1000)
    items = d.feed(b"500:" + b"x" * 500 + b",3:abc,")
    assert isinstance(items[0], netstring.Skipped) and items[1] == b"abc"
    assert len(d._data) == 0


def test_socketmap_requests_split_at_first_space_only():
    d = socketmap.Decoder()
    assert d.feed(netstring.encode(b"virtual a b  c")) == [(b"virtual", b"a b  c")]
    assert d.feed(netstring.encode(b"virtual ")) == [(b"virtual", b"")]
    assert d.feed(netstring.encode(b"nospace")) == [socketmap.MALFORMED]
    assert isinstance(d.feed(b"x")[0], Close)
    assert d.feed(b"3:abc,") == []  # closed for good


def test_socketmap_replies():
    assert socketmap.ok(b"a b") == b"6:OK a b,"
    assert socketmap.NOTFOUND == b"9:NOTFOUND ,"
    assert socketmap.temp(b"x") == b"6:TEMP x,"
    assert socketmap.timeout(b"x") == b"9:TIMEOUT x,"
    assert socketmap.perm(b"x") == b"6:PERM x,"
    assert len(socketmap.ok(b"v" * 99997)) == len(b"100000:,") + 100000
    assert socketmap.ok(b"v" * 99998).startswith(b"33:TEMP ")


# --- policy ------------------------------------------------------------------------------------

REQUEST = b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=a@b\nrecipient=c@d\n\n"


def test_policy_decoder_keeps_bytes_order_and_duplicates():
    d = policy.Decoder()
    raw = b"request=smtpd_access_policy\nhelo_name=\xff\rx\nsender=\nx=1=2\nx=3\n\n"
    assert d.feed(raw) == [[(b"request", b"smtpd_access_policy"), (b"helo_name", b"\xff\rx"),
                            (b"sender", b""), (b"x", b"1=2"), (b"x", b"3")]]


@pytest.mark.parametrize("bad", [b"\n", b"noequals\n\n", b"=value\n\n", b"request=other\n\n",
                                 b"sender=a\n\n"])
def test_policy_protocol_errors_close(bad):
    items = policy.Decoder().feed(bad)
    assert len(items) == 1 and isinstance(items[0], Close)


def test_policy_limits_close():
    assert isinstance(policy.Decoder().feed(b"a=" + b"x" * (policy.MAX_LINE + 1))[0], Close)
    many = b"request=smtpd_access_policy\n" + b"a=b\n" * policy.MAX_ATTRIBUTES + b"\n"
    assert isinstance(policy.Decoder().feed(many)[-1], Close)
    big = b"request=smtpd_access_policy\n" + (b"a=" + b"x" * 10000 + b"\n") * 7
    assert isinstance(policy.Decoder().feed(big)[-1], Close)


def test_policy_crlf_client():
    items = policy.Decoder().feed(REQUEST.replace(b"\n", b"\r\n"))
    assert items[0][-1] == (b"recipient", b"c@d")


def test_policy_reply():
    assert policy.reply("DUNNO") == b"action=DUNNO\n\n"
    assert policy.reply("REJECT \u00e9") == "action=REJECT \u00e9\n\n".encode()


# --- actions -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body,action", [
    (b"DUNNO", "DUNNO"), (b"  REJECT go away \n", "REJECT go away"), (b"action=OK\n\n", "OK"),
    (b"550 5.7.1 no", "550 5.7.1 no"), ("REJECT d\u00e9j\u00e0".encode(), "REJECT d\u00e9j\u00e0"),
    (b"", None), (b"   ", None), (b"550", None), (b"action=", None), (b"action=450", None),
    (b"OK\nDUNNO", None), (b"<html>Error</html>", None), (b'["DUNNO"]', None),
    (b"permit_mynetworks", "permit_mynetworks"), (b"REJECT a\rb", None), (b"REJECT \xff", None), (b"a\0b", None),
])
def test_actions_from_backend_body(body, action):
    assert actions.from_body(body) == action


@pytest.mark.parametrize("action,ok", [
    ("DUNNO", True), ("defer_if_permit try later", True), ("554 5.3.0 policy down", True),
    ("451 4.3.0 later", True), ("OK", True), ("550", False), ("250 ok", False), ("", False),
    ("FOOBAR", False), ("REJECT\nx", False), (" DUNNO", False), ("REJECT caf\u00e9", False),
])
def test_actions_check_for_configured_error_actions(action, ok):
    assert (actions.check(action) is None) == ok
