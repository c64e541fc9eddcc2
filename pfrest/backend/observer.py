"""What the HTTP side tells whoever counts (the server's metrics).  The default counts nothing.

``exchange`` is called once per HTTP exchange attempted (a failover to another target is a second
one), ``cache`` once per cache event.
"""


class Observer:
    def exchange(self, target: str, outcome: str, seconds: float):
        """``target``: the URL asked; ``outcome``: "ok" (an HTTP answer came, whatever its status) or the
        Failure kind (timeout, refused, reset, dns, tls, too-large, protocol, internal)."""

    def cache(self, event: str):
        """``event``: "hit", "miss", "stale" (an expired answer served because the backend failed),
        "eviction" (an entry dropped to stay within cache-max-entries)."""


NOBODY = Observer()
