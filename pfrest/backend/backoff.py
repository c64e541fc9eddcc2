"""Up or down, and when to try again: the health of a backend target (client.py) and of the shared
cache (cache/sharedhealth.py).

A failure makes it down for ``first`` seconds; when that has passed, one caller at a time may try
it again (``usable`` says yes once, to that caller), and while those retries fail the wait doubles,
up to ``most``.  Failures of calls that were under way while it was already down change nothing;
a success makes it up.
"""


class Backoff:
    __slots__ = ("down_until", "backoff", "probing", "first", "most")

    def __init__(self, first: float, most: float):
        self.first, self.most = first, most
        self.down_until, self.backoff, self.probing = 0.0, 0.0, False   # 0: up

    def usable(self, now: float) -> bool:
        """Up, or its back-off has run out and no other caller retries it yet (this one does)."""
        if not self.down_until:
            return True
        if self.probing or now < self.down_until:
            return False
        self.probing = True
        return True

    def succeeded(self):
        self.down_until, self.backoff, self.probing = 0.0, 0.0, False

    def failed(self, now: float):
        """Down for ``first`` seconds, or twice as long as before when a retry after the back-off
        failed; failures of calls under way while it is already down change nothing."""
        self.probing = False
        if not self.down_until:
            self.backoff = self.first
        elif now >= self.down_until:
            self.backoff = min(self.backoff * 2, self.most)
        else:
            return
        self.down_until = now + self.backoff
