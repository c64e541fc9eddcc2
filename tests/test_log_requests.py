"""`log-requests` (all, problems, none) and the summary line `pfrest handle` logs at exit, through real
`pfrest handle` processes and a real HTTP backend; and `handle` never loading prometheus-client."""

import re
import subprocess
import sys

from conftest import ROOT, pfrest_env
from pfrest import config
from pfrest.conversation.services import Service
from pfrest.ops.counters import reply_class
from pfrest.protocol.verdict import Failure, HttpResult

POLICY = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\n"
          b"sender=a@example.com\nrecipient=%s\n\n")
REQUEST_LINE = re.compile(r"^.* (?:INFO|WARNING): endpoint=ep id=[0-9a-f]{16} .*$", re.M)
SUMMARY = re.compile(r"INFO: endpoint=ep peer=stdin connection ended: (.*) connected=\d+\.\ds$", re.M)


def lookup(backend, **extra):
    return {"name": "ep", "mode": "tcp-lookup", "target": backend.url + "/t", **extra}


def policy(backend, **extra):
    return {"name": "ep", "mode": "policy", "target": backend.url + "/p", **extra}


def request_lines(log):
    return [line for line in REQUEST_LINE.findall(log) if "connection ended" not in line]


def test_handle_logs_one_summary_line_at_the_end(backend, write_config, handle):
    backend.answers.update({"k": (200, ["v"]), "gone": (404, b""), "down": (503, b"")})
    out = handle(write_config([lookup(backend)]), "ep", b"get k\nget gone\nget down\nget k\n")
    assert out.startswith(b"200 v\n500 not%20found\n400 backend%20error")
    summaries = SUMMARY.findall(handle.log)
    assert summaries == ["requests=4 replies=FOUND:2,NOTFOUND:1,TEMP:1 backend-errors=1 (http-503:1)"], handle.log


def test_log_requests_all_problems_none(backend, write_config, handle):
    backend.answers.update({"k": (200, ["v"]), "gone": (404, b""), "down": (503, b"")})
    tcp_input = b"get k\nget gone\nget down\nget %zz\n"   # the last: a protocol error (bad request)
    expected, seen = {"all": 3, "problems": 1, "none": 0}, 0
    for level, count in expected.items():
        handle(write_config([lookup(backend)], **{"log-requests": level}), "ep", tcp_input)
        log, seen = handle.log[seen:], len(handle.log)   # the log file is the same for every run
        lines = request_lines(log)
        assert len(lines) == count, (level, log)
        if level == "problems":
            assert " WARNING: endpoint=ep " in lines[0] and "key=down status=503 reply=TEMP" in lines[0]
        if level == "all":   # a failed request warns (journalctl -p warning), the others are INFO
            assert [" WARNING: " in line for line in lines] == [False, False, True], lines
        assert "bad request:" in log   # protocol errors: whatever the setting
        # the counters stay complete (the bad request never reaches the backend nor the counters)
        assert SUMMARY.findall(log) == ["requests=3 replies=FOUND:1,NOTFOUND:1,TEMP:1 backend-errors=1 "
                                        "(http-503:1)"], (level, log)


def test_log_requests_problems_keeps_policy_refusals_and_the_endpoint_setting_wins(backend, write_config, handle):
    backend.answers.update({"ok@x": (200, b"DUNNO"), "no@x": (200, b"REJECT go away"),
                            "later@x": (200, b"DEFER_IF_PERMIT busy"), "num@x": (200, b"550 5.7.1 no"),
                            "down@x": (503, b"")})
    path = write_config([policy(backend, **{"log-requests": "problems"})], **{"log-requests": "none"})
    data = b"".join(POLICY % r for r in (b"ok@x", b"no@x", b"later@x", b"num@x", b"down@x", b"ok@x"))
    out = handle(path, "ep", data)
    assert out.count(b"action=") == 6
    lines = request_lines(handle.log)
    assert [re.search(r"recipient=(\S+)", line).group(1) for line in lines] == \
        ["no@x", "later@x", "num@x", "down@x"], handle.log
    # a refusal is the backend's answer (INFO); the backend's failure is a WARNING
    assert [" WARNING: " in line for line in lines] == [False, False, False, True], lines
    assert SUMMARY.findall(handle.log) == ["requests=6 replies=5XX:1,DEFER_IF_PERMIT:1,DUNNO:2,REJECT:1,TEMP:1 "
                                           "backend-errors=1 (http-503:1)"], handle.log


def test_what_problems_means():
    assert [reply_class("ACTION", a) for a in ("DUNNO", "reject x", "defer_if_permit x", "450 4.7.1 later",
                                               "554 5.7.1 no", "200 ok", "PREPEND X-A: b", "weird")] == \
        ["DUNNO", "REJECT", "DEFER_IF_PERMIT", "4XX", "5XX", "OTHER", "PREPEND", "OTHER"]
    endpoint = config.parse({"endpoints": [{"name": "ep", "mode": "tcp-lookup", "target": "http://h/",
                                            "log-requests": "problems"}]}).endpoints[0]
    service = Service(endpoint, "ua", backend=object())
    fresh, stale = HttpResult(200, b'["v"]', cached=True), HttpResult(200, b'["v"]', cached=True, stale=True)
    assert not service.log_all
    assert service.worth_logging("TEMP", Failure("timeout")) and service.worth_logging("FOUND", stale)
    assert not service.worth_logging("FOUND", fresh) and not service.worth_logging("NOTFOUND", None)


def test_handle_does_not_load_prometheus_client(backend, write_config, tmp_path):
    backend.answers["k"] = (200, ["v"])
    path, report = write_config([lookup(backend)]), tmp_path / "modules"
    code = ("import sys, atexit\n"
            f"atexit.register(lambda: open({str(report)!r}, 'w').write(' '.join(sorted(sys.modules))))\n"
            "from pfrest.cli import main\n"
            f"sys.exit(main(['handle', '-c', {path!r}, '--log-file', {str(tmp_path / 'log')!r}, 'ep']))\n")
    proc = subprocess.run([sys.executable, "-c", code], input=b"get k\n", capture_output=True, env=pfrest_env(),
                          cwd=ROOT, timeout=30)
    assert proc.returncode == 0 and proc.stdout == b"200 v\n", proc
    modules = report.read_text().split()
    assert "pfrest.ops.counters" in modules and not [m for m in modules if m.startswith("prometheus_client")]
    assert "difflib" not in modules   # only a config with a typo needs "did you mean"
