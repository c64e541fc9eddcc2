"""One token shared by every pfrest process of a user: a private file in the runtime directory.

Spawn mode starts a ``pfrest handle`` per Postfix client, ``serve --workers`` forks; each process would
fetch a token of its own.  Instead the token goes into a file, 0600, in a directory only its user can
enter (0700, the user's own), with when it expires; a process that needs a token takes the file's if it
is not yet due for renewal.  Fetching is one process at a time: an exclusive ``flock`` on a lock file
beside it, taken without waiting (the event loop must not block); the others read the file until the
token is there.  A file, not the shared cache (cache-url): it needs no Redis, works in every mode, and
is at hand in microseconds.

Every open is O_NOFOLLOW, as root too, and a file is used only when it is a regular file of this user
with no permission for group or others: a link or a file planted by someone else is never read, nor
written through.  A new token is written to a new file (O_EXCL) and renamed over the old one, so that a
reader never sees half a token.  The directory: systemd's ``RUNTIME_DIRECTORY`` for serve, else
/run/pfrest when it is this user's, else /tmp/pfrest-UID (made 0700; refused unless it is the user's
own, private directory).  Where none of them is private, tokens are not shared (one line in the log).
"""

import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import time
from typing import NamedTuple, Optional

log = logging.getLogger("pfrest")

SYSTEM_RUNTIME = "/run/pfrest"
FALLBACK_RUNTIME = "/tmp/pfrest-%d"
MAX_FILE = 1 << 15   # bytes of a token file: an access token (grant.MAX_TOKEN) and two numbers
NAME_DIGITS = 32     # hex digits of the credentials' hash in the file name
_PRIVATE = stat.S_IRWXG | stat.S_IRWXO
NO_LOCK = -1


class Stored(NamedTuple):
    """A token as the file holds it: ``expires`` on the wall clock (processes share no other)."""
    value: str
    expires: float
    lifetime: float


def directory() -> Optional[str]:
    """The private runtime directory of this user, made if need be; None when there is none."""
    candidates = [os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0], SYSTEM_RUNTIME,
                  FALLBACK_RUNTIME % os.geteuid()]
    for path in filter(None, candidates):
        if path.startswith("/tmp/"):
            try:
                os.mkdir(path, 0o700)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    continue
        if _private_directory(path):
            return path
    return None


def _private_directory(path: str) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & _PRIVATE


class TokenFile:
    """The file of one set of credentials (``key``: anything hashable with a stable repr)."""

    def __init__(self, folder: str, key):
        digest = hashlib.sha256(repr(key).encode("utf-8")).hexdigest()[:NAME_DIGITS]
        self.path = os.path.join(folder, f"oauth2-{digest}.json")
        self._lock_path = self.path + ".lock"

    def read(self) -> Optional[Stored]:
        """The token in the file, None when there is none (or it is not a private file of this user)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & _PRIVATE:
                return None
            data = os.read(fd, MAX_FILE + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            doc = json.loads(data) if len(data) <= MAX_FILE else None
            return Stored(str(doc["token"]), float(doc["expires"]), float(doc["lifetime"]))
        except (ValueError, TypeError, KeyError):
            return None

    def write(self, value: str, lifetime: float) -> bool:
        """Keep a token just received, for ``lifetime`` seconds from now; False when it cannot be."""
        data = json.dumps({"token": value, "expires": time.time() + lifetime, "lifetime": lifetime})
        temporary = f"{self.path}.{os.getpid()}.new"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                return False
            os.unlink(temporary)   # one a killed process of the same pid left: ours to remove
            return self.write(value, lifetime)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.rename(temporary, self.path)   # replaces a link at that name, never follows it
            return True
        except OSError:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            return False

    def lock(self):
        """The fetching right: an open descriptor holding an exclusive flock (release with ``unlock``),
        None while another process holds it, NO_LOCK when there is no lock file to be had (then every
        process fetches its own).  A process that ends releases it with its descriptors."""
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return NO_LOCK
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            os.close(fd)
            return None

    @staticmethod
    def unlock(fd):
        if fd != NO_LOCK:
            os.close(fd)   # closing the descriptor releases the flock
