"""Issue 21, windows per API: a SaaS sidecar keeps and resends its records for as long as
BatchMeterUsage takes them (24 hours; the closed month's records until 06:00 UTC on the 1st),
not MeterUsage's six hours. Against the project's emulator over loopback HTTP (boto3, the real
gateway), with the test's clock driving both the sidecar and the emulator.

An outage of the Metering API is the emulator refusing every call (InternalServiceError) or
dropping the connection (ConnectionReset; once after recording the call, so AWS has records the
sidecar never heard about). When it ends, every record is billed exactly once; past the window
the records expire, and say so (state, metric, warning)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.emulator.service import Fault
from sidecar.ops.metrics import Metrics
from sidecar.usage.hours import HOUR, hour_of, hour_start, iso
from sidecar.usage.saas import SaasService
from tests.helpers import ManualClock
from tests.test_saas_ledger import DIMS
from tests.test_saas_service import batch_calls, billed_in, emulated_service, use

STEP = 600.0  # the sidecar's loop, ten minutes apart on the test's clock


def at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def outage(emulator: Any, kind: str) -> None:
    """BatchMeterUsage fails from now on: refused (5xx) or unreachable (connection dropped,
    the first call after AWS recorded it)."""
    op = "BatchMeterUsage"
    if kind == "refused":
        emulator.config.faults = [Fault("InternalServiceErrorException", rate=1.0, op=op)]
    else:
        emulator.config.faults = [
            Fault("RecordedThenReset", first=1, op=op),
            Fault("ConnectionReset", rate=1.0, op=op),
        ]


def run_until(svc: SaasService, clock: ManualClock, end: float) -> None:
    """The sidecar's loop on the test's clock (the backoff pauses pass on its monotonic clock
    too) until `end`."""
    while clock.t < end:
        svc.tick()
        step = min(STEP, end - clock.t)
        clock.t += step
        clock.mono += step


def drain(svc: SaasService, clock: ManualClock, passes: int = 40) -> None:
    for _ in range(passes):
        svc.tick()
        if not svc.counters().records_by_state["sealed"]:
            return
        clock.t += 30
        clock.mono += 30
    raise AssertionError(f"records still sealed: {svc.counters().records_by_state}")


def scrape(svc: SaasService) -> dict[tuple[str, str], float]:
    metrics = Metrics(None, frozenset())
    metrics.watch_saas(svc.counters, frozenset(DIMS))
    return {
        (s.name, s.labels.get("state", "")): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


@pytest.mark.parametrize(("hours", "kind"), [(7, "unreachable"), (20, "refused")])
def test_an_outage_of_hours_inside_the_day_bills_every_record_exactly_once(
    emulator_server: Any,
    emulator: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hours: int,
    kind: str,
) -> None:
    """Before issue 21 these records expired six hours after their hour (MeterUsage's window
    applied to BatchMeterUsage), although AWS would still have billed them."""
    svc, clock, people = emulated_service(
        emulator_server, emulator, tmp_path, monkeypatch, 4, zero_records=False
    )
    first = hour_of(clock.t)
    want = {first: use(svc, people, lambda n, d: n + len(d))}
    outage(emulator, kind)
    run_until(svc, clock, hour_start(first + 3) + 600)
    want[first + 3] = use(svc, people, lambda n, d: 100 + n)  # the product kept working
    run_until(svc, clock, hour_start(first) + hours * HOUR)
    states = svc.counters().records_by_state
    assert states["sealed"] == 24 and states["expired"] == 0, states
    assert batch_calls(emulator) >= hours  # it kept trying, with backoff
    emulator.config.faults = []  # AWS is back
    drain(svc, clock)
    states = svc.counters().records_by_state
    assert states["sent"] == 24 and states["expired"] == 0 and states["rejected"] == 0, states
    for hour, usage in want.items():
        assert billed_in(emulator_server, hour) == usage  # once each: no DuplicateRecord either
    assert scrape(svc)[("marketplace_saas_records", "expired")] == 0.0
    svc.close()


def test_an_outage_of_25_hours_expires_the_records_visibly_at_their_deadline(
    emulator_server: Any, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, clock, people = emulated_service(
        emulator_server, emulator, tmp_path, monkeypatch, 4, zero_records=False
    )
    hour = hour_of(clock.t)
    use(svc, people, lambda n, d: n + 1)
    outage(emulator, "refused")
    deadline = hour_start(hour) + 24 * HOUR - svc.policy.hours.window_safety
    run_until(svc, clock, deadline - 30 * 60)
    assert svc.counters().records_by_state["sealed"] == 12  # still kept, 30 minutes left
    warnings = svc.report()["warnings"]
    assert any(f"window closes from {iso(deadline)}" in w for w in warnings), warnings
    run_until(svc, clock, deadline + 1)
    calls = batch_calls(emulator)
    run_until(svc, clock, hour_start(hour) + 25 * HOUR)
    emulator.config.faults = []  # AWS is back, too late
    drain(svc, clock)
    states = svc.counters().records_by_state
    assert states["expired"] == 12 and states["sent"] == 0 and states["rejected"] == 0, states
    assert billed_in(emulator_server, hour) == {}
    assert batch_calls(emulator) == calls  # nothing sent once past the deadline
    assert svc.counters().alerts["expired"] == 12
    assert scrape(svc)[("marketplace_saas_records", "expired")] == 12.0
    warnings = svc.report()["warnings"]
    assert any("12 records expired unsent" in w and "24 h" in w for w in warnings), warnings
    rows = [r for r in svc.report()["records"] if r["state"] == "expired"]
    assert len(rows) == 12 and all(r["deadline"] == iso(deadline) for r in rows)
    svc.close()


@pytest.mark.parametrize(
    ("back_at", "billed"), [("2027-02-01T05:00:00Z", True), ("2027-02-01T06:00:00Z", False)]
)
def test_the_closed_months_last_hour_is_billed_until_0600_utc_on_the_first(
    emulator_server: Any,
    emulator: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    back_at: str,
    billed: bool,
) -> None:
    """Usage of January 31, 23:00 UTC; BatchMeterUsage down from the hour's seal. Back at 05:00
    on February 1: billed. Back at 06:00: AWS refuses January's records from then on
    ("regardless of the normal 24-hour submission window"), so they expired at their
    deadline, 06:00 minus the safety margin, without a call AWS would refuse."""
    svc, clock, people = emulated_service(
        emulator_server,
        emulator,
        tmp_path,
        monkeypatch,
        3,
        zero_records=False,
        at=at("2027-01-31T23:10:00Z"),
    )
    hour = hour_of(clock.t)
    want = use(svc, people, lambda n, d: 2 * n + 1)
    outage(emulator, "refused")
    run_until(svc, clock, at(back_at))
    emulator.config.faults = []
    calls = batch_calls(emulator)
    drain(svc, clock)
    states = svc.counters().records_by_state
    if billed:
        assert states["sent"] == 9 and states["expired"] == 0, states
        assert billed_in(emulator_server, hour) == want
    else:
        assert states["expired"] == 9 and states["sent"] == 0, states
        assert billed_in(emulator_server, hour) == {}
        assert batch_calls(emulator) == calls  # none refused by AWS: expired before
        rows = [r for r in svc.report()["records"] if r["state"] == "expired"]
        assert {r["deadline"] for r in rows} == {"2027-02-01T05:58:00Z"}
    svc.close()


def test_a_fleet_down_for_ten_hours_bills_each_hour_in_its_own_hour(
    emulator_server: Any, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every sidecar down (no tick) for 10 hours, then back: the unsealed hours are still inside
    BatchMeterUsage's window, so each is sealed and billed as its own hour. Under the six-hour
    window they were too old to seal and their usage was carried into the open hour."""
    svc, clock, people = emulated_service(
        emulator_server, emulator, tmp_path, monkeypatch, 3, zero_records=False
    )
    first = hour_of(clock.t)
    want = {first: use(svc, people, lambda n, d: n + 5)}
    clock.t = hour_start(first + 2) + 900
    want[first + 2] = use(svc, people, lambda n, d: n + 50)
    clock.t = hour_start(first) + 10 * HOUR + 300  # nobody sealed anything meanwhile
    drain(svc, clock)
    for hour, usage in want.items():
        assert billed_in(emulator_server, hour) == usage
    assert billed_in(emulator_server, first + 10) == {}  # nothing carried
    svc.close()


def test_saas_intake_takes_timestamps_up_to_batchmeterusages_24_hours(
    emulator_server: Any, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A product reporting usage it recorded during its own 10-hour outage: accepted (counted in
    the open hour, its own being sealed). 25 hours old: a 400 naming the field and the window."""
    svc, clock, people = emulated_service(
        emulator_server, emulator, tmp_path, monkeypatch, 1, zero_records=False
    )
    p = people[0]
    doc = {
        "customer_aws_account_id": p["customer_aws_account_id"],
        "license_arn": p["license_arn"],
        "dimension": DIMS[0],
        "quantity": 3,
    }
    late = {**doc, "timestamp": iso(clock.t - 10 * HOUR)}
    status, answer = svc.post(json.dumps(late).encode())
    assert status == 202, answer
    too_old = {**doc, "timestamp": iso(clock.t - 25 * HOUR)}
    status, answer = svc.post(json.dumps(too_old).encode())
    assert status == 400, answer
    assert answer["field"] == "timestamp", answer
    assert "BatchMeterUsage takes at most 24 hours" in answer["message"], answer
    svc.close()


# -- a real `run` process on the test-only scaled clock ---------------------------------------

SCALE = 3600.0  # one real second is an hour, for the sidecar and the emulator alike


def running_car(emulator_server: Any, emulator: Any, tmp_path: Path, people: int) -> Any:
    """A SaaS `run` process and the emulator on one scaled clock (a few minutes into an hour),
    with `people` customers resolved. Retries every 5 scaled minutes (12 calls a real second)."""
    from tests.saas_kit import Ops, aligned_origin, resolve, saas_env, spawn, wait_up

    ops = Ops(emulator_server.url)
    origin = aligned_origin(SCALE, into_hour=300.0)
    ops.configure(time_scale=SCALE, time_origin=origin)
    customers = [ops.customer(i) for i in range(people)]
    env = saas_env(
        emulator_server.url,
        state_dir=tmp_path,
        scale=SCALE,
        origin=origin,
        MARKETPLACE_ZERO_USAGE_RECORDS="false",
        MARKETPLACE_BACKOFF_BASE_SECONDS="60",
        MARKETPLACE_BACKOFF_CAP_SECONDS="300",
    )
    car = wait_up(spawn(env, tmp_path, "windows"))
    for c in customers:
        resolve(car, c)
    return car, customers, origin


def post_usage(car: Any, customers: list[Any]) -> dict[tuple[str, str, int], int]:
    """One record per customer and dimension; what AWS should bill, by the hour each answer
    names (a post may cross an hour on the fast clock)."""
    import requests

    from tests.saas_kit import epoch_hour

    want = {}
    for n, c in enumerate(customers):
        for dimension in ("api_calls", "storage_gb"):
            doc = {**c.fields(), "dimension": dimension, "quantity": 10 + n}
            resp = requests.post(car.api + "/v1/usage", json=doc, timeout=10)
            assert resp.status_code == 202, resp.text
            hour = epoch_hour(resp.json()["records"][0]["hour"])
            want[(c.key, dimension, hour)] = 10 + n
    return want


def wait_scaled(origin: float, until: float, *, real_timeout: float) -> None:
    import time

    from tests.saas_kit import scaled_now

    deadline = time.monotonic() + real_timeout
    while scaled_now(SCALE, origin) < until:
        assert time.monotonic() < deadline, "the scaled clock did not get there"
        time.sleep(0.05)


def test_a_running_sidecar_bills_a_seven_hour_outage_exactly_once(
    emulator_server: Any, emulator: Any, tmp_path: Path
) -> None:
    """The wiring (`run`, MARKETPLACE_MODE=saas) gives SaaS records BatchMeterUsage's window:
    seven scaled hours of refused calls, then every record billed once."""
    import time

    car, customers, origin = running_car(emulator_server, emulator, tmp_path, 4)
    try:
        emulator.reconfigure(
            {
                "faults": [
                    {"error": "InternalServiceErrorException", "rate": 1.0, "op": "BatchMeterUsage"}
                ]
            }
        )
        want = post_usage(car, customers)
        last = max(h for _, _, h in want)
        wait_scaled(origin, hour_start(last) + 7 * HOUR, real_timeout=30)
        usage = car.get("/v1/usage").json()
        assert usage["records_by_state"]["sealed"] == len(want), usage["records_by_state"]
        emulator.reconfigure({"faults": []})
        deadline = time.monotonic() + 20
        book: dict[str, Any] = {}
        while time.monotonic() < deadline:
            book = emulator.saas_ledger()
            if len(book["records"]) >= len(want):
                break
            time.sleep(0.1)
        billed = {
            (r["customer"], r["dimension"], r["hour"]): r["quantity"] for r in book["records"]
        }
        assert billed == want and len(book["records"]) == len(want)
        assert book["counts"].get("duplicate_record", 0) == 0
        states: dict[str, int] = {}
        while time.monotonic() < deadline:  # AWS answered; the sidecar stores the answer
            states = car.get("/v1/usage").json()["records_by_state"]
            if states["sent"] == len(want):
                break
            time.sleep(0.1)
        assert states["sent"] == len(want) and states["expired"] == 0, states
    finally:
        emulator.reconfigure({"faults": []})
        assert car.stop() == 0


@pytest.mark.slow
def test_a_running_sidecar_expires_a_25_hour_outage_in_state_metric_and_warning(
    emulator_server: Any, emulator: Any, tmp_path: Path
) -> None:
    """25 scaled hours of refused calls (about 30 real seconds): the records expire at their
    deadline and say so on the real endpoints; nothing is billed, nothing sent after it."""
    car, customers, origin = running_car(emulator_server, emulator, tmp_path, 3)
    try:
        emulator.reconfigure(
            {
                "faults": [
                    {"error": "InternalServiceErrorException", "rate": 1.0, "op": "BatchMeterUsage"}
                ]
            }
        )
        want = post_usage(car, customers)
        last = max(h for _, _, h in want)
        wait_scaled(origin, hour_start(last) + 25 * HOUR, real_timeout=60)
        emulator.reconfigure({"faults": []})  # AWS back, too late
        usage = car.get("/v1/usage").json()
        assert usage["records_by_state"]["expired"] == len(want), usage["records_by_state"]
        assert any(f"{len(want)} records expired unsent" in w for w in usage["warnings"])
        metrics = {
            (s.name, s.labels.get("state", "")): s.value
            for family in text_string_to_metric_families(car.get("/metrics", probe=True).text)
            for s in family.samples
        }
        assert metrics[("marketplace_saas_records", "expired")] == len(want)
        assert emulator.saas_ledger()["records"] == []
        assert "saas_record_expired" in car.logs()
    finally:
        emulator.reconfigure({"faults": []})
        assert car.stop() == 0
