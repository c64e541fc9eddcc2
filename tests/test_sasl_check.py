"""`pfrest check` and dovecot-sasl: the warnings of a login endpoint (a request-timeout smtpd does not
wait for, passwords over plain http beyond loopback) and `check --postfix` with smtpd_sasl_type /
smtpd_sasl_path (main.cf and master.cf -o), read through real postconf from private config directories."""

import pytest

from conftest import ROOT, pfrest_cmd, pfrest_env   # noqa: F401 (pfrest_cmd: the real command below)
from pfrest import config
from pfrest.config import checks
from test_check import run


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


def test_check_prints_them_and_still_exits_0(write_config):
    path = write_config([{"name": "auth", "mode": "dovecot-sasl", "target": "http://auth.mail.lan/login",
                          "request-timeout": 15000}])
    proc = run("check", "-c", path)
    assert proc.returncode == 0, proc.stderr
    assert "warning: endpoints[0] (auth).request-timeout: 15000 ms" in proc.stderr
    assert "warning: endpoints[0] (auth).target: http://auth.mail.lan/login is plain http" in proc.stderr
