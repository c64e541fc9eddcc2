"""`pfrest handle` as a real subprocess against a real HTTP backend: every row of the reply table."""

import re
import socket
import time

import pytest


from pfrest.protocol import netstring

REF = rb"\(ref%20[0-9a-f]{16}\)"       # tcp: the request id, %-encoded
SM_REF = rb"\(ref [0-9a-f]{16}\)"


def slow(seconds, answer):
    def respond(request):
        time.sleep(seconds)
        return answer
    return respond


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# key -> (backend answer, expected tcp reply regex, expected socketmap payload regex)
ROWS = {
    "found": ((200, ["a b%c", "\u00e9"]), rb"200 a%20b%25c,%C3%A9\n", rb"OK a b%c,\xc3\xa9"),
    "empty": ((200, []), rb"500 not%20found\n", rb"NOTFOUND "),
    "blank": ((200, [""]), rb"500 not%20found\n", rb"NOTFOUND "),
    "missing": ((404, b""), rb"500 not%20found\n", rb"NOTFOUND "),
    "forbidden": ((403, b"no"), rb"400 backend%20rejected%20the%20request%20\(HTTP%20403\)%20" + REF + rb"\n",
                  rb"PERM backend rejected the request \(HTTP 403\) " + SM_REF),
    "down": ((503, b"oops"), rb"400 backend%20error%20\(HTTP%20503\)%20" + REF + rb"\n",
             rb"TEMP backend error \(HTTP 503\) " + SM_REF),
    "slow": (slow(1.0, (200, ["late"])), rb"400 backend%20timed%20out%20" + REF + rb"\n",
             rb"TIMEOUT backend timed out " + SM_REF),
    "moved": ((302, b"", {"Location": "http://elsewhere.example/"}),
              rb"400 backend%20redirected%20\(HTTP%20302\)%20" + REF + rb"\n",
              rb"TEMP backend redirected \(HTTP 302\) " + SM_REF),
    "nocontent": ((204, b""), rb"400 unexpected%20backend%20status%20\(HTTP%20204\)%20" + REF + rb"\n",
                  rb"TEMP unexpected backend status \(HTTP 204\) " + SM_REF),
    "html": ((200, b"<html>hi</html>", {"Content-Type": "text/html"}),
             rb"400 invalid%20backend%20data.*\n", rb"TEMP invalid backend data.*"),
    "numbers": ((200, [1, 2]), rb"400 invalid%20backend%20data.*\n", rb"TEMP invalid backend data.*"),
    "nested": ((200, [["a"]]), rb"400 invalid%20backend%20data.*\n", rb"TEMP invalid backend data.*"),
    "crlf": ((200, ["a\r\nb"]), rb"400 invalid%20backend%20data.*\n", rb"TEMP invalid backend data.*"),
    "nul": ((200, ["a\u0000b"]), rb"400 invalid%20backend%20data.*\n", rb"TEMP invalid backend data.*"),
    "huge": ((200, ["x" * 200000]), rb"400 value%20too%20long%20for%20tcp_table%20" + REF + rb"\n",
             rb"TEMP value too long for socketmap " + SM_REF),
}
ROWS["tcpmax"] = ((200, ["y" * 4091]), b"200 " + b"y" * 4091 + b"\n", b"OK " + b"y" * 4091)
ROWS["tcpover"] = ((200, ["%" * 1364]), rb"400 value%20too%20long%20for%20tcp_table%20" + REF + rb"\n", b"OK " + b"%" * 1364)
ROWS["smmax"] = ((200, ["z" * 99997]), rb"400 value%20too%20long%20for%20tcp_table%20" + REF + rb"\n", b"OK " + b"z" * 99997)
ROWS["smover"] = ((200, ["z" * 99998]), rb"400 value%20too%20long%20for%20tcp_table%20" + REF + rb"\n",
                  rb"TEMP value too long for socketmap " + SM_REF)


def endpoint(backend, mode, **extra):
    ep = {"name": "ep", "mode": mode, "target": backend.url + "/lookup", "bind-address": "127.0.0.1",
          "bind-port": 9000, "auth-token": "s3cret-token", "request-timeout": 400}
    ep.update(extra)
    return ep


def read_netstrings(data):
    decoder = netstring.Decoder(hard_limit=1 << 24, soft_limit=1 << 24)
    return decoder.feed(data)


@pytest.mark.parametrize("mode", ["tcp-lookup", "socketmap-lookup"])
def test_every_row_byte_for_byte(backend, write_config, handle, mode):
    for key, row in ROWS.items():
        backend.answers[key] = row[0]
    keys = list(ROWS)
    if mode == "tcp-lookup":
        data = b"".join(b"get " + k.encode() + b"\n" for k in keys)
    else:
        data = b"".join(netstring.encode(b"mymap " + k.encode()) for k in keys)
    out = handle(write_config([endpoint(backend, mode)]), "ep", data)
    assert handle.returncode == 0
    if mode == "tcp-lookup":
        replies = out.split(b"\n")[:-1]
        replies = [r + b"\n" for r in replies]
        assert out.endswith(b"\n")
    else:
        replies = read_netstrings(out)
    assert len(replies) == len(keys), out
    for key, reply in zip(keys, replies):
        expected = ROWS[key][1] if mode == "tcp-lookup" else ROWS[key][2]
        assert re.fullmatch(expected, reply, re.S), (key, reply[:200])
        if mode == "tcp-lookup":
            assert len(reply) <= 4096 and b"\r" not in reply


def test_refused_backend_is_temporary(write_config, handle):
    port = closed_port()
    ep = {"name": "ep", "mode": "tcp-lookup", "target": f"http://127.0.0.1:{port}/x"}
    out = handle(write_config([ep]), "ep", b"get k\n")
    assert re.fullmatch(rb"400 backend%20refused%20the%20connection%20" + REF + rb"\n", out)


def test_requests_the_backend_receives(backend, write_config, handle):
    backend.answers["k y"] = (200, ["v"])
    ep = endpoint(backend, "socketmap-lookup", target=backend.url + "/route?static=1")
    out = handle(write_config([ep], **{"user-agent": "UA/1"}), "ep",
                 netstring.encode(b"virtual k y") + netstring.encode(b"virtual \xff\xfe%+&"))
    assert out == b"4:OK v," + b"9:NOTFOUND ,"
    first, second = backend.requests
    assert first.method == "GET" and first.path == "/route"
    assert first.raw_query == "static=1&name=virtual&key=k%20y"
    assert second.raw_query == "static=1&name=virtual&key=%FF%FE%25%2B%26"
    assert first.headers["user-agent"] == "UA/1"
    assert first.headers["x-auth-token"] == "s3cret-token"
    ids = [r.headers["x-request-id"] for r in backend.requests]
    assert len(set(ids)) == 2 and all(re.fullmatch("[0-9a-f]{16}", i) for i in ids)
    for i in ids:
        assert f"id={i}" in handle.log
    assert "s3cret-token" not in handle.log


def test_tcp_key_decoding_and_protocol_errors(backend, write_config, handle):
    backend.answers["a b%c\u00e9"] = (200, ["ok"])
    data = (b"get a%20b%25c%C3%a9\n" b"get %zz\n" b"get %00\n" b"put k v\n" b"hello\n" b"get \n"
            b"get a%20b%25c%C3%A9\r\n")
    out = handle(write_config([endpoint(backend, "tcp-lookup")]), "ep", data)
    assert out.split(b"\n") == [
        b"200 ok", b"400 malformed%20request:%20bad%20%25XX%20escape",
        b"400 malformed%20request:%20%2500%20in%20key", b"500 update%20rejected:%20table%20is%20read-only",
        b"400 malformed%20request:%20expected%20get%20SP%20key", b"500 empty%20key", b"200 ok", b""]
    assert [dict((k, v) for k, v in r.query)["key"] for r in backend.requests] == ["a b%c\u00e9"] * 2


def test_tcp_non_utf8_key_is_sent_byte_for_byte(backend, write_config, handle):
    handle(write_config([endpoint(backend, "tcp-lookup")]), "ep", b"get %FF%20x\n")
    assert backend.requests[0].raw_query == "key=%FF%20x"


POLICY_REQUEST = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
                  b"client_address=192.0.2.1\nhelo_name=h\xffelo\nsender=a+b@example.com\n"
                  b"recipient=%s\nrecipient=dup\ninstance=1.2\n\n")
# recipient -> (answer, expected reply regex)
POLICY_ROWS = {
    "reject": ((200, b"REJECT no thanks"), rb"action=REJECT no thanks\n\n"),
    "prefixed": ((200, b"  action=DUNNO\n"), rb"action=DUNNO\n\n"),
    "numeric": ((200, b"550 5.7.1 go away"), rb"action=550 5\.7\.1 go away\n\n"),
    "bare-number": ((200, b"550"), rb"action=DEFER_IF_PERMIT Policy service temporarily unavailable " + SM_REF + rb"\n\n"),
    "empty": ((200, b""), rb"action=DEFER_IF_PERMIT Policy service temporarily unavailable " + SM_REF + rb"\n\n"),
    "twolines": ((200, b"DUNNO\n\nOK"), rb"action=DEFER_IF_PERMIT Policy service temporarily unavailable " + SM_REF + rb"\n\n"),
    "latin1": ((200, b"REJECT \xe9"), rb"action=DEFER_IF_PERMIT Policy service temporarily unavailable " + SM_REF + rb"\n\n"),
    "utf8": ((200, "REJECT \u00e9t\u00e9".encode()), "action=REJECT \u00e9t\u00e9\n\n".encode()),
    "notfound": ((404, b""), rb"action=DEFER_IF_PERMIT Policy service misconfigured " + SM_REF + rb"\n\n"),
    "forbidden": ((401, b""), rb"action=DEFER_IF_PERMIT Policy service misconfigured " + SM_REF + rb"\n\n"),
    "down": ((500, b""), rb"action=DEFER_IF_PERMIT Policy service temporarily unavailable " + SM_REF + rb"\n\n"),
    "slow": (slow(1.0, (200, b"OK")), rb"action=DEFER_IF_PERMIT Policy service temporarily unavailable " + SM_REF + rb"\n\n"),
    "moved": ((301, b""), rb"action=DEFER_IF_PERMIT Policy service temporarily unavailable " + SM_REF + rb"\n\n"),
}


def test_policy_every_row(backend, write_config, handle):
    for rcpt, row in POLICY_ROWS.items():
        backend.answers[rcpt] = row[0]
    data = b"".join(POLICY_REQUEST % r.encode() for r in POLICY_ROWS)
    out = handle(write_config([endpoint(backend, "policy")]), "ep", data)
    replies = [r + b"\n\n" for r in out.split(b"\n\n")[:-1]]
    assert len(replies) == len(POLICY_ROWS), out
    for rcpt, reply in zip(POLICY_ROWS, replies):
        assert re.fullmatch(POLICY_ROWS[rcpt][1], reply), (rcpt, reply)
    request = backend.requests[0]
    assert request.method == "GET"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.body.startswith(b"request=smtpd_access_policy&protocol_state=RCPT&protocol_name=ESMTP&"
                                   b"client_address=192.0.2.1&helo_name=h%FFelo&sender=a%2Bb%40example.com&"
                                   b"recipient=reject&recipient=dup&instance=1.2")
    assert "client_address=192.0.2.1 sender=a+b@example.com recipient=reject" in handle.log


def test_policy_post_and_configured_error_actions(backend, write_config, handle):
    backend.answers["down"] = (503, b"")
    backend.answers["forbidden"] = (403, b"")
    ep = endpoint(backend, "policy", method="post", **{
        "temporary-error-action": "DUNNO", "permanent-error-action": "554 5.3.0 policy misconfigured"})
    out = handle(write_config([ep]), "ep", POLICY_REQUEST % b"down" + POLICY_REQUEST % b"forbidden")
    first, second = out.split(b"\n\n")[:2]
    assert first == b"action=DUNNO"
    assert re.fullmatch(rb"action=554 5\.3\.0 policy misconfigured " + SM_REF, second)
    assert backend.requests[0].method == "POST"


def test_policy_protocol_error_closes_without_reply(backend, write_config, handle):
    backend.answers["x"] = (200, b"OK")
    data = POLICY_REQUEST % b"x" + b"this line has no equals sign\n\n" + POLICY_REQUEST % b"x"
    out = handle(write_config([endpoint(backend, "policy")]), "ep", data)
    assert out == b"action=OK\n\n"
    assert handle.returncode == 0
    assert "protocol error" in handle.log


def test_socketmap_bad_netstring_closes(backend, write_config, handle):
    backend.answers["k"] = (200, ["v"])
    out = handle(write_config([endpoint(backend, "socketmap-lookup")]), "ep",
                 b"5:map k,05:map k,5:map k,")
    assert out == b"4:OK v,"


def test_unknown_endpoint_and_bad_config_exit_nonzero(write_config, handle, tmp_path):
    path = write_config([{"name": "ep", "mode": "tcp-lookup", "target": "http://127.0.0.1:1/"}])
    assert handle(path, "nope", b"get k\n") == b""
    assert handle.returncode != 0
    assert "no endpoint named 'nope'" in handle.log


def test_nothing_but_replies_on_stdout_and_stderr_whatever_breaks(backend, write_config, tmp_path):
    """fd 1 and 2 may be the Postfix socket: a broken config, an unknown endpoint or a log file that
    cannot be opened must not write a byte there, even with a terminal-like stderr."""
    import subprocess
    from conftest import ROOT, pfrest_cmd, pfrest_env
    backend.answers["k"] = (200, ["v"])
    good = write_config([endpoint(backend, "tcp-lookup")])
    broken = tmp_path / "broken.json"
    broken.write_text('{"endpoints": [{"name": "ep", "mode": "tcp-lookup"}]}')
    cases = [(["-c", str(broken), "ep"], b"", 78),
             (["-c", str(tmp_path / "missing.json"), "ep"], b"", 78),
             (["-c", good, "nope"], b"", 78),
             (["-c", good, "--log-file", str(tmp_path / "no" / "such" / "dir.log"), "ep"], b"200 v\n", 0)]
    for args, replies, status in cases:
        proc = subprocess.run(pfrest_cmd("handle", *args), input=b"get k\n", capture_output=True,
                              timeout=30, env=pfrest_env(), cwd=ROOT)
        assert (proc.stdout, proc.stderr, proc.returncode) == (replies, b"", status), args


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_openssl_is_loaded_only_by_a_handle_that_may_need_it(backend, write_config, tmp_path, scheme):
    """A handle of plain http URLs never maps OpenSSL (its private memory, issue 22); one with an https
    target has it: the same config but for the scheme (the https target is refused, a temporary error)."""
    import subprocess
    from conftest import pfrest_cmd, pfrest_env, ROOT
    backend.answers["k"] = (200, ["v"])
    url = backend.url if scheme == "http" else backend.url.replace("http://", "https://")
    path = write_config([endpoint(backend, "tcp-lookup", target=url + "/lookup", **{"request-timeout": 2000})])
    ours, theirs = socket.socketpair()
    with ours:
        proc = subprocess.Popen(pfrest_cmd("handle", "-c", path, "--log-file", str(tmp_path / "log"), "ep"),
                                stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL, env=pfrest_env(), cwd=ROOT)
        theirs.close()
        try:
            ours.settimeout(30)
            ours.sendall(b"get k\n")
            reply = ours.recv(4096)
            maps = open(f"/proc/{proc.pid}/maps").read()
        finally:
            ours.shutdown(socket.SHUT_WR)
            proc.wait(timeout=30)
    mapped = re.search(r"/_ssl\.|/libssl\.", maps) is not None
    assert (reply, mapped) == ((b"200 v\n", False) if scheme == "http" else (reply, True)), (reply, mapped)
    assert scheme == "http" or reply.startswith(b"400 ")
