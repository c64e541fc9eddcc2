"""The two bits of systemd that ``pfrest serve`` uses, with the standard library only.

- Socket activation with ``Accept=no``: systemd binds the sockets and passes them as fds 3, 4, ... with
  ``LISTEN_FDS`` (their count), ``LISTEN_PID`` (who they are for) and ``LISTEN_FDNAMES`` (the units'
  ``FileDescriptorName=``, colon-separated), see sd_listen_fds(3).
- ``sd_notify``: one datagram such as ``READY=1`` to the unix socket in ``NOTIFY_SOCKET``; a leading
  ``@`` means the abstract namespace, see sd_notify(3).
"""

import os
import socket

LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(unset_environment=True):
    """The passed listening fds as ``[(fd, name), ...]``; empty when none are meant for this process.

    The variables are removed (by default) so that nothing pfrest starts later takes them for its own.
    An fd without a name gets ``"unknown"``, as systemd itself does.
    """
    env = os.environ
    try:
        meant_for_us = int(env.get("LISTEN_PID", "")) == os.getpid()
        count = int(env.get("LISTEN_FDS", "")) if meant_for_us else 0
    except ValueError:
        count = 0
    names = env.get("LISTEN_FDNAMES", "").split(":") if count else []
    if unset_environment:
        for var in _VARIABLES:
            env.pop(var, None)
    fds = []
    for i in range(max(count, 0)):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)  # systemd passes them inheritable; a backend helper must not keep them
        fds.append((fd, names[i] if i < len(names) and names[i] else "unknown"))
    return fds


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager; False when there is none or it failed.

    Never raises: a missing or broken notification socket must not take the service down.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
        return True
    except OSError:
        return False
