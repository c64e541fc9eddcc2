import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from pfrest.commands import minihttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI") == "true"


def need_binary(name):
    """Skip when a system binary is missing, but never in CI: there it must be installed."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} not installed")
    return path


class Backend:
    """A real HTTP server on 127.0.0.1:0 whose answers a test scripts per key, recording requests.

    ``answers`` maps a lookup key (or policy recipient) to (status, body) or (status, body, headers),
    or a callable taking the Request; ``default`` answers everything else.
    """

    def __init__(self):
        self.answers = {}
        self.default = (404, b"")
        self.requests = []
        self.lock = threading.Lock()
        self.server = minihttp.serve_app(self.app)
        self.url = self.server.url

    def key_of(self, request):
        params = dict(minihttp.query_bytes(request))
        if b"key" in params:
            return params[b"key"].decode("utf-8", "surrogateescape")
        first = [v for n, v in minihttp.form_bytes(request) if n == b"recipient"][:1]
        return (first or [b""])[0].decode("utf-8", "surrogateescape")

    def app(self, request):
        with self.lock:
            self.requests.append(request)
        answer = self.answers.get(self.key_of(request), self.default)
        if callable(answer):
            answer = answer(request)
        status, body = answer[0], answer[1]
        headers = answer[2] if len(answer) > 2 else {"Content-Type": "application/json"}
        if isinstance(body, (list, dict)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        return status, headers, body

    def stop(self):
        self.server.stop()


@pytest.fixture
def backend():
    b = Backend()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def module_backend():
    """One backend for a whole module (starting and stopping one takes longer than many tests)."""
    b = Backend()
    yield b
    b.stop()


@pytest.fixture
def reset_backend(module_backend):
    """The module's backend, as a new one would be: no answers, no requests seen, 404 by default."""
    module_backend.answers.clear()
    module_backend.requests.clear()
    module_backend.default = (404, b"")
    return module_backend


@pytest.fixture
def write_config(tmp_path):
    """write_config(endpoints, **top) -> path of a JSON config file."""
    def write(endpoints, name="pfrest.json", **top):
        doc = dict(top)
        doc["endpoints"] = endpoints
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        path.chmod(0o600)
        return str(path)
    return write


def pfrest_cmd(*args):
    return [sys.executable, "-m", "pfrest", *args]


def pfrest_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def handle(tmp_path):
    """handle(config, name, input_bytes) -> stdout bytes of a real `pfrest handle` process."""
    def run(config_path, name, data, timeout=30):
        log = tmp_path / "handle.log"
        proc = subprocess.run(pfrest_cmd("handle", "-c", config_path, "--log-file", str(log), name),
                              input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, env=pfrest_env(), cwd=ROOT)
        assert proc.stderr == b"", proc.stderr
        run.returncode = proc.returncode
        run.log = log.read_text() if log.exists() else ""
        return proc.stdout
    return run


def package_installed(name="pfrest"):
    try:
        status = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", name], capture_output=True,
                                text=True, timeout=30).stdout
    except FileNotFoundError:
        status = "no dpkg"
    return status == "installed"


def need_package(name="pfrest"):
    """Skip when the Debian package is not installed, but never in CI: .ci/run builds and installs it."""
    if not package_installed(name):
        if IN_CI:
            pytest.fail(f"the package {name} is not installed; .ci/run must build and install it")
        pytest.skip(f"the package {name} is not installed (docs/deploying.md: Install)")


@pytest.fixture(scope="session")
def installation():
    """What the deployment tests run: the files the Debian package installed, where it is (always in CI,
    which builds and installs it), else the repository's files with a `pfrest` that user nobody can run
    (for spawn(8) and xinetd).  The package's files are the repository's with the installed paths, so
    one of the two is enough for a run (postfix_instance.Installation)."""
    import postfix_instance
    if IN_CI or package_installed():
        need_package()
        yield postfix_instance.Installation.package()
    else:
        with postfix_instance.installed_for_nobody() as script:
            yield postfix_instance.Installation.checkout(script)


@pytest.fixture(scope="session")
def postmap_conf(tmp_path_factory):
    """A Postfix config directory for postmap -c: a fresh Debian install has no /etc/postfix/main.cf.
    compatibility_level 3.6 turns smtputf8_enable on, as on real systems."""
    need_binary("postmap")
    from postfix_instance import backdate
    d = tmp_path_factory.mktemp("postmap-conf")
    (d / "main.cf").write_text("compatibility_level = 3.6\n")
    backdate(d / "main.cf")  # Postfix re-reads a main.cf younger than ~2 s until it settles
    return str(d)


def postmap(conf, key, table, stdin=None):
    """Run ``postmap -c conf -q key table``; (exit status, stdout, stderr)."""
    proc = subprocess.run([need_binary("postmap"), "-c", conf, "-q", key, table], input=stdin,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


class ServerThread:
    """A pfrest.process.serving.Server on an event loop in a thread of the test process, with a
    synchronous face for tests: ``addresses``, ``reload(cfg)``, ``summary()``, ``connection_count()``,
    ``stop(drain_timeout)``."""

    def __init__(self, cfg, names=()):
        import asyncio
        from pfrest.process.serving import Server
        from pfrest.system import eventloop
        self._asyncio = asyncio
        self.loop = eventloop.new_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="server-loop")
        self.thread.start()
        try:
            self.server = self.call(lambda: Server(cfg, names).start())
        except BaseException:
            self._end()
            raise

    def call(self, function, *args):
        """``function(*args)`` run in the loop's thread; its result, or its exception raised here."""
        async def run():
            return function(*args)
        return self._asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    @property
    def addresses(self):
        return self.call(lambda: self.server.addresses)

    def reload(self, cfg):
        return self.call(self.server.reload, cfg)

    def summary(self):
        return self.call(self.server.summary)

    def connection_count(self):
        return self.call(self.server.connection_count)

    def stop(self, drain_timeout=10.0):
        if self.loop.is_closed():
            return None
        try:
            return self._asyncio.run_coroutine_threadsafe(self.server.stop(drain_timeout), self.loop).result(
                drain_timeout + 30)
        finally:
            self._end()

    def _end(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()
