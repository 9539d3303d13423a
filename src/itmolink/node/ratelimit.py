"""Token buckets bounding what one partner can make a node do (PROTOCOL.md §2.5)."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second on average, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float, count: int = 1) -> bool:
        """Take ``count`` tokens if the bucket holds them; else take none."""
        # A clock that went back refills nothing now, and refills from its new
        # reading on (not only once it has caught up with the old one).
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens < count:
            return False
        self.tokens -= count
        return True


class RateLimited(Exception):
    """A request over a partner's agreed rate: refused unprocessed and unrecorded,
    with no signed reply; the partner retries it later (PROTOCOL.md §2.5)."""
