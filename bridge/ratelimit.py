"""Token buckets: ``rate`` tokens a second on average, bursts of up to ``burst`` at once.

A :class:`RateLimiter` keeps one bucket per key (a bearer token, a webhook slug). Keys come from
the config, never from a request, so the number of buckets is bounded by the config. Buckets
live in one process: N ingress processes behind a load balancer allow N times the rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """Holds up to ``burst`` tokens, refilled at ``rate`` a second; a request takes one, a batch of
    N events takes N.

    A cost over the burst needs a full bucket and leaves it in debt (below zero) that later
    requests wait out, so a large batch goes at all and the average rate still holds.
    """

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self, cost: int = 1) -> float:
        """Take ``cost`` tokens and return 0.0, or take nothing and return the seconds until they are due."""
        wait = self.due(cost)
        if not wait:
            self._tokens -= cost
        return wait

    def give_back(self, cost: int = 1) -> None:
        """Return ``cost`` tokens taken for what turned out to cost nothing (at most a full bucket)."""
        self.due()  # refill up to now first
        self._tokens = min(self.burst, self._tokens + cost)

    def due(self, cost: int = 1) -> float:
        """The seconds until ``cost`` tokens may be taken (0.0: now); takes nothing."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        need = min(cost, self.burst)
        return 0.0 if self._tokens >= need else (need - self._tokens) / self.rate


class RateLimiter:
    """One :class:`TokenBucket` per key, all with the same rate and burst."""

    def __init__(self, rate: float, burst: int | None = None, *, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else default_burst(rate)
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, cost: int = 1) -> float:
        """0.0 when ``key`` may go on (its ``cost`` tokens taken); otherwise the seconds until it may."""
        return self._bucket(key).take(cost)

    def due(self, key: str, cost: int = 1) -> float:
        """The seconds until ``key`` may spend ``cost`` tokens (0.0: now); takes nothing."""
        return self._bucket(key).due(cost)

    def _bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, clock=self._clock)
        return bucket


def default_burst(rate: float) -> int:
    """One second's worth of requests, at least one."""
    return max(1, math.ceil(rate))


def retry_after(wait: float) -> int:
    """Whole seconds for a ``Retry-After`` header: rounded up, at least 1."""
    return max(1, math.ceil(wait))
