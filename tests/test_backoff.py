from __future__ import annotations

import functools
import heapq
import itertools
import random

import pytest

from sidecar.core.backoff import Backoff, ThrottleSchedule, jittered
from sidecar.core.ratelimit import TokenBucket


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


# -- throttle windows (fleet cold start) ---------------------------------------------------


def fleet(pods: int, schedule: ThrottleSchedule, seed: int = 1) -> tuple[float, float, int]:
    """`pods` registrations starting together against RegisterUsage's 5 calls/s per account
    (the emulator's token bucket, burst 5), in virtual time: (all entitled after, calls per
    pod, give-ups at the one-hour deadline)."""
    rng = random.Random(seed)
    bucket = TokenBucket(5.0, 5, 0.0)
    due = [(0.0, pod, 0) for pod in range(pods)]
    heapq.heapify(due)
    calls = done = 0
    last = 0.0
    while due:
        now, pod, throttles = heapq.heappop(due)
        calls += 1
        if bucket.take(now) == 0.0:
            done += 1
            last = max(last, now)
            continue
        delay = schedule.delay(throttles + 1, 0.0, now, rng.random)
        if now + delay <= 3600.0:
            heapq.heappush(due, (now + delay, pod, throttles + 1))
    return last, calls / pods, pods - done


def test_adaptive_windows_follow_each_other_and_widen_by_what_was_seen() -> None:
    s = ThrottleSchedule()
    windows = [s.window(k) for k in range(1, 8)]
    assert windows[0] == (0.0, 5.0)
    for (_, high), (low, _) in itertools.pairwise(windows):
        assert low == high  # each wave after the previous one, no overlap, no gap
    widths = [high - low for low, high in windows]
    assert widths[1] == 0.8 * 5.0  # widened by 0.8x the 5 s throttled so far
    assert all(b > a for a, b in itertools.pairwise(widths[1:]))
    # The widening fraction shrinks to `least`: late windows add 20% of the time seen.
    low, high = s.window(15)
    assert high - low == pytest.approx(0.2 * low)
    # ... and no window is wider than `widest`.
    assert max(h - lo for lo, h in (s.window(k) for k in range(1, 200))) <= s.widest + 1e-6


def test_adaptive_delay_lands_in_its_window_from_the_first_attempt() -> None:
    """Injected clock: `started` and `now` are the registrar's monotonic readings."""
    s = ThrottleSchedule()
    started, now = 100.0, 100.2  # first attempt at 100 s, throttled 0.2 s later
    assert s.delay(1, started, now, lambda: 0.0) == pytest.approx(0.0)
    assert now + s.delay(1, started, now, lambda: 0.999) - started == pytest.approx(4.9952)
    low, high = s.window(3)
    now = started + 8.0  # the second retry came back throttled at 8 s
    for r in (0.0, 0.5, 0.999):
        at = now + s.delay(3, started, now, functools.partial(float, r)) - started
        assert low <= at < high


def test_adaptive_delay_after_a_late_answer_is_never_negative_nor_shortened() -> None:
    s = ThrottleSchedule()
    low, high = s.window(2)
    started = 0.0
    late = high + 30.0  # the throttle came back long after its window (slow network)
    assert s.delay(2, started, late, lambda: 0.0) == 0.0
    assert s.delay(2, started, late, lambda: 0.999) == pytest.approx(0.999 * (high - low))
    mid = (low + high) / 2  # inside the window: the rest of it
    assert 0.0 <= s.delay(2, started, mid, lambda: 0.5) < high - mid


def test_fixed_slots_still_work_as_configured() -> None:
    s = ThrottleSchedule((25.0, 40.0, 43.0))
    assert s.delay(1, 0.0, 0.0, lambda: 0.5) == 12.5
    assert s.delay(2, 0.0, 20.0, lambda: 0.0) == 5.0  # slot [25, 40) measured from the start
    assert s.delay(3, 0.0, 30.0, lambda: 0.999) == pytest.approx(12.997)
    assert 0.0 <= s.delay(4, 0.0, 44.0, lambda: 0.999) < 3.0  # then backoff from the last slot


@pytest.mark.parametrize("pods", [20, 50, 100, 200, 500, 1000])
def test_fleet_is_entitled_within_the_goal_with_no_give_ups(pods: int) -> None:
    """Goal of issue 14: all entitled within 1.25 x N/5 s + 5 s, nobody gives up."""
    took, _, gave_up = fleet(pods, ThrottleSchedule())
    assert gave_up == 0
    assert took <= 1.25 * pods / 5 + 5


def test_small_fleets_are_through_in_seconds_where_fixed_slots_made_them_wait() -> None:
    adaptive, calls, _ = fleet(20, ThrottleSchedule())
    fixed, _, _ = fleet(20, ThrottleSchedule((25.0, 40.0, 43.0)))
    assert adaptive <= 10.0 and calls < 3
    assert fixed > 20.0  # what the old default cost 20 pods


def test_calls_per_pod_grow_slowly_with_the_fleet() -> None:
    """< 3 calls per pod holds up to 50 pods; beyond, it is the price of the time goal (README)."""
    per_pod = {n: fleet(n, ThrottleSchedule())[1] for n in (20, 50, 200, 1000)}
    assert per_pod[20] < 3 and per_pod[50] < 3
    assert per_pod[200] < 6 and per_pod[1000] < 11
