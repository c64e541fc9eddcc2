"""Command line: ``pfrest handle|check|query|serve|stats|cache|demo|init``.  Imports stay lazy so that ``--help`` and
``check`` cost no more than the config code, and ``handle`` only what a request needs: Postfix starts
one ``handle`` per connection, so even argparse (0.6 MiB and 9 ms a process) is left out when its
command line is the plain one that master.cf, xinetd and systemd give (``handle_argv``)."""

import os
import sys

from pfrest import __version__, config
from pfrest.commands.handleargs import HandleArgs, handle_argv  # noqa: F401 (cli.handle_argv)

EX_USAGE = os.EX_USAGE   # 64: sysexits.h, for every command (argparse alone would exit 2)

# The exit statuses of every command, as pfrest --help and pfrest(8) show them (bin/pfrest-manpages).
EXIT_STATUSES = (
    ("0", "success: valid (check), found or authenticated (query), done (cache), figures printed (stats), "
          "a clean stop (serve)"),
    ("1", "not found or login rejected (query, as postmap -q); a mismatch with Postfix (check --postfix); a "
          "runtime failure (serve, demo: a socket that cannot be bound)"),
    ("64", "EX_USAGE: arguments that do not fit (an unknown option, a missing ENDPOINT, a KEY for flush)"),
    ("69", "EX_UNAVAILABLE: what the command needs cannot be reached (stats: the metrics-address; cache: the "
           "store or the control socket; check --postfix: postconf), or a permanent failure (query)"),
    ("73", "EX_CANTCREAT: init will not write the file (it exists, is a link, or its directory is missing)"),
    ("75", "EX_TEMPFAIL: a temporary failure or a deferring policy action (query)"),
    ("78", "EX_CONFIG: the config file is invalid, or names no such endpoint (every command)"),
)


def _parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        """Exits 64 (EX_USAGE) on an argument error, not argparse's 2, like every command's own usage
        errors; the subcommands' parsers are of this class too (add_subparsers takes the parent's)."""

        def error(self, message):
            self.print_usage(sys.stderr)
            self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")

    parser = Parser(
        prog="pfrest", description="Answer Postfix tcp_table, socketmap and policy requests from a REST backend.",
        epilog="exit status:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_STATUSES),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-V", "--version", action="version", version=f"pfrest {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-c", "--config", default=config.DEFAULT_PATH, metavar="FILE",
                       help=f"config file, JSON or .toml (default {config.DEFAULT_PATH})")
        return p

    p = command("handle", "serve one Postfix connection on stdin/stdout (spawn(8), xinetd, systemd Accept=yes)")
    p.add_argument("name", help="endpoint name")
    p.add_argument("--log-file", metavar="PATH", help="log to this file instead of syslog")

    p = command("check", "validate the config file; exit 0 when valid, 78 when not")
    p.add_argument("--postfix", nargs="?", const="", metavar="DIR",
                   help="also compare with Postfix's configuration (postconf, or postconf -c DIR); "
                        "exit 1 on a mismatch")

    p = command("serve", "serve every endpoint (or those named) on its socket, in one long-running process")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="endpoints to serve (default: every one with a bind-port or bind-path)")
    p.add_argument("--syslog", action="store_true", help="log to syslog (facility mail) instead of stderr")
    p.add_argument("--log-file", metavar="PATH", help="log to this file instead of stderr (reopened on SIGHUP)")
    p.add_argument("--drain-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long requests in progress may take to finish (default 10)")
    p.add_argument("--workers", type=_workers, default=1, metavar="N",
                   help="worker processes the connections are passed to, each replaced when it dies or "
                        "goes silent; one per CPU core uses them all (default 1)")

    command("stats", "print the figures of the running pfrest serve (from its metrics-address)")

    p = command("query", "make the real backend call and print the reply Postfix would get; for a "
                         "dovecot-sasl endpoint, one login of USER, whose password is read from stdin (its "
                         "first line) or, on a terminal, asked for: never given on the command line")
    p.add_argument("name", help="endpoint name")
    p.add_argument("words", nargs="+", metavar="KEY | attr=value | USER",
                   help="the lookup key, policy attributes (the usual ones are filled in), or the user name "
                        "to log in as (dovecot-sasl; the password comes from stdin or a prompt)")
    p.add_argument("--map", dest="mapname", metavar="MAPNAME",
                   help="socketmap map name sent to the backend (default: the endpoint name)")

    p = command("cache", "drop cached answers: from the shared cache (cache-url) and every pfrest using it, or "
                         "else from the local pfrest serve (its control-socket)")
    p.add_argument("action", choices=("drop", "flush"), metavar="ACTION",
                   help="drop: the answers to the KEYs; flush: every answer of the endpoint")
    p.add_argument("name", metavar="ENDPOINT", help="endpoint name")
    p.add_argument("keys", nargs="*", metavar="KEY",
                   help="drop: the lookup keys, as pfrest query takes them (user@example.com, not %%-encoded)")
    p.add_argument("--map", dest="mapname", metavar="MAPNAME",
                   help="socketmap: the map name the keys are looked up in (default: the endpoint name)")

    text = "the four modes on loopback with a built-in REST backend, and the commands to try (no config)"
    p = sub.add_parser("demo", help=text, description=text)
    p.add_argument("--port-base", type=_port_base, metavar="N",
                   help="listen on ports N to N+3 (default 9101; 0: any free ports)")
    p = command("init", "write a starting config for the modes asked, with a random auth token, and print the "
                        "Postfix lines that go with it; an existing file is never replaced (exit 73)")
    p.add_argument("--target", required=True, metavar="URL",
                   help="the backend's base URL: each endpoint's target is URL/NAME (domains, aliases, policy)")
    p.add_argument("--modes", type=_modes, default="tcp,socketmap,policy", metavar="MODES",
                   help="comma-separated: tcp, socketmap, policy, auth (SMTP AUTH: an endpoint auth of mode "
                        "dovecot-sasl; sasl says the same) (default tcp,socketmap,policy)")
    p.add_argument("--port-base", type=_init_port_base, metavar="N",
                   help="every endpoint on 127.0.0.1 ports N, N+1, N+2, N+3 (default: tcp on 127.0.0.1:9001, "
                        "the others on unix sockets in /var/spool/postfix/private)")
    return parser


def _modes(text):
    from pfrest.commands import init
    try:
        return init.parse_modes(text)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _invalid(message):
    """The error argparse shows as is (argparse is loaded: only it calls the checks below)."""
    import argparse
    return argparse.ArgumentTypeError(message)


def _port_base(text):
    if not text.isdigit() or not (int(text) == 0 or 1 <= int(text) <= 65532):
        raise _invalid("must be 0 or a port number up to 65532")
    return int(text)


def _init_port_base(text):
    if not text.isdigit() or not 1 <= int(text) <= 65532:
        raise _invalid("must be a port number, 1..65532 (the endpoints take N to N+3)")
    return int(text)


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise _invalid("must be a number of seconds, 0..3600")
    return value


def _workers(text):
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise _invalid("must be a number of processes, 1..64")
    return int(text)


def _serve(args) -> int:
    from pfrest.commands import serve
    return serve.run(serve.Options(args.config, args.names, args.syslog, args.log_file,
                                   args.drain_timeout, args.workers))


def _demo(args) -> int:
    from pfrest.commands import demo
    return demo.run(args.port_base)


def _init(args) -> int:
    from pfrest.commands import init
    return init.run(args.config, args.modes, args.target, args.port_base)  # --modes: a list (_modes)


def _check(args) -> int:
    from pfrest.commands import check
    return check.run(args.config, args.postfix)


def _query(args) -> int:
    from pfrest import log
    from pfrest.commands import query
    log.for_foreground()
    cfg = config.load(args.config)
    words = [os.fsencode(w) for w in args.words]
    password = None
    if cfg.endpoint(args.name).mode == config.SASL and len(words) == 1:
        password = query.read_password(args.words[0])
    try:
        return query.run(cfg, args.name, words, args.mapname, password=password)
    except ValueError as exc:
        print(f"pfrest query: {exc}", file=sys.stderr)
        return EX_USAGE


def _load_part(command, path, top_keys, endpoint_name=None):
    """The config as far as ``command`` needs it, with a warning line when the rest of the file is invalid
    (config.load_part: the running serve keeps its last valid config, and these commands talk to it)."""
    cfg, elsewhere = config.load_part(path, top_keys, endpoint_name)
    if elsewhere:
        what = " and ".join([", ".join(top_keys)] + ([f"endpoint {endpoint_name}"] if endpoint_name else []))
        print(f"pfrest {command}: warning: {path} is not valid ({len(elsewhere)} problem(s); pfrest check -c "
              f"{path} lists them, and a pfrest serve keeps its last valid config): using only {what}",
              file=sys.stderr)
    return cfg


def _stats(args) -> int:
    from pfrest.commands import stats
    return stats.run(_load_part("stats", args.config, ("metrics-address",)))


def _cache(args) -> int:
    from pfrest.commands import cache
    cfg = _load_part("cache", args.config, ("control-socket",), args.name)
    return cache.run(cfg, args.action, args.name, [os.fsencode(k) for k in args.keys], args.mapname)


def _handle(args) -> int:
    from pfrest.commands import handle
    return handle.run(args.config, args.name, args.log_file)


COMMANDS = {"handle": _handle, "check": _check, "query": _query, "serve": _serve, "demo": _demo,
            "stats": _stats, "cache": _cache, "init": _init}


def _parse(argv):
    """The parsed command line.  ``cache``'s KEYs may come on either side of ``--map`` (``cache drop
    aliases --map virtual info@example.com``, as the README writes it): argparse gives the KEYs after an
    option back as unrecognised, and they are KEYs like the others; anything else unrecognised is an error."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "cache" and not any(word.startswith("-") for word in extra):
        args.keys += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = handle_argv(argv) or _parse(argv)
    try:
        return COMMANDS[args.command](args)
    except config.ConfigError as exc:   # check, query, stats, cache (an unknown endpoint too), init
        print("\n".join(exc.problems), file=sys.stderr)
        return os.EX_CONFIG
