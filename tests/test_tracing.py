"""tracing (issue 24): spans over OTLP/HTTP to a receiver on loopback (a small HTTP server decoding the
protobuf with opentelemetry-proto), W3C traceparent to the backend, sampling; without tracing nothing
of OpenTelemetry is imported."""

import gzip
import json
import signal
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, pfrest_cmd, pfrest_env
from test_serve import served  # noqa: F401 (a fixture)
from pfrest import config
from pfrest.config import ConfigError

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

KEY = "secret-key-4711"   # a lookup key: never in a span


class Receiver:
    """An OTLP/HTTP traces endpoint: every span it is sent, decoded."""

    def __init__(self):
        self.spans, self.lock = [], threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                elif self.headers.get("Content-Encoding") == "deflate":
                    body = zlib.decompress(body)
                receiver.add(trace_service.ExportTraceServiceRequest.FromString(body))
                answer = trace_service.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, request):
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append({
                            "name": span.name, "trace": span.trace_id.hex(), "id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(), "kind": span.kind,
                            "service": resource.get("service.name"),
                            "attributes": {a.key: _value(a.value) for a in span.attributes}})

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def handle_run(path, data, tmp_path):
    log = tmp_path / "handle.log"
    proc = subprocess.run(pfrest_cmd("handle", "-c", path, "--log-file", str(log), "ep"), input=data,
                          capture_output=True, timeout=60, env=pfrest_env(), cwd=ROOT)
    assert proc.stderr == b""
    return proc.stdout, log.read_text() if log.exists() else ""


def test_spans_arrive_with_their_attributes_and_links_and_the_backend_gets_the_trace(backend, receiver,
                                                                                      write_config, tmp_path):
    backend.answers[KEY] = (200, ["v"])
    path = write_config([{"name": "ep", "mode": "tcp-lookup", "target": backend.url + "/lookup"}],
                        tracing={"otlp-endpoint": receiver.url, "service-name": "pfrest-test"})
    out, log = handle_run(path, f"get {KEY}\nget other\n".encode(), tmp_path)
    assert out == b"200 v\n500 not%20found\n", (out, log)
    requests = [s for s in receiver.spans if s["name"] == "pfrest tcp-lookup"]
    exchanges = [s for s in receiver.spans if s["name"] != "pfrest tcp-lookup"]
    assert len(requests) == 2 and len(exchanges) == 2, receiver.spans
    for request, exchange, sent in zip(requests, sorted(exchanges, key=lambda s: [r["id"] for r in requests]
                                                        .index(s["parent"])), backend.requests):
        assert request["service"] == "pfrest-test" and request["parent"] == ""
        assert exchange["parent"] == request["id"] and exchange["trace"] == request["trace"]
        # the backend's traceparent: this trace, the exchange span as parent, sampled
        version, trace, parent, flags = sent.headers["traceparent"].split("-")
        assert (version, trace, parent) == ("00", request["trace"], exchange["id"]) and int(flags, 16) & 1
        attrs = request["attributes"]
        assert attrs["pfrest.endpoint"] == "ep" and attrs["pfrest.mode"] == "tcp-lookup"
        assert attrs["pfrest.cache"] == "none" and len(attrs["pfrest.request_id"]) == 16
        assert exchange["attributes"]["server.address"] == backend.url.split("//")[1]
        assert exchange["attributes"]["pfrest.attempt"] == 1 and exchange["attributes"]["pfrest.failover"] is False
    replies = sorted((r["attributes"]["pfrest.reply"] for r in requests))
    assert replies == ["FOUND", "NOTFOUND"], replies
    statuses = sorted(e["attributes"]["http.response.status_code"] for e in exchanges)
    assert statuses == [200, 404]
    assert KEY not in json.dumps(receiver.spans) and KEY in log   # the key: in the log line, in no span


def test_sampling_zero_sends_no_spans_but_the_context_still_goes_to_the_backend(backend, receiver, write_config,
                                                                                   tmp_path):
    backend.answers["k"] = (200, ["v"])
    path = write_config([{"name": "ep", "mode": "tcp-lookup", "target": backend.url + "/lookup"}],
                        tracing={"otlp-endpoint": receiver.url, "sample-ratio": 0})
    out, _ = handle_run(path, b"get k\n", tmp_path)
    assert out == b"200 v\n"
    assert receiver.spans == []
    assert not int(backend.requests[0].headers["traceparent"].split("-")[3], 16) & 1   # not sampled (W3C)


def test_without_tracing_nothing_of_opentelemetry_is_loaded(backend, write_config, tmp_path):
    """handle stays light: the SDK is imported only when tracing is configured."""
    backend.answers["k"] = (200, ["v"])
    path = write_config([{"name": "ep", "mode": "tcp-lookup", "target": backend.url + "/lookup"}])
    code = ("import sys, pfrest.commands.handle as h, pfrest.system.eventloop as e, pfrest.config as c\n"
            "cfg = c.load(sys.argv[1])\n"
            "e.run(h.converse(cfg.endpoint('ep'), cfg.user_agent), fast=False)\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'pfrest.identity')))\n"
            "open(sys.argv[2], 'w').write(repr(loaded))")
    found = tmp_path / "modules"
    proc = subprocess.run([sys.executable, "-c", code, path, str(found)], input=b"get k\n", capture_output=True,
                          timeout=60, env=pfrest_env(), cwd=ROOT)
    assert proc.stdout == b"200 v\n" and found.read_text() == "[]", (proc, found.read_text())
    assert not any(h.lower() == "traceparent" for h in backend.requests[0].headers)


def test_config_checks_the_tracing_block():
    def problems(value):
        with pytest.raises(ConfigError) as err:
            config.parse({"tracing": value, "endpoints": [{"name": "e", "mode": "tcp-lookup", "target": "http://b/"}]})
        return "\n".join(err.value.problems)
    assert "needs otlp-endpoint" in problems({"sample-ratio": 1})
    assert "sample-ratio must be a number 0..1" in problems({"otlp-endpoint": "http://c/v1/traces", "sample-ratio": 2})
    assert "'keys' is not one of its keys" in problems({"otlp-endpoint": "http://c/v1/traces", "keys": True})
    cfg = config.parse({"tracing": {"otlp-endpoint": "http://c:4318/v1/traces", "sample-ratio": 0.25},
                        "endpoints": [{"name": "e", "mode": "tcp-lookup", "target": "http://b/"}]})
    assert cfg.tracing == config.Tracing("http://c:4318/v1/traces", 0.25, "pfrest")


def test_query_shows_the_traceparent_sent(backend, receiver, write_config):
    backend.answers["k"] = (200, ["v"])
    path = write_config([{"name": "ep", "mode": "tcp-lookup", "target": backend.url + "/lookup"}],
                        tracing={"otlp-endpoint": receiver.url})
    proc = subprocess.run(pfrest_cmd("query", "-c", path, "ep", "k"), capture_output=True, text=True, timeout=60,
                          env=pfrest_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sent = backend.requests[0].headers["traceparent"]
    assert f"traceparent: {sent}\n" in proc.stdout
    assert [s["trace"] for s in receiver.spans] == [sent.split("-")[1]]   # the exchange's span: query's only


def test_serve_with_two_workers_exports_every_span_by_its_end(backend, receiver, write_config, served):
    from postfix_instance import free_port
    from test_serve import connect, tcp_get
    backend.answers["k"] = (200, ["v"])
    port = free_port()
    proc = served("-c", write_config([{"name": "ep", "mode": "tcp-lookup", "target": backend.url + "/lookup",
                                       "bind-port": port}], tracing={"otlp-endpoint": receiver.url}),
                  "--workers", "2")
    proc.wait_for(r"2 workers")
    socks = [connect(("127.0.0.1", port)) for _ in range(6)]
    try:
        assert [tcp_get(sock, b"k") for sock in socks] == [b"200 v\n"] * 6
    finally:
        for sock in socks:
            sock.close()
    proc.send(signal.SIGTERM)
    assert proc.exit_status() == 0
    requests = [s for s in receiver.spans if s["name"] == "pfrest tcp-lookup"]
    exchanges = [s for s in receiver.spans if s["name"] != "pfrest tcp-lookup"]
    assert len(requests) == 6 and len(exchanges) == 6
    assert {e["parent"] for e in exchanges} == {r["id"] for r in requests}
    sent = {r.headers["traceparent"].split("-")[1] for r in backend.requests}
    assert sent == {r["trace"] for r in requests}
