"""A real OAuth2 authorization server and a backend that demands its tokens, for pfrest's oauth2 tests:
Authlib's AuthorizationServer (the client credentials grant, RFC 6749 4.4) and ResourceProtector
(Bearer tokens, RFC 6750) on Flask, served by werkzeug on a loopback port.

    python3 tests/oauth_server.py [--lifetime SECONDS] [--port N]   # prints "listening on URL", serves

- POST /token: the token endpoint.  Clients: "pfrest-basic" (client_secret_basic only) and
  "pfrest-post" (client_secret_post only), both with the secret SECRET;
- GET /.well-known/openid-configuration: OIDC discovery, naming /token;
- GET /lookup?key=K: the backend, ["value-of-K"] for a valid token, else 401 with a Bearer challenge;
  POST /policy: "DUNNO" likewise; POST /login: a dovecot-sasl backend (password "good");
- /admin/stats (tokens issued, by client; lookups answered; requests refused), POST /admin/revoke (every
  token issued so far), POST /admin/fail?status=N (the token endpoint answers N, with a body that must
  never reach pfrest's log; 0 ends it), POST /admin/delay?seconds=S (the token endpoint takes S
  seconds).  Test-only: it listens on loopback only.
"""

import argparse
import json
import secrets
import sys
import threading
import time

from authlib.integrations.flask_oauth2 import AuthorizationServer, ResourceProtector, current_token
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6750 import BearerTokenValidator
from flask import Flask, jsonify, request
from werkzeug.serving import WSGIRequestHandler, make_server

SECRET = "s3cret-client-value-7f2a"
PROVIDER_BODY = "provider-body-must-never-be-logged"
CLIENTS = {"pfrest-basic": "client_secret_basic", "pfrest-post": "client_secret_post"}


class Client(ClientMixin):
    def __init__(self, client_id):
        self.client_id, self.method = client_id, CLIENTS[client_id]

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return None

    def get_allowed_scope(self, scope):
        return scope or ""

    def check_redirect_uri(self, redirect_uri):
        return False

    def check_client_secret(self, client_secret):
        return secrets.compare_digest(client_secret, SECRET)

    def check_endpoint_auth_method(self, method, endpoint):
        return method == self.method

    def check_response_type(self, response_type):
        return False

    def check_grant_type(self, grant_type):
        return grant_type == "client_credentials"


class Grant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = list(CLIENTS.values())   # each client allows only its own (above)


class Token(TokenMixin):
    def __init__(self, data):
        self.data, self.issued, self.revoked = data, time.time(), False

    def check_client(self, client):
        return client.get_client_id() == self.data["client_id"]

    def get_scope(self):
        return self.data.get("scope", "")

    def get_expires_in(self):
        return self.data["expires_in"]

    def is_expired(self):
        return time.time() > self.issued + self.data["expires_in"]

    def is_revoked(self):
        return self.revoked


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.tokens = {}
        self.issued = {}          # client id -> tokens issued
        self.scopes = []          # the scope of each token issued
        self.lookups = self.refused = 0
        self.fail = 0
        self.delay = 0.0


def create_app(lifetime):
    state = State()
    app = Flask(__name__)
    app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {"client_credentials": lifetime}

    def save_token(token, req):
        with state.lock:
            state.tokens[token["access_token"]] = Token(dict(token, client_id=req.client.client_id))
            state.issued[req.client.client_id] = state.issued.get(req.client.client_id, 0) + 1
            state.scopes.append(token.get("scope", ""))

    server = AuthorizationServer(app, query_client=lambda cid: Client(cid) if cid in CLIENTS else None,
                                 save_token=save_token)
    server.register_grant(Grant)

    class Validator(BearerTokenValidator):
        def authenticate_token(self, token_string):
            return state.tokens.get(token_string)

    require = ResourceProtector()
    require.register_token_validator(Validator())


    @app.after_request
    def refused(response):
        if response.status_code == 401 and request.path in ("/lookup", "/policy"):
            with state.lock:
                state.refused += 1
        return response

    @app.route("/token", methods=["POST"])
    def token():
        if state.delay:
            time.sleep(state.delay)
        if state.fail:
            return PROVIDER_BODY + " " + SECRET, state.fail
        return server.create_token_response()

    @app.route("/.well-known/openid-configuration")
    def discovery():
        base = request.host_url.rstrip("/")
        return jsonify(issuer=base, token_endpoint=base + "/token")

    @app.route("/lookup")
    @require()
    def lookup():
        with state.lock:
            state.lookups += 1
        return jsonify([f"value-of-{request.args.get('key', '')}"])

    @app.route("/policy", methods=["POST"])
    @require()
    def policy():
        with state.lock:
            state.lookups += 1
        return "DUNNO"

    @app.route("/login", methods=["POST"])
    @require()
    def login():
        """dovecot-sasl's backend: 200 for the password "good", a plain 401 (no challenge) for another."""
        with state.lock:
            state.lookups += 1
        return ("", 200) if request.form.get("password") == "good" else ("", 401)

    @app.route("/admin/stats")
    def stats():
        with state.lock:
            return jsonify(issued=state.issued, total=sum(state.issued.values()), scopes=state.scopes,
                           lookups=state.lookups, refused=state.refused)

    @app.route("/admin/revoke", methods=["POST"])
    def revoke():
        with state.lock:
            for token in state.tokens.values():
                token.revoked = True
        return "ok"

    @app.route("/admin/fail", methods=["POST"])
    def fail():
        state.fail = int(request.args["status"])
        return "ok"

    @app.route("/admin/delay", methods=["POST"])
    def delay():
        state.delay = float(request.args["seconds"])
        return "ok"

    return app


class Quiet(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lifetime", type=int, default=3600)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = make_server("127.0.0.1", args.port, create_app(args.lifetime), threaded=True, request_handler=Quiet)
    print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
