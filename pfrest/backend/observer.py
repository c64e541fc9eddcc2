"""What the HTTP side tells whoever counts (the server's metrics).  The default counts nothing.

``exchange`` is called once per HTTP exchange attempted (a failover to another target is a second
one), ``cache`` once per cache event, ``shared`` once per event of the shared cache (cache-url),
``stray`` once per answer that was not its request's.
"""


class Observer:
    def exchange(self, target: str, outcome: str, seconds: float):
        """``target``: the URL asked; ``outcome``: "ok" (an HTTP answer came, whatever its status) or the
        Failure kind (timeout, refused, reset, dns, tls, too-large, protocol, stray, internal)."""

    def cache(self, event: str):
        """``event``: "hit", "miss", "stale" (an expired answer served because the backend failed),
        "eviction" (an entry dropped to stay within cache-max-entries), "drop" (an entry dropped by
        ``pfrest cache``)."""

    def shared(self, event: str):
        """``event``: "hit" (a local miss the shared store answered), "miss" (it had no fresh entry),
        "error" (a call to it that failed or timed out), "skip" (a local miss that did not ask it:
        it was skipped after failing); per key read, "read-primary" or "read-replica" (cache-read-url)."""

    def stray(self, target: str):
        """``target`` sent an answer that was not its request's, and the connection was closed: one
        with another request's X-Request-Id (or none, with require-request-id), or bytes on an idle
        connection (a backend that answers twice)."""


NOBODY = Observer()
