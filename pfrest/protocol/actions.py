"""Policy actions: which ``action=`` values Postfix reads the way they were meant.

Postfix's smtpd reads some values in surprising ways (protocol reference P7, P8): an empty action and an
all-numeric one (``550``) *permit* the mail, a multi-line one desynchronises the protocol, and with
SMTPUTF8 a non-UTF-8 one makes smtpd fall back to its default action.  Both the actions a backend sends
and the error actions an admin configures go through this module.
"""

import re

# What pfrest answers when the backend fails, unless configured otherwise: a temporary refusal that
# only applies if the mail would otherwise be accepted.  A backend fault must never accept or bounce mail.
DEFAULT_TEMPORARY = "DEFER_IF_PERMIT Policy service temporarily unavailable"
DEFAULT_PERMANENT = "DEFER_IF_PERMIT Policy service misconfigured"

# First words smtpd's check_table_result() knows (case-insensitive), from access(5).
KNOWN_WORDS = frozenset("""
    OK RELAY DUNNO REJECT DEFER DEFER_IF_REJECT DEFER_IF_PERMIT BCC DISCARD FILTER HOLD PREPEND
    REDIRECT INFO WARN
""".split())

_NUMERIC_REPLY = re.compile(r"^[45]\d\d\s+\S")
# Action words, restriction and class names are all of this shape; an HTML or JSON error page is not.
_FIRST_WORD = re.compile(r"^[A-Za-z0-9_]+(?:[ \t]|$)")
_STATUS_WORD = re.compile(r"^\d+$")


def problem(action: str):
    """Why smtpd would not read this action as meant, or None.  Applies to backend answers."""
    if not action:
        return "empty action (Postfix would accept the mail)"
    if any(c in action for c in "\r\n\0"):
        return "action spans more than one line"
    if action != action.strip():
        return "action has leading or trailing white space"
    if _STATUS_WORD.match(action):
        return "all-numeric action (Postfix would accept the mail)"
    if not _FIRST_WORD.match(action):
        return "does not start with an action word"
    return None


def check(action: str):
    """Stricter test for configured error actions: also the first word must be an action smtpd knows."""
    message = problem(action)
    if message:
        return message
    try:
        action.encode("ascii")
    except UnicodeEncodeError:
        return "must be ASCII"
    word = action.split(None, 1)[0]
    if word.isdigit():
        if not _NUMERIC_REPLY.match(action):
            return "a numeric reply needs a 4xx or 5xx code and a text, e.g. \"451 4.3.0 Try again later\""
        return None
    if word.upper() not in KNOWN_WORDS:
        return f"unknown action {word!r} (Postfix would answer 451 Server configuration error)"
    return None


def from_body(body: bytes):
    """The action a backend's 200 body asks for, or None when Postfix would misread it.

    The body is trimmed, and an ``action=`` prefix (what other connectors' backends send) is dropped.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.strip()
    if text.startswith("action="):
        text = text[len("action="):].strip()
    return None if problem(text) else text
