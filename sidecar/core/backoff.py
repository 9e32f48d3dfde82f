"""Retry delays: capped exponential backoff with full jitter.

Full jitter (delay drawn uniformly from [0, min(cap, base * 2**n)]) spreads a fleet of pods that
failed together, which is what RegisterUsage's 5 requests/s per account needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# RegisterUsage's quota: 5 requests/s per account and region, shared by every pod of the account.
QUOTA_PER_SECOND = 5.0


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
    started together. Retry k is drawn uniformly from window k, the windows following each other
    from the first attempt, so each wave of retries lands after the previous one instead of on
    top of it.

    Adaptive (no `edges`, the default): the first window is `first` seconds wide; each next one
    is widened by `widen` times what the pod has seen so far (the time since its first attempt,
    all of it throttled: at 5 calls/s that is at least 5 calls/s of other pods for that long).
    `widen` shrinks by `shrink` per window down to `least`, so the window that finishes the
    fleet overshoots the time the fleet needs by about that fraction. No window is wider than
    `widest`. Small fleets are through in seconds; large fleets stay close to N/5 s, at the cost
    of more calls per pod (benchmarks/fleet.py shows N from 20 to 1,000).

    Fixed (`edges` given, MARKETPLACE_THROTTLE_SCHEDULE_SECONDS): slots [0, e1), [e1, e2), ...
    tuned for one fleet size; beyond the last edge, exponential full jitter starting from the
    last slot's width, capped at `cap`.

    Hinted (`fleet` given, MARKETPLACE_FLEET_SIZE): one throttle bit cannot tell 20 pods from
    1,000, so the seller says how many can start together. The first retry is drawn from
    [now, `hinted_end`], `spread` x fleet / quota seconds after the first attempt (the fleet
    at ~83 % of the quota: few of them are throttled twice). A pod throttled again while that
    window runs retries within what is left of it plus `first` seconds (the spare sixth of the
    quota); throttled after it, the fleet is larger than the hint, and the adaptive windows
    take over as if the fleet had started when the hinted window ended. The first call is
    never delayed, so a lone replacement pod registers at once; but a pod throttled once by
    something else in the account (another product) waits up to `hinted_end`.
    """

    edges: tuple[float, ...] = ()
    fleet: int | None = None
    cap: float = 60.0
    first: float = 5.0
    widen: float = 0.8
    shrink: float = 0.85
    least: float = 0.2
    widest: float = 600.0
    spread: float = 1.2

    def __post_init__(self) -> None:
        if self.fleet is not None and (self.fleet < 1 or self.edges):
            raise ValueError("fleet must be >= 1 and cannot be combined with fixed edges")

    def _windows(self) -> Iterator[tuple[float, float]]:
        low, high, widen = 0.0, self.first, self.widen
        while True:
            yield low, high
            low, high = high, high + min(self.widest, widen * high)
            widen = max(self.least, widen * self.shrink)

    def window(self, throttles: int) -> tuple[float, float]:
        """[start, end) of the adaptive window for retry `throttles` (1-based), in seconds
        after the first attempt."""
        return next(itertools.islice(self._windows(), max(throttles, 1) - 1, None))

    def hinted_end(self) -> float:
        """End of the first retry's window with a fleet hint (never shorter than adaptive's)."""
        fleet = self.fleet or 1
        return max(self.first, self.spread * fleet / QUOTA_PER_SECOND)

    def _hinted(self, throttles: int, elapsed: float, rng: Callable[[], float]) -> float:
        end = self.hinted_end()
        if elapsed < end:
            high = end if throttles == 1 else end + self.first
            return rng() * (high - elapsed)
        since = elapsed - end  # past the hinted window: the adaptive window after this one
        windows = self._windows()
        for _, high in windows:
            if high > since:
                break
        low, high = next(windows)
        return end + low + rng() * (high - low) - elapsed

    def delay(self, throttles: int, started: float, now: float, rng: Callable[[], float]) -> float:
        """Seconds to wait after the `throttles`-th consecutive throttle (1-based)."""
        if self.fleet is not None:
            return self._hinted(throttles, max(0.0, now - started), rng)
        if not self.edges:
            low, high = self.window(throttles)
            elapsed = now - started
            if elapsed >= high:  # the call came back after its whole window: same width from now
                low, high = elapsed, elapsed + (high - low)
            low = max(low, elapsed)
            return low + rng() * (high - low) - elapsed
        if throttles <= len(self.edges):
            low = self.edges[throttles - 2] if throttles >= 2 else 0.0
            high = self.edges[throttles - 1]
            return max(0.0, started + low + rng() * (high - low) - now)
        last_slot = self.edges[-1] - (self.edges[-2] if len(self.edges) > 1 else 0.0)
        return Backoff(base=last_slot, cap=self.cap).delay(throttles - len(self.edges), rng)
