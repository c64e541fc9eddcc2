"""Unix socket files of ``pfrest serve``, made, handed over, re-moded and removed without following a
link, though serve runs as root in a directory that another account may write (Postfix's
``/var/spool/postfix/private`` belongs to postfix).

That account can rename, replace or link entries of its directory at any moment.  A call by path, as
root, on the socket's name would act on whatever the name is by then: ``chown`` on a symlink
swapped in for the socket hands the link's target (``/etc/shadow``, say) to serve's user.  So:

- The directory is opened once; every later step names entries relative to that descriptor, and the
  directory is recognised again (device, inode) before the socket is removed.
- The socket is bound in a private directory made for it (mode 0700, ours: checked through its own
  descriptor, whatever the hostile account renames), reached as ``/proc/self/fd/N/``, under a umask
  that gives it its ``bind-mode`` as it is born: no chmod by any name, no window.  Its inode is learnt
  there.  Then it is hard-linked into place (``linkat``: never replacing an entry that appeared
  meanwhile); it is handed to the account serve is about to become through its private name
  (``fchownat`` with AT_SYMLINK_NOFOLLOW, in a directory only root may enter: the same file, still out
  of reach), and the private directory removed.
- Its mode never changes afterwards: a new ``bind-mode`` takes effect at the next start (a chmod of
  the name, or even of ``/proc/self/fd/N`` for an O_PATH descriptor, is a call by path as root).
- Removal (at the end, a stale socket before binding) unlinks only the entry that ``lstat``, relative
  to the directory's descriptor, shows as the socket expected.  Between that look and the unlink the
  directory's writer could put something else there: then it loses an entry of its own directory,
  which it may remove itself; unlink never follows a link.

Linux only (``/proc/self/fd``), as the rest of serve (SO_PEERCRED, systemd).
"""

import os
import secrets
import socket
import stat
from typing import NamedTuple

from pfrest.system.sockets import BACKLOG, BindError

PRIVATE_MODE = 0o700        # the directory a socket is made in: nobody else may enter it
BOUND_NAME = "s"            # the socket's name in it: /proc/self/fd/N/s is far below sun_path's 108 bytes
PRIVATE_TRIES = 3           # names tried for the private directory (random: a collision is an attack)
PROBE_TIMEOUT = 2.0         # seconds to find out whether a process still listens on a socket file


class SocketFile(NamedTuple):
    """A socket file serve made: where, and which file and directory it is (st_dev, st_ino);
    ``own_directory``: serve made that directory too (/run/pfrest), and removes it, if empty, after."""
    path: str
    file: tuple
    directory: tuple
    own_directory: bool = False


def _identity(st):
    return st.st_dev, st.st_ino


def _directory_of(path):
    """A descriptor of the directory that holds ``path`` (its path is followed: it is the admin's)."""
    return os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def listen(path, mode, what, owner=None):
    """``(socket, SocketFile)``: a listening unix socket at ``path``, its file mode ``mode`` and, with
    ``owner`` ((uid, gid), as root), owned by that account; see the module text.  A stale socket file
    at ``path`` is removed first; anything else there is refused.  BindError naming ``what``."""
    name = os.path.basename(path)
    try:
        parent = _directory_of(path)
    except OSError as exc:
        raise BindError(f"{what}: cannot listen on {path}: its directory: {exc.strerror}") from None
    try:
        _clear_stale(parent, name, path, what)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            return sock, _make(sock, parent, name, path, mode, owner)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise BindError(f"{what}: cannot listen on {path}: {exc.strerror or exc}") from None
            raise
    finally:
        os.close(parent)


def _make(sock, parent, name, path, mode, owner):
    """Bind ``sock`` in a private directory, finish the file there, link it in as ``name`` (listening
    already: a client that finds the name is served)."""
    private, fd = _private_directory(parent)
    try:
        # the umask is the process's: safe here, where binds run on the one thread that makes files
        umask = os.umask(~mode & 0o777)
        try:
            sock.bind(f"/proc/self/fd/{fd}/{BOUND_NAME}")
        except FileNotFoundError:   # the descriptor and its directory are there: /proc is not
            raise OSError("pfrest binds through /proc/self/fd, and /proc is not mounted") from None
        finally:
            os.umask(umask)
        sock.listen(BACKLOG)
        st = os.lstat(BOUND_NAME, dir_fd=fd)
        # a default ACL of the directory overrides the umask (set-id and sticky bits mean nothing to a socket)
        if stat.S_IMODE(st.st_mode) != mode & 0o777:
            raise OSError(f"the socket was made with mode {stat.S_IMODE(st.st_mode):04o}, not bind-mode "
                          f"{mode & 0o777:04o}: remove the default ACL of its directory (setfacl -k)")
        made = SocketFile(path, _identity(st), _identity(os.fstat(parent)))
        try:  # linkat never replaces: what appeared at the name since _clear_stale stays
            os.link(BOUND_NAME, name, src_dir_fd=fd, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            raise OSError(f"{path} appeared meanwhile; not replacing it") from None
        if owner is not None:
            # after the link: linking a file another account owns takes CAP_FOWNER (protected_hardlinks),
            # which pfrest.service does not grant; the private name is the same file, out of reach.
            # fchownat(AT_SYMLINK_NOFOLLOW) by the private name, in the 0700 directory only root enters: no
            # link is followed and no other account can put one there.  fchown(sock) would not do: on a
            # socket's descriptor it changes the socket's own inode, not the file bind made.
            try:
                os.chown(BOUND_NAME, *owner, dir_fd=fd, follow_symlinks=False)
            except OSError:
                _unlink_if(parent, name, made.file)
                raise
        return made
    finally:
        try:
            os.unlink(BOUND_NAME, dir_fd=fd)
        except FileNotFoundError:
            pass
        os.close(fd)
        try:  # the hostile writer may have renamed it: then this removes at most an empty directory of its own
            os.rmdir(private, dir_fd=parent)
        except OSError:
            pass


def _private_directory(parent):
    """``(name, descriptor)`` of a new directory in ``parent`` that only this process's user may enter."""
    for _ in range(PRIVATE_TRIES):
        name = f".pfrest-{secrets.token_hex(8)}"
        try:
            os.mkdir(name, PRIVATE_MODE, dir_fd=parent)
        except FileExistsError:
            continue
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        st = os.fstat(fd)
        # what the name holds by now, whoever put it there, is fit only if it is ours and closed to others
        if st.st_uid == os.geteuid() and not st.st_mode & 0o077:
            return name, fd
        os.close(fd)
        raise OSError(f"the new directory {name} was replaced by another's")
    raise OSError("cannot make a private directory: every name tried exists")


def _clear_stale(parent, name, path, what):
    """Remove a socket file left by a process that is gone; refuse anything else."""
    try:
        st = os.lstat(name, dir_fd=parent)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BindError(f"{what}: cannot check {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(f"{what}: {path} exists and is not a socket; not removing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:  # by path: a link swapped in leads at worst to another socket, and a refusal to start
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: stale
        except OSError as exc:
            raise BindError(f"{what}: cannot check {path}: {exc.strerror or exc}") from None
        else:
            raise BindError(f"{what}: cannot listen on {path}: another process is listening on it "
                            "(another pfrest serve, the pfrest service?): stop it first, or choose another bind-path")
    try:
        _unlink_if(parent, name, _identity(st))
    except OSError as exc:
        raise BindError(f"{what}: cannot remove stale socket {path}: {exc.strerror}") from None


def _unlink_if(parent, name, identity):
    """Unlink ``name`` in ``parent`` if it is (still) the file ``identity``; a link is never followed."""
    try:
        if _identity(os.lstat(name, dir_fd=parent)) == identity:
            os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        pass


def remove(made):
    """Remove a socket file we made, never a successor's, nor what replaced it (a link to it included)."""
    try:
        parent = _directory_of(made.path)
    except OSError:
        return
    try:
        if _identity(os.fstat(parent)) == made.directory:
            _unlink_if(parent, os.path.basename(made.path), made.file)
    except OSError:
        pass
    finally:
        os.close(parent)
    if made.own_directory:
        _rmdir_if(os.path.dirname(made.path), made.directory)


def _rmdir_if(path, identity):
    """Remove the directory ``path`` if its name is (still) that directory and it is empty; a link
    there is never followed, another's directory never removed, a non-empty one kept."""
    try:
        grandparent = _directory_of(path)
    except OSError:
        return
    try:
        name = os.path.basename(path)
        st = os.lstat(name, dir_fd=grandparent)
        if stat.S_ISDIR(st.st_mode) and _identity(st) == identity:
            os.rmdir(name, dir_fd=grandparent)
    except OSError:   # gone, not empty (another's file in it), replaced meanwhile
        pass
    finally:
        os.close(grandparent)

