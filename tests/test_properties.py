"""Property-based tests (hypothesis): codecs round-trip any bytes; the dialogue never raises on any
input, answers only with whole replies, and answers the same however the input is split."""

from hypothesis import given, settings, strategies as st

from memory import FakeBackend, converse as conversation, endpoint
from pfrest.protocol import netstring, tcptable
from pfrest.protocol.verdict import HttpResult


@given(st.binary(max_size=2000))
def test_tcp_quote_round_trips_and_is_wire_safe(data):
    quoted = tcptable.quote(data)
    assert all(0x21 <= b <= 0x7E for b in quoted)
    if b"\0" not in data:
        assert tcptable.unquote(quoted) == data


@given(st.binary(max_size=300))
def test_tcp_unquote_never_raises_anything_but_valueerror(data):
    try:
        tcptable.unquote(data)
    except ValueError:
        pass


@given(st.lists(st.binary(max_size=500), max_size=10), st.integers(min_value=1, max_value=64))
def test_netstrings_round_trip_in_any_chunking(payloads, size):
    stream = b"".join(netstring.encode(p) for p in payloads)
    d = netstring.Decoder()
    out = []
    for i in range(0, len(stream), size):
        out += d.feed(stream[i:i + size])
    assert out == payloads and not d.pending


@given(st.binary(max_size=2000))
def test_netstring_decoder_never_raises(data):
    for item in netstring.Decoder(soft_limit=100, hard_limit=1000).feed(data):
        assert isinstance(item, (bytes, netstring.Skipped, netstring.NetstringError))


class AlwaysFound(FakeBackend):
    async def lookup(self, params, request_id):
        self.calls.append(params)
        return HttpResult(200, b'["v"]')

    async def policy(self, pairs, request_id):
        self.calls.append(pairs)
        return HttpResult(200, b"DUNNO")


def converse(mode, data, size):
    backend = AlwaysFound({})
    return conversation(endpoint(mode), data, backend, size), backend.calls


def well_formed(mode, reply):
    if mode == "tcp-lookup":
        return reply.endswith(b"\n") and reply.count(b"\n") == 1 and reply[:4] in (b"200 ", b"400 ", b"500 ")
    if mode == "socketmap-lookup":
        items = netstring.Decoder().feed(reply)
        return len(items) == 1 and isinstance(items[0], bytes)
    return reply.startswith(b"action=") and reply.endswith(b"\n\n") and reply.count(b"\n") == 2


ALPHABETS = {
    "tcp-lookup": st.lists(st.sampled_from([b"get ", b"put ", b"%", b"%4", b"1", b"\n", b"\r", b" ",
                                            b"\xff", b"%41", b"%00", b"x"]), max_size=40).map(b"".join),
    "socketmap-lookup": st.lists(st.sampled_from([b"3:", b"5:", b"0", b":", b",", b"m k", b"a",
                                                  b" ", b"10:", b"\xff"]), max_size=40).map(b"".join),
    "policy": st.lists(st.sampled_from([b"request=smtpd_access_policy\n", b"a=b\n", b"\n", b"=",
                                        b"x", b"\r\n", b"request=other\n", b"\xff"]), max_size=40).map(b"".join),
}


def dialogue_property(mode):
    @settings(max_examples=300, deadline=None)
    @given(st.one_of(ALPHABETS[mode], st.binary(max_size=400)), st.integers(min_value=1, max_value=50))
    def check(data, size):
        writes, calls = converse(mode, data, size)
        assert all(well_formed(mode, w) for w in writes), writes
        assert len(calls) <= len(writes)  # every backend call answered once; never a reply twice
        whole, _ = converse(mode, data, len(data) + 1)
        assert writes == whole  # the same answers however the input is split
    return check


test_tcp_dialogue_is_total = dialogue_property("tcp-lookup")
test_socketmap_dialogue_is_total = dialogue_property("socketmap-lookup")
test_policy_dialogue_is_total = dialogue_property("policy")
