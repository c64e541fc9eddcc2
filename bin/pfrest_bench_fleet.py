"""The fleet figures of ``bin/pfrest-bench --fleet`` that need more than a shared store: a failover under
Redis Sentinel, and refresh ahead (stale-while-revalidate) against a slow backend.  Imported by
pfrest-bench; everything it starts on loopback is stopped when each scenario ends.

- failover: a primary, its replica and three sentinels (down-after-milliseconds 1000), N ``pfrest
  serve`` hosts on ``redis+sentinel://``, clients asking all of them (half hot keys, half new ones,
  every reply checked); the primary is killed (SIGKILL): how long until the sentinels name the replica,
  how long until a key fetched on one host is answered by another without a backend request, the
  lookups' latency meanwhile, wrong and unanswered replies;
- refresh ahead: N hosts sharing one store, a backend taking BACKEND_DELAY per answer, HOT keys (or
  --refresh-keys) with a cache-ttl of REFRESH_TTL, asked by every client all the time; without, then with
  cache-stale-while-revalidate: the latency of the lookups after warm-up, how many waited for the
  backend, and the backend's requests per key per lifetime for the whole fleet.
"""

import http.server
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

SERVICE = "bench"
DOWN_AFTER_MS = 1000
BACKEND_DELAY = 0.2     # seconds per answer of the refresh-ahead backend
REFRESH_TTL = 2.0       # cache-ttl of the refresh-ahead hosts
HOT = 20                # hot keys of the refresh-ahead load (default): the warm-up fetches them one by one
WAITED = 0.1            # seconds: a lookup slower than this waited for the backend (BACKEND_DELAY)
READY = 15.0            # seconds for a program to listen, the sentinels to settle, a failover to happen


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(check, what, seconds=READY, every=0.05):
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"pfrest-bench: {what} within {seconds:g} s")
        time.sleep(every)


def _listens(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Programs:
    """The processes a scenario started, stopped together."""

    def __init__(self):
        self.procs = []

    def start(self, args, port=None):
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        if port:
            _until(lambda: _listens(port) or proc.poll() is not None, f"{args[0]} did not listen")
            if proc.poll() is not None:
                raise SystemExit(f"pfrest-bench: {' '.join(args[:3])} ... exited")
        return proc

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def redis(programs, binary, workdir, name, *extra):
    port, directory = _port(), os.path.join(workdir, name)
    os.makedirs(directory, exist_ok=True)
    return port, programs.start([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", directory, *extra], port)


def ask(port, *command):
    """One RESP command to a server (or sentinel) on loopback; the reply's lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*%d\r\n" % len(command) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in command))
        time.sleep(0.02)
        return s.recv(65536).decode(errors="replace").split("\r\n")


class KeyedBackend:
    """An HTTP backend in threads of this process: ``["val-KEY"]`` for each key, after ``delay``, each
    request counted per key."""

    def __init__(self, delay=0.0):
        counts, lock = {}, threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                key = parse_qs(urlsplit(self.path).query).get("key", [""])[0]
                with lock:
                    counts[key] = counts.get(key, 0) + 1
                time.sleep(delay)
                body = json.dumps([f"val-{key}"]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:   # the host went away meanwhile (stopped at the scenario's end)
                    self.close_connection = True

            def log_message(self, *_):
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass   # a connection a stopping host reset: nothing to report

        self.counts, self.lock = counts, lock
        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def asked(self, key=None):
        with self.lock:
            return sum(self.counts.values()) if key is None else self.counts.get(key, 0)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def hosts(programs, pfrest, workdir, backend, count, workers, **cache):
    """``count`` pfrest serve processes with the same endpoint; their ports."""
    ports = []
    for i in range(count):
        port = _port()
        ep = {"name": "fleet", "mode": "tcp-lookup", "bind-port": port, "target": backend.url + "/lookup",
              "request-timeout": 3000, **cache}
        path = os.path.join(workdir, f"scene-host{i}.json")
        with open(path, "w") as f:
            json.dump({"control-socket": os.path.join(workdir, f"scene-host{i}.sock"), "endpoints": [ep]}, f)
        os.chmod(path, 0o600)
        programs.start([*pfrest, "serve", "-c", path, "--workers", str(workers), "--log-file",
                        os.path.join(workdir, "scene.log")], port)
        ports.append(port)
    return ports


class Clients:
    """Threads asking the hosts in lock-step, each reply checked; (started, seconds) kept per lookup."""

    def __init__(self, ports, count, key):
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.latencies, self.wrong, self.unanswered = [], 0, 0
        self.threads = [threading.Thread(target=self._run, args=(ports[i % len(ports)], i, key), daemon=True)
                        for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self, port, index, key):
        sock, n = None, 0
        while not self.stop.is_set():
            n += 1
            name = key(index, n)
            started = time.monotonic()
            try:
                sock = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
                reply = lookup(sock, name)
            except OSError:
                with self.lock:
                    self.unanswered += 1
                sock = None
                continue
            with self.lock:
                self.latencies.append((started, time.monotonic() - started))
                self.wrong += reply != f"200 val-{name}\n".encode()

    def end(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(15)

    def between(self, start, end=float("inf")):
        with self.lock:
            return sorted(seconds for started, seconds in self.latencies if start <= started < end)


def lookup(sock, key):
    sock.sendall(b"get " + key.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def _ms(values, fraction):
    return values[min(len(values) - 1, int(len(values) * fraction))] * 1000 if values else float("nan")


def failover(pfrest, binary, workdir, count, workers, clients, out=sys.stdout):
    programs, backend = Programs(), KeyedBackend()
    try:
        primary, _ = redis(programs, binary, workdir, "primary")
        replica, _ = redis(programs, binary, workdir, "replica", "--replicaof", "127.0.0.1", str(primary))
        sentinels = []
        for i in range(3):
            port, conf = _port(), os.path.join(workdir, f"sentinel{i}.conf")
            with open(conf, "w") as f:
                f.write(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                        f"sentinel failover-timeout {SERVICE} 3000\n")
            programs.start([binary, conf, "--sentinel"], port)
            sentinels.append(port)
        _until(lambda: all("num-other-sentinels" in r and r[r.index("num-other-sentinels") + 2] == "2"
                           and r[r.index("num-slaves") + 2] == "1"
                           for r in (ask(s, "SENTINEL", "MASTER", SERVICE) for s in sentinels)),
               "the sentinels did not settle")
        url = "redis+sentinel://" + ",".join(f"127.0.0.1:{s}" for s in sentinels) + f"/{SERVICE}/0"
        ports = hosts(programs, pfrest, workdir, backend, count, workers, **{
            "cache-ttl": 600, "cache-url": url, "cache-local-ttl": 1, "cache-timeout": 50})
        load = Clients(ports, clients, lambda i, n: f"hot{n % 50}" if n % 2 else f"c{i}-{n}")
        time.sleep(2)
        killed = time.monotonic()
        programs.procs[0].kill()
        _until(lambda: ask(sentinels[0], "SENTINEL", "get-master-addr-by-name", SERVICE)[4] == str(replica),
               "the sentinels did not promote the replica", READY * 2)
        promoted = time.monotonic() - killed
        probe = [0]

        def shared():
            probe[0] += 1
            key = f"probe-{probe[0]}"
            with socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as a:
                lookup(a, key)
            time.sleep(0.05)
            with socket.create_connection(("127.0.0.1", ports[-1]), timeout=10) as b:
                lookup(b, key)
            return backend.asked(key) == 1
        _until(shared, "the hosts did not share the cache again", READY * 2, every=0.1)
        again = time.monotonic() - killed
        time.sleep(1)
        load.end()
        during = load.between(killed, killed + again)
        print(f"failover ({count} hosts, --workers {workers}, {clients} clients, down-after-milliseconds "
              f"{DOWN_AFTER_MS}): the replica promoted {promoted:.1f} s after the primary's SIGKILL, the hosts "
              f"sharing again after {again:.1f} s; meanwhile {len(during)} lookups, p50 {_ms(during, 0.5):.1f} ms, "
              f"p99 {_ms(during, 0.99):.1f} ms, max {_ms(during, 1.0):.1f} ms; wrong {load.wrong}, "
              f"unanswered {load.unanswered} (of {len(load.latencies)})", file=out)
    finally:
        programs.stop()
        backend.stop()


def refresh_ahead(pfrest, binary, workdir, count, workers, clients, duration, hot=HOT, out=sys.stdout):
    for window in (0, 60):
        programs, backend = Programs(), KeyedBackend(BACKEND_DELAY)
        try:
            store, _ = redis(programs, binary, workdir, f"store-{window}")
            ports = hosts(programs, pfrest, workdir, backend, count, workers, **{
                "cache-ttl": REFRESH_TTL, "cache-url": f"redis://127.0.0.1:{store}/0", "cache-local-ttl": 1,
                "cache-timeout": 50, **({"cache-stale-while-revalidate": window} if window else {})})
            for port in ports:   # warm-up: every host holds every hot key
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    for k in range(hot):
                        lookup(sock, f"hot{k}")
            warm, started = backend.asked(), time.monotonic()
            load = Clients(ports, clients, lambda i, n: f"hot{(i + n) % hot}")
            time.sleep(duration)
            load.end()
            seconds = time.monotonic() - started
            after = load.between(started)
            waited = sum(s > WAITED for s in after)
            per_key = (backend.asked() - warm) / hot / (seconds / REFRESH_TTL)
            label = f"stale-while-revalidate {window} s" if window else "no refresh ahead"
            print(f"refresh ahead, {label}: {count} hosts, backend {BACKEND_DELAY * 1000:.0f} ms, {hot} hot keys, "
                  f"cache-ttl {REFRESH_TTL:g} s, {clients} clients, {seconds:.0f} s: {len(after)} lookups, p50 "
                  f"{_ms(after, 0.5):.2f} ms, p99 {_ms(after, 0.99):.2f} ms, max {_ms(after, 1.0):.1f} ms, "
                  f"{waited} waited for the backend; backend requests per key per lifetime for the fleet "
                  f"{per_key:.2f}; wrong {load.wrong}, unanswered {load.unanswered}", file=out)
        finally:
            programs.stop()
            backend.stop()
