"""Hour arithmetic, sealing, carrying late usage, spreading sends and retry decisions. Pure."""

from __future__ import annotations

import random
import threading
import time

from sidecar.usage.hours import (
    CONFLICT,
    EXPIRED,
    REJECTED,
    RETRY,
    SENT,
    HourPolicy,
    RetryPolicy,
    ScaledClock,
    decide,
    hour_of,
    hour_start,
    request_timestamp,
    target_hour,
)

H = 500_000  # an hour index
P = HourPolicy(seal_margin=60, spread=600)


def test_an_hour_is_sealable_only_after_it_ended_plus_the_margin() -> None:
    end = hour_start(H + 1)
    assert P.sealable_through(end - 1) == H - 1
    assert P.sealable_through(end + 59.9) == H - 1  # ended, but inside the margin
    assert P.sealable_through(end + 60) == H
    assert P.seal_due(H) == end + 60


def test_the_request_timestamp_stays_inside_its_hour_and_never_in_the_future() -> None:
    assert hour_of(request_timestamp(H, hour_start(H + 3))) == H
    assert request_timestamp(H, hour_start(H + 3)) == hour_start(H + 1) - 1
    now = hour_start(H) + 1234.5  # draining the open hour: now, not the hour's end
    assert request_timestamp(H, now) == int(now)


def test_late_usage_for_a_sealed_hour_is_carried_into_the_open_hour() -> None:
    now = hour_start(H) + 600
    sealed = {H - 1}
    assert target_hour(H - 1, now, sealed.__contains__, P) == H
    assert target_hour(H - 2, now, sealed.__contains__, P) == H - 2  # unsealed, still sendable
    # too old to send comfortably: carried rather than risked
    assert target_hour(H - 5, now, sealed.__contains__, P) == H
    # the open hour itself taken (entitlement record, drain): the next one
    assert target_hour(H, now, {H, H + 1}.__contains__, P) == H + 2
    # a product clock a little ahead: its own (future) hour is not counted early
    assert target_hour(H + 1, now, set().__contains__, P) == H + 1


def test_after_a_backward_clock_jump_usage_never_lands_in_a_sealed_hour() -> None:
    sealed = {H, H + 1, H + 2}
    now = hour_start(H) + 10  # the clock went back two hours
    assert target_hour(H, now, sealed.__contains__, P) == H + 3


def test_send_times_spread_over_the_window_after_the_seal() -> None:
    rng = random.Random(1)
    times = [P.send_after(H, rng.random) - P.seal_due(H) for _ in range(2000)]
    assert min(times) >= 0 and max(times) <= 600
    # spread evenly: each tenth of the window gets roughly a tenth of the sends
    buckets = [0] * 10
    for t in times:
        buckets[min(9, int(t / 60))] += 1
    assert min(buckets) > 140 and max(buckets) < 260


def test_the_deadline_counts_six_hours_from_the_hours_start_with_a_safety_margin() -> None:
    stamp = request_timestamp(H, hour_start(H + 2))
    assert P.deadline(stamp) == hour_start(H) + 6 * 3600 - P.window_safety
    assert P.countable(H - 4, hour_start(H)) and not P.countable(H - 5, hour_start(H) + 1)


def test_what_each_answer_means_for_the_hour() -> None:
    assert decide(None, False) == SENT
    assert decide("DuplicateRequestException", False) == CONFLICT
    assert decide("TimestampOutOfBoundsException", False) == EXPIRED
    assert decide("InvalidTagException", False) == REJECTED
    assert decide("CustomerNotEntitledException", False) == REJECTED
    assert decide("ThrottlingException", True) == RETRY
    assert decide("InternalServiceErrorException", True) == RETRY
    assert decide("EndpointConnectionError", True) == RETRY
    # IAM and credentials can be fixed without a restart: keep the hour and try again later
    assert decide("AccessDeniedException", False) == RETRY
    assert decide("SomethingNewException", False) == RETRY


def test_retry_delays_grow_to_the_cap_and_are_never_zero() -> None:
    r = RetryPolicy(base=2, cap=300)
    assert r.delay(1, lambda: 0.0) >= 1 and r.delay(1, lambda: 0.999) <= 2
    assert r.delay(20, lambda: 0.999) <= 300 and r.delay(20, lambda: 0.0) == 150


def test_the_test_only_clock_runs_hours_in_seconds() -> None:
    clock = ScaledClock(3600.0, time.time())
    before = clock.time()
    stop = threading.Event()
    started = time.monotonic()
    clock.wait(stop, 360.0)  # six scaled minutes
    assert time.monotonic() - started < 0.5
    assert clock.time() - before >= 300
