"""`pfrest check` and dovecot-sasl: the warnings of a login endpoint (a request-timeout smtpd does not
wait for, passwords over plain http beyond loopback) and `check --postfix` with smtpd_sasl_type /
smtpd_sasl_path (main.cf and master.cf -o), read through real postconf from private config directories."""

import pytest

from conftest import need_binary
from pfrest import config
from pfrest.config import checks
from test_check import endpoint, lines, pfrest_config, postfix_config, run
from test_check import shared_dir   # noqa: F401 (a fixture: a directory nobody, spawn's user here, can enter)


def login_warnings(**extra):
    ep = dict({"name": "auth", "mode": "dovecot-sasl", "target": "https://auth.mail.lan/login"}, **extra)
    return [w for w in checks.warnings(config.parse({"endpoints": [ep]})) if w.startswith("endpoints[0] (auth)")]


def test_a_request_timeout_smtpd_does_not_wait_for():
    assert login_warnings(**{"request-timeout": 9999}) == []
    [warning] = login_warnings(**{"request-timeout": 10000})
    assert warning.startswith("endpoints[0] (auth).request-timeout: 10000 ms, but smtpd waits 10000 ms")
    assert "set request-timeout below 10000" in warning
    # a lookup endpoint may take its time: Postfix's own limits there are others
    lookup = {"name": "t", "mode": "tcp-lookup", "target": "http://h/", "request-timeout": 20000}
    assert not [w for w in checks.warnings(config.parse({"endpoints": [lookup]})) if "request-timeout" in w]


@pytest.mark.parametrize("target,warned", [
    ("http://auth.mail.lan/login", True), ("http://192.0.2.7:8080/login", True),
    ("http://[2001:db8::1]/login", True), ("https://auth.mail.lan/login", False),
    ("http://127.0.0.1:8080/login", False), ("http://localhost/login", False), ("http://[::1]/login", False)])
def test_passwords_in_clear_beyond_loopback(target, warned):
    found = login_warnings(target=target)
    assert bool(found) == warned, found
    if warned:
        assert found[0].startswith(f"endpoints[0] (auth).target: {target} is plain http to ")
        assert "in clear; use https" in found[0]


def test_every_target_is_judged():
    [warning] = login_warnings(target=["https://a.mail.lan/", "http://b.mail.lan/"])
    assert "http://b.mail.lan/" in warning


def test_a_login_endpoint_made_in_code_posts_too():
    """parse() forces POST for dovecot-sasl; an Endpoint made in code (the demo's, an embedding's) too."""
    ep = config.Endpoint(name="auth", mode=config.SASL, target="http://127.0.0.1:9/login")
    assert ep.method == "POST"
    assert config.Endpoint(name="p", mode=config.POLICY, target="http://127.0.0.1:9/p").method == "GET"


def test_check_prints_them_and_still_exits_0(write_config):
    path = write_config([{"name": "auth", "mode": "dovecot-sasl", "target": "http://auth.mail.lan/login",
                          "request-timeout": 15000}])
    proc = run("check", "-c", path)
    assert proc.returncode == 0, proc.stderr
    assert "warning: endpoints[0] (auth).request-timeout: 15000 ms" in proc.stderr
    assert "warning: endpoints[0] (auth).target: http://auth.mail.lan/login is plain http" in proc.stderr


# --- check --postfix ---------------------------------------------------------------------------------

def test_a_sasl_path_is_compared_as_the_other_references(shared_dir):
    """smtpd_sasl_path reaches endpoints by inet:, a path relative to the queue directory, unix:PATH, or a
    spawn service running pfrest handle; one of another mode is a mismatch, one elsewhere is not ours."""
    need_binary("postconf")
    spool = shared_dir / "spool"
    path = pfrest_config(shared_dir, [
        endpoint("auth", "dovecot-sasl", **{"bind-address": "127.0.0.1", "bind-port": 9004}),
        endpoint("policy", "policy", **{"bind-path": f"{spool}/private/pfrest-policy"}),
        endpoint("auth2", "dovecot-sasl"),
        endpoint("domains", **{"bind-address": "127.0.0.1", "bind-port": 9001})])
    handle = f"spawn user=nobody argv=/usr/local/bin/pfrest handle -c {path}"
    d = postfix_config(shared_dir, f"""\
        compatibility_level = 3.6
        queue_directory = {spool}
        smtpd_sasl_auth_enable = yes
        smtpd_sasl_type = dovecot
        smtpd_sasl_path = inet:127.0.0.1:9004
        virtual_mailbox_domains = tcp:127.0.0.1:9001
        pfrest-auth2_time_limit = 86400s
        pfrest-lookup_time_limit = 3600s
        """, f"""\
        smtp      inet  n       -       n       -       -       smtpd
        submission inet n       -       n       -       -       smtpd
          -o smtpd_sasl_path=private/pfrest-policy
        smtps     inet  n       -       n       -       -       smtpd
          -o smtpd_sasl_path=private/pfrest-auth2
        465       inet  n       -       n       -       -       smtpd
          -o smtpd_sasl_path=unix:{spool}/private/pfrest-policy -o smtpd_sasl_type=cyrus
        2525      inet  n       -       n       -       -       smtpd
          -o smtpd_sasl_path=private/dovecot-auth
        pfrest-auth2 unix - n n - 0 {handle} auth2
        pfrest-lookup unix - n n - 0 {handle} policy
        2526      inet  n       -       n       -       -       smtpd
          -o smtpd_sasl_path=private/pfrest-lookup
        """)
    proc = run("check", "-c", str(path), "--postfix", str(d))
    assert lines(proc.stderr, "mismatch") == [
        "mismatch: master.cf submission/inet -o smtpd_sasl_path: smtpd_sasl_path = private/pfrest-policy reaches "
        f"endpoint policy at {spool}/private/pfrest-policy, a policy endpoint, not dovecot-sasl",
        "mismatch: master.cf 2526/inet -o smtpd_sasl_path: smtpd_sasl_path = private/pfrest-lookup reaches "
        "endpoint policy through master.cf service pfrest-lookup/unix, a policy endpoint, not dovecot-sasl"], \
        proc.stderr
    # cyrus on 465: not a dovecot path; 2525: Dovecot's own socket, not pfrest's business; auth2: reached
    assert "465/inet" not in proc.stderr and "2525/inet" not in proc.stderr
    assert lines(proc.stderr, "warning") == [], proc.stderr   # every endpoint is used: auth2 by smtps
    assert proc.returncode == 1


def test_noplaintext_with_only_plaintext_mechanisms_is_fatal_for_smtpd(shared_dir):
    need_binary("postconf")
    path = pfrest_config(shared_dir, [
        endpoint("auth", "dovecot-sasl", **{"bind-address": "127.0.0.1", "bind-port": 9004})])
    main = """\
        smtpd_sasl_type = dovecot
        smtpd_sasl_path = inet:127.0.0.1:9004
        smtpd_sasl_security_options = noanonymous, noplaintext
        """
    d = postfix_config(shared_dir, main, """\
        submission inet n       -       n       -       -       smtpd
          -o smtpd_sasl_security_options=noanonymous -o smtpd_sasl_tls_security_options=noanonymous
        """)
    proc = run("check", "-c", str(path), "--postfix", str(d))
    assert proc.returncode == 1
    assert lines(proc.stderr, "mismatch") == [
        "mismatch: main.cf smtpd_sasl_path: smtpd_sasl_path = inet:127.0.0.1:9004 reaches endpoint auth, whose "
        "mechanisms (PLAIN, LOGIN) are all plaintext, and smtpd_sasl_security_options = noanonymous, noplaintext "
        "holds noplaintext: smtpd exits \"fatal: no SASL authentication mechanisms\"; drop noplaintext, and "
        "refuse logins without TLS with smtpd_tls_auth_only = yes"]   # submission's own options are fine


def test_sasl_references_need_the_dovecot_type(shared_dir):
    """smtpd_sasl_type's default is cyrus: its path names a Cyrus application, not a socket."""
    need_binary("postconf")
    path = pfrest_config(shared_dir, [endpoint("domains", **{"bind-address": "127.0.0.1", "bind-port": 9001})])
    d = postfix_config(shared_dir, """\
        smtpd_sasl_path = inet:127.0.0.1:9001
        virtual_mailbox_domains = tcp:127.0.0.1:9001
        """, "")
    proc = run("check", "-c", str(path), "--postfix", str(d))
    assert proc.returncode == 0 and lines(proc.stderr, "mismatch") == [], proc.stderr
