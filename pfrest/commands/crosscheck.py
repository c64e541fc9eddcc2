"""``pfrest check --postfix``: does Postfix's configuration use pfrest's endpoints as they are?

Postfix reaches pfrest in two ways, and both are compared with the pfrest config:

- references in main.cf parameters and master.cf ``-o`` overrides: ``tcp:HOST:PORT``,
  ``socketmap:inet:HOST:PORT:NAME`` / ``socketmap:unix:PATH:NAME``, ``check_policy_service
  inet:HOST:PORT`` / ``unix:PATH`` (``private/NAME`` is relative to the queue directory), and
  ``smtpd_sasl_path`` where ``smtpd_sasl_type = dovecot`` (main.cf, or a service's ``-o``; ``inet:``,
  ``unix:PATH`` or a path).  Each one that reaches a pfrest endpoint must reach one of its mode: a tcp
  table talking to a policy endpoint gets nothing but protocol errors.  An smtpd that reaches a
  dovecot-sasl endpoint with ``noplaintext`` in its SASL security options has no mechanism left (pfrest
  offers only PLAIN and LOGIN) and exits "fatal: no SASL authentication mechanisms";
- master.cf spawn services that run ``pfrest handle NAME``: the endpoint must exist, spawn's time limit
  (``SERVICE_time_limit``, 1000 s by default) must be set, or spawn kills handlers that Postfix still
  uses, and spawn's ``user=`` must be able to read the config.

A reference reaches whatever listens at its address: a master.cf service (Postfix binds those, so they
come first), else an endpoint's bind-address/bind-port or bind-path.  References to anything else are
not pfrest's business.  Endpoints that nothing reaches are only warned about: they may be there for
``postmap -q`` or a Postfix instance elsewhere.
"""

import os
import re
from typing import List, NamedTuple, Optional

from pfrest import addresses, config
from pfrest.commands.handleargs import handle_argv
from pfrest.commands.postconf import PostfixConfig, Service
from pfrest.config import checks

MISMATCH, WARNING = "mismatch", "warning"
NEEDS = {"tcp": config.TCP, "socketmap": config.SOCKETMAP, "policy": config.POLICY, "sasl": config.SASL}
TIME_LIMIT = "{}_time_limit"   # spawn(8): a handler's lifetime, default $command_time_limit (1000s)
SPAWN_DEFAULT_LIMIT = "1000 s"
# What to set it to: an smtpd keeps its auth connection for its whole life (a day covers any)
ADVISED_LIMIT = {config.SASL: "86400s"}
# smtpd's SASL parameters and their defaults (postconf -n lists only those set)
SASL_TYPE, SASL_PATH = ("smtpd_sasl_type", "cyrus"), ("smtpd_sasl_path", "smtpd")
SASL_OPTIONS = ("smtpd_sasl_security_options", "smtpd_sasl_tls_security_options")
SASL_DEFAULT_OPTIONS = "noanonymous"   # smtpd_sasl_tls_security_options: $smtpd_sasl_security_options

_TCP = re.compile(r"(?<![\w.-])tcp:(\[[^\]]+\]|[^\s,:{}\[\]]+):([^\s,:{}]+)")
_SOCKETMAP = re.compile(r"(?<![\w.-])socketmap:(inet|unix):([^\s,{}]+)")
_POLICY = re.compile(r"(?<![\w.-])check_policy_service[\s,]*\{?\s*([^\s,{}]+)")


class Finding(NamedTuple):
    kind: str   # MISMATCH or WARNING
    text: str   # names the Postfix side and the pfrest side


class Reference(NamedTuple):
    where: str                          # "main.cf virtual_alias_maps", "master.cf smtp/inet -o ..."
    text: str                           # as written
    protocol: str                       # "tcp", "socketmap", "policy" or "sasl"
    address: Optional[addresses.Address]
    noplaintext: str = ""               # sasl: the security options that hold noplaintext, as written


class Handler(NamedTuple):
    """A master.cf service whose spawn runs ``pfrest handle``."""
    service: Service
    endpoint: str
    config: str
    user: str


def references(where: str, value: str, queue_directory: str) -> List[Reference]:
    """The tcp, socketmap and policy references in one parameter value."""
    found = []
    for m in _TCP.finditer(value):
        found.append(Reference(where, m.group(0), "tcp",
                               addresses.resolved(m.group(1), addresses.port_number(m.group(2)))))
    for m in _SOCKETMAP.finditer(value):
        place = m.group(2).rpartition(":")[0]   # the text after the last colon is the map name
        if m.group(1) == "unix":
            address = addresses.unix(place, queue_directory) if place else None
        else:
            host, _, port = place.rpartition(":")
            address = addresses.resolved(host, addresses.port_number(port)) if host else None
        found.append(Reference(where, m.group(0), "socketmap", address))
    for m in _POLICY.finditer(value):
        found.append(Reference(where, f"check_policy_service {m.group(1)}", "policy",
                               _policy_server(m.group(1), queue_directory)))
    return found


def _policy_server(server: str, queue_directory: str):
    kind, sep, rest = server.partition(":")
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        return addresses.resolved(host, addresses.port_number(port)) if host else None
    if kind in ("unix", "local"):
        return addresses.unix(rest, queue_directory)
    return None if sep else addresses.unix(server, queue_directory)   # a bare path is a unix socket


def listens_on(service: Service, queue_directory: str) -> Optional[addresses.Address]:
    """Where master(8) listens for a service: inet ``host:port`` (or a port alone: every address);
    unix under ``private/`` (``public/`` when the private column says n)."""
    if service.type == "inet":
        host, sep, port = service.name.rpartition(":")
        number = addresses.port_number(port)
        if number is None:
            return None
        return addresses.resolved(host, number) if sep and host else addresses.everywhere(number)
    if service.type == "unix":
        return addresses.unix(("public/" if service.private == "n" else "private/") + service.name,
                              queue_directory)
    return None


def handler(service: Service) -> Optional[Handler]:
    """The ``pfrest handle`` a spawn service runs (``user=... argv=PROGRAM handle [-c FILE] NAME``)."""
    if service.command != "spawn":
        return None
    user, argv = "", []
    for i, arg in enumerate(service.args):
        if arg.startswith("user="):
            user = arg[len("user="):]
        elif arg.startswith("argv="):
            argv = [arg[len("argv="):], *service.args[i + 1:]]
            break
    for i in range(1, len(argv)):
        runs_pfrest = os.path.basename(argv[i - 1]) == "pfrest" or argv[max(i - 2, 0):i] == ["-m", "pfrest"]
        if argv[i] == "handle" and runs_pfrest:
            args = handle_argv(argv[i:])
            if args is not None:
                return Handler(service, args.name, args.config, user)
    return None


def compare(cfg: config.Config, postfix: PostfixConfig) -> List[Finding]:
    """Every mismatch between Postfix's configuration and ``cfg``, and the endpoints Postfix never uses."""
    findings, used = [], set()
    ours = os.path.realpath(cfg.path or config.DEFAULT_PATH)
    by_name = {ep.name: ep for ep in cfg.endpoints}
    listeners = []   # (address, Handler, Service or Endpoint); master.cf first: Postfix binds those
    for service in postfix.services:
        address = listens_on(service, postfix.queue_directory)
        spawned = handler(service)
        if spawned is not None and os.path.realpath(spawned.config) != ours:
            findings.append(Finding(WARNING, f"master.cf service {service.label}: runs pfrest handle with "
                                             f"{spawned.config}, not {cfg.path}: not compared"))
            spawned = None
        elif spawned is not None:
            findings += _spawned(spawned, by_name, postfix, address, cfg.path)
        if address is not None:
            listeners.append((address, spawned, service))
    for ep in cfg.endpoints:
        try:
            address = addresses.bound_by(ep)
        except OSError:
            address = None   # check.refusals has said so
        if address is not None:
            listeners.append((address, None, ep))
    for ref in _all_references(postfix):
        finding, name = _reached(ref, listeners, by_name, cfg.path)
        if finding:
            findings.append(finding)
        if name:
            used.add(name)
        if name and ref.noplaintext and by_name[name].mode == config.SASL:
            findings.append(Finding(MISMATCH, f"{ref.where}: {ref.text} reaches endpoint {name}, whose mechanisms "
                                              f"({', '.join(by_name[name].mechanisms)}) are all plaintext, and "
                                              f"{ref.noplaintext} holds noplaintext: smtpd exits \"fatal: no SASL "
                                              "authentication mechanisms\"; drop noplaintext, and refuse logins "
                                              "without TLS with smtpd_tls_auth_only = yes"))
    for spawned in filter(None, (h for _, h, _ in listeners)):
        used.add(spawned.endpoint)   # a master.cf service runs it: Postfix's own, referenced or not
    for ep in cfg.endpoints:
        if ep.name not in used:
            findings.append(Finding(WARNING, f"endpoint {ep.name} ({ep.mode}, {checks.where(ep)}): Postfix never "
                                             "uses it: no main.cf parameter, -o override or spawn service "
                                             "reaches it"))
    return findings


def _all_references(postfix: PostfixConfig) -> List[Reference]:
    found = []
    for name, value in postfix.main.items():
        found += references(f"main.cf {name}", value, postfix.queue_directory)
    for (service, kind), params in postfix.overrides.items():
        for name, value in params.items():
            found += references(f"master.cf {service}/{kind} -o {name}", value, postfix.queue_directory)
    return found + _sasl_references(postfix)


def _sasl_references(postfix: PostfixConfig) -> List[Reference]:
    """smtpd_sasl_path where smtpd_sasl_type is dovecot: main.cf's, and each service's whose -o sets
    one of the SASL parameters (a service that sets none uses main.cf's: the same reference, said once)."""
    found = []
    contexts = [("main.cf", postfix.main)]
    contexts += [(f"master.cf {service}/{kind} -o", {**postfix.main, **params})
                 for (service, kind), params in postfix.overrides.items()
                 if any(name in params for name in (SASL_TYPE[0], SASL_PATH[0], *SASL_OPTIONS))]
    for where, params in contexts:
        if params.get(*SASL_TYPE) != "dovecot":
            continue
        path = params.get(*SASL_PATH)
        # each holding noplaintext is fatal: the first for sessions without TLS, the other with it
        values = [(SASL_OPTIONS[0], params.get(SASL_OPTIONS[0], SASL_DEFAULT_OPTIONS)),
                  (SASL_OPTIONS[1], params.get(SASL_OPTIONS[1], ""))]
        noplaintext = " and ".join(f"{name} = {value}" for name, value in values
                                   if "noplaintext" in re.split(r"[\s,]+", value))
        found.append(Reference(f"{where} {SASL_PATH[0]}", f"{SASL_PATH[0]} = {path}", "sasl",
                               _policy_server(path, postfix.queue_directory), noplaintext))
    return found


def _reached(ref: Reference, listeners, by_name, config_path):
    """(a Finding or None, the endpoint name reached or None) for one reference."""
    if ref.address is None:
        return None, None
    for address, spawned, owner in listeners:
        if not addresses.reaches(ref.address, address):
            continue
        if isinstance(owner, Service) and spawned is None:
            return None, None   # another program's service
        if spawned is not None:
            ep, via = by_name.get(spawned.endpoint), f"through master.cf service {owner.label}"
            if ep is None:
                return Finding(MISMATCH, f"{ref.where}: {ref.text} reaches master.cf service {owner.label}, "
                                         f"which runs pfrest handle for endpoint {spawned.endpoint!r}, not in "
                                         f"{config_path}"), None
        else:
            ep, via = owner, f"at {checks.where(owner)}"
        if ep.mode != NEEDS[ref.protocol]:
            return Finding(MISMATCH, f"{ref.where}: {ref.text} reaches endpoint {ep.name} {via}, a {ep.mode} "
                                     f"endpoint, not {NEEDS[ref.protocol]}"), ep.name
        return None, ep.name
    return None, None


def _spawned(spawned: Handler, by_name, postfix: PostfixConfig, address, config_path) -> List[Finding]:
    service = spawned.service
    where = f"master.cf service {service.label}"
    ep = by_name.get(spawned.endpoint)
    if ep is None:
        known = ", ".join(by_name) or "none"
        return [Finding(MISMATCH, f"{where}: runs pfrest handle for endpoint {spawned.endpoint!r}, which "
                                  f"{config_path} does not have (endpoints: {known})")]
    findings = []
    limit = TIME_LIMIT.format(service.name)
    if limit not in postfix.main and limit not in postfix.overrides.get((service.name, service.type), {}):
        findings.append(Finding(MISMATCH, f"{where}: runs pfrest handle {ep.name} without {limit} in main.cf: "
                                          f"spawn kills the handler after {SPAWN_DEFAULT_LIMIT} while Postfix "
                                          f"may still use it; add {limit} = {ADVISED_LIMIT.get(ep.mode, '3600s')}"))
    if ep.mode == config.TCP and not isinstance(address, addresses.Inet):
        findings.append(Finding(MISMATCH, f"{where}: runs pfrest handle {ep.name}, a tcp-lookup endpoint, "
                                          "on a unix socket: tcp: tables reach only inet services"))
    problem = _unreadable_for(spawned.user, config_path)
    if problem:
        findings.append(Finding(MISMATCH, f"{where}: runs pfrest handle {ep.name} as user={spawned.user}, "
                                          f"who {problem} ({config_path}): every handler would exit 78"))
    return findings


def _unreadable_for(user: str, path: str) -> Optional[str]:
    """Why spawn's ``user=name[:group]`` cannot read ``path``, or None (also when that is unknown)."""
    import grp
    name, _, group = user.partition(":")
    account = checks.account(name) if name else None
    if account is None or path is None:
        return None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            return None
        account = account._replace(gid=gid, gids=frozenset(os.getgrouplist(account.name, gid)))
    return checks.denied(path, account)

