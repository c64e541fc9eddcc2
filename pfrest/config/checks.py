"""What ``pfrest check`` refuses and warns about beyond the config file's own facts, where the system
must be asked: name resolution, the account database, file permissions.

``config.parse`` judges the file alone, which is all ``pfrest handle`` needs (spawn(8) starts one per
connection: it must stay cheap, and it never binds or changes user).  ``pfrest serve`` loads its config
through ``load`` here, so that it refuses exactly what ``check`` refuses, before binding anything:
two endpoints on one socket, an unknown ``user``.  The warnings are what would only fail later: a
SIGHUP re-reads the file as ``user`` once privileges are dropped, and the TLS files are read at the
first https connection, after the drop too.

Permissions are judged from mode bits, owner and group membership, as the kernel does without ACLs.
"""

import importlib.util
import os
import socket
import stat
from typing import List, NamedTuple, Optional
from urllib.parse import parse_qsl, urlsplit

from pfrest import addresses, config
from pfrest.config import sentinelurl

READ, SEARCH = 4, 1          # permission bits of "other"; shifted by 3 for group, 6 for owner
# smtpd's limit on every read from its auth server (xsasl_dovecot_server.c: AUTH_TIMEOUT): a login the
# backend answers later gets smtpd's own "454" first, and smtpd drops that connection.
POSTFIX_AUTH_TIMEOUT_MS = 10000
TLS_FILES = (("ca-file", "ca_file"), ("client-cert", "client_cert"), ("client-key", "client_key"))


class Account(NamedTuple):
    name: str
    uid: int
    gid: int          # the primary group
    gids: frozenset   # the primary group and every supplementary one


def load(path: str) -> config.Config:
    """The config at ``path``; ConfigError for whatever ``pfrest check`` refuses."""
    cfg = config.load(path)
    problems = refusals(cfg)
    if problems:
        raise config.ConfigError(problems)
    return cfg


def refusals(cfg: config.Config) -> List[str]:
    """Problems that stop ``pfrest serve``, as dotted-path messages."""
    problems = _shared_sockets(cfg)
    problems += [f"{config.where(i, ep.name)}.bind-address: set without bind-port, so nothing listens on it: add "
                 "bind-port (pfrest serve then listens on bind-address:bind-port), or remove bind-address "
                 "(pfrest handle and systemd's socket units need neither)"
                 for i, ep in enumerate(cfg.endpoints) if ep.bind_address_alone]
    if cfg.user and account(cfg.user) is None:
        problems.append(f"user: no such user {cfg.user!r}")
    shared = [(i, ep.name) for i, ep in enumerate(cfg.endpoints) if ep.cache_url]
    if shared and not _installed("redis"):
        problems.append(f"{config.where(*shared[0])}.cache-url: needs the Python package redis (Debian: "
                        "python3-redis), which is not installed")
    return problems


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (only its parent packages)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def warnings(cfg: config.Config) -> List[str]:
    """config.warnings, and what the file system says about the config file and the TLS files."""
    found = config.warnings(cfg)
    if cfg.tracing is not None and not _installed("opentelemetry.sdk.trace"):
        found.append("tracing: the OpenTelemetry SDK is not installed: pip install 'pfrest[otel]' (pfrest runs, "
                     "without traces, until it is)")
    user = account(cfg.user) if cfg.user else None
    if user is not None and user.uid == 0:
        user = None   # root reads everything
    if cfg.path:
        found += _config_file(cfg.path, user)
    for i, ep in enumerate(cfg.endpoints):
        for key, attr in TLS_FILES:
            path = getattr(ep, attr)
            problem = path and _unreadable(path, user)
            if problem:
                found.append(f"{config.where(i, ep.name)}.{key}: {problem}; connections to {ep.target} will fail")
        secret_file = ep.oauth2 and ep.oauth2.client_secret_file
        problem = secret_file and _unreadable(secret_file, user)
        if problem:
            found.append(f"{config.where(i, ep.name)}.oauth2.client-secret-file: {problem}; no token can be "
                         "fetched, Postfix gets temporary answers")
        for key, url in (("cache-url", ep.cache_url), ("cache-read-url", ep.cache_read_url)):
            # sentinelurl.split: urlsplit may refuse a Sentinel URL's list of hosts
            for name, path in parse_qsl(sentinelurl.split(url).query if url else ""):
                problem = name in config.CACHE_URL_FILES and _unreadable(path, user)
                if problem:
                    found.append(f"{config.where(i, ep.name)}.{key}: {name}: {problem}; the shared cache will be "
                                 "skipped (lookups go to the backend)")
        if ep.mode == config.SASL:
            found += [f"{config.where(i, ep.name)}.{tail}" for tail in _login_warnings(ep)]
    return found


def _login_warnings(ep) -> List[str]:
    """What a dovecot-sasl endpoint risks: an answer later than smtpd waits, passwords in clear."""
    found = []
    if ep.request_timeout >= POSTFIX_AUTH_TIMEOUT_MS:
        found.append(f"request-timeout: {ep.request_timeout} ms, but smtpd waits {POSTFIX_AUTH_TIMEOUT_MS} ms "
                     "for a login's answer: a slower backend gets smtpd's own 454 first, and the answer "
                     f"is lost; set request-timeout below {POSTFIX_AUTH_TIMEOUT_MS} (e.g. 5000)")
    for target in ep.targets:
        parts = urlsplit(target)
        if parts.scheme == "http" and not config.is_loopback(parts.hostname or ""):
            found.append(f"target: {target} is plain http to {parts.hostname}, beyond loopback: every SMTP "
                         "password crosses the network in clear; use https")
    return found


def account(user: str) -> Optional[Account]:
    """The account named (or numbered) ``user``, as privileges.drop finds it; None when none is."""
    import pwd
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        return None
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, frozenset(os.getgrouplist(pw.pw_name, pw.pw_gid)))


def _shared_sockets(cfg) -> List[str]:
    """Endpoints that ``pfrest serve`` could not all bind: one socket path, or addresses that the
    kernel counts as one (``localhost`` and ``127.0.0.1``; ``0.0.0.0`` and any IPv4 address)."""
    problems, bound = [], []
    for i, ep in enumerate(cfg.endpoints):
        try:
            address = addresses.bound_by(ep)
        except (socket.gaierror, UnicodeError) as exc:
            problems.append(f"{config.where(i, ep.name)}.bind-address: {ep.bind_address!r} does not resolve "
                            f"({getattr(exc, 'strerror', None) or exc})")
            continue
        if address is None:
            continue
        key = "bind-path" if ep.bind_path else "bind-port"
        for j, other, taken in bound:
            if addresses.collide(address, taken):
                problems.append(f"{config.where(i, ep.name)}.{key}: would listen on {where(ep)}, where "
                                f"{config.where(j, other.name)} listens on {where(other)}")
                break
        else:
            bound.append((i, ep, address))
    return problems


def where(ep) -> str:
    """An endpoint's socket as its config gives it, for messages."""
    if ep.bind_path:
        return ep.bind_path
    return f"{ep.bind_address}:{ep.bind_port}" if ep.bind_port is not None else "no bind address"


def _config_file(path, user) -> List[str]:
    found = []
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return found
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "every user" if mode & stat.S_IWOTH else "its group"
        found.append(f"{path}: writable by {who}, who could send requests and tokens anywhere; "
                     f"chmod go-w {path}")
    problem = user and denied(path, user)
    if problem:
        found.append(f"{path}: user {user.name} {problem}: a reload (SIGHUP) once pfrest serve runs as "
                     f"{user.name} would fail; e.g. chown root:{_group(user.gid)} and chmod 0640 it")
    return found


def _unreadable(path, user) -> Optional[str]:
    """Why this process, or ``user``, cannot read ``path``; None when both can."""
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.access(path, os.R_OK):
        return f"{path} cannot be read"
    problem = user and denied(path, user)
    return f"{path}: user {user.name} {problem}" if problem else None


def denied(path, user: Account) -> Optional[str]:
    """Why ``user`` cannot read ``path`` (a directory on the way it may not enter, or the file's
    mode), or None."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    parents = []
    while True:
        parents.append(directory)
        if directory == os.path.dirname(directory):
            break
        directory = os.path.dirname(directory)
    try:
        for directory in reversed(parents):
            if not allowed(os.stat(directory), user, SEARCH):
                return f"may not enter {directory}"
        st = os.stat(path)
    except OSError:
        return None   # this process cannot tell; what it cannot read itself is said elsewhere
    if not allowed(st, user, READ):
        return f"may not read it (mode {stat.S_IMODE(st.st_mode):04o}, owner {_owner(st)})"
    return None


def allowed(st, user: Account, bit: int) -> bool:
    """The kernel's check: the owner's bits for the owner, else the group's for a member, else other's."""
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid in user.gids:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def _owner(st) -> str:
    import pwd
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"{owner}:{_group(st.st_gid)}"


def _group(gid: int) -> str:
    import grp
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
