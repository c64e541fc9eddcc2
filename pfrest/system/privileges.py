"""Started as root, ``pfrest serve`` binds first and then becomes the config's ``user`` for good: groups,
gid, uid, in that order, so that no way back to root remains.

The unix sockets it makes are that account's from the start (``owner``: socketfiles.py makes them so
without following a link).  They live in directories that account may not write (Postfix's
``/var/spool/postfix/private`` belongs to postfix), so it could not remove them at the end.  A *janitor*
does: a child forked while still root that keeps nothing open but one pipe and waits, ignoring
signals, until the pipe closes (the server has exited, however it ended), then removes those socket
files (only if they are still the ones made, socketfiles.remove) and exits.  A server that ends in
order closes the pipe itself and waits for the janitor (``finish``): under the unit's KillMode=mixed,
systemd kills what is left of the unit as soon as the main process is gone, the janitor too.
"""

import logging
import os
import signal
import time

from pfrest.system import socketfiles

log = logging.getLogger("pfrest")

JANITOR_WAIT = 2.0   # seconds a server that ends waits for its janitor to remove the socket files
_janitor = None      # (pid, the pipe's write end) of this process's janitor, until finish


class PrivilegeError(Exception):
    pass


def _account(user):
    import pwd
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise PrivilegeError(f"user: no such user {user!r}") from None


def owner(user):
    """(uid, gid) the socket files made now are for: ``user``'s when running as root (drop will become
    it), else None (they stay this process's).  PrivilegeError for an unknown user."""
    if os.geteuid() != 0 or not user:
        return None
    pw = _account(user)
    return pw.pw_uid, pw.pw_gid


def drop(user, socket_files):
    """As root: start the janitor for ``socket_files`` (socketfiles.SocketFile, already ``user``'s) and
    become ``user``.  Otherwise nothing, with a word when that is worth knowing."""
    if os.geteuid() != 0:
        return
    if not user:
        log.warning("running as root: set \"user\" in the config to drop privileges after binding")
        return
    pw = _account(user)
    if socket_files:
        _start_janitor(socket_files)
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    log.info("running as user %s (uid %d, gid %d)", pw.pw_name, pw.pw_uid, pw.pw_gid)


def finish():
    """At the end of serve, its workers gone: the janitor removes the socket files now, and the server
    waits for it (up to JANITOR_WAIT) before it exits."""
    global _janitor
    if _janitor is None:
        return
    (pid, write_end), _janitor = _janitor, None
    os.close(write_end)
    deadline = time.monotonic() + JANITOR_WAIT
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.01)


def _start_janitor(socket_files):
    global _janitor
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid != 0:
        os.close(read_end)
        os.set_inheritable(write_end, False)  # only this process (and its forked workers) hold it
        _janitor = pid, write_end
        return
    try:  # the janitor: never returns
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_IGN)  # a stop signal to the whole unit must not end it early
        os.closerange(0, read_end)
        os.closerange(read_end + 1, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536)
        while os.read(read_end, 1):
            pass
        for made in socket_files:
            socketfiles.remove(made)
    finally:
        os._exit(0)
