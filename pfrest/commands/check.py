"""``pfrest check``: validate the config file as ``serve`` would (config.checks) and, with ``--postfix``,
compare it with Postfix's configuration (crosscheck.py, through postconf.py)."""

import os
import sys

from pfrest import log
from pfrest.config import checks


def run(config_path, postfix_directory=None) -> int:
    """0 when valid (and, with ``postfix_directory`` not None, consistent with Postfix: "" for its default
    configuration); a ConfigError for an invalid config goes to the caller (exit 78)."""
    cfg = checks.load(config_path)
    for warning in checks.warnings(cfg) + _log_socket(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    modes = ", ".join(f"{ep.name} ({ep.mode})" for ep in cfg.endpoints)
    print(f"{config_path}: valid; {modes}")
    unserved = _unserved(cfg)
    if unserved:
        print(unserved)
    return 0 if postfix_directory is None else _against_postfix(cfg, postfix_directory or None)


def _unserved(cfg):
    """What ``pfrest serve`` would say of a config with no socket of its own (process.listener.selected):
    "nothing to serve", unless systemd passes it a socket per endpoint.  Such a config is right for
    ``pfrest handle`` (spawn, xinetd, Accept=yes), so check says so rather than refusing it."""
    if any(ep.binds for ep in cfg.endpoints):
        return None
    return (f"{cfg.path}: for pfrest handle only (spawn, xinetd, systemd Accept=yes): no endpoint has a "
            "bind-port or bind-path, so pfrest serve would refuse it (nothing to serve) unless systemd passes "
            "it a socket per endpoint; to use pfrest serve, give the endpoints bind-port or bind-path")


def _log_socket(cfg):
    """A warning when ``pfrest handle`` (the endpoints serve does not bind: spawn's) would log into
    nothing: no /dev/log, no journald socket."""
    handled = [ep.name for ep in cfg.endpoints if not ep.binds]
    if not handled or log.log_socket():
        return []
    return [f"no syslog socket ({log.SYSLOG_SOCKET}, {log.JOURNAL_SYSLOG_SOCKET} or {log.JOURNAL_NATIVE_SOCKET}): "
            f"pfrest handle would lose its log lines (endpoints: {', '.join(handled)}); run a syslog daemon "
            "or journald, or give handle --log-file in master.cf"]


def _against_postfix(cfg, directory) -> int:
    """Exit 0 when Postfix uses the endpoints as configured, 1 on a mismatch, EX_UNAVAILABLE when
    postconf cannot tell."""
    from pfrest.commands import crosscheck, postconf
    try:
        postfix = postconf.read(directory)
    except postconf.PostconfError as exc:
        print(f"pfrest check --postfix: {exc}", file=sys.stderr)
        return os.EX_UNAVAILABLE
    findings = crosscheck.compare(cfg, postfix)
    for finding in findings:
        print(f"{finding.kind}: {finding.text}", file=sys.stderr)
    mismatches = sum(finding.kind == crosscheck.MISMATCH for finding in findings)
    print(f"Postfix ({directory or 'default configuration'}): "
          + (f"{mismatches} mismatch(es) with {cfg.path}" if mismatches else f"consistent with {cfg.path}"))
    return 1 if mismatches else 0
