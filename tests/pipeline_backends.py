"""The lookup backends people run, started for the pipelining tests: nginx (also over TLS), a Go net/http
server, uvicorn, gunicorn's sync worker (which closes after each answer: it does not pipeline) and the
project's own test backend; and the Postfix-style clients that load `pfrest serve` and judge every reply.

Every backend answers GET /lookup?key=K with 200 ["value-of-K"] (404 for a key starting "missing") and
/policy (any method) with a policy action, and echoes X-Request-Id unless started with ``echo=False``.
Each is a real process (or server) on 127.0.0.1; ``stop()`` ends it.
"""

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from typing import NamedTuple

from backends.pyapps import answer
from conftest import Backend, need_binary
from hostile import netstring, policy_request
from postfix_instance import certificate, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
APPS = os.path.join(HERE, "backends")
START_TIMEOUT = 20.0   # seconds for a backend to listen (a Go build is done before)

NGINX_CONF = """daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 1024; }}
http {{
    log_format pipe '$uri $pipe $http_x_request_id';
    access_log {tmp}/access.log pipe;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests {keepalive_requests};
    server {{
        listen 127.0.0.1:{port}{tls};
        location /lookup {{
            default_type application/json;
            {echo}
            if ($arg_key ~ "^missing") {{ return 404; }}
            return 200 '["value-of-$arg_key"]';
        }}
        location /policy {{
            default_type text/plain;
            {echo}
            return 200 'OK policy-any';
        }}
    }}
}}
"""
NGINX_ECHO = "add_header X-Request-Id $http_x_request_id always;"


class Program:
    """A backend process; ``url``, ``stop()``, and what it tells of its requests where it can
    (``pipelined()``, ``policy_ids()``: None where it cannot).  What it prints goes to a file (a pipe
    nobody reads would block it once full)."""

    expected_policy = None   # the policy action the backend answers, when it does not name the recipient
    endpoint_options = {}    # config keys the endpoints need to reach it

    def __init__(self, command, url, env=None, pass_fds=(), cwd=None):
        self.url, self.printed = url, tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, env=env, pass_fds=pass_fds, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=self.printed, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.printed.seek(0)
        return self.printed.read().decode("utf-8", "replace")

    def wait_until(self, ready, what):
        """Until ``ready()`` is true (it may raise OSError: not yet); fails if the process ends first."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if ready():
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{what} (exit status {self.proc.poll()}): {self.output()[-2000:]}")
            time.sleep(0.02)

    def wait_answering(self, what, context=None):
        """Until a lookup is answered: a server still importing its app would otherwise hold pfrest's
        first requests in the listening socket's backlog past their request-timeout."""
        def answered():
            with urllib.request.urlopen(self.url + "/lookup?key=ready", timeout=START_TIMEOUT,
                                        context=context) as answer:
                return answer.read() is not None
        self.wait_until(answered, f"{what} did not answer")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.printed.close()

    def pipelined(self):
        return None

    def policy_ids(self):
        return None


class Nginx(Program):
    """nginx answering from its config alone (``return``); its access log's $pipe says which requests
    came pipelined.  With ``tls``, over https with a certificate of its own (``endpoint_options``: the
    endpoint's ``ca-file`` trusting it)."""

    expected_policy = b"OK policy-any"

    def __init__(self, tmp, echo=True, keepalive_requests=1000000, tls=False):
        need_binary("nginx")
        self.tmp, port = tmp, free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        conf, context, scheme = tmp / "nginx.conf", None, "http"
        if tls:
            cert, key = certificate(tmp)
            tls = f" ssl;\n        ssl_certificate {cert};\n        ssl_certificate_key {key}"
            context, scheme = ssl.create_default_context(cafile=str(cert)), "https"
            self.endpoint_options = {"ca-file": str(cert)}
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, echo=NGINX_ECHO if echo else "",
                                          keepalive_requests=keepalive_requests, tls=tls or ""))
        super().__init__([need_binary("nginx"), "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)],
                         f"{scheme}://127.0.0.1:{port}")
        self.wait_answering("nginx", context)

    def _log(self):
        path = self.tmp / "access.log"
        return [line.split(" ") for line in path.read_text().splitlines()] if path.exists() else []

    def pipelined(self):
        """How many requests nginx read pipelined ($pipe "p")."""
        return sum(1 for fields in self._log() if fields[1] == "p")

    def policy_ids(self):
        return Counter(fields[2] for fields in self._log() if fields[0] == "/policy")


class GoServer(Program):
    """tests/backends/lookup.go, built once per session (go_binary)."""

    def __init__(self, binary, echo=True):
        super().__init__([binary, f"-echo={'true' if echo else 'false'}"], "")
        self.wait_until(lambda: re.match(r"listening on (\S+)\n", self.output()), "the Go backend did not start")
        self.url = "http://" + re.match(r"listening on (\S+)", self.output()).group(1)


def build_go(tmp):
    """The Go backend built into ``tmp`` (its GOCACHE and GOPATH there too); the binary's path."""
    env = dict(os.environ, GOCACHE=str(tmp / "gocache"), GOPATH=str(tmp / "gopath"), GOFLAGS="", CGO_ENABLED="0")
    binary = str(tmp / "lookup")
    subprocess.run([need_binary("go"), "build", "-o", binary, os.path.join(APPS, "lookup.go")], env=env,
                   check=True, timeout=300, capture_output=True)
    return binary


class _Listening(Program):
    """A Python server handed a listening socket made here (port 0: no race for a free port)."""

    def __init__(self, argv, echo):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.set_inheritable(True)
        env = dict(os.environ, PYTHONPATH=APPS)
        env.pop("LOOKUP_NO_ECHO", None)
        if not echo:
            env["LOOKUP_NO_ECHO"] = "1"
        super().__init__([sys.executable, "-m", *[a.format(fd=self.sock.fileno()) for a in argv]],
                         f"http://127.0.0.1:{self.sock.getsockname()[1]}", env=env,
                         pass_fds=(self.sock.fileno(),), cwd=APPS)
        self.wait_answering(argv[0])

    def stop(self):
        super().stop()
        self.sock.close()


class Uvicorn(_Listening):
    def __init__(self, echo=True):
        super().__init__(["uvicorn", "--fd", "{fd}", "--no-access-log", "--log-level", "warning", "pyapps:app"],
                         echo)


class Gunicorn(_Listening):
    """The sync worker: one request per connection, answered with Connection: close."""

    def __init__(self, echo=True):
        super().__init__(["gunicorn", "--bind", "fd://{fd}", "--worker-class", "sync", "--workers", "2",
                          "--log-level", "warning", "pyapps:wsgi"], echo)


class ProjectBackend:
    """conftest's Backend (pfrest.commands.minihttp, the project's test server), answering lookups; it
    records every request, so it tells the policy requests' ids."""

    expected_policy, endpoint_options = None, {}

    def __init__(self, echo=True):
        self.backend = Backend()
        self.url = self.backend.url

        def reply(request):
            status, kind, body = answer(request.path, request.raw_query, request.body)
            headers = {"Content-Type": kind}
            if echo and request.headers.get("x-request-id"):
                headers["X-Request-Id"] = request.headers["x-request-id"]
            return status, body, headers
        self.backend.default = reply   # every key: Backend calls it with the request

    def stop(self):
        self.backend.stop()

    def pipelined(self):
        return None

    def policy_ids(self):
        with self.backend.lock:
            return Counter(r.headers.get("x-request-id") for r in self.backend.requests if r.path == "/policy")


# --- the Postfix side ----------------------------------------------------------------------------------

TCP, SOCKETMAP, POLICY = "tcp", "socketmap", "policy"
WARM_UP = 2   # lookups the first clients ask alone


class Reply(NamedTuple):
    mode: str
    key: str
    outcome: str      # "value", "notfound", "temporary" or "WRONG"
    reply: bytes
    at: float         # time.monotonic() when the client had it


def judge(mode, key, reply, expected_policy=None) -> str:
    """What a reply is for its own key: its value, its not-found, a temporary error, or WRONG."""
    if mode == TCP:
        if reply == b"200 value-of-" + key.encode():
            return "value"
        if reply.startswith(b"500 ") and key.startswith("missing"):
            return "notfound"
        return "temporary" if reply.startswith(b"400 ") else "WRONG"
    if mode == SOCKETMAP:
        if reply == b"OK value-of-" + key.encode():
            return "value"
        if reply.startswith(b"NOTFOUND") and key.startswith("missing"):
            return "notfound"
        return "temporary" if reply.startswith((b"TEMP ", b"TIMEOUT ")) else "WRONG"
    if reply == b"action=" + (expected_policy or b"OK policy-" + key.encode()):
        return "value"
    return "temporary" if reply.startswith(b"action=DEFER_IF_PERMIT ") else "WRONG"


class Client:
    """One Postfix-like connection to `pfrest serve`: one request, then its one reply, then the next."""

    def __init__(self, mode, port):
        self.mode, self.buffer = mode, b""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)

    def request(self, key) -> bytes:
        if self.mode == TCP:
            return b"get %s\n" % key.encode()
        if self.mode == SOCKETMAP:
            return netstring(b"lookup " + key.encode())
        return policy_request(key.encode())

    def _reply(self):
        """The next whole reply in the buffer, or None."""
        if self.mode == SOCKETMAP:
            size, colon, rest = self.buffer.partition(b":")
            if colon and len(rest) > int(size):
                reply, self.buffer = rest[:int(size)], rest[int(size) + 1:]
                return reply
            return None
        end = b"\n" if self.mode == TCP else b"\n\n"
        if end not in self.buffer:
            return None
        reply, _, self.buffer = self.buffer.partition(end)
        return reply

    def ask(self, key) -> bytes:
        self.sock.sendall(self.request(key))
        while True:
            reply = self._reply()
            if reply is not None:
                return reply
            data = self.sock.recv(65536)
            assert data, f"pfrest closed a {self.mode} connection"
            self.buffer += data

    def extra(self) -> bytes:
        """What came beyond the replies asked for (after a short wait): a second reply would be here."""
        self.sock.settimeout(0.1)
        try:
            self.buffer += self.sock.recv(65536)
        except socket.timeout:
            pass
        return self.buffer

    def close(self):
        self.sock.close()


def keys_for(client: int, requests: int, prefix="", errors=False):
    """Distinct keys, one in ten of them missing; with ``errors``, one in ten that the backend fails
    (hostile_backends: 500)."""
    return [f"{'missing-' if i % 10 == 9 else 'error-' if errors and i % 10 == 4 else ''}{prefix}c{client}-{i}"
            for i in range(requests)]


def traffic(ports, clients=32, requests=40, policy_clients=4, expected_policy=None, extra_keys=None,
            errors=False):
    """``clients`` lookup clients (tcp and socketmap in turn) and ``policy_clients`` policy clients, each
    asking its own keys one after another, all at once; every Reply, and the bytes that came beyond them.
    The first tcp and socketmap clients ask WARM_UP keys before the others start: the pipeline of each
    endpoint has a proven connection when the load comes, so that lookups are pipelined from the start.
    ``extra_keys``: {client number: keys} asked by that client instead of its own; ``errors``: some
    lookup keys are ones the backend fails (keys_for)."""
    replies, extras, lock = [], [], threading.Lock()
    start = threading.Barrier(clients + policy_clients)

    def run(number, mode):
        client = Client(mode, ports[mode])
        try:
            keys = (extra_keys or {}).get(number) or keys_for(number, requests, "p" if mode == POLICY else "",
                                                              errors and mode != POLICY)
            for n, key in enumerate(keys):
                if n == (WARM_UP if number < 2 else 0):   # the first clients prove a connection first
                    start.wait(30)
                asked = f"{key}@example.com" if mode == POLICY else key
                reply = client.ask(asked)
                with lock:
                    replies.append(Reply(mode, key, judge(mode, asked, reply, expected_policy), reply,
                                         time.monotonic()))
            left = client.extra()
            if left:
                extras.append((mode, number, left))
        finally:
            client.close()
    modes = [TCP if n % 2 == 0 else SOCKETMAP for n in range(clients)] + [POLICY] * policy_clients
    threads = [threading.Thread(target=run, args=(n, mode)) for n, mode in enumerate(modes) if mode in ports]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return replies, extras


def serve_config(path, url, request_timeout=3000, pipelining=True, ports=None, **extra):
    """A config with a tcp and a socketmap endpoint (``pipelining``) and a policy one beside them, on
    free ports (or ``ports``), all with the keys ``extra``; (path, {mode: port})."""
    ports = ports or {TCP: free_port(), SOCKETMAP: free_port(), POLICY: free_port()}
    endpoints = [{"name": "tcp", "mode": "tcp-lookup", "target": url + "/lookup", "pipelining": pipelining},
                 {"name": "socketmap", "mode": "socketmap-lookup", "target": url + "/lookup",
                  "pipelining": pipelining},
                 {"name": "policy", "mode": "policy", "target": url + "/policy"}]
    for endpoint, (mode, port) in zip(endpoints, ports.items()):
        endpoint.update(extra, **{"bind-port": port, "request-timeout": request_timeout})
    # its own control socket: the default one in /run belongs to the machine's pfrest
    path.write_text(json.dumps({"endpoints": endpoints, "control-socket": str(path.parent / "control.sock")}))
    path.chmod(0o600)
    return str(path), ports
