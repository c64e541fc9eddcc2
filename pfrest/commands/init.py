"""``pfrest init``: write a starting config for the modes asked, with a random auth token, and print the
Postfix lines (main.cf, and master.cf for spawn) that go with the endpoints it wrote.

The file is created, never replaced: O_EXCL refuses an existing file and, with O_NOFOLLOW, a symbolic link
planted where it goes (exit 73, EX_CANTCREAT, for every reason it cannot be created).  It holds the token,
so only its owner may read it, and the ``pfrest`` account too when that account exists and init runs as root
(the Debian package creates it; ``serve`` then drops to it, as ``user`` says): root:pfrest 0640, as
master.cf.example asks for.  The format follows the file name, as every command reads it: TOML (with
comments) for ``*.toml``, JSON otherwise.  What it writes is validated by config.parse before it is
written, so a bad ``--target`` is refused naming the option (exit 78), and the file passes ``check``.
"""

import grp
import json
import os
import pwd
import secrets
import shutil
import sys

from pfrest import config

EX_CANTCREAT = 73  # sysexits.h; os.EX_CANTCREAT is missing on some platforms
ACCOUNT = "pfrest"  # the account the Debian package creates, and master.cf.example's user=
TOKEN_BYTES = 32    # secrets.token_urlsafe: 43 characters, 256 random bits
REQUEST_TIMEOUT_MS = 2000
LOOPBACK = "127.0.0.1"
DEFAULT_TCP_PORT = 9001  # master.cf.example and pfrest.json.example
SOCKET_DIR = "/var/spool/postfix/private"  # where chrooted Postfix daemons reach unix sockets too

# --modes word -> (endpoint name, mode, port offset under --port-base); the names of pfrest.json.example
MODES = {"tcp": ("domains", config.TCP, 0), "socketmap": ("aliases", config.SOCKETMAP, 1),
         "policy": ("policy", config.POLICY, 2), "auth": ("auth", config.SASL, 3)}
DEFAULT_MODES = "tcp,socketmap,policy"   # SMTP AUTH only when asked for: it needs its own backend route
ALIASES = {"sasl": "auth", "dovecot-sasl": "auth"}
ALL_MODES = ",".join(MODES)
# A spawn service's time limit: a lookup or policy connection lives as long as its Postfix process keeps
# it (an hour is plenty); an smtpd keeps its auth connection for its whole life, and a handle killed at
# the limit fails the next login on it.
TIME_LIMITS = {config.SASL: "86400s"}
DEFAULT_TIME_LIMIT = "3600s"


def parse_modes(text):
    """``tcp,socketmap,policy,auth`` (full mode names too, ``sasl`` for ``auth``) -> the MODES words, in
    that order; ValueError."""
    words = {w.strip().replace("-lookup", "") for w in text.split(",") if w.strip()}
    words = {ALIASES.get(w, w) for w in words}
    unknown = words - set(MODES)
    if unknown or not words:
        raise ValueError(f"must be a comma-separated list of {ALL_MODES}")
    return [w for w in MODES if w in words]


def document(modes, target, port_base=None, user=None):
    """The config as a dict: one endpoint per mode, its target ``{target}/{name}``.  Without port_base,
    the bindings of pfrest.json.example (tcp on 127.0.0.1:9001, unix sockets under Postfix's private/);
    with it, every endpoint on loopback TCP ports port_base, +1, +2."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    endpoints = []
    for word in modes:
        name, mode, offset = MODES[word]
        ep = {"name": name, "mode": mode, "target": f"{target.rstrip('/')}/{name}"}
        if port_base is not None:
            ep.update({"bind-address": LOOPBACK, "bind-port": port_base + offset})
        elif mode == config.TCP:  # a tcp: table can only reach an inet service
            ep.update({"bind-address": LOOPBACK, "bind-port": DEFAULT_TCP_PORT})
        else:  # 0666: Postfix's daemons connect as postfix, and private/ already keeps others out
            ep.update({"bind-path": f"{SOCKET_DIR}/pfrest-{name}", "bind-mode": "0666"})
        ep.update({"auth-token": token, "request-timeout": REQUEST_TIMEOUT_MS})
        endpoints.append(ep)
    doc = {"user": user} if user else {}
    doc["endpoints"] = endpoints
    return doc


def to_toml(doc):
    """The document as TOML, with comments saying what each endpoint is for."""
    def value(v):
        return json.dumps(v)  # a JSON string or integer is a valid TOML one
    lines = ["# pfrest config written by `pfrest init`; every key: man pfrest.json",
             "# auth-token is sent as X-Auth-Token: give the backend the same value, keep this file private."]
    if "user" in doc:
        lines += ["", "# serve drops to this account after binding its sockets", f"user = {value(doc['user'])}"]
    for ep in doc["endpoints"]:
        lines += ["", f"# {ep['mode']}: {_usage(ep)}", "[[endpoints]]"]
        lines += [f"{key} = {value(v)}" for key, v in ep.items()]
    return "\n".join(lines) + "\n"


def _usage(ep):
    return {config.TCP: "a tcp: table (GET target?key=)",
            config.SOCKETMAP: "a socketmap: table (GET target?name=MAP&key=)",
            config.POLICY: "check_policy_service (a form-encoded request body)",
            config.SASL: "SMTP AUTH, smtpd_sasl_type = dovecot (a form-encoded POST per login)"}[ep["mode"]]


def _service(ep):
    """(how main.cf names the endpoint's socket, the master.cf service name and type)."""
    if "bind-path" in ep:
        short = ep["bind-path"][len(SOCKET_DIR) + 1:] if ep["bind-path"].startswith(SOCKET_DIR + "/") else None
        return f"unix:private/{short}" if short else f"unix:{ep['bind-path']}", short, "unix"
    address = f"{ep['bind-address']}:{ep['bind-port']}"
    return f"inet:{address}", address, "inet"


def postfix_lines(doc, path):
    """What to add to main.cf (for serve and spawn alike), and master.cf for spawn instead of serve."""
    main, master, limits = [], [], []
    program = _program()
    for ep in doc["endpoints"]:
        where, service, kind = _service(ep)
        if ep["mode"] == config.TCP:
            main.append(f"    virtual_mailbox_domains = tcp:{where[len('inet:'):]}")
        elif ep["mode"] == config.SOCKETMAP:
            main.append(f"    virtual_alias_maps = socketmap:{where}:{ep['name']}")
        elif ep["mode"] == config.SASL:   # smtpd_sasl_path: relative to the queue directory, or inet:
            main += ["    smtpd_sasl_auth_enable = yes", "    smtpd_sasl_type = dovecot",
                     f"    smtpd_sasl_path = {where[len('unix:'):] if where.startswith('unix:') else where}",
                     "    smtpd_tls_auth_only = yes"]
        else:
            main.append("    smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination,")
            main.append(f"        check_policy_service {where}")
        if service:
            master.append(f"    {service} {kind} {'n' if kind == 'inet' else '-'} n n - 0 spawn")
            master.append(f"      user={ACCOUNT} argv={program} handle -c {path} {ep['name']}")
            limits.append(f"    {service}_time_limit = {TIME_LIMITS.get(ep['mode'], DEFAULT_TIME_LIMIT)}")
    lines = ["main.cf (use the tables wherever Postfix takes a table; these are examples):", "", *main, "",
             f"then `pfrest check -c {path}` and `postfix reload`; run the endpoints with",
             f"`pfrest serve -c {path}` (systemd: pfrest.service), or instead let Postfix start `pfrest handle`",
             "per connection (spawn): these services in master.cf, and in main.cf the time limits:", "",
             *master, "", *limits]
    return "\n".join(lines)


def _program():
    """The absolute path spawn's argv= needs: this very pfrest when run as ``pfrest`` (a venv's, say),
    else the first on PATH, else the Debian package's."""
    if os.path.basename(sys.argv[0]) == "pfrest" and os.path.isabs(sys.argv[0]):
        return sys.argv[0]
    return shutil.which("pfrest") or "/usr/bin/pfrest"


def _owner(user):
    """(file mode, group id or -1): root:pfrest 0640 when serve will run as pfrest, else 0600."""
    if user:
        return 0o640, pwd.getpwnam(user).pw_gid
    return 0o600, -1


def default_user():
    """``pfrest`` when init runs as root and the account exists: serve must not stay root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(ACCOUNT)
    except KeyError:
        return None
    return ACCOUNT


def create(path, text, user):
    """Create the file, never replacing one nor following a link; OSError when it cannot."""
    mode, gid = _owner(user)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        if gid != -1:
            os.fchown(fd, 0, gid)
        os.fchmod(fd, mode)  # the umask may have taken bits the admin expects (group read)
        os.write(fd, text.encode("utf-8"))
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def run(path, modes, target, port_base=None, out=None) -> int:
    out = out or sys.stdout
    path = os.path.abspath(path)
    user = default_user()
    doc = document(modes, target, port_base, user)
    try:
        config.parse(doc, path)
    except config.ConfigError as exc:  # only --target can be wrong: name the option, not the key it fills
        problems = "; ".join(dict.fromkeys(p.split(": ", 1)[-1] for p in exc.problems))  # once, not per endpoint
        print(f"pfrest init: --target {target}: {problems}", file=sys.stderr)
        return os.EX_CONFIG
    text = to_toml(doc) if path.endswith(".toml") else json.dumps(doc, indent=2) + "\n"
    try:
        create(path, text, user)
    except FileExistsError:
        print(f"pfrest init: {path} exists; it was left as it is (move it away, or pick another -c FILE)",
              file=sys.stderr)
        return EX_CANTCREAT
    except FileNotFoundError:
        print(f"pfrest init: cannot create {path}: its directory does not exist "
              f"(mkdir -p {os.path.dirname(path)} first)", file=sys.stderr)
        return EX_CANTCREAT
    except OSError as exc:
        print(f"pfrest init: cannot create {path}: {exc.strerror}", file=sys.stderr)
        return EX_CANTCREAT
    group = f", group {grp.getgrgid(_owner(user)[1]).gr_name}" if user else ""
    print(f"pfrest init: wrote {path} (mode {_owner(user)[0]:04o}{group}): {', '.join(modes)};\n"
          f"its auth-token is new and random: give your backend the same (X-Auth-Token)\n", file=out)
    print(postfix_lines(doc, path), file=out)
    return 0
