"""The lookup backend as an ASGI app (uvicorn) and a WSGI app (gunicorn), for tests/test_pipelining.py.

GET /lookup?key=K answers 200 ["value-of-K"], or 404 for a key starting "missing"; /policy (any method) answers
"OK policy-RECIPIENT". X-Request-Id is echoed unless the environment sets LOOKUP_NO_ECHO (a backend that
does not echo it, which pfrest must never pipeline to).
"""

import json
import os
from urllib.parse import parse_qsl

ECHO = not os.environ.get("LOOKUP_NO_ECHO")


def answer(path, query, body):
    """(status, content type, body) for a request."""
    if path == "/policy":
        recipient = dict(parse_qsl(body.decode("latin-1"))).get("recipient", "")
        return 200, "text/plain", b"OK policy-" + recipient.encode("latin-1")
    key = dict(parse_qsl(query)).get("key", "")
    if key.startswith("missing"):
        return 404, "text/plain", b""
    return 200, "application/json", json.dumps(["value-of-" + key]).encode()


async def app(scope, receive, send):
    """ASGI (uvicorn)."""
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    status, kind, payload = answer(scope["path"], scope["query_string"].decode("latin-1"), body)
    headers = [(b"content-type", kind.encode()), (b"content-length", str(len(payload)).encode())]
    request_id = dict(scope["headers"]).get(b"x-request-id")
    if ECHO and request_id:
        headers.append((b"x-request-id", request_id))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def wsgi(environ, start_response):
    """WSGI (gunicorn)."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    status, kind, payload = answer(environ["PATH_INFO"], environ.get("QUERY_STRING", ""), body)
    headers = [("Content-Type", kind), ("Content-Length", str(len(payload)))]
    request_id = environ.get("HTTP_X_REQUEST_ID")
    if ECHO and request_id:
        headers.append(("X-Request-Id", request_id))
    start_response(f"{status} {'OK' if status == 200 else 'Not Found'}", headers)
    return [payload]
