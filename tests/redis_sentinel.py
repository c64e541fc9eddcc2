"""A real Redis Sentinel group on loopback for the fleet tests: a primary, a replica of it and three
sentinels (``redis-server sentinel.conf --sentinel``, or valkey's), with short timeouts so that a
failover takes seconds: the primary is declared down after DOWN_AFTER_MS without an answer, and a quorum
of two sentinels promotes the replica.  Every process is stopped by ``stop``."""

import os
import subprocess
import time

from postfix_instance import free_port, stop_process
from redis_server import READY_TIMEOUT, RedisServer

SERVICE = "pfrest-fleet"
DOWN_AFTER_MS = 1000      # a primary silent this long is down (the production default is 30 s)
FAILOVER_TIMEOUT_MS = 3000
QUORUM = 2
SENTINELS = 3
SETTLED_TIMEOUT = 30.0    # seconds for the sentinels to find the replica and each other (INFO, hello)


class Sentinel:
    """One sentinel process, its config file (which it rewrites) in its own directory."""

    def __init__(self, directory, binary, primary, password=None, pki=None):
        self.directory, self.binary, self.port, self.pki = str(directory), binary, free_port(), pki
        os.makedirs(self.directory, exist_ok=True)
        listen = [f"port {self.port}"] if pki is None else [
            "port 0", f"tls-port {self.port}", f"tls-cert-file {pki['cert']}", f"tls-key-file {pki['key']}",
            f"tls-ca-cert-file {pki['ca']}", "tls-auth-clients no", "tls-replication yes"]
        lines = [*listen, "bind 127.0.0.1", f"dir {self.directory}",
                 f"logfile {os.path.join(self.directory, 'sentinel.log')}",
                 f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} {QUORUM}",
                 f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
                 f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
                 f"sentinel parallel-syncs {SERVICE} 1"]
        if password:
            lines.append(f"sentinel auth-pass {SERVICE} {password}")
        self.conf = os.path.join(self.directory, "sentinel.conf")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([binary, self.conf, "--sentinel"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(self):
        import redis
        tls = {} if self.pki is None else {"ssl": True, "ssl_ca_certs": self.pki["ca"]}
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5, **tls)

    def master(self):
        """SENTINEL MASTER as a dict, or None while the sentinel does not answer."""
        import redis
        try:
            reply = self.client().execute_command("SENTINEL", "MASTER", SERVICE)
        except (redis.RedisError, OSError):
            return None
        if isinstance(reply, list):   # RESP2 gives a flat list (redis-py parses some versions' into a dict)
            reply = dict(zip(reply[::2], reply[1::2]))
        return reply

    def stop(self):
        stop_process(self.proc)


class SentinelGroup:
    """A primary, its replica, three sentinels.  ``url`` is the cache-url that names the service."""

    def __init__(self, directory, binary="redis-server", password=None, pki=None):
        self.password, self.pki = password, pki
        for name in ("primary", "replica"):
            (directory / name).mkdir(parents=True, exist_ok=True)
        auth = ("--masterauth", password) if password else ()
        auth += ("--tls-replication", "yes") if pki else ()   # the replica follows its primary over TLS
        self.primary = RedisServer(directory / "primary", binary, password=password, pki=pki, extra=auth)
        self.replica = RedisServer(directory / "replica", binary, password=password, pki=pki,
                                   extra=(*auth, "--replicaof", "127.0.0.1", str(self.primary.port)))
        self.sentinels = []
        try:
            self.sentinels = [Sentinel(directory / f"sentinel{i}", self.primary.binary, self.primary, password, pki)
                              for i in range(SENTINELS)]
            self.settled()
        except BaseException:
            self.stop()
            raise

    @property
    def servers(self):
        return (self.primary, self.replica)

    def url(self, db=0):
        """The cache-url: rediss+sentinel:// with the CA when the group speaks TLS."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        if self.pki:
            return f"rediss+sentinel://{auth}{hosts}/{SERVICE}/{db}?ssl_ca_certs={self.pki['ca']}"
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}/{db}"

    def settled(self, timeout=SETTLED_TIMEOUT):
        """Until every sentinel knows the replica (linked to its primary) and the two other sentinels:
        only then can they agree on a failover."""
        deadline = time.monotonic() + timeout
        while True:
            masters = [s.master() for s in self.sentinels]
            if all(m and int(m.get("num-slaves", 0)) >= 1 and int(m.get("num-other-sentinels", 0)) >= SENTINELS - 1
                   and "down" not in m.get("flags", "") for m in masters) and self.linked():
                return
            assert time.monotonic() < deadline, f"the sentinels did not settle: {masters}"
            time.sleep(0.1)

    def linked(self):
        """Whether the replica follows its primary now (the sentinels' view of it lags by seconds)."""
        import redis
        try:
            return self.replica.client().role()[3] == b"connected"
        except (redis.RedisError, OSError, IndexError):   # not answering yet, or not a replica's reply
            return False

    def promoted(self, timeout=READY_TIMEOUT * 3):
        """Until every sentinel names the replica as the primary; the seconds that took."""
        started = time.monotonic()
        while not all(m and int(m["port"]) == self.replica.port for m in (s.master() for s in self.sentinels)):
            assert time.monotonic() - started < timeout, [s.master() for s in self.sentinels]
            time.sleep(0.05)
        return time.monotonic() - started

    def stop(self):
        for process in (*self.sentinels, self.replica, self.primary):
            process.stop()
