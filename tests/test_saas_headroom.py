"""SaaS sending headroom (issue 19, item 12): the pure projection with an injected `now`, and its
exposure end to end (metrics, /readyz, GET /v1/usage, `doctor`) against the emulator with a
fast clock and a slow AWS."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.usage.headroom import HourSending, capacity_per_hour, headroom, send_seconds
from sidecar.usage.hours import HOUR, hour_of, hour_start
from tests.helpers import ROOT
from tests.saas_kit import Ops, aligned_origin, resolve, saas_env, spawn, wait_up

H = 500_000  # an hour number
T = hour_start(H + 1) + 60  # sealed one minute after the hour


def hour(h: int, records: int, backlog: int = 0, took: float | None = 30.0) -> HourSending:
    sealed = hour_start(h + 1) + 60
    return HourSending(h, sealed, records, backlog, None if took is None else sealed + took)


def test_the_paced_ceiling_is_720k_records_an_hour_and_awss_900k() -> None:
    assert capacity_per_hour(8.0) == 720_000
    assert capacity_per_hour(10.0) == 900_000
    assert send_seconds(0, 8.0) == 0.0
    assert send_seconds(1, 8.0) == 0.125  # one call
    assert send_seconds(720_000, 8.0) == HOUR


def test_a_small_product_has_headroom_and_no_reason() -> None:
    hours = [hour(H - 1, 3_000), hour(H, 3_000)]
    room = headroom(T + 120, hours, backlog=0, calls_per_second=8.0)
    assert room.load_ratio == 3_000 / 720_000
    assert room.send_seconds == 30.0 and room.send_ratio == 30.0 / HOUR
    assert room.backlog_seconds == 0.0 and room.trend_per_hour == 0.0
    assert not room.alert and not room.expires_unsent


def test_240k_customers_with_three_dimensions_pass_the_ceiling() -> None:
    """The issue's case: 720,000 records an hour need the whole hour at 8 calls/s."""
    records = 240_000 * 3
    room = headroom(T, [hour(H, records, took=None)], backlog=records, calls_per_second=8.0)
    assert room.load_ratio == 1.0
    assert room.backlog_seconds == HOUR
    assert any("100% of an hour" in r for r in room.reasons)
    assert any("60 min at 8 calls/s" in r for r in room.reasons)
    assert room.alert


def test_the_alert_comes_at_half_the_ceiling_not_at_it() -> None:
    just_under = headroom(T, [hour(H, 360_000)], backlog=0, calls_per_second=8.0)
    assert not just_under.alert  # exactly 50%
    over = headroom(T, [hour(H, 360_025)], backlog=0, calls_per_second=8.0)
    assert over.alert and "50% of an hour" in over.reasons[0]


def test_an_hour_whose_sending_took_over_half_the_hour_is_a_reason() -> None:
    hours = [hour(H - 1, 1_000, took=1_900.0), hour(H, 1_000, took=20.0)]
    room = headroom(T + 60, hours, backlog=0, calls_per_second=8.0)
    assert room.send_seconds == 20.0  # the newest finished hour
    assert not room.alert
    hours = [hour(H - 1, 1_000, took=20.0), hour(H, 1_000, took=1_900.0)]
    room = headroom(T + 2_000, hours, backlog=0, calls_per_second=8.0)
    assert room.send_seconds == 1_900.0 and room.alert
    assert "took 32 min (53% of an hour)" in room.reasons[0]


def test_an_hour_still_sending_counts_with_the_injected_clock() -> None:
    hours = [hour(H - 1, 1_000, took=20.0), hour(H, 1_000, took=None)]
    early = headroom(T + 600, hours, backlog=500, calls_per_second=8.0)
    assert early.sending_for_seconds == 600.0 and not early.alert
    late = headroom(T + 1_800, hours, backlog=500, calls_per_second=8.0)
    assert late.sending_for_seconds == 1_800.0 and not late.alert  # exactly half
    later = headroom(T + 1_801, hours, backlog=500, calls_per_second=8.0)
    assert later.alert and "has been sending for 30 min" in later.reasons[0]


def test_a_growing_backlog_is_a_trend_and_expiry_is_projected() -> None:
    hours = [hour(H - 2, 600_000, 0), hour(H - 1, 600_000, 100_000), hour(H, 600_000, 250_000)]
    room = headroom(T, hours, backlog=400_000, calls_per_second=8.0, oldest_unsent_hour=H - 1)
    assert room.trend_per_hour == 150_000
    assert "growing by 150000 records an hour" in " ".join(room.reasons)
    # 400,000 records need 2,000 s; the oldest unsent hour's window (BatchMeterUsage: 24 h)
    # ends in 22 h: no expiry yet.
    assert room.backlog_seconds == 2_000.0 and not room.expires_unsent
    late = headroom(
        hour_start(H - 1) + 24 * HOUR - 1_000,
        hours,
        backlog=400_000,
        calls_per_second=8.0,
        oldest_unsent_hour=H - 1,
    )
    assert late.expires_unsent
    assert any("records will expire" in r for r in late.reasons)


# -- end to end ---------------------------------------------------------------------------

SCALE = 360.0  # one hour in ten seconds
LATENCY = 1.0  # real seconds AWS takes per call: 360 scaled seconds


def metric_values(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("marketplace_saas_")
    }


def test_a_slow_hour_shows_in_metrics_readyz_usage_and_doctor(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    """Every call takes 360 s of the scaled clock: 6 calls of an hour's 150 records take 60% of
    the hour. The sidecar stays ready and says why; metrics, GET /v1/usage and doctor agree."""
    ops = Ops(emulator_server.url)
    origin = aligned_origin(SCALE, into_hour=HOUR - 8.0 * SCALE)  # 8 real s before the hour
    ops.configure(time_scale=SCALE, time_origin=origin)
    customers = [ops.customer(i) for i in range(50)]  # 50 x 3 dimensions: 150 records/hour
    state = tmp_path / "state"
    state.mkdir()
    env = saas_env(emulator_server.url, state_dir=state, scale=SCALE, origin=origin)
    car = wait_up(spawn(env, tmp_path, "slow"))
    try:
        for c in customers:
            resolve(car, c)
        ops.configure(latency=LATENCY)
        # Wait (real time, deadline) for a slow hour's sending to finish: metrics say how long.
        # (Had resolving crossed an hour, that hour has fewer records and the next one counts.)
        deadline = time.monotonic() + 60
        got: dict[str, float] = {}
        while time.monotonic() < deadline:
            got = metric_values(car.get("/metrics", probe=True).text)
            if got.get("marketplace_saas_hour_send_seconds", 0.0) > 0.5 * HOUR:
                break
            time.sleep(0.2)
        took = got["marketplace_saas_hour_send_seconds"]
        assert 0.5 * HOUR < took < HOUR, got  # 6 calls x 360 s, plus pacing and sealing
        assert got["marketplace_saas_hour_records"] == 150
        assert got["marketplace_saas_send_ratio"] > 0.5
        assert got["marketplace_saas_send_headroom_low"] == 1.0
        assert got["marketplace_saas_send_capacity_records_per_hour"] == 720_000
        ready = car.get("/readyz")
        assert ready.status_code == 200, ready.text  # a reason, still ready
        body = ready.json()
        assert body["ready"] is True
        assert "sending_headroom" in body["warnings"][0] and "of an hour" in body["warnings"][0]
        public = car.get("/readyz", probe=True).json()
        assert public["ready"] is True and public["warnings"] == ["sending_headroom"]
        report = car.get("/v1/usage").json()
        room = report["sending"]["headroom"]
        assert room["last_hour_records"] == 150 and room["capacity_per_hour"] == 720_000
        assert any(w.startswith("sending: ") for w in report["warnings"])
        doc = subprocess.run(
            [sys.executable, "-m", "sidecar", "doctor"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        line = next(x for x in doc.stdout.splitlines() if "sending headroom" in x)
        assert line.startswith("! sending headroom: "), doc.stdout
        assert "of an hour" in line and "150 records" in line
        assert "MARKETPLACE_ZERO_USAGE_RECORDS=false" in doc.stdout
    finally:
        ops.configure(latency=0.0)
        car.stop()


def test_at_a_month_end_the_projection_uses_the_0600_utc_cut_off() -> None:
    """Issue 21: the closed month's records are refused from 06:00 UTC on the 1st, whatever
    their 24 hours say. The same backlog 5 h 40 min after the hour: fine mid-month, expiring
    when that hour was the last of January."""
    last_of_january = hour_of(datetime(2027, 2, 1, tzinfo=UTC).timestamp()) - 1
    for oldest, expires in ((H - 1, False), (last_of_january, True)):
        now = hour_start(oldest + 1) + 5 * HOUR + 40 * 60
        room = headroom(
            now,
            [hour(oldest, 600_000, 0, took=None)],
            backlog=400_000,
            calls_per_second=8.0,
            oldest_unsent_hour=oldest,
        )
        assert room.expires_unsent is expires
    assert "2027-02-01T06:00:00Z" in " ".join(room.reasons), room.reasons
