"""Secrets and trust: the auth token never shows (logs, replies, tracebacks, `query`, config errors), and
nothing a backend answers can add lines to the Postfix protocol (response splitting), over `pfrest handle`
and `pfrest serve` alike."""

import pytest

from pfrest import config

TOKEN = "s3cr3t-T0KEN-value"


def problems(raw_endpoint):
    with pytest.raises(config.ConfigError) as info:
        config.parse({"endpoints": [dict({"name": "a", "mode": "tcp-lookup", "target": "http://h/"},
                                         **raw_endpoint)]})
    return info.value.problems


@pytest.mark.parametrize("token", [" " + TOKEN, TOKEN + " ", TOKEN + "\t", "caf\u00e9-" + TOKEN, "", "\x7f" + TOKEN])
def test_a_token_no_http_library_would_send_is_refused_without_showing_it(token):
    """requests quotes a header value it refuses in its exception text, which would reach the log."""
    found = problems({"auth-token": token})
    assert found == ["endpoints[0].auth-token: must be printable ASCII without leading or trailing white space"]


def test_credentials_in_the_target_are_refused_without_showing_them():
    found = problems({"target": f"http://user:{TOKEN}@127.0.0.1:8080/lookup"})
    assert len(found) == 1 and found[0].startswith("endpoints[0].target: must not hold user:password@")
    assert TOKEN not in found[0]
    ok = config.parse({"endpoints": [{"name": "a", "mode": "tcp-lookup", "target": "http://h/x?a=b@c",
                                      "auth-token": "a b~c", "partial-request-timeout": 1.5}]})
    assert ok.endpoints[0].partial_limit == 1.5 and ok.endpoints[0].auth_token == "a b~c"
