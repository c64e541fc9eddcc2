"""Config loading and validation: the original connector's files load unchanged; errors name the field."""

import json
import os
import subprocess

import pytest

from conftest import ROOT, pfrest_cmd, pfrest_env
from pfrest import config

SEED = {
    "user-agent": "Postfix REST Connector",
    "endpoints": [
        {"name": "domain-lookup", "mode": "tcp-lookup", "target": "https://somehost/tcp-lookup-route",
         "bind-address": "0.0.0.0", "bind-port": 9001, "auth-token": "test123", "request-timeout": 2000},
        {"name": "sm", "mode": "socketmap-lookup", "target": "https://somehost/socketmap-lookup-route",
         "bind-address": "0.0.0.0", "bind-port": 9002, "auth-token": "test123", "request-timeout": 2000},
        {"name": "pol", "mode": "policy", "target": "https://somehost/policy-check-route",
         "bind-address": "0.0.0.0", "bind-port": 9003, "auth-token": "test123", "request-timeout": 2000},
    ],
}


def problems(doc):
    with pytest.raises(config.ConfigError) as err:
        config.parse(doc)
    return err.value.problems


def test_seed_config_loads_unchanged(tmp_path):
    path = tmp_path / "pfrest.json"
    path.write_text(json.dumps(SEED, indent=2))
    cfg = config.load(str(path))
    assert [ep.name for ep in cfg.endpoints] == ["domain-lookup", "sm", "pol"]
    ep = cfg.endpoint("domain-lookup")
    assert (ep.mode, ep.bind_address, ep.bind_port, ep.auth_token, ep.timeout) == \
        ("tcp-lookup", "0.0.0.0", 9001, "test123", 2.0)
    assert "test123" not in repr(ep)


def test_defaults():
    cfg = config.parse({"endpoints": [{"name": "a", "mode": "policy", "target": "http://h/p"}]})
    ep = cfg.endpoints[0]
    assert cfg.user_agent == "Postfix REST Connector"
    assert (ep.request_timeout, ep.bind_address, ep.auth_token, ep.list_separator, ep.method) == \
        (2000, "127.0.0.1", None, ",", "GET")
    assert ep.temporary_error_action.startswith("DEFER_IF_PERMIT ")
    assert ep.permanent_error_action.startswith("DEFER_IF_PERMIT ")
    assert problems({"endpoints": []}) == ["endpoints: must list at least one endpoint"]


def test_toml_config_works_the_same(tmp_path):
    path = tmp_path / "pfrest.toml"
    path.write_text('user-agent = "UA"\n[[endpoints]]\nname = "a"\nmode = "tcp-lookup"\n'
                    'target = "http://127.0.0.1:8080/x"\nbind-port = 9001\nrequest-timeout = 500\n')
    cfg = config.load(str(path))
    assert cfg.user_agent == "UA" and cfg.endpoints[0].request_timeout == 500


@pytest.mark.parametrize("change,message", [
    ({"bind-port": 0}, "endpoints[1] (b).bind-port: must be 1..65535"),
    ({"bind-port": "9000"}, "endpoints[1] (b).bind-port: must be a number, not the string '9000': write 9000 "
                            "without quotes"),
    ({"bind-port": "70000"}, "endpoints[1] (b).bind-port: must be 1..65535"),
    ({"request-timeout": "2000"}, "endpoints[1] (b).request-timeout: must be a number, not the string '2000': "
                                  "write 2000 without quotes"),
    ({"cache-ttl": "1.5"}, "endpoints[1] (b).cache-ttl: must be a number, not the string '1.5': write 1.5 "
                           "without quotes"),
    ({"auth_token": "t"}, "endpoints[1] (b).auth_token: unknown key; did you mean auth-token?"),
    ({"bindport": 9000}, "endpoints[1] (b).bindport: unknown key; did you mean bind-port?"),
    ({"target": "ftp://x/"}, "endpoints[1] (b).target: must be an http or https URL"),
    ({"target": "http:///nohost"}, "endpoints[1] (b).target: must be an http or https URL"),
    ({"request-timeout": 0}, "endpoints[1] (b).request-timeout: must be an integer 1..99000 (milliseconds)"),
    ({"request-timeout": 99001}, "endpoints[1] (b).request-timeout: must be an integer 1..99000 (milliseconds)"),
    ({"request-timeout": True}, "endpoints[1] (b).request-timeout: must be an integer 1..99000 (milliseconds)"),
    ({"mode": "lookup"}, "endpoints[1] (b).mode: must be one of tcp-lookup, socketmap-lookup, policy, dovecot-sasl"),
    ({"auth-token": 5}, "endpoints[1] (b).auth-token: must be a string"),
    ({"colour": "red"}, "endpoints[1] (b).colour: unknown key"),
    ({"name": "a"}, "endpoints[1] (a).name: the name of endpoints[0] too: each endpoint needs a name of its own"),
    ({"method": "POST"}, "endpoints[1] (b).method: not used by mode tcp-lookup"),
    ({"bind-address": "not an address!"}, "endpoints[1] (b).bind-address: must be an IP address or host name"),
    ({"list-separator": "\n"}, "endpoints[1] (b).list-separator: must not contain CR, LF or NUL"),
    # 660 in JSON is not 0o660: only a string says octal unambiguously
    ({"bind-path": "/run/x.sock", "bind-mode": 660},
     "endpoints[1] (b).bind-mode: must be an octal file mode in a string, such as \"0660\""),
    ({"bind-path": "/run/x.sock", "bind-mode": "0999"},
     "endpoints[1] (b).bind-mode: must be an octal file mode in a string, such as \"0660\""),
])
def test_errors_name_the_field(change, message):
    second = {"name": "b", "mode": "tcp-lookup", "target": "http://h/"}
    second.update(change)
    doc = {"endpoints": [{"name": "a", "mode": "tcp-lookup", "target": "http://h/"}, second]}
    assert message in problems(doc)


def test_policy_error_actions_are_checked():
    ep = {"name": "p", "mode": "policy", "target": "http://h/", "temporary-error-action": "550",
          "permanent-error-action": "FOOBAR x"}
    found = problems({"endpoints": [ep]})
    assert any(p.startswith("endpoints[0] (p).temporary-error-action: all-numeric") for p in found)
    assert any(p.startswith("endpoints[0] (p).permanent-error-action: unknown action") for p in found)
    ok = dict(ep, **{"temporary-error-action": "DUNNO", "permanent-error-action": "554 5.3.0 broken"})
    assert config.parse({"endpoints": [ok]}).endpoints[0].permanent_error_action == "554 5.3.0 broken"


def test_all_problems_reported_and_top_level_checked():
    found = problems({"endpoints": [{"mode": "x"}], "user-agent": 3, "extra": 1})
    assert "user-agent: must be a string" in found
    assert "extra: unknown key" in found
    assert "endpoints[0].name: is required" in found
    assert "endpoints[0].target: is required" in found
    assert problems({}) == ["endpoints: is required"]
    assert problems({"endpoints": {}}) == ['endpoints: must be a list of endpoints: "endpoints": [{...}, {...}]']
    assert problems({"endpoints": [], "auth-token": "t", "metrics-adress": "127.0.0.1:9100"}) == [
        "auth-token: unknown key (an endpoint key: it goes inside an endpoint)",
        "metrics-adress: unknown key; did you mean metrics-address?", "endpoints: must list at least one endpoint"]
    assert problems({"endpoints": [{"name": "a", "mode": "policy", "target": "http://h/p"}],
                     "metrics-address": 9100}) == ["metrics-address: must be \"HOST:PORT\", e.g. \"127.0.0.1:9100\""]


ONE_ENDPOINT = [{"name": "a", "mode": "policy", "target": "http://h/p"}]


@pytest.mark.parametrize("agent", ["caf\u00e9 \u2603", "tab\tis fine but not\x01", "a\x7f"])
def test_user_agent_must_be_a_latin1_header_value(agent):
    assert problems({"user-agent": agent, "endpoints": ONE_ENDPOINT}) == [
        "user-agent: must be Latin-1 text without control characters (it is sent as an HTTP header)"]
    assert config.parse({"user-agent": "caf\u00e9/1.0\t(x)", "endpoints": ONE_ENDPOINT}).user_agent == \
        "caf\u00e9/1.0\t(x)"


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"endpoints": [{"name": "a", "mode": "policy", "target": "http://h/p", "bind-port": 1,\n'
                   '  "bind-port": 2}], "user": "x", "user": "y"}')
    with pytest.raises(config.ConfigError) as info:
        config.load(str(bad))
    assert info.value.problems == [
        "user: given more than once (lines 2 and 2); keep one (JSON would silently use the last)",
        "endpoints[0] (a).bind-port: given more than once (lines 1 and 2); keep one (JSON would silently use "
        "the last)"]
    bad.write_text('{"endpoints": [\n {"name": "a", "mode": "policy", "target": "http://h/p"},\n'
                   ' {"name": "b", "mode": "policy",\n  "target": "http://h/\\"q\\"",\n  "mode": "policy",\n'
                   '  "headers": {"mode": "x", "X-A": "1"}, "mode": "policy"}]}')
    with pytest.raises(config.ConfigError) as info:
        config.load(str(bad))
    assert info.value.problems == ["endpoints[1] (b).mode: given more than once (lines 3, 5 and 6); keep one "
                                   "(JSON would silently use the last)"]
    toml = tmp_path / "bad.toml"   # TOML's own parser names the line
    toml.write_text('[[endpoints]]\nname = "a"\nname = "b"\n')
    with pytest.raises(config.ConfigError, match=r"bad.toml: not valid TOML: .*line 3"):
        config.load(str(toml))
    toml.write_text('[endpoints]\nname = "a"\nmode = "policy"\ntarget = "http://h/p"\n')
    with pytest.raises(config.ConfigError) as info:
        config.load(str(toml))
    assert info.value.problems == ["endpoints: must be a list of endpoints: in TOML, write [[endpoints]] (two "
                                   "brackets) before each endpoint, not [endpoints]"]
    bad.write_text("{not json")
    with pytest.raises(config.ConfigError, match="not valid JSON"):
        config.load(str(bad))


def test_warnings(tmp_path):
    path = tmp_path / "pfrest.json"
    path.write_text(json.dumps(SEED))
    os.chmod(path, 0o644)
    found = config.warnings(config.load(str(path)))
    assert any("listens on 0.0.0.0" in w for w in found)
    assert any("readable by every user" in w for w in found)
    os.chmod(path, 0o600)
    loopback = dict(SEED, endpoints=[dict(e, **{"bind-address": "127.0.0.1"}) for e in SEED["endpoints"]])
    path.write_text(json.dumps(loopback))
    assert config.warnings(config.load(str(path))) == []


SHARED = {"name": "s", "mode": "socketmap-lookup", "target": "http://h/", "cache-ttl": 60}


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1", "redis://:pw@cache.example:6380/2", "redis://pfrest:p%40ss@[::1]:6379/0",
    "rediss://cache.example/0?ssl_ca_certs=/etc/ssl/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem",
    "unix:///run/redis/redis.sock", "unix://:pw@/run/redis/redis.sock?db=3",
    "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3/mymaster",
    "redis+sentinel://pfrest:pw@s1.example:26379,[::1]:26380/mymaster/2",
    "rediss+sentinel://:pw@s1.example:26379/cache?ssl_ca_certs=/etc/ssl/ca.pem"])
def test_cache_url_forms_redis_py_reads(url):
    ep = config.parse({"endpoints": [dict(SHARED, **{"cache-url": url})]}).endpoints[0]
    assert ep.cache_url == url and ep.cache_local_ttl == 5.0 and ep.cache_timeout == 5
    assert url not in repr(ep)   # it may hold a password
    # the password is one of the secrets no log line shows, however the URL names its hosts (a list of
    # hosts with [v6]:port is refused by the urlsplit of some Pythons: Debian 12's 3.11.2)
    assert ("pw" in ep.secrets()) == (":pw@" in url)
    from pfrest.cache.redisclient import where   # how messages name the store: never with its password
    assert "pw" not in where(url) and where(url).startswith(url.partition("://")[0] + ":")


@pytest.mark.parametrize("extra,message", [
    ({"cache-url": "http://cache/"}, "cache-url: must be a redis://, rediss://, unix:// or redis+sentinel:// URL"),
    ({"cache-url": "redis://"}, "cache-url: a redis:// URL names a host"),
    ({"cache-url": "redis://h:99999"}, "cache-url: must be a redis://, rediss://, unix:// or redis+sentinel:// URL"),
    ({"cache-url": "redis://h/cache"}, "cache-url: the path of a redis:// URL is the database number"),
    ({"cache-url": "unix://relative.sock"}, "cache-url: a unix:// URL names an absolute socket path"),
    ({"cache-url": "unix:///r.sock?db=x"}, "cache-url: db must be a database number"),
    ({"cache-url": "redis://h/0?ssl_ca_certs=/ca.pem"}, "cache-url: 'ssl_ca_certs' is not a setting"),
    ({"cache-url": "rediss://h/0?ssl_ca_certs=ca.pem"}, "cache-url: ssl_ca_certs must be an absolute path"),
    ({"cache-url": "redis://h/0?socket_timeout=9"}, "cache-url: 'socket_timeout' is not a setting"),
    ({"cache-url": "redis+sentinel://s1:26379"}, "cache-url: the path is the service the sentinels watch"),
    ({"cache-url": "redis+sentinel://s1:26379/m/x"}, "cache-url: the path is the service the sentinels watch"),
    ({"cache-url": "redis+sentinel://s1:26379,/m"}, "cache-url: '' is not a sentinel's HOST:PORT"),
    ({"cache-url": "redis+sentinel://s1:99999/m"}, "cache-url: 's1:99999': the port must be 1..65535"),
    ({"cache-url": "redis+sentinel://s1,s1/m"}, "cache-url: names a sentinel twice"),
    ({"cache-url": "redis+sentinel://s1/m?db=2"}, "cache-url: 'db' is not a setting pfrest takes in a "
                                                 "redis+sentinel:// URL (it takes none; the database is the path's"),
    ({"cache-url": "redis+sentinel://s1/m?ssl_ca_certs=/ca.pem"}, "cache-url: 'ssl_ca_certs' is not a setting"),
    ({"cache-url": "rediss+sentinel://s1/m?ssl_ca_certs=ca.pem"}, "cache-url: ssl_ca_certs must be an absolute"),
    ({"cache-stale-while-revalidate": -1}, "cache-stale-while-revalidate: must be a number of seconds, 0..604800"),
    ({"cache-stale-while-revalidate": "60"}, "cache-stale-while-revalidate: must be a number, not the string '60'"),
    ({"cache-read-url": "redis://127.0.0.1"}, "cache-read-url: needs cache-url"),
    ({"cache-url": "redis://h", "cache-read-url": "http://h/"}, "cache-read-url: must be a redis://"),
    ({"cache-local-ttl": 2}, "cache-local-ttl: needs cache-url"),
    ({"cache-timeout": 5}, "cache-timeout: needs cache-url"),
    ({"cache-url": "redis://h", "cache-timeout": 0}, "cache-timeout: must be an integer 1..10000"),
    ({"cache-url": "redis://h", "cache-timeout": 2.5}, "cache-timeout: must be an integer 1..10000"),
    ({"cache-url": "redis://h", "cache-ttl": 0}, "cache-url: needs cache-ttl or cache-negative-ttl"),
])
def test_cache_url_errors_name_the_field(extra, message):
    found = problems({"endpoints": [dict(SHARED, **extra)]})
    assert any(p.startswith("endpoints[0] (s)." + message) for p in found), found


def test_stale_while_revalidate_is_seconds_for_lookups():
    ep = config.parse({"endpoints": [dict(SHARED, **{"cache-stale-while-revalidate": 30})]}).endpoints[0]
    assert ep.cache_stale_while_revalidate == 30.0 and isinstance(ep.cache_stale_while_revalidate, float)
    pol = {"name": "p", "mode": "policy", "target": "http://h/", "cache-stale-while-revalidate": 30}
    assert problems({"endpoints": [pol]}) == [
        "endpoints[0] (p).cache-stale-while-revalidate: not used by mode policy"]


def test_cache_url_is_for_lookups_and_its_password_is_a_secret():
    pol = {"name": "p", "mode": "policy", "target": "http://h/", "cache-url": "redis://h"}
    assert any(p.startswith("endpoints[0] (p).cache-url:") for p in problems({"endpoints": [pol]}))
    ep = config.parse({"endpoints": [dict(SHARED, **{"cache-url": "redis://u:p%40ss@h/0"})]}).endpoints[0]
    assert {"p%40ss", "p@ss"} <= set(ep.secrets())
    ep = config.parse({"endpoints": [dict(SHARED, **{"cache-url": "redis+sentinel://:s%40c@h:1,h:2/m"})]}).endpoints[0]
    assert {"s%40c", "s@c"} <= set(ep.secrets())
    ep = config.parse({"endpoints": [dict(SHARED, **{"cache-url": "redis://h", "cache-read-url": "redis://:r%40d@l/0"})]
                       }).endpoints[0]
    assert ep.cache_read_url == "redis://:r%40d@l/0" and {"r%40d", "r@d"} <= set(ep.secrets())
    assert "r%40d" not in repr(ep)


def test_control_socket_is_an_absolute_path():
    assert config.parse({"endpoints": ONE_ENDPOINT, "control-socket": "/run/x/c.sock"}).control_socket == \
        "/run/x/c.sock"
    assert any(p.startswith("control-socket:") for p in problems({"endpoints": ONE_ENDPOINT,
                                                                  "control-socket": "c.sock"}))


@pytest.mark.parametrize("mode", ["tcp-lookup", "socketmap-lookup", "policy"])
def test_require_request_id_is_a_boolean_of_every_mode(mode, write_config):
    base = {"name": "r", "mode": mode, "target": "http://h/"}
    assert config.parse({"endpoints": [base]}).endpoints[0].require_request_id is False
    assert config.parse({"endpoints": [dict(base, **{"require-request-id": True})]}).endpoints[0].require_request_id
    for wrong in ("yes", 1, None):
        assert problems({"endpoints": [dict(base, **{"require-request-id": wrong})]}) == [
            "endpoints[0] (r).require-request-id: must be true or false"]
    proc = subprocess.run(pfrest_cmd("check", "-c", write_config([dict(base, **{"require-request-id": "yes"})])),
                          capture_output=True, text=True, timeout=30, env=pfrest_env(), cwd=ROOT)
    assert proc.returncode == 78 and "endpoints[0] (r).require-request-id: must be true or false" in proc.stderr


SASL = {"name": "auth", "mode": "dovecot-sasl", "target": "https://api.example/auth"}


@pytest.mark.parametrize("extra,message", [
    ({"mechanisms": []}, "mechanisms: must be a non-empty list of mechanisms"),
    ({"mechanisms": ["PLAIN", "CRAM-MD5"]}, "mechanisms: 'CRAM-MD5' is not one of PLAIN, LOGIN"),
    ({"mechanisms": ["PLAIN", "plain"]}, "mechanisms: names a mechanism twice"),
    ({"target": "http://api.example/auth", "proxy": "http://proxy.example:3128"},
     "proxy: a dovecot-sasl endpoint sends passwords: through a proxy only to https targets"),
    ({"method": "GET"}, "method: not used by mode dovecot-sasl"),
    ({"cache-ttl": 60}, "cache-ttl: not used by mode dovecot-sasl")])
def test_a_login_endpoint_is_refused_what_would_expose_or_cache_a_password(extra, message):
    assert any(message in p for p in problems({"endpoints": [dict(SASL, **extra)]})), problems(
        {"endpoints": [dict(SASL, **extra)]})


def test_a_login_endpoint_posts_offers_its_mechanisms_and_keeps_idle_connections_a_day():
    ep = config.parse({"endpoints": [dict(SASL, mechanisms=["login"], proxy="http://proxy.example:3128")]}).endpoints[0]
    assert (ep.method, ep.mechanisms, ep.idle_limit, ep.caches) == ("POST", ("LOGIN",), 86400.0, False)
    assert config.parse({"endpoints": [SASL]}).endpoints[0].mechanisms == ("PLAIN", "LOGIN")
