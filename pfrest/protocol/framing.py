"""What an incremental protocol decoder hands to the dialogue besides requests.

Decoders (tcptable, socketmap, policy) are pure: ``feed(bytes)`` returns, in order, requests to answer,
``Reject`` items (a protocol-level answer that needs no backend call) and at most one final ``Close``
(the stream can no longer be trusted: drop the connection without a reply).
"""

from typing import NamedTuple


class Reject(NamedTuple):
    reply: bytes  # the exact bytes to send back
    why: str      # for the log


class Close(NamedTuple):
    why: str      # for the log
