#!/usr/bin/env python3
"""A pfrest backend on Python's standard library alone: answers the four modes from a small table.

    PFREST_AUTH_TOKEN=<the config's auth-token> python3 stdlib_backend.py [--listen 127.0.0.1:8081]
        [--table table.json]
    python3 stdlib_backend.py --hash-password < password-file    (a "users" entry for the table)

It follows pfrest's HTTP contract (docs/http-contract.md, "The HTTP contract, for backend authors"):
- GET /domains?key=K (tcp-lookup) and GET /aliases?name=MAP&key=K (socketmap-lookup): the table named by
  `name` (else by the path's last part); 200 with a JSON array of strings when K is in it, else 404.
- /policy (GET or POST, the attributes form-encoded in the body): 200 with the action as text/plain,
  looked up by sender, then recipient, then client_address; DUNNO when none is in the table.
- POST /auth (dovecot-sasl, SMTP AUTH; the login form-encoded in the body): 200 with the user's name as
  the table writes it (a JSON array of one string) when ``username`` is in the table's "users" and
  ``password`` matches its PBKDF2-SHA256 hash, else 401, the same for an unknown user and a wrong
  password, which take the same time (a hash is computed either way, compared in constant time).
- X-Auth-Token must be the token (403 otherwise); X-Request-Id is echoed in every answer.

Keys are looked up in lower case: Postfix does not fold case for tcp: and socketmap: tables.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "table.json")
TOKEN_VARIABLE = "PFREST_AUTH_TOKEN"  # the environment, not argv: ps shows every user the command line
MAX_BODY = 1 << 20  # a policy request is a few hundred bytes; refuse what is no policy request
USERS = "users"     # the table of logins: never answered as a lookup (it holds password hashes)
HASH = "pbkdf2_sha256"
ITERATIONS = 600000  # PBKDF2-HMAC-SHA256: OWASP's 2023 figure; each entry names its own
SALT_BYTES = 16


def hash_password(password: bytes, iterations=ITERATIONS, salt=None) -> str:
    """``pbkdf2_sha256$ITERATIONS$SALT$HASH`` (base64), the form the table's "users" hold."""
    salt = salt or os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    return "$".join((HASH, str(iterations), base64.b64encode(salt).decode(), base64.b64encode(digest).decode()))


def password_matches(password: bytes, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` (hash_password's form) was made from, in constant time."""
    try:
        kind, iterations, salt, digest = stored.split("$")
        salt, digest = base64.b64decode(salt), base64.b64decode(digest)
        iterations = int(iterations)
    except ValueError:
        return False
    if kind != HASH:
        return False
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha256", password, salt, iterations), digest)


# What an unknown user's password is checked against: the same work as a known user's, so that the time
# an answer takes does not tell which user names exist (any salt: nothing matches it).
NOBODY = "$".join((HASH, str(ITERATIONS), base64.b64encode(b"\0" * SALT_BYTES).decode(),
                   base64.b64encode(b"\0" * 32).decode()))


class Table:
    """The answers: {table name: {key: [values]}} for lookups, {"policy": {address: action}}."""

    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        self.maps = {name: {k.lower(): v for k, v in entries.items()} for name, entries in raw.items()}

    def lookup(self, path, params):
        """(status, content type, body) for a tcp or socketmap lookup."""
        name = params.get("name") or path.rstrip("/").rsplit("/", 1)[-1]
        values = self.maps.get(name, {}).get(params.get("key", "").lower()) if name != USERS else None
        if values is None:
            return 404, "text/plain", b""
        return 200, "application/json", json.dumps(values).encode()

    def policy(self, attrs):
        """The action for a policy request: plain text, as Postfix will read it after `action=`."""
        actions = self.maps.get("policy", {})
        for attr in ("sender", "recipient", "client_address"):
            action = actions.get(attrs.get(attr, "").lower())
            if action:
                return action
        return "DUNNO"

    def login(self, form):
        """(status, content type, body) for a login: 200 ["name"] or 401, which says nothing of why."""
        users = self.maps.get(USERS, {})
        name = form.get(b"username", b"").decode("utf-8", "surrogateescape").lower()
        stored = users.get(name)
        good = password_matches(form.get(b"password", b""), stored or NOBODY)
        if stored is None or not good:
            return 401, "text/plain", b""
        return 200, "application/json", json.dumps([name]).encode()

    def answer(self, method, target, body, token, expected_token):
        """(status, content type, body) for one request."""
        if not hmac.compare_digest((token or "").encode(), expected_token.encode()):
            return 403, "text/plain", b"wrong or missing X-Auth-Token"
        parts = urlsplit(target)
        if parts.path.rstrip("/").endswith("/auth"):
            if method != "POST":
                return 405, "text/plain", b"logins are POST"
            return self.login(dict(parse_qsl(body, keep_blank_values=True)))
        if parts.path.rstrip("/").endswith("/policy"):
            attrs = dict(parse_qsl(body.decode("utf-8", "surrogateescape"), keep_blank_values=True))
            return 200, "text/plain", self.policy(attrs).encode("utf-8", "surrogateescape")
        if method != "GET":
            return 405, "text/plain", b"lookups are GET"
        return self.lookup(parts.path, dict(parse_qsl(parts.query, keep_blank_values=True)))


def handler(table, token):
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1: the connection is kept alive between requests, as pfrest keeps it (the default,
        # HTTP/1.0, closes it after each answer: a new TCP connection for every lookup).
        protocol_version = "HTTP/1.1"
        # The Nagle trap: the headers and the body go out as two small writes; with Nagle's algorithm
        # on, the body waits until the client ACKs the headers, and the client delays that ACK (up to
        # 40 ms on Linux) hoping to piggyback it. Every lookup on a kept-alive connection after the
        # first then takes ~44 ms instead of under 1 ms. TCP_NODELAY sends the body at once.
        disable_nagle_algorithm = True

        def do_GET(self):
            self._serve()

        def do_POST(self):
            self._serve()

        def _serve(self):
            # http.server reads no body itself: pfrest sends Content-Length; anything else (chunked)
            # cannot be read here, and the connection cannot go on past a body left unread
            length = self.headers.get("Content-Length") or "0"
            if "Transfer-Encoding" in self.headers or not length.isdigit() or int(length) > MAX_BODY:
                self.close_connection = True
                return self._send(400, "text/plain", b"a body needs a Content-Length up to 1 MiB")
            length = int(length)
            body = self.rfile.read(length)  # always read the body: what is left would be the next request
            self._send(*table.answer(self.command, self.path, body, self.headers.get("X-Auth-Token"), token))

        def _send(self, status, content_type, body):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))  # the framing keep-alive needs
            request_id = self.headers.get("X-Request-Id")
            if request_id:  # the echo lets pfrest prove that the answer is this request's
                self.send_header("X-Request-Id", request_id)
            self.end_headers()
            self.wfile.write(body)

    return Handler


def options(description, argv=None):
    """--listen and --table, and the token from the environment; shared with flask_backend.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--listen", default="127.0.0.1:8081", metavar="HOST:PORT",
                        help="where to listen (default 127.0.0.1:8081; port 0: any free port)")
    parser.add_argument("--table", default=TABLE, metavar="FILE", help="the answers, JSON (default table.json)")
    parser.add_argument("--hash-password", action="store_true",
                        help="read a password from stdin (its first line), print its hash for the table's "
                             "\"users\", and exit")
    args = parser.parse_args(argv)
    if args.hash_password:
        print(hash_password(sys.stdin.buffer.readline().rstrip(b"\n")))
        sys.exit(0)
    host, _, port = args.listen.rpartition(":")
    token = os.environ.get(TOKEN_VARIABLE)
    if not token:
        parser.error(f"set {TOKEN_VARIABLE} to the auth-token of the pfrest config")
    return host.strip("[]") or "127.0.0.1", int(port), Table(args.table), token


def main(argv=None):
    host, port, table, token = options("pfrest reference backend (Python standard library)", argv)
    server = ThreadingHTTPServer((host, port), handler(table, token))
    server.daemon_threads = True  # a kept-alive connection must not keep the process from stopping
    return serve(server, host)


def serve(server, host):
    """Say where (the first line of stdout: the port is the kernel's with port 0), serve until Ctrl-C."""
    print(f"listening on http://{host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
