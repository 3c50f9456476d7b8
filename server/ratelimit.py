"""Per-user token buckets (PROTOCOL.md §5, ``rate_limited``)."""

from __future__ import annotations

import math
import time

__all__ = ["RateLimiter"]


class RateLimiter:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst`` saved."""

    def __init__(self, rate: float, burst: int, max_keys: int = 1_000_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float | None = None) -> int:
        """Take one token; return 0 when allowed, else milliseconds to wait."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0 - 1e-9:  # float slack: waiting retry_after_ms is always enough
            if key not in self._buckets and len(self._buckets) >= self._max_keys:
                self._buckets.clear()  # bounded memory; forgetting only grants a fresh burst
            self._buckets[key] = (tokens - 1.0, now)
            return 0
        self._buckets[key] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate * 1000))

    def sweep(self, now: float | None = None) -> None:
        """Drop buckets that have refilled: they hold nothing worth keeping."""
        now = time.monotonic() if now is None else now
        full = [
            k
            for k, (t, last) in self._buckets.items()
            if t + (now - last) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]
