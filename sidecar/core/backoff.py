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


@dataclass(frozen=True)
class ThrottleSchedule:
    """Where the k-th retry after a ThrottlingException lands, measured from the first attempt.

    A throttle at start-up means other pods of the same account are registering at the same
    moment (RegisterUsage allows 5 requests/s per account and region), typically a whole fleet
    started together. Retry k is drawn uniformly from slot k: [0, e1), [e1, e2), [e2, e3) seconds
    after the first attempt, so each wave of retries lands after the previous one instead of on
    top of it; beyond the last edge, exponential full jitter starting from the last slot's width,
    capped at `cap`. The default edges were tuned
    with benchmarks/fleet.py for 200 pods starting at once (see the README for other sizes).
    """

    edges: tuple[float, ...] = (25.0, 40.0, 43.0)
    cap: float = 60.0

    def delay(self, throttles: int, started: float, now: float, rng: Callable[[], float]) -> float:
        """Seconds to wait after the `throttles`-th consecutive throttle (1-based)."""
        if throttles <= len(self.edges):
            low = self.edges[throttles - 2] if throttles >= 2 else 0.0
            high = self.edges[throttles - 1]
            return max(0.0, started + low + rng() * (high - low) - now)
        last_slot = self.edges[-1] - (self.edges[-2] if len(self.edges) > 1 else 0.0)
        return Backoff(base=last_slot, cap=self.cap).delay(throttles - len(self.edges), rng)
