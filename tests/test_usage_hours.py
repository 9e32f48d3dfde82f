"""Hour arithmetic, sealing, carrying late usage, spreading sends and retry decisions. Pure."""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime

import pytest

from sidecar.usage.hours import (
    BATCH_METER_USAGE,
    CONFLICT,
    EXPIRED,
    HOUR,
    METER_USAGE,
    REJECTED,
    RETRY,
    SENT,
    HourPolicy,
    RetryPolicy,
    ScaledClock,
    decide,
    first_hour_open,
    hour_of,
    hour_start,
    iso,
    request_timestamp,
    target_hour,
    window_closes,
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


# -- windows per API (issue 21) -------------------------------------------------------------


def at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def closes(api: str, hour_text: str) -> str:
    return iso(window_closes(api, hour_of(at(hour_text))))


def test_meterusage_keeps_six_hours_even_across_a_month_end() -> None:
    assert closes(METER_USAGE, "2027-01-15T08:00:00Z") == "2027-01-15T14:00:00Z"
    assert closes(METER_USAGE, "2027-01-31T23:00:00Z") == "2027-02-01T05:00:00Z"
    assert closes(METER_USAGE, "2026-12-31T20:00:00Z") == "2027-01-01T02:00:00Z"


def test_batchmeterusage_takes_24_hours_inside_a_month() -> None:
    assert closes(BATCH_METER_USAGE, "2027-01-15T08:00:00Z") == "2027-01-16T08:00:00Z"
    # the first hours of a month: a full day, never the month before's cut-off
    assert closes(BATCH_METER_USAGE, "2027-02-01T00:00:00Z") == "2027-02-02T00:00:00Z"
    assert closes(BATCH_METER_USAGE, "2027-01-30T23:00:00Z") == "2027-01-31T23:00:00Z"


@pytest.mark.parametrize(
    ("last_day", "next_first"),
    [
        ("2027-01-31", "2027-02-01"),  # 31-day month
        ("2027-04-30", "2027-05-01"),  # 30-day month
        ("2028-02-29", "2028-03-01"),  # February of a leap year
        ("2027-02-28", "2027-03-01"),  # February of a common year
        ("2026-12-31", "2027-01-01"),  # December into January: a new year
    ],
)
def test_the_closed_months_records_are_cut_at_0600_utc_on_the_first(
    last_day: str, next_first: str
) -> None:
    """AWS: "After 06:00 UTC on April 1, March records are rejected regardless of the normal
    24-hour submission window": a cut-off that shortens the last day's hours from 06:00 on,
    never an extension of the earlier ones."""
    cut = f"{next_first}T06:00:00Z"
    for h in range(6):  # 00:00-05:00 on the last day: their 24 h end before the cut-off
        assert closes(BATCH_METER_USAGE, f"{last_day}T0{h}:00:00Z") == f"{next_first}T0{h}:00:00Z"
    for h in (6, 12, 23):
        assert closes(BATCH_METER_USAGE, f"{last_day}T{h:02}:00:00Z") == cut
    assert closes(BATCH_METER_USAGE, f"{next_first}T00:00:00Z") == (
        iso(at(f"{next_first}T00:00:00Z") + 24 * HOUR)
    )


def test_february_28_of_a_leap_year_keeps_its_full_day() -> None:
    assert closes(BATCH_METER_USAGE, "2028-02-28T23:00:00Z") == "2028-02-29T23:00:00Z"
    assert closes(BATCH_METER_USAGE, "2027-02-28T23:00:00Z") == "2027-03-01T06:00:00Z"


def test_windows_never_close_earlier_for_a_later_hour_and_first_hour_open_agrees() -> None:
    """What sealing, expiry and the warnings rely on: hour order is deadline order."""
    start = hour_of(at("2027-12-29T00:00:00Z"))
    for api in (METER_USAGE, BATCH_METER_USAGE):
        ends = [window_closes(api, h) for h in range(start, start + 24 * 70)]
        assert ends == sorted(ends)
        for t in (
            at("2027-12-31T23:30:00Z"),
            at("2028-01-01T05:59:59Z"),
            at("2028-01-01T06:00:00Z"),
            at("2028-02-01T03:00:00Z"),
            at("2028-01-15T10:20:00Z"),
        ):
            first = first_hour_open(api, t)
            assert window_closes(api, first) > t >= window_closes(api, first - 1)


def test_the_policy_follows_its_apis_window_with_an_injected_clock() -> None:
    saas = P.using(BATCH_METER_USAGE)
    last = hour_of(at("2027-01-31T23:00:00Z"))
    stamp = hour_start(last) + 1800
    assert P.deadline(stamp) == at("2027-02-01T05:00:00Z") - P.window_safety
    assert saas.deadline(stamp) == at("2027-02-01T06:00:00Z") - P.window_safety
    # sealing after an outage: 5 h 40 min after the month ended, the last hour is still worth
    # sealing for BatchMeterUsage (20 min left, more than seal_floor's 10) but not at 05:55
    assert saas.worth_sealing(last, at("2027-02-01T05:40:00Z"))
    assert not saas.worth_sealing(last, at("2027-02-01T05:55:00Z"))
    mid = hour_of(at("2027-01-15T08:00:00Z"))
    assert saas.worth_sealing(mid, hour_start(mid) + 23 * HOUR)
    assert not P.worth_sealing(mid, hour_start(mid) + 6 * HOUR)
    assert saas.countable(mid, hour_start(mid) + 22 * HOUR)
    assert not saas.countable(mid, hour_start(mid) + 23 * HOUR + 1)
    assert saas.first_unexpired(at("2027-02-01T05:59:00Z")) == hour_of(at("2027-02-01T00:00:00Z"))
    assert saas.first_unexpired(at("2027-01-20T12:00:00Z")) == hour_of(at("2027-01-19T13:00:00Z"))
    assert P.first_unexpired(at("2027-01-20T12:00:00Z")) == hour_of(at("2027-01-20T07:00:00Z"))


def test_an_unknown_api_is_refused() -> None:
    with pytest.raises(ValueError, match="MeterUsage, BatchMeterUsage"):
        HourPolicy(api="RegisterUsage")
    with pytest.raises(ValueError, match="api must be"):
        window_closes("Other", 1)


def test_saas_policies_always_follow_batchmeterusage() -> None:
    from sidecar.usage.saas import SaasPolicy
    from sidecar.usage.saas_ledger import SealSpec

    assert SaasPolicy(dimensions=("a",), hours=P).hours.api == BATCH_METER_USAGE
    assert SealSpec(("a",), "license", True, P).hours.api == BATCH_METER_USAGE
    assert P.api == METER_USAGE  # custom mode's default
