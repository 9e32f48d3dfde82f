"""Fault matrix for sending: throttling storms, 5xx bursts, an endpoint down for over an hour,
timestamps near the six-hour edge, DuplicateRequest, clock jumps.

Every case ends with the same audit: what AWS (the emulator) holds equals what was acknowledged,
at most one record per dimension-hour, and no DuplicateRequestException the sidecar caused.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sidecar.emulator.service import Emulator
from sidecar.usage.hours import hour_of, hour_start, iso, iso_hour
from sidecar.usage.service import UsageService
from tests.helpers import ManualClock
from tests.usage_kit import ledger_totals, post, run_for, service

H0 = hour_of(ManualClock().t)


def feed(svc: UsageService, clock: ManualClock, hours: int, per_hour: int = 5) -> dict[str, int]:
    """POST usage across `hours` hours while the loop runs; the acknowledged totals."""
    acked: dict[str, int] = {}
    rng = random.Random(3)
    for _ in range(hours):
        for _ in range(per_hour):
            dim = rng.choice(["scans", "users"])
            q = rng.randint(0, 50)
            status, _ = post(svc, {"dimension": dim, "quantity": q})
            assert status == 202
            acked[dim] = acked.get(dim, 0) + q
            run_for(svc, clock, 3600 / per_hour)
    return acked


def audit(emulator: Emulator, acked: dict[str, int]) -> None:
    ledger = emulator.ledger()
    assert ledger_totals(emulator) == {d: q for d, q in acked.items()}
    keys = [(r["pod"], r["dimension"], r["hour"]) for r in ledger["records"]]
    assert len(keys) == len(set(keys))
    assert ledger["counts"].get("DuplicateRequestException", 0) == 0
    assert ledger["counts"].get("IdempotencyConflictException", 0) == 0


def meter_calls(emulator: Emulator) -> int:
    return sum(1 for c in emulator.calls if c["op"] == "MeterUsage")


def test_throttling_storm(tmp_path: Path, clock: ManualClock, emulator: Emulator) -> None:
    emulator.reconfigure({"faults": [{"error": "ThrottlingException", "rate": 0.7}]})
    svc = service(tmp_path, clock)
    acked = feed(svc, clock, 4)
    emulator.reconfigure({"faults": []})
    run_for(svc, clock, 3 * 3600)
    audit(emulator, acked)
    assert set(svc.counters().hours_by_state.items()) >= {("sent", 8), ("expired", 0)}
    svc.close()


def test_5xx_burst_pauses_all_sending_instead_of_hammering(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    svc = service(tmp_path, clock, backoff_base=30, backoff_cap=300)
    acked = feed(svc, clock, 3)  # six dimension-hours, sent as they come due
    emulator.reconfigure({"faults": [{"error": "InternalServiceErrorException", "first": 6}]})
    before = meter_calls(emulator)
    recorded = len(emulator.ledger()["records"])
    acked2 = feed(svc, clock, 3)
    for d, q in acked2.items():
        acked[d] = acked.get(d, 0) + q
    run_for(svc, clock, 2 * 3600)
    audit(emulator, acked)
    # six failures, each followed by a pause: one probe per pause, not one per pending hour
    sent_since = len(emulator.ledger()["records"]) - recorded
    assert sent_since >= 6
    assert meter_calls(emulator) - before == 6 + sent_since
    svc.close()


def test_endpoint_down_for_ninety_minutes_then_up(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    svc = service(tmp_path, clock, backoff_base=2, backoff_cap=300)
    acked = feed(svc, clock, 1)
    emulator.reconfigure({"faults": [{"error": "ConnectionReset", "rate": 1.0}]})
    calls = meter_calls(emulator)
    more = feed(svc, clock, 2)  # ninety-odd minutes of outage with hours coming due
    for d, q in more.items():
        acked[d] = acked.get(d, 0) + q
    down_calls = meter_calls(emulator) - calls
    assert down_calls <= 40  # capped backoff: about one probe per 150-300 s
    report = svc.report()
    assert report["sending"]["consecutive_failures"] >= 5
    emulator.reconfigure({"faults": []})
    run_for(svc, clock, 2 * 3600)
    audit(emulator, acked)
    assert svc.counters().hours_by_state["expired"] == 0
    svc.close()


def test_near_the_six_hour_edge_send_at_once_warn_and_expire_what_aws_would_refuse(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    svc = service(tmp_path, clock)
    post(svc, {"dimension": "scans", "quantity": 4})
    post(svc, {"dimension": "users", "quantity": 6})
    svc.close()
    # the container was down for five and a half hours: the hours are sealed and sent at once
    clock.t = hour_start(H0) + 5.5 * 3600
    svc = service(tmp_path, clock)
    emulator.reconfigure({"faults": [{"error": "ThrottlingException", "first": 1}]})
    svc.tick(clock.t)
    report = svc.report()
    assert any("window closes" in w for w in report["warnings"])
    assert any(h.get("warning") for h in report["hours"])
    clock.mono += 10
    svc.tick(clock.t + 10)
    svc.tick(clock.t + 20)
    assert ledger_totals(emulator) == {"scans": 4, "users": 6}
    # a record 5 h 59 min old is not risked in its own hour: carried into the open hour
    late = post(svc, {"dimension": "scans", "quantity": 1, "timestamp": iso(clock.t - 5.98 * 3600)})
    assert late[1]["records"][0].get("carried_from")
    svc.close()


def test_usage_left_unsealed_past_the_window_is_carried_not_lost(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    svc = service(tmp_path, clock)
    post(svc, {"dimension": "scans", "quantity": 4})
    svc.close()
    clock.t = hour_start(H0) + 6 * 3600 + 600  # the container was down for six hours
    svc = service(tmp_path, clock)
    svc.tick(clock.t)
    (row,) = svc.report()["hours"]
    assert (row["state"], row["hour"], row["quantity"]) == ("open", iso_hour(H0 + 6), 4)
    assert row["carried_records"] == 1
    run_for(svc, clock, 2 * 3600)
    assert {(r["hour"], r["quantity"]) for r in emulator.ledger()["records"]} == {(H0 + 6, 4)}
    svc.close()


def test_a_sealed_hour_not_sent_in_time_is_expired_kept_and_never_sent(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    svc = service(tmp_path, clock)
    post(svc, {"dimension": "scans", "quantity": 4})
    clock.t = hour_start(H0 + 1) + 61
    svc.tick(clock.t)  # sealed; its send time is still ahead
    svc.close()
    clock.t = hour_start(H0) + 6 * 3600 + 600  # the container was down until the window closed
    svc = service(tmp_path, clock)
    svc.tick(clock.t)
    (row,) = svc.report()["hours"]
    assert row["state"] == "expired" and row["quantity"] == 4
    assert meter_calls(emulator) == 0
    assert svc.counters().send_attempts == {("expired", "window"): 1}
    svc.close()


@pytest.mark.parametrize(("ahead_hours", "final"), [(3, "sent"), (7, "expired")])
def test_aws_refusing_the_timestamp_is_retried_until_the_window_closes(
    tmp_path: Path, clock: ManualClock, emulator: Emulator, ahead_hours: int, final: str
) -> None:
    svc = service(tmp_path, clock)
    post(svc, {"dimension": "scans", "quantity": 4})
    # the pod's clock ahead of AWS's: AWS sees the hour's timestamp in its future
    emulator.meter_clock = lambda: clock.t - ahead_hours * 3600
    run_for(svc, clock, 2 * 3600)
    (row,) = svc.report()["hours"]
    assert row["state"] == "sealed"  # refused, kept as it is, retried
    assert row["last_error"]["code"] == "TimestampOutOfBoundsException"
    run_for(svc, clock, 6 * 3600)
    (row,) = svc.report()["hours"]
    assert row["state"] == final
    assert ledger_totals(emulator) == ({"scans": 4} if final == "sent" else {})
    svc.close()


def test_duplicate_request_is_a_conflict_never_resent(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    svc = service(tmp_path, clock)
    post(svc, {"dimension": "scans", "quantity": 4})
    emulator.reconfigure({"faults": [{"error": "DuplicateRequestException", "first": 1}]})
    run_for(svc, clock, 3 * 3600)
    (row,) = svc.report()["hours"]
    assert row["state"] == "conflict" and row["attempts"] == 1
    assert meter_calls(emulator) == 1
    assert any("conflict" in w for w in svc.report()["warnings"])
    svc.close()


@pytest.mark.parametrize("jump_hours", [3.0, -2.0])
def test_clock_jumps_never_double_bill(
    tmp_path: Path, clock: ManualClock, emulator: Emulator, jump_hours: float
) -> None:
    # The pod's clock was off by the jump and NTP corrects it; AWS's clock does not jump.
    skew = [jump_hours * 3600]
    emulator.meter_clock = lambda: clock.t + skew[0]
    svc = service(tmp_path, clock)
    acked = feed(svc, clock, 2)
    clock.t += jump_hours * 3600
    skew[0] = 0.0
    more = feed(svc, clock, 3)
    for d, q in more.items():
        acked[d] = acked.get(d, 0) + q
    run_for(svc, clock, 4 * 3600)
    audit(emulator, acked)
    assert svc.counters().hours_by_state["expired"] == 0
    svc.close()
