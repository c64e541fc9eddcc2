"""No path followed as root: `pfrest serve`, started as root, makes, hands over, re-modes and removes its
unix socket files, and opens its --log-file, without following a link that the account owning the
directory swapped in (socketfiles.py, log.open_log_file).  The hostile account is played by the test:
a process running as nobody, the owner of the socket's directory, renaming its entries as fast as it can."""

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from types import SimpleNamespace

import pytest

from pfrest import log
from pfrest.ops import controlsocket
from pfrest.system import socketfiles
from conftest import ROOT, pfrest_cmd, pfrest_env
from postfix_instance import interpreter_for, remove_tree, stop_process, world_tmpdir
from test_serve import (connect, endpoint, ephemeral, listening, pfrest_log,  # noqa: F401 (fixtures)
                        served, tcp_get, unix_endpoint)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: serve drops privileges only as root")
SECRET = "root:$y$j9T$not-for-nobody:19000:0:99999:7:::\n"
RACE_TIMEOUT = 30.0   # seconds the hostile process watches for the socket before giving up
SWAPPER_NICE = -20    # the hostile process's priority: the highest
OTHERS = 31           # endpoints bound after the raced one: the old serve chown-ed them all, later


@pytest.fixture
def secret(tmp_path):
    """A root-owned 0600 file, like /etc/shadow: what a swapped-in symlink points at."""
    path = tmp_path / "shadow"
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


def untouched(path):
    st = os.stat(path)
    return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), path.read_text()) == (0, 0, 0o600, SECRET)


@pytest.fixture
def site():
    """A directory every user may enter (a reload after the drop reads and binds as nobody)."""
    directory = world_tmpdir("pfrest-sockets-")
    yield directory
    remove_tree(directory)


@pytest.fixture
def spool(site):
    """A directory owned by nobody, as /var/spool/postfix/private is postfix's."""
    path = site / "private"
    path.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    return path


# The directory's owner, a process of its own: as soon as a socket appears at argv[1], it puts a symlink
# to argv[2] in its place (symlink, then rename over: the name is never missing); says "swapped".
SWAPPER = """
import os, stat, sys, time
path, target, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
print("watching", flush=True)
while time.monotonic() < deadline:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.symlink(target, path + ".new")
            os.rename(path + ".new", path)
            print("swapped", flush=True)
            break
    except FileNotFoundError:
        time.sleep(0.0002)   # a look every quarter millisecond still wins the old serve's window of milliseconds
"""


class Swapper:
    """SWAPPER running as nobody, the owner of the socket's directory, on ``path``."""

    def __init__(self, path, target):
        self.proc = subprocess.Popen([interpreter_for("nobody"), "-I", "-c", SWAPPER, str(path), str(target),
                                      str(RACE_TIMEOUT)], user="nobody", cwd="/", stdout=subprocess.PIPE,
                                     text=True)
        # first to the CPU when both want it (the machine may be busy): the race is the review's, won
        # in a few milliseconds, and the test must win it against the old code every time
        os.setpriority(os.PRIO_PROCESS, self.proc.pid, SWAPPER_NICE)
        assert self.proc.stdout.readline() == "watching\n"

    def swapped(self):
        try:
            return self.proc.communicate(timeout=RACE_TIMEOUT)[0] == "swapped\n"
        finally:
            stop_process(self.proc)


def config_for(write_config, backend, spool, names, **top):
    endpoints = [unix_endpoint(backend, spool / f"{name}.sock", name=name, **{"bind-mode": "0666"})
                 for name in names]
    return write_config(endpoints, user="nobody", **{"control-socket": str(spool / "control.sock")}, **top)


@needs_root
def test_socket_swapped_for_a_symlink_hands_nothing_over(backend, write_config, served, spool, secret):
    """The review's attack: the new socket replaced by a link to a root-owned 0600 file; the old serve
    chmod-ed (0666) and chown-ed (to nobody) the link's target.  Now the target stays as it was; the
    sockets nobody raced are nobody's, with their bind-mode, and no private directory is left."""
    nobody = pwd.getpwnam("nobody")
    cfg = config_for(write_config, backend, spool, ["first", *(f"other{i}" for i in range(OTHERS))])
    swapper = Swapper(spool / "first.sock", secret)
    proc = served("-c", cfg)
    proc.wait_for("ready:", timeout=60)   # a busy machine: the swapper takes a core at the highest priority
    assert swapper.swapped(), "the race never ran: the test proves nothing"
    assert "running as user nobody" in proc.log
    assert untouched(secret)
    for name in ("other0.sock", f"other{OTHERS - 1}.sock", "control.sock"):
        st = os.lstat(spool / name)
        expected = 0o666 if name.startswith("other") else 0o600
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == expected, name
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), name
    assert not [entry for entry in os.listdir(spool) if entry.startswith(".pfrest-")]
    backend.answers["k"] = (200, ["v"])
    with connect(str(spool / f"other{OTHERS - 1}.sock")) as sock:
        assert tcp_get(sock, b"k") == b"200 v\n"
    proc.send(signal.SIGTERM)
    assert proc.exit_status() == 0
    wait_gone(spool / "control.sock")   # the janitor's last
    assert os.path.islink(spool / "first.sock") and untouched(secret)


def wait_gone(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while os.path.lexists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.lexists(path), f"{path} is still there"


@needs_root
def test_janitor_removes_only_the_sockets_it_made(backend, write_config, served, spool, secret):
    """At exit, root's janitor removes the socket files serve made, and nothing that took their name:
    not a symlink to the very socket moved aside (following it, the old janitor saw its inode), not a
    regular file, not a symlink to a root file."""
    cfg = config_for(write_config, backend, spool, ["moved", "replaced", "linked", "kept"])
    proc = served("-c", cfg, "--workers", "2")   # the arbiter's janitor, as the single process's
    proc.wait_for("ready:")
    os.rename(spool / "moved.sock", spool / "aside.sock")
    os.symlink(spool / "aside.sock", spool / "moved.sock")
    os.unlink(spool / "replaced.sock")
    (spool / "replaced.sock").write_text("a file of the directory's owner\n")
    os.unlink(spool / "linked.sock")
    os.symlink(secret, spool / "linked.sock")
    proc.send(signal.SIGTERM)
    assert proc.exit_status() == 0
    wait_gone(spool / "control.sock")   # the janitor goes in order: the endpoints', then this one
    assert not os.path.lexists(spool / "kept.sock")
    assert os.path.islink(spool / "moved.sock") and stat.S_ISSOCK(os.lstat(spool / "aside.sock").st_mode)
    assert (spool / "replaced.sock").read_text() == "a file of the directory's owner\n"
    assert os.path.islink(spool / "linked.sock") and untouched(secret)


@needs_root
def test_a_new_bind_mode_waits_for_the_next_start(backend, listening, spool, secret, pfrest_log):
    """A serve left root (no user) never changes a mode by a path: a new bind-mode is said to take effect
    at the next start, the file keeps its mode, and a link put in its place leads nowhere."""
    raw = unix_endpoint(backend, spool / "ep.sock", **{"bind-mode": "0660"})
    server = listening(ephemeral([raw, unix_endpoint(backend, spool / "other.sock", name="other")]))
    os.rename(spool / "other.sock", spool / "aside.sock")
    os.symlink(secret, spool / "other.sock")
    server.reload(ephemeral([dict(raw, **{"bind-mode": "0666"}),
                             unix_endpoint(backend, spool / "other.sock", name="other", **{"bind-mode": "0666"})]))
    assert stat.S_IMODE(os.lstat(spool / "ep.sock").st_mode) == 0o660 and untouched(secret)
    assert "endpoint=ep bind-mode changed: the change takes effect when pfrest serve restarts" in pfrest_log.text
    server.stop()
    assert os.path.islink(spool / "other.sock") and untouched(secret)


def test_the_socket_is_born_with_its_bind_mode(backend, listening, tmp_path):
    """The mode comes from the umask at bind (no chmod afterwards), whatever the process's umask is."""
    umask = os.umask(0o077)
    try:
        server = listening(ephemeral([unix_endpoint(backend, tmp_path / "ep.sock", **{"bind-mode": "0666"})]))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.lstat(tmp_path / "ep.sock").st_mode) == 0o666
    assert os.umask(umask) == umask   # given back as it was
    server.stop()
    assert not os.path.lexists(tmp_path / "ep.sock")


def test_a_name_taken_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    """What appears at the name between the stale check and the link stays; serve does not start."""
    path = tmp_path / "ep.sock"
    clear = socketfiles._clear_stale

    def racing(*args):
        clear(*args)
        path.write_text("not yours\n")
    monkeypatch.setattr(socketfiles, "_clear_stale", racing)
    with pytest.raises(socketfiles.BindError, match="ep.sock appeared meanwhile; not replacing it"):
        socketfiles.listen(str(path), 0o600, "endpoint ep")
    assert path.read_text() == "not yours\n"
    assert os.listdir(tmp_path) == ["ep.sock"]   # no private directory left


# --- the log file ------------------------------------------------------------------------------------

@needs_root
def test_log_file_that_is_a_symlink_is_refused(backend, write_config, served, tmp_path, secret):
    """An admin expects serve to say so and stop, rather than to write where a link points."""
    link = tmp_path / "pfrest.log"
    link.symlink_to(secret)
    cfg = write_config([unix_endpoint(backend, tmp_path / "ep.sock")])
    proc = served("-c", cfg, "--log-file", str(link))
    assert proc.exit_status() == 1
    assert f"cannot open --log-file {link}: a symbolic link" in proc.log
    assert untouched(secret)
    assert not (tmp_path / "ep.sock").exists()


@needs_root
def test_log_file_swapped_for_a_symlink_is_not_reopened(backend, write_config, served, tmp_path, secret):
    """SIGHUP after the log was moved aside and a link put at its name (the directory's writer, not
    logrotate): serve logs on to the old file and says why."""
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "pfrest.log"
    cfg = write_config([unix_endpoint(backend, tmp_path / "ep.sock")])
    proc = served("-c", cfg, "--log-file", str(path))
    wait_for_line(path, "ready:")
    os.rename(path, logs / "pfrest.log.1")
    path.symlink_to(secret)
    proc.send(signal.SIGHUP)
    wait_for_line(logs / "pfrest.log.1", f"cannot reopen {path}, logging on to the old file: a symbolic link")
    wait_for_line(logs / "pfrest.log.1", "reloaded")
    assert untouched(secret)
    proc.send(signal.SIGTERM)
    assert proc.exit_status() == 0


def test_handle_with_a_log_file_that_is_a_symlink_answers_and_logs_to_syslog(backend, write_config, tmp_path,
                                                                               secret):
    """pfrest handle (spawn(8) may run it as root) answers as ever; its log goes to syslog, not through
    the link."""
    backend.answers["k"] = (200, ["v"])
    link = tmp_path / "handle.log"
    link.symlink_to(secret)
    cfg = write_config([endpoint(backend)])
    proc = subprocess.run(pfrest_cmd("handle", "-c", cfg, "--log-file", str(link), "ep"), input=b"get k\n",
                          capture_output=True, timeout=30, env=pfrest_env(), cwd=ROOT)
    assert (proc.stdout, proc.stderr, proc.returncode) == (b"200 v\n", b"", 0)
    assert os.path.islink(link) and os.stat(secret).st_mode & 0o777 == 0o600
    assert secret.read_text() == SECRET


def wait_for_line(path, text, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"no {text!r} in {path}:\n{path.read_text() if path.exists() else '(none)'}")


def test_log_file_only_a_regular_file_of_one_name(tmp_path):
    path = tmp_path / "new.log"
    with log.open_log_file(str(path)) as f:   # made when missing
        f.write("one\n")
    with log.open_log_file(str(path)) as f:   # appended to
        f.write("two\n")
    assert path.read_text() == "one\ntwo\n"
    os.link(path, tmp_path / "other-name")
    with pytest.raises(OSError, match="another name"):
        log.open_log_file(str(path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file|No such device"):   # and never blocks
        log.open_log_file(str(fifo))


@needs_root
def test_after_the_drop_reload_makes_sockets(backend, site, served, spool):
    """Once serve is nobody (not dumpable: its /proc/self is root's then), a reload still binds a new
    socket through /proc/self/fd, with its bind-mode; a socket already made keeps its mode until the
    next start."""
    nobody = pwd.getpwnam("nobody")

    def doc(modes):
        return {"user": "nobody", "control-socket": str(spool / "control.sock"), "endpoints": [
            unix_endpoint(backend, spool / f"{name}.sock", name=name, **{"bind-mode": mode})
            for name, mode in modes.items()]}
    cfg = site / "pfrest.json"   # nobody reads it on reload
    cfg.write_text(json.dumps(doc({"old": "0666"})))
    proc = served("-c", cfg)
    proc.wait_for("ready:")
    mark = proc.mark()
    cfg.write_text(json.dumps(doc({"old": "0660", "new": "0666"})))
    proc.send(signal.SIGHUP)
    proc.wait_for("reloaded", after=mark)
    assert not [line for line in proc.lines[mark:] if "ERROR" in line]
    old, new = os.lstat(spool / "old.sock"), os.lstat(spool / "new.sock")
    assert stat.S_IMODE(old.st_mode) == 0o666 and stat.S_IMODE(new.st_mode) == 0o666
    assert any("endpoint=old bind-mode changed" in line for line in proc.lines[mark:])
    assert new.st_uid == nobody.pw_uid
    backend.answers["k"] = (200, ["v"])
    with connect(str(spool / "new.sock")) as sock:
        assert tcp_get(sock, b"k") == b"200 v\n"
    proc.send(signal.SIGTERM)
    assert proc.exit_status() == 0


@needs_root
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)")
def test_the_units_capabilities_suffice(backend, write_config, served, spool):
    """Only what pfrest.service's CapabilityBoundingSet= grants (no CAP_FOWNER: linking a file another
    account owns would fail, hence the link before the chown): the sockets are made, handed over and,
    by the janitor, removed, in a directory of nobody's that only it may enter (as postfix's private/)."""
    with open(os.path.join(ROOT, "systemd", "pfrest.service")) as f:
        caps = next(line.split("=", 1)[1].split() for line in f if line.startswith("CapabilityBoundingSet="))
    spool.chmod(0o700)
    bounding = ",".join(["-all"] + ["+" + cap.lower().removeprefix("cap_") for cap in caps])
    proc = served("-c", config_for(write_config, backend, spool, ["ep"]),
                  prefix=["setpriv", f"--bounding-set={bounding}", "--"])
    proc.wait_for("ready:")
    nobody = pwd.getpwnam("nobody")
    for name in ("ep.sock", "control.sock"):
        assert os.lstat(spool / name).st_uid == nobody.pw_uid, name
    backend.answers["k"] = (200, ["v"])
    with connect(str(spool / "ep.sock")) as sock:
        assert tcp_get(sock, b"k") == b"200 v\n"
    proc.send(signal.SIGTERM)
    assert proc.exit_status() == 0
    wait_gone(spool / "control.sock")
    assert os.listdir(spool) == []


def test_the_control_sockets_directory_goes_if_serve_made_it(monkeypatch):
    """A serve started by hand makes /run/pfrest for its control socket (a tmp directory here) and
    removes it at the end, if it is still the directory it made and empty; one that was there before,
    one another file came into, and a link swapped in for it stay (the link is not followed)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:   # short: a socket path has 108 bytes
        run = os.path.join(tmp, "run")
        monkeypatch.setattr(controlsocket, "DEFAULT_CONTROL_SOCKET", run + "/control.sock")

        def bound():
            control = controlsocket.ControlSocket(SimpleNamespace(control_socket=None, user=None), None).bind()
            assert control.bound and os.path.exists(run + "/control.sock")
            return control
        bound().close()
        assert not os.path.exists(run)

        os.mkdir(run)   # there before: kept
        bound().close()
        assert os.listdir(run) == []
        os.rmdir(run)

        control = bound()
        open(run + "/other", "w").close()   # not empty: kept, with what is in it
        control.close()
        assert os.listdir(run) == ["other"]
        shutil.rmtree(run)

        control = bound()
        os.rename(run, tmp + "/moved")
        os.mkdir(tmp + "/elsewhere")
        os.symlink(tmp + "/elsewhere", run)
        control.close()
        assert os.path.islink(run) and os.path.isdir(tmp + "/elsewhere")
        assert os.listdir(tmp + "/moved") == ["control.sock"]   # not its name any more: left alone
