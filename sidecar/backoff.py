"""Retry delays: capped exponential backoff with full jitter.

Full jitter (delay drawn uniformly from [0, min(cap, base * 2**n)]) spreads a fleet of pods that
failed together, which is what RegisterUsage's 5 requests/s per account needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    base: float = 1.0
    cap: float = 60.0

    def ceiling(self, failures: int) -> float:
        """Upper bound of the delay after `failures` consecutive failures (1-based)."""
        exponent = min(max(failures, 1) - 1, 60)
        return float(min(self.cap, self.base * (2**exponent)))

    def delay(self, failures: int, rng: Callable[[], float]) -> float:
        """A delay in [0, ceiling); `rng` returns floats in [0, 1)."""
        return rng() * self.ceiling(failures)


def jittered(period: float, fraction: float, rng: Callable[[], float]) -> float:
    """`period` moved by up to ±`fraction` of itself, so hourly calls of a fleet do not align."""
    return period * (1.0 + fraction * (2.0 * rng() - 1.0))
