from __future__ import annotations

import random

from sidecar.core.backoff import Backoff, jittered


def test_ceiling_doubles_then_caps() -> None:
    b = Backoff(base=1, cap=10)
    assert [b.ceiling(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert b.ceiling(10_000) == 10


def test_full_jitter_stays_within_ceiling_and_spreads() -> None:
    b = Backoff(base=1, cap=60)
    rng = random.Random(1)
    delays = [b.delay(5, rng.random) for _ in range(2000)]
    assert all(0 <= d < 16 for d in delays)
    assert min(delays) < 1 and max(delays) > 15  # the whole range is used


def test_jittered_period_bounds() -> None:
    assert jittered(3600, 0.1, lambda: 0.0) == 3240
    assert jittered(3600, 0.1, lambda: 0.5) == 3600
    assert round(jittered(3600, 0.1, lambda: 0.999999)) == 3960
