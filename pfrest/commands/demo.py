"""``pfrest demo``: the four endpoint modes on loopback, answered by a small built-in REST backend, with
the exact commands to try printed.  No config file to write, no root, nothing left behind.

The endpoints are served by the very Server of ``pfrest serve``; the backend is a minihttp app that
follows the HTTP contract (docs/http-contract.md) (and checks the auth token, as a real one should).  Postfix's
``postmap`` needs a main.cf, which a fresh "No configuration" install does not have, so the demo writes
one into a temporary directory and prints ``postmap -c DIR ...``.  It also writes the config it serves
there, as a file any command reads (the ports those the endpoints got), prints it and the ``pfrest query``
command that asks the backend through it; a login (dovecot-sasl) is tried with ``pfrest query`` too, the
demo user's password on stdin (no swaks, no openssl, no Postfix needed).
"""

import asyncio
import hmac
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time

from pfrest import config, log
from pfrest.commands import minihttp
from pfrest.system import eventloop

logger = logging.getLogger("pfrest")

HOST = "127.0.0.1"
DEFAULT_PORT_BASE = 9101
TOKEN = "demo-token"

DOMAINS = ("example.com", "example.org")
ALIASES = {"info@example.com": ["alice@example.com", "bob@example.com"],
           "postmaster@example.com": ["alice@example.com"]}
BLOCKED_SENDER = "spammer@bad.example"

# (name, mode, port offset)
# The one user the demo's login route knows; a demo's password, printed for anyone to try
DEMO_USER, DEMO_PASSWORD = "demo@example.com", "demo-password"
ENDPOINTS = (("domains", config.TCP, 0), ("aliases", config.SOCKETMAP, 1), ("policy", config.POLICY, 2),
             ("auth", config.SASL, 3))


def backend_app(request):
    """The demo's REST backend: GET /domains?key=, GET /aliases?name=&key=, /policy with a form body.
    Every answer echoes the request's X-Request-Id, as the HTTP contract asks: the proof that it is
    that request's answer."""
    status, headers, body = _answer(request)
    request_id = request.headers.get("x-request-id")
    return status, dict(headers, **{"X-Request-Id": request_id}) if request_id else headers, body


def _answer(request):
    if request.headers.get("x-auth-token") != TOKEN:
        return 403, {}, b"wrong or missing X-Auth-Token"
    params = dict(request.query)
    key = params.get("key", "").lower()  # Postfix does not fold case for tcp: and socketmap: tables
    if request.path == "/domains":
        return _json([key]) if key in DOMAINS else (404, {}, b"")
    if request.path == "/aliases":
        return _json(ALIASES[key]) if key in ALIASES else (404, {}, b"")
    if request.path == "/policy":
        attrs = dict(minihttp.form_bytes(request))
        if attrs.get(b"sender", b"").lower() == BLOCKED_SENDER.encode():
            return 200, {"Content-Type": "text/plain"}, b"REJECT Sender blocked by the pfrest demo policy"
        return 200, {"Content-Type": "text/plain"}, b"DUNNO"
    if request.path == "/auth":
        return _login(request)
    return 404, {}, b""


def _login(request):
    """The login route, as the HTTP contract says: a POSTed form; 200 with the canonical user name for
    the demo user's password, 401 for any other (saying nothing of which part was wrong)."""
    if request.method != "POST":
        return 405, {"Allow": "POST"}, b""
    form = dict(minihttp.form_bytes(request))
    user = form.get(b"username", b"").lower()
    # compare_digest: the time taken says nothing of how much of the password was right
    good = hmac.compare_digest(form.get(b"password", b""), DEMO_PASSWORD.encode())
    if user == DEMO_USER.encode() and good:
        return _json([DEMO_USER])
    return 401, {}, b""


def _json(values):
    import json
    return 200, {"Content-Type": "application/json"}, json.dumps(values).encode()


def demo_config(backend_url, port_base, host=HOST):
    """The Config the demo serves; port_base 0 lets the kernel pick every port."""
    endpoints = tuple(
        config.Endpoint(name=name, mode=mode, target=f"{backend_url}/{name}", bind_address=host,
                        bind_port=port_base + offset if port_base else 0, auth_token=TOKEN,
                        request_timeout=2000)
        for name, mode, offset in ENDPOINTS)
    return config.Config(endpoints=endpoints, user_agent="pfrest demo")


def config_file(root, addresses, backend_url):
    """The demo's config as a file (its endpoints where they listen now): (path, text)."""
    endpoints = [{"name": name, "mode": mode, "target": f"{backend_url}/{name}",
                  "bind-address": addresses[name][0], "bind-port": addresses[name][1], "auth-token": TOKEN,
                  "request-timeout": 2000}
                 for name, mode, _ in ENDPOINTS]
    text = json.dumps({"user-agent": "pfrest demo", "endpoints": endpoints}, indent=2) + "\n"
    path = os.path.join(root, "pfrest.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)   # it holds the token
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path, text


def pfrest_command():
    """This pfrest as the user can run it again: the ``pfrest`` script that runs (a venv's, say), else
    this Python with ``-m pfrest``."""
    if os.path.basename(sys.argv[0]) == "pfrest":
        return shlex.quote(os.path.abspath(sys.argv[0]))
    return f"{shlex.quote(sys.executable)} -m pfrest"


def postfix_dir(root):
    """A config directory for postmap: a fresh Debian install with "No configuration" has no
    /etc/postfix/main.cf, and postmap refuses to run without one."""
    path = os.path.join(root, "postfix")
    os.mkdir(path)
    main_cf = os.path.join(path, "main.cf")
    with open(main_cf, "w") as f:
        f.write("# written by `pfrest demo`, removed when it stops\ncompatibility_level = 3.6\n")
    old = time.time() - 10  # Postfix programs keep re-reading a main.cf younger than ~2 s
    os.utime(main_cf, (old, old))
    return path


def postmap_command():
    """``postmap`` as the user can run it: Debian keeps it in /usr/sbin, outside a user's PATH."""
    if shutil.which("postmap"):
        return "postmap"
    for path in ("/usr/sbin/postmap", "/usr/local/sbin/postmap"):
        if os.path.exists(path):
            return path
    return None


def instructions(addresses, confdir, backend_url, config=None):
    """What to print: the config served (path, text), the commands to try and the main.cf lines."""
    (h1, tcp), (h2, sockmap), (h3, policy), (h4, auth) = (addresses[name] for name, _, _ in ENDPOINTS)
    postmap = postmap_command()
    pm = f"{postmap or 'postmap'} -c {shlex.quote(confdir)} -q"
    # double quotes, no $ or backquote: the same in sh, bash and zsh; Python turns \n into newlines
    probe = ('python3 -c "import socket; s = socket.create_connection((\'%s\', %d)); '
             's.sendall(b\'request=smtpd_access_policy\\nclient_address=192.0.2.1\\nsender=%s\\n'
             'recipient=info@example.com\\n\\n\'); print(s.recv(4096).decode().strip())"'
             % (h3, policy, BLOCKED_SENDER))
    lines = [
        f"pfrest demo: four endpoints on loopback, answered by a built-in REST backend at {backend_url}",
        ""]
    if config:
        path, text = config
        lines += [f"The config they are served with, written to {path} (removed when the demo stops):", "",
                  *("    " + line for line in text.rstrip("\n").splitlines()), ""]
    lines += [
        "Look things up with Postfix's own client:" if postmap else
        "Look things up with Postfix's own client (install Postfix first: apt-get install postfix, "
        "and choose \"No configuration\"):",
        "",
        f"    {pm} example.com tcp:{h1}:{tcp}",
        "        prints: example.com",
        f"    {pm} example.net tcp:{h1}:{tcp}",
        "        prints nothing and exits 1: not found",
        f"    {pm} info@example.com socketmap:inet:{h2}:{sockmap}:aliases",
        "        prints: alice@example.com,bob@example.com",
        f"    {pm} postmaster@example.com socketmap:inet:{h2}:{sockmap}:aliases",
        "        prints: alice@example.com",
        "",
        "Ask the backend through an endpoint with pfrest's own client, which shows the URL asked, the",
        "backend's answer and the reply Postfix gets:",
        "",
        f"    {pfrest_command()} query -c {shlex.quote(config[0]) if config else 'FILE'} domains example.com",
        "        prints among them: result: found",
        "",
        "Log in as the demo user (SMTP AUTH as smtpd would ask it; the password on stdin, never in argv):",
        "",
        f"    echo {DEMO_PASSWORD} | {pfrest_command()} query -c {shlex.quote(config[0]) if config else 'FILE'} "
        f"auth {DEMO_USER}",
        "        shows: result: authenticated, and what smtpd answers: 235; exits 0 (another password: "
        "rejected, 535, exit 1)",
        "",
        "Send the policy request that Postfix's smtpd would send for a sender the demo policy blocks:",
        "",
        f"    {probe}",
        "        prints: action=REJECT Sender blocked by the pfrest demo policy",
        "",
        "Or point a Postfix at the demo: in its main.cf, then `postfix reload`:",
        "",
        f"    virtual_mailbox_domains = tcp:{h1}:{tcp}",
        f"    virtual_alias_maps = socketmap:inet:{h2}:{sockmap}:aliases",
        "    smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination,",
        f"        check_policy_service inet:{h3}:{policy}",
        "    smtpd_sasl_auth_enable = yes",
        "    smtpd_sasl_type = dovecot",
        f"    smtpd_sasl_path = inet:{h4}:{auth}",
        "",
        "Each request is logged below (on stderr). Ctrl-C stops the demo.",
    ]
    return "\n".join(lines)


def run(port_base=None, out=None) -> int:
    out = out or sys.stdout
    port_base = DEFAULT_PORT_BASE if port_base is None else port_base
    log.for_foreground()
    backend = minihttp.serve_app(backend_app, host=HOST)
    root = tempfile.mkdtemp(prefix="pfrest-demo-")
    try:
        return eventloop.run(_serve(demo_config(backend.url, port_base), port_base, root, backend.url, out))
    finally:
        backend.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _serve(cfg, port_base, root, backend_url, out):
    from pfrest.process.serving import Server
    from pfrest.system.sockets import BindError
    try:
        server = Server(cfg).start()
    except BindError as exc:
        ports = ", ".join(str(port_base + offset) for _, _, offset in ENDPOINTS)
        print(f"pfrest demo: {exc}\n"
              f"pfrest demo: the demo listens on {HOST} ports {ports}; pick free ones with "
              f"--port-base N (it uses N to N+3), or --port-base 0 for any free ports",
              file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    config = config_file(root, server.addresses, backend_url)
    print(instructions(server.addresses, postfix_dir(root), backend_url, config), file=out, flush=True)
    await stop.wait()
    logger.info("stopping")
    await server.stop(2.0)
    return 0
