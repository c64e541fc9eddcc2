"""oauth2 (issue 24): bearer tokens from the client credentials grant, against a real authorization
server (Authlib's, on Flask: tests/oauth_server.py, a process on loopback) whose backend demands them.

What is proven: the token is fetched once and sent with every request, with either client
authentication method and through OIDC discovery; renewed ahead of its expiry while no lookup waits
for it; a revoked token (401) replaced once, a lookup sent again, a policy request not; a failing token
endpoint gives temporary answers, one log line, none of its body or the secret, and recovers by itself;
endpoints with the same credentials share one token; twenty `handle` processes and `serve --workers 2`
fetch one token between them (the token file); config checks.
"""

import asyncio
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, pfrest_cmd, pfrest_env
from pfrest import config
from pfrest.backend import new_request_id
from pfrest.cache import for_endpoint
from pfrest.config import ConfigError
from pfrest.identity import tokens
from pfrest.protocol.verdict import Failure, HttpResult
from postfix_instance import free_port
from test_serve import connect, served, tcp_get  # noqa: F401 (served is a fixture)

pytest.importorskip("authlib")   # in the test extra: bin/test and .ci/run install it

SERVER = os.path.join(ROOT, "tests", "oauth_server.py")
SECRET = "s3cret-client-value-7f2a"
PROVIDER_BODY = "provider-body-must-never-be-logged"
UA = "pfrest-test"


class AuthServer:
    """tests/oauth_server.py as a process on a free loopback port."""

    def __init__(self, lifetime=3600, port=0):
        self.proc = subprocess.Popen([sys.executable, SERVER, "--lifetime", str(lifetime), "--port", str(port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), f"oauth_server did not start: {line!r}"
        self.url = line.split()[-1]

    def stats(self):
        with urllib.request.urlopen(self.url + "/admin/stats", timeout=10) as answer:
            return json.load(answer)

    def admin(self, what, **query):
        args = "&".join(f"{k}={v}" for k, v in query.items())
        request = urllib.request.Request(f"{self.url}/admin/{what}?{args}", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def idp():
    server = AuthServer()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def private_runtime(tmp_path, monkeypatch):
    """Each test's token file in a directory of its own (pytest makes it 0700)."""
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(folder))
    return folder


def oauth(idp, client="pfrest-basic", **more):
    doc = {"token-url": idp.url + "/token", "client-id": client, "client-secret": SECRET}
    if client == "pfrest-post":
        doc["auth-method"] = "client_secret_post"
    doc.update(more)
    return doc


def endpoint_doc(idp, mode="tcp-lookup", path="/lookup", **oauth_doc):
    doc = {"name": "ep", "mode": mode, "target": idp.url + path, "oauth2": oauth(idp, **oauth_doc)}
    if mode == "policy":
        doc["method"] = "POST"
    return doc


def endpoint(idp, **kw):
    return config.parse({"endpoints": [endpoint_doc(idp, **kw)]}).endpoints[0]


def lookups(client, keys):
    """The results of lookups of ``keys``, one after the other, on one new event loop."""
    async def go():
        return [await client.lookup((("key", key.encode()),), new_request_id()) for key in keys]
    return asyncio.run(go())


def test_a_token_is_fetched_once_and_sent_with_every_request(idp):
    client = for_endpoint(endpoint(idp), UA)
    results = lookups(client, ["a", "b", "c"])
    assert [(r.status, json.loads(r.body)) for r in results] == [(200, [f"value-of-{k}"]) for k in "abc"]
    assert idp.stats()["issued"] == {"pfrest-basic": 1}
    assert client.bearer.origin == f"fetched from {idp.url}/token"
    assert 3500 < client.bearer.expires_in() <= 3600


@pytest.mark.parametrize("how", ["post", "issuer", "scope"])
def test_client_secret_post_discovery_and_scope(idp, how):
    if how == "post":
        ep = endpoint(idp, client="pfrest-post")
    elif how == "issuer":
        ep = config.parse({"endpoints": [{"name": "ep", "mode": "tcp-lookup", "target": idp.url + "/lookup",
                                          "oauth2": {"issuer": idp.url, "client-id": "pfrest-basic",
                                                     "client-secret": SECRET}}]}).endpoints[0]
    else:
        ep = endpoint(idp, scope="mail.read")
    [result] = lookups(for_endpoint(ep, UA), ["k"])
    assert (result.status, json.loads(result.body)) == (200, ["value-of-k"])
    stats = idp.stats()
    assert stats["total"] == 1 and stats["scopes"] == (["mail.read"] if how == "scope" else [""])


def test_a_failing_token_endpoint_gives_temporary_answers_and_recovers_by_itself(idp, caplog):
    """A client the provider refuses (wrong auth method), then a provider that fails (503 with a body):
    a Failure of kind token, with the status and the RFC 6749 error code only; one log line per change;
    recovery by itself once the provider answers again."""
    wrong = for_endpoint(endpoint(idp, client="pfrest-post", **{"auth-method": "client_secret_basic"}), UA)
    [result] = lookups(wrong, ["k"])
    assert result.__class__ is Failure and result.kind == "token"
    assert "HTTP 401 (invalid_client)" in result.detail or "HTTP 400 (invalid_client)" in result.detail

    idp.admin("fail", status=503)
    client = for_endpoint(endpoint(idp), UA)
    caplog.set_level(logging.INFO, logger="pfrest")

    async def go():
        first = [await client.lookup((("key", b"k"),), new_request_id()) for _ in range(5)]
        idp.admin("fail", status=0)
        deadline = time.monotonic() + 10
        while True:   # the failure's hold (1 s) passes, and the next lookup fetches again
            result = await client.lookup((("key", b"k"),), new_request_id())
            if result.__class__ is HttpResult or time.monotonic() > deadline:
                return first, result
            await asyncio.sleep(0.1)
    first, last = asyncio.run(go())
    assert all(r.__class__ is Failure and r.kind == "token" and "HTTP 503" in r.detail for r in first)
    assert (last.status, json.loads(last.body)) == (200, ["value-of-k"])
    lines = [r.getMessage() for r in caplog.records if "oauth2" in r.getMessage()]
    assert len([line for line in lines if "HTTP 503" in line]) == 1, lines   # once, not per request
    assert any("again" in line for line in lines), lines
    text = caplog.text + repr(first)
    assert PROVIDER_BODY not in text and SECRET not in text


def test_a_provider_that_is_down_gives_temporary_answers_and_one_back_is_used_again(idp, caplog):
    """The provider's process ends (connection refused), the backend refuses the token it had issued
    (it is a new process: a revocation); a new provider on the same port: the lookups recover alone."""
    client = for_endpoint(endpoint(idp), UA)
    port = int(idp.url.rsplit(":", 1)[1])

    async def go():
        first = await client.lookup((("key", b"k"),), new_request_id())
        idp.stop()
        client.bearer.refused(client.bearer.line(asyncio.get_running_loop()))   # as a 401 would
        down = [await client.lookup((("key", b"k"),), new_request_id()) for _ in range(3)]
        back = await asyncio.get_running_loop().run_in_executor(None, lambda: AuthServer(port=port))
        try:
            deadline = time.monotonic() + 15
            while True:
                result = await client.lookup((("key", b"k"),), new_request_id())
                if result.__class__ is HttpResult or time.monotonic() > deadline:
                    return first, down, result
                await asyncio.sleep(0.1)
        finally:
            back.stop()
    first, down, last = asyncio.run(go())
    assert first.status == 200
    assert all(r.__class__ is Failure and r.kind == "token" and "refused" in r.detail for r in down), down
    assert (last.status, json.loads(last.body)) == (200, ["value-of-k"])
    assert len([r for r in caplog.records if "cannot be had" in r.getMessage()]) == 1


def test_a_revoked_token_is_replaced_once_a_lookup_is_sent_again_a_policy_request_not(idp):
    """Revoked: a lookup gets its answer with a new token; a policy request gets a temporary failure and
    is not sent twice, the next one goes with the new token.  A token refused within REFUSE_HOLD of the
    last replacement stays (a backend refusing every token must not cost a token request per lookup)."""
    lookup_client = for_endpoint(endpoint(idp), UA)
    policy_client = for_endpoint(endpoint(idp, mode="policy", path="/policy"), UA)
    assert lookup_client.bearer is policy_client.bearer   # the same credentials: one token

    async def go():
        before = await lookup_client.lookup((("key", b"k"),), new_request_id())
        idp.admin("revoke")
        after = await lookup_client.lookup((("key", b"k"),), new_request_id())
        idp.admin("revoke")
        held = await policy_client.policy([(b"recipient", b"r@x")], new_request_id())
        await asyncio.sleep(tokens.REFUSE_HOLD)
        policy = await policy_client.policy([(b"recipient", b"r@x")], new_request_id())
        again = await policy_client.policy([(b"recipient", b"r@x")], new_request_id())
        return before, after, held, policy, again
    before, after, held, policy, again = asyncio.run(go())
    assert before.status == after.status == 200 and json.loads(after.body) == ["value-of-k"]
    assert held.__class__ is Failure and held.kind == "token" and "just fetched" in held.detail
    assert policy.__class__ is Failure and policy.kind == "token" and "not sent twice" in policy.detail
    assert (again.status, again.body) == (200, b"DUNNO")   # with the new token, Postfix's next try
    stats = idp.stats()
    assert stats["total"] == 3      # the first, one per revocation replaced
    assert stats["refused"] == 3    # the lookup's first try, the held one, and the policy request, sent once
    assert stats["lookups"] == 3    # before, after (again), and the policy request's next try


def test_dovecot_sasl_a_wrong_password_is_no_refused_token_a_revoked_token_no_second_login(idp):
    """In dovecot-sasl a 401 is a wrong password: only one with a Bearer challenge (the resource
    server's, RFC 6750) is a refused token, and the login is not sent again."""
    client = for_endpoint(endpoint(idp, mode="dovecot-sasl", path="/login"), UA)

    def login(password):
        return [(b"mechanism", b"PLAIN"), (b"username", b"alice"), (b"password", password)]

    async def go():
        good = await client.policy(login(b"good"), new_request_id())
        wrong = await client.policy(login(b"wrong"), new_request_id())
        idp.admin("revoke")
        revoked = await client.policy(login(b"good"), new_request_id())
        again = await client.policy(login(b"good"), new_request_id())
        return good, wrong, revoked, again
    good, wrong, revoked, again = asyncio.run(go())
    assert good.status == 200 and wrong.status == 401 and not wrong.bearer_challenge   # FAIL, as before
    assert revoked.__class__ is Failure and revoked.kind == "token" and "not sent twice" in revoked.detail
    assert again.status == 200
    stats = idp.stats()
    assert stats["total"] == 2 and stats["lookups"] == 3   # the wrong password kept the token; sent once


def test_renewal_happens_ahead_of_expiry_and_no_lookup_waits_for_it():
    """A 10 s token, renewed from 7.5 s on by a token endpoint that takes a second to answer: the
    lookups meanwhile go on with the current token (none takes that second), and the new token comes
    before the old one is no longer used (9 s)."""
    idp = AuthServer(lifetime=10)
    try:
        client = for_endpoint(endpoint(idp), UA)

        async def go():
            await client.lookup((("key", b"k"),), new_request_id())   # the first token, waited for
            idp.admin("delay", seconds=1)
            slowest, results, end = 0.0, [], time.monotonic() + 10
            while time.monotonic() < end:
                started = time.monotonic()
                results.append(await client.lookup((("key", b"k"),), new_request_id()))
                slowest = max(slowest, time.monotonic() - started)
                await asyncio.sleep(0.02)
            return slowest, results
        slowest, results = asyncio.run(go())
        assert all(r.__class__ is HttpResult and r.status == 200 for r in results)
        assert slowest < 1.0, slowest   # no lookup waited for the renewal's answer
        assert idp.stats()["total"] == 2
    finally:
        idp.stop()


def test_twenty_handle_processes_fetch_one_token(idp, write_config, private_runtime, tmp_path):
    path = write_config([endpoint_doc(idp)])
    env = dict(pfrest_env(), RUNTIME_DIRECTORY=str(private_runtime))

    def one(i):
        log = tmp_path / f"handle{i}.log"
        proc = subprocess.run(pfrest_cmd("handle", "-c", path, "--log-file", str(log), "ep"),
                              input=b"get k%d\n" % i, capture_output=True, timeout=60, env=env, cwd=ROOT)
        return proc.stdout, log.read_text() if log.exists() else ""
    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(one, range(20)))
    assert [out for out, _ in outcomes] == [b"200 value-of-k%d\n" % i for i in range(20)]
    assert idp.stats()["total"] == 1
    [token_file] = [p for p in private_runtime.iterdir() if p.suffix == ".json"]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = json.loads(token_file.read_text())["token"]
    logs = "".join(text for _, text in outcomes)
    assert token not in logs and SECRET not in logs


def test_serve_with_two_workers_fetches_one_token(idp, write_config, served, private_runtime):
    port = free_port()
    doc = dict(endpoint_doc(idp), **{"bind-port": port})
    proc = served("-c", write_config([doc]), "--workers", "2",
                  env=dict(pfrest_env(), RUNTIME_DIRECTORY=str(private_runtime)))
    proc.wait_for(r"2 workers")
    socks = [connect(("127.0.0.1", port)) for _ in range(8)]   # spread over both workers
    try:
        assert [tcp_get(sock, b"k") for sock in socks] == [b"200 value-of-k\n"] * 8
    finally:
        for sock in socks:
            sock.close()
    assert idp.stats()["total"] == 1
    assert SECRET not in proc.log


def test_a_token_file_that_is_a_link_or_not_private_is_never_used(idp, private_runtime, tmp_path):
    """A link planted where the token file goes is replaced, not written through; a file readable by
    others is not read."""
    client = for_endpoint(endpoint(idp), UA)
    lookups(client, ["k"])
    [token_file] = [p for p in private_runtime.iterdir() if p.suffix == ".json"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(token_file.read_text())
    elsewhere.chmod(0o600)   # private as a token file is: only the link can keep it unread
    token_file.unlink()
    token_file.symlink_to(elsewhere)
    store = client.bearer._store
    assert store.read() is None    # O_NOFOLLOW
    assert store.write("new-token", 60)
    assert not token_file.is_symlink() and json.loads(token_file.read_text())["token"] == "new-token"
    assert "new-token" not in elsewhere.read_text()
    token_file.chmod(0o644)
    assert store.read() is None


# --- config ---------------------------------------------------------------------------------------

def _problems(oauth_doc, **more):
    doc = {"endpoints": [dict({"name": "ep", "mode": "tcp-lookup", "target": "https://b/x", "oauth2": oauth_doc},
                              **more)]}
    with pytest.raises(ConfigError) as err:
        config.parse(doc)
    return "\n".join(err.value.problems)


def test_config_refuses_what_cannot_work_and_never_shows_the_secret():
    good = {"token-url": "https://idp/token", "client-id": "c", "client-secret": "x" * 12}
    ep = config.parse({"endpoints": [{"name": "ep", "mode": "tcp-lookup", "target": "https://b/x",
                                      "oauth2": good}]}).endpoints[0]
    assert ep.oauth2.client_secret == "x" * 12 and "x" * 12 in ep.secrets() and "x" * 12 not in repr(ep.oauth2)
    assert "needs token-url or issuer" in _problems({"client-id": "c", "client-secret": "s"})
    assert "needs token-url or issuer" in _problems(dict(good, issuer="https://idp"))
    assert "needs client-id" in _problems({"token-url": "https://idp/t", "client-secret": "s"})
    assert "needs client-secret or client-secret-file" in _problems(dict(good, **{"client-secret-file": "/s"}))
    assert "'secret' is not one of its keys" in _problems(dict(good, secret="s"))
    assert "auth-method must be one of" in _problems(dict(good, **{"auth-method": "private_key_jwt"}))
    assert "client-secret must be printable ASCII" in _problems(dict(good, **{"client-secret": "bad\tsecret-1"}))
    assert "bad\tsecret-1" not in _problems(dict(good, **{"client-secret": "bad\tsecret-1"}))
    assert "basic-auth and headers' Authorization" in _problems(good, **{"basic-auth": "u:p"})


def test_check_warns_of_a_token_url_that_is_not_https():
    cfg = config.parse({"endpoints": [{"name": "ep", "mode": "tcp-lookup", "target": "https://b/x", "oauth2": {
        "token-url": "http://idp/token", "client-id": "c", "client-secret-file": "/etc/pfrest/secret"}}]})
    assert any("oauth2: http://idp/token is not https" in w for w in config.warnings(cfg))


def test_query_shows_the_token_step(idp, write_config, private_runtime):
    path = write_config([endpoint_doc(idp)])
    env = dict(pfrest_env(), RUNTIME_DIRECTORY=str(private_runtime))
    proc = subprocess.run(pfrest_cmd("query", "-c", path, "ep", "k"), capture_output=True, text=True, timeout=60,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"^token: fetched from {re.escape(idp.url)}/token, expires in 3(599|600) s$", proc.stdout,
                     re.M), proc.stdout
    assert "value: value-of-k" in proc.stdout
    idp.admin("fail", status=503)
    for token_file in private_runtime.iterdir():
        token_file.unlink()
    proc = subprocess.run(pfrest_cmd("query", "-c", path, "ep", "k"), capture_output=True, text=True, timeout=60,
                          env=env, cwd=ROOT)
    assert proc.returncode == os.EX_TEMPFAIL, proc.stdout + proc.stderr
    assert f"token: none could be had: {idp.url}/token answered HTTP 503" in proc.stdout, proc.stdout
    assert PROVIDER_BODY not in proc.stdout + proc.stderr and SECRET not in proc.stdout + proc.stderr


def test_serve_with_two_workers_renews_once_for_both(write_config, served, private_runtime):
    """A 6 s token, renewed from 4.5 s on: both workers' timers come due together; one renews, the
    other takes the file's token.  Lookups on both workers for 7 s: two tokens in all."""
    idp = AuthServer(lifetime=6)
    try:
        port = free_port()
        proc = served("-c", write_config([dict(endpoint_doc(idp), **{"bind-port": port})]), "--workers", "2",
                      env=dict(pfrest_env(), RUNTIME_DIRECTORY=str(private_runtime)))
        proc.wait_for(r"2 workers")
        socks = [connect(("127.0.0.1", port)) for _ in range(4)]   # both workers get some
        try:
            end, replies = time.monotonic() + 7, set()
            while time.monotonic() < end:
                replies.update(tcp_get(sock, b"k") for sock in socks)
                time.sleep(0.1)
        finally:
            for sock in socks:
                sock.close()
        assert replies == {b"200 value-of-k\n"}
        assert idp.stats()["total"] == 2
    finally:
        idp.stop()


def test_check_warns_of_a_client_secret_file_it_cannot_read(write_config, tmp_path):
    path = write_config([{"name": "ep", "mode": "tcp-lookup", "target": "https://b.test/x", "oauth2": {
        "token-url": "https://idp.test/token", "client-id": "c", "client-secret-file": str(tmp_path / "none")}}])
    proc = subprocess.run(pfrest_cmd("check", "-c", path), capture_output=True, text=True, timeout=60,
                          env=pfrest_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "oauth2.client-secret-file:" in proc.stderr and "no token can be fetched" in proc.stderr, proc.stderr


@pytest.mark.parametrize("document", [
    {"access_token": "abc\n"},                      # a line end would end the Authorization header early
    {"access_token": "abc\r\nX-Evil: 1"}, {"access_token": "a b"}, {"access_token": ""},
    {"access_token": 7}, {"access_token": "x" * 100000},
    {"access_token": "abc", "token_type": "mac"},
    {"access_token": "abc", "expires_in": "soon"}, {"access_token": "abc", "expires_in": True},
    {"access_token": "abc", "expires_in": 0}])
def test_a_token_answer_that_cannot_be_sent_as_it_is_is_refused(document):
    from pfrest.identity import grant
    got = grant.token(HttpResult(200, json.dumps(document).encode()), "idp")
    assert got.__class__ is Failure and got.kind == "token", got
    assert grant.token(HttpResult(200, b'{"access_token": "abc", "expires_in": "60"}'), "idp").value == "abc"


def test_another_scope_or_audience_is_another_token_file(private_runtime):
    """OAuth2's repr names only the URL and the client: the file's name must come from every field that
    makes another token, or two scopes would take each other's tokens from one file."""
    from pfrest.identity import bearer_for
    doc = {"token-url": "https://idp.example/token", "client-id": "c", "client-secret": SECRET}
    paths = set()
    for extra in ({}, {"scope": "a"}, {"scope": "b"}, {"audience": "x"}, {"auth-method": "client_secret_post"}):
        ep = config.parse({"endpoints": [{"name": "ep", "mode": "tcp-lookup", "target": "https://api.example/l",
                                          "oauth2": dict(doc, **extra)}]}).endpoints[0]
        paths.add(bearer_for(ep, UA)._store.path)
    assert len(paths) == 5


def test_query_of_a_login_endpoint_sends_the_token_as_serve_does(idp, write_config, private_runtime):
    """`pfrest query` of a dovecot-sasl endpoint behind the provider: the login goes with the bearer token
    (without it the resource server's 401 would read as a wrong password), and the token step is shown."""
    path = write_config([endpoint_doc(idp, mode="dovecot-sasl", path="/login")])
    env = dict(pfrest_env(), RUNTIME_DIRECTORY=str(private_runtime))
    proc = subprocess.run(pfrest_cmd("query", "-c", path, "ep", "alice"), input="good\n", capture_output=True,
                          text=True, timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"^token: fetched from {re.escape(idp.url)}/token", proc.stdout, re.M), proc.stdout
    assert "good" not in proc.stdout.replace("password=(not shown)", "")
