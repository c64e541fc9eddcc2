#!/usr/bin/env python3
"""A pfrest backend in Flask: the same answers as stdlib_backend.py (its Table), from the same table.

    PFREST_AUTH_TOKEN=<the config's auth-token> python3 flask_backend.py [--listen 127.0.0.1:8081]
        [--table table.json]

Run this way it uses Werkzeug's threaded server, which closes the connection after every answer (pfrest
then opens a new one per request: correct, a little slower). In production, serve `app` with a WSGI server
that keeps connections alive and sets TCP_NODELAY (see the Nagle trap in stdlib_backend.py), e.g.
`PFREST_AUTH_TOKEN=... waitress-serve --listen=127.0.0.1:8081 flask_backend:app` (the table: PFREST_TABLE).
"""

import os
import sys

from flask import Flask, Response, request
from werkzeug.serving import WSGIRequestHandler, make_server

from stdlib_backend import TABLE, TOKEN_VARIABLE, Table, options, serve


def create_app(table, token):
    app = Flask(__name__)

    @app.route("/<path:path>", methods=["GET", "POST"])
    def answer(path):
        target = request.full_path if request.query_string else request.path
        status, content_type, body = table.answer(request.method, target, request.get_data(),
                                                  request.headers.get("X-Auth-Token"), token)
        response = Response(body, status=status, content_type=content_type)
        request_id = request.headers.get("X-Request-Id")
        if request_id:  # the echo lets pfrest prove that the answer is this request's
            response.headers["X-Request-Id"] = request_id
        return response

    return app


class Handler(WSGIRequestHandler):
    # The Nagle trap (stdlib_backend.py says more): the head and the body are two writes; without
    # TCP_NODELAY the body waits for the client's delayed ACK of the head (up to 40 ms).
    disable_nagle_algorithm = True


def main(argv=None):
    host, port, table, token = options("pfrest reference backend (Flask)", argv)
    # threaded: a slow request does not hold up the others (pfrest sends several at once)
    server = make_server(host, port, create_app(table, token), threaded=True, request_handler=Handler)
    return serve(server, host)


if __name__ == "__main__":
    sys.exit(main())
elif os.environ.get(TOKEN_VARIABLE):  # imported by a WSGI server (waitress-serve flask_backend:app)
    app = create_app(Table(os.environ.get("PFREST_TABLE", TABLE)), os.environ[TOKEN_VARIABLE])
