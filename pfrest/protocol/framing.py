"""What an incremental protocol decoder hands to the dialogue besides requests.

Decoders (tcptable, socketmap, policy, dovecotauth) are pure: ``feed(bytes)`` returns, in order, requests
to answer, ``Reject`` items (a protocol-level answer that needs no backend call, logged as a problem),
``Prompt`` items (a protocol step that needs none either: a SASL challenge) and at most one final
``Close`` (the stream can no longer be trusted: drop the connection without a reply).
"""

from typing import NamedTuple


class Reject(NamedTuple):
    reply: bytes  # the exact bytes to send back
    why: str      # for the log


class Close(NamedTuple):
    why: str      # for the log


class Prompt(NamedTuple):
    reply: bytes  # a challenge to send as is (SASL): the protocol going on, nothing to log
