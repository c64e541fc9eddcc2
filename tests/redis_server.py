"""A real Redis (or Valkey) server for the shared-cache tests: started on loopback or a unix socket in a
test's directory, never persisting anything, stopped after.  Optionally with a password, TLS
(certificates made with openssl), and stopped (SIGSTOP), killed and restarted on the same address."""

import os
import shutil
import signal
import socket
import subprocess
import time

from conftest import need_binary
from postfix_instance import free_port, stop_process

READY_TIMEOUT = 10.0
# a primary starts a replica's first sync at once: by default it waits 5 s for other replicas to share
# the transfer, and every test with a replica waited for it
SYNC_DELAY_S = 0


def binaries():
    """The servers to test against: redis-server (Debian's package), and valkey-server where installed."""
    return ["redis-server"] + (["valkey-server"] if shutil.which("valkey-server") else [])


def make_pki(directory, names=("localhost",), ips=("127.0.0.1",)):
    """A CA and a server certificate it signed for ``names`` and ``ips``: {ca, cert, key} paths."""
    openssl = need_binary("openssl")
    d = str(directory)
    paths = {"ca": f"{d}/ca.pem", "cakey": f"{d}/ca.key", "cert": f"{d}/server.pem", "key": f"{d}/server.key"}
    san = ",".join([f"DNS:{n}" for n in names] + [f"IP:{ip}" for ip in ips])

    def run(*args):
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=pfrest test CA", "-keyout", paths["cakey"], "-out", paths["ca"])
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={names[0]}",
        "-keyout", paths["key"], "-out", f"{d}/server.csr")
    with open(f"{d}/ext.cnf", "w") as f:
        f.write(f"subjectAltName={san}\n")
    run("x509", "-req", "-in", f"{d}/server.csr", "-CA", paths["ca"], "-CAkey", paths["cakey"],
        "-CAcreateserial", "-days", "2", "-extfile", f"{d}/ext.cnf", "-out", paths["cert"])
    return paths


class RedisServer:
    """One redis-server process.  ``url`` is the cache-url that reaches it."""

    def __init__(self, directory, binary="redis-server", unix=False, password=None, pki=None, extra=()):
        self.binary = need_binary(binary)
        self.directory, self.password, self.pki, self.extra = str(directory), password, pki, tuple(extra)
        self.port = free_port()
        self.path = os.path.join(self.directory, "redis.sock") if unix else None
        self.proc = None
        self.start()

    @property
    def url(self):
        auth = f":{self.password}@" if self.password else ""
        if self.path:
            return f"unix://{auth}{self.path}?db=1"
        if self.pki:
            return f"rediss://{auth}localhost:{self.port}/0?ssl_ca_certs={self.pki['ca']}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self):
        args = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.directory,
                "--logfile", os.path.join(self.directory, "redis.log"),
                "--repl-diskless-sync-delay", str(SYNC_DELAY_S)]
        if self.path:
            args += ["--port", "0", "--unixsocket", self.path, "--unixsocketperm", "700"]
        elif self.pki:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.pki["cert"],
                     "--tls-key-file", self.pki["key"], "--tls-ca-cert-file", self.pki["ca"],
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        return args + list(self.extra)

    def start(self):
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._listening():
            assert self.proc.poll() is None, f"{self.binary} exited: " + self.log()
            assert time.monotonic() < deadline, f"{self.binary} not ready: " + self.log()
            time.sleep(0.02)
        return self

    def _listening(self):
        family, address = (socket.AF_UNIX, self.path) if self.path else (socket.AF_INET, ("127.0.0.1", self.port))
        with socket.socket(family) as sock:
            try:
                sock.connect(address)
                return "ready to accept connections" in self.log().lower()
            except OSError:
                return False

    def log(self):
        try:
            with open(os.path.join(self.directory, "redis.log")) as f:
                return f.read()
        except OSError:
            return ""

    def client(self):
        """A synchronous redis-py client, to look into the store."""
        import redis
        kwargs = {"ssl_check_hostname": True} if self.pki else {}
        return redis.Redis.from_url(self.url, **kwargs)

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            stop_process(self.proc)


STREAM_PROBE = "pfrest-test:streaming"
STREAM_WAIT_S = 0.5


def streams_to(primary, replica) -> bool:
    """Whether a write to the primary reaches the replica now.  The replica's role says "connected" once
    it has loaded its first sync, but after a diskless one the primary holds the writes back until the
    replica's first REPLCONF ACK, up to a second later: a test writing at once would read a miss."""
    token = os.urandom(8).hex()
    primary.client().set(STREAM_PROBE, token)
    deadline = time.monotonic() + STREAM_WAIT_S
    try:
        while time.monotonic() < deadline:
            if replica.client().get(STREAM_PROBE) == token.encode():
                return True
            time.sleep(0.01)
        return False
    finally:
        primary.client().delete(STREAM_PROBE)
