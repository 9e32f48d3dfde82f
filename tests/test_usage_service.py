"""The usage pipeline end to end in one process: real store, real boto3, the emulator over HTTP.

A manual clock moves only when the loop waits, so hours pass instantly and deterministically.
"""

from __future__ import annotations

import json
from pathlib import Path

from sidecar.emulator.service import Emulator
from sidecar.usage.hours import hour_of, hour_start, iso, iso_hour
from tests.helpers import ManualClock
from tests.usage_kit import ledger_totals, post, run_for, service

H0 = hour_of(ManualClock().t)


def test_usage_is_acknowledged_sealed_after_the_hour_and_sent_once(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    svc = service(tmp_path, clock)
    status, body = post(
        svc, [{"dimension": "scans", "quantity": 3}, {"dimension": "users", "quantity": 2}]
    )
    assert status == 202 and body["accepted"] == 2
    assert {r["hour"] for r in body["records"]} == {iso_hour(H0)}
    assert post(svc, {"dimension": "scans", "quantity": 4})[0] == 202
    hours = svc.report()["hours"]
    assert {(h["dimension"], h["state"], h["quantity"]) for h in hours} == {
        ("scans", "open", 7),
        ("users", "open", 2),
    }
    run_for(svc, clock, hour_start(H0 + 1) - clock.t + 30)  # the hour ended, inside the margin
    assert emulator.ledger()["records"] == []
    assert {h["state"] for h in svc.report()["hours"]} == {"open"}
    run_for(svc, clock, 2 * 3600)
    report = svc.report()
    assert {(h["dimension"], h["state"], h["quantity"]) for h in report["hours"]} == {
        ("scans", "sent", 7),
        ("users", "sent", 2),
    }
    assert ledger_totals(emulator) == {"scans": 7, "users": 2}
    for rec in emulator.ledger()["records"]:
        assert rec["hour"] == H0  # the timestamp is inside the hour
    ids = {h["metering_record_id"] for h in report["hours"]}
    assert ids == {r["metering_record_id"] for r in emulator.ledger()["records"]}
    assert report["totals"]["scans"]["sent"] == 7
    calls = [c for c in emulator.calls if c["op"] == "MeterUsage"]
    assert len(calls) == 2  # one call per dimension-hour
    svc.close()


def test_an_id_counts_once_and_different_content_under_it_is_409_storing_nothing(
    tmp_path: Path, clock: ManualClock
) -> None:
    svc = service(tmp_path, clock)
    first = post(svc, {"dimension": "scans", "quantity": 5, "id": "job-1"})
    again = post(svc, {"dimension": "scans", "quantity": 5, "id": "job-1"})
    assert first[0] == 202 and again[0] == 200
    assert again[1]["records"][0]["hour"] == first[1]["records"][0]["hour"]
    assert again[1]["records"][0]["id"] == "job-1"
    status, body = post(
        svc,
        [
            {"dimension": "users", "quantity": 1, "id": "job-2"},
            {"dimension": "scans", "quantity": 6, "id": "job-1"},
        ],
    )
    assert status == 409 and body["field"] == "records[1].id"
    assert (
        post(svc, {"dimension": "users", "quantity": 1, "id": "job-2"})[0] == 202
    )  # job-2 was not stored
    totals = svc.report()["totals"]
    assert totals["scans"]["accepted"] == 5 and totals["users"]["accepted"] == 1
    svc.close()


def test_bad_requests_store_nothing(tmp_path: Path, clock: ManualClock) -> None:
    svc = service(tmp_path, clock)
    status, body = post(
        svc, [{"dimension": "scans", "quantity": 1}, {"dimension": "gb", "quantity": 1}]
    )
    assert status == 400 and body["field"] == "records[1].dimension"
    assert svc.report()["hours"] == []
    svc.close()


def test_late_usage_for_a_sealed_hour_goes_to_the_open_hour_and_says_so(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    svc = service(tmp_path, clock)
    post(svc, {"dimension": "scans", "quantity": 1})
    run_for(svc, clock, hour_start(H0 + 1) - clock.t + 120)  # H0 sealed (maybe sent)
    late = post(svc, {"dimension": "scans", "quantity": 2, "timestamp": iso(hour_start(H0) + 5)})
    assert late[0] == 202
    rec = late[1]["records"][0]
    assert rec["hour"] == iso_hour(H0 + 1) and rec["carried_from"] == iso_hour(H0)
    run_for(svc, clock, 3 * 3600)
    by_hour = {(r["dimension"], r["hour"]): r["quantity"] for r in emulator.ledger()["records"]}
    assert by_hour == {("scans", H0): 1, ("scans", H0 + 1): 2}
    svc.close()


def test_a_restart_resends_the_stored_request_and_aws_returns_the_same_record(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    svc = service(tmp_path, clock, fleet_size=1)  # a pod alone: its slot is every slot
    post(svc, {"dimension": "scans", "quantity": 9})
    emulator.reconfigure(
        {"faults": [{"error": "RecordedThenReset", "first": 1, "op": "MeterUsage"}]}
    )
    clock.t = hour_start(H0 + 1) + 60 + 600  # sealed and due
    svc.tick(clock.t)  # AWS records it, the answer is lost
    pending = svc.report()["hours"][0]
    assert pending["state"] == "sealed" and pending["attempts"] == 1
    token = json.loads(
        svc.store.read(lambda c: c.execute("SELECT request FROM hours").fetchone()[0])
    )["ClientToken"]
    svc.close()
    svc = service(tmp_path, clock, fleet_size=1)  # a new container on the same state dir
    clock.t += 400
    svc.tick(clock.t)
    row = svc.report()["hours"][0]
    assert row["state"] == "sent"
    (rec,) = emulator.ledger()["records"]
    assert rec["client_token"] == token and rec["metering_record_id"] == row["metering_record_id"]
    assert emulator.ledger()["counts"].get("DuplicateRequestException", 0) == 0
    svc.close()


def test_meter_zero_checks_entitlement_and_moves_the_first_dimensions_hour(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    svc = service(tmp_path, clock, check="meter_zero")
    result = svc.check_entitlement()
    assert result.outcome == "entitled" and result.record_id
    (zero,) = emulator.ledger()["records"]
    assert (zero["dimension"], zero["quantity"], zero["hour"]) == ("scans", 0, H0)
    body = post(
        svc, [{"dimension": "scans", "quantity": 4}, {"dimension": "users", "quantity": 1}]
    )[1]
    assert [r["hour"] for r in body["records"]] == [iso_hour(H0 + 1), iso_hour(H0)]
    svc.close()
    calls = len(emulator.calls)
    again = service(tmp_path, clock, check="meter_zero").check_entitlement()
    assert again.outcome == "entitled" and again.remembered
    assert len(emulator.calls) == calls  # no second "first call"


def test_a_refusal_is_final_and_remembered_across_restarts(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    emulator.reconfigure({"entitled": False})
    svc = service(tmp_path, clock, check="meter_zero")
    result = svc.check_entitlement()
    assert result.outcome == "refused" and result.error is not None
    assert result.error.code == "CustomerNotEntitledException"
    svc.close()
    emulator.reconfigure({"entitled": True})  # AWS would not refuse a second call of this pod
    calls = len(emulator.calls)
    again = service(tmp_path, clock, check="meter_zero").check_entitlement()
    assert again.outcome == "refused" and again.remembered
    assert again.error is not None and again.error.code == "CustomerNotEntitledException"
    assert len(emulator.calls) == calls


def test_throttling_at_start_is_retried_until_entitled(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    emulator.reconfigure({"faults": [{"error": "ThrottlingException", "first": 3}]})
    svc = service(tmp_path, clock, check="meter_zero")
    assert svc.check_entitlement().outcome == "entitled"
    assert len(clock.waits) == 3
    svc.close()


def test_dry_run_checks_permission_for_every_dimension(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    svc = service(tmp_path, clock, check="dry_run")
    assert svc.check_entitlement().outcome == "permitted"
    dry = [c for c in emulator.calls if c["op"] == "MeterUsage"]
    assert [(c["dimension"], c["dry_run"]) for c in dry] == [("scans", True), ("users", True)]
    assert emulator.ledger()["records"] == []
    emulator.reconfigure({"dry_run_answer": "error"})
    assert svc.check_entitlement().outcome == "permitted"
    emulator.reconfigure({"denied_operations": ["MeterUsage"]})
    denied = svc.check_entitlement()
    assert denied.outcome == "refused" and denied.error is not None
    assert denied.error.code == "UnauthorizedException" and denied.error.kind == "configuration"
    svc.close()


def test_in_dry_run_mode_the_first_hourly_send_learns_a_refusal(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    from sidecar.usage.service import EntitlementResult

    seen: list[EntitlementResult] = []
    svc = service(tmp_path, clock, check="dry_run")
    svc._on_entitlement = seen.append
    emulator.reconfigure({"entitled": False})
    assert svc.check_entitlement().outcome == "permitted"  # DryRun does not check the subscription
    post(svc, {"dimension": "users", "quantity": 2})
    run_for(svc, clock, 2 * 3600)
    assert [r.outcome for r in seen] == ["refused"]
    assert svc.report()["hours"][0]["state"] == "rejected"
    assert svc.report()["entitlement_refusal"]["code"] == "CustomerNotEntitledException"
    svc.close()


def test_drain_seals_the_partial_hour_and_sends_it(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    svc = service(tmp_path, clock)
    post(svc, {"dimension": "users", "quantity": 3})
    svc.drain(5.0)
    (rec,) = emulator.ledger()["records"]
    assert (rec["quantity"], rec["hour"]) == (3, H0)
    assert rec["timestamp"] <= clock.t  # never in the future
    later = post(svc, {"dimension": "users", "quantity": 1})[1]["records"][0]
    assert later["hour"] == iso_hour(H0 + 1)  # the drained hour is taken: carried
    svc.close()


def test_a_full_disk_answers_503_with_a_retry_hint_and_stores_nothing(
    tmp_path: Path, clock: ManualClock
) -> None:
    svc = service(tmp_path, clock)
    pages = svc.store._conn.execute("PRAGMA page_count").fetchone()[0]
    svc.store._conn.execute(f"PRAGMA max_page_count={pages}")
    status, body = post(
        svc, [{"dimension": "scans", "quantity": 1, "id": f"k{i}" * 20} for i in range(500)]
    )
    assert status == 503 and body["retry_after"] > 0
    svc.store._conn.execute("PRAGMA max_page_count=1073741823")
    assert svc.report()["hours"] == []
    svc.close()


def test_counters_for_metrics(tmp_path: Path, clock: ManualClock, emulator: Emulator) -> None:
    svc = service(tmp_path, clock, fleet_size=1)  # a pod alone: its slot is every slot
    post(svc, {"dimension": "scans", "quantity": 3})
    post(svc, {"dimension": "scans", "quantity": 3, "id": "a"})
    post(svc, {"dimension": "scans", "quantity": 3, "id": "a"})
    clock.t = hour_start(H0 + 2)
    c = svc.counters()
    assert c.units_accepted == {"scans": 6, "users": 0}
    assert c.hours_by_state["open"] == 1
    assert c.oldest_unsent_age_seconds == 3600
    emulator.reconfigure({"faults": [{"error": "InternalServiceErrorException", "first": 1}]})
    svc.tick(clock.t)
    assert svc.counters().send_attempts == {("retry", "InternalServiceErrorException"): 1}
    clock.mono += 301  # past the longest pause
    clock.t += 600  # and this pod's slot in the next frame (a frame is at most the spread)
    svc.tick(clock.t)
    assert svc.counters().send_attempts == {
        ("retry", "InternalServiceErrorException"): 1,
        ("sent", "ok"): 1,
    }
    assert svc.counters().hours_by_state["sent"] == 1
    svc.close()


def test_drain_racing_a_send_in_flight_sends_each_hour_once(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    """SIGTERM arrives while the loop's MeterUsage is still waiting on a slow AWS: the drain and
    the loop are two paths to AWS for the same hours; each (dimension, hour) goes out once."""
    import threading

    svc = service(tmp_path, clock)
    post(svc, [{"dimension": "users", "quantity": 4}, {"dimension": "scans", "quantity": 9}])
    clock.t = hour_start(H0 + 1) + 3600 - 1  # hour H0 sealable and past its spread
    emulator.reconfigure({"latency": 0.5})
    loop = threading.Thread(target=svc.tick, args=(clock.t,))
    loop.start()
    while not any(c["op"] == "MeterUsage" for c in emulator.calls) and loop.is_alive():
        threading.Event().wait(0.01)  # the first send is answered; the second is in flight
    svc.drain(10.0)  # races the loop's send still in flight
    loop.join(10)
    sends = [(c["dimension"], c["quantity"]) for c in emulator.calls if c["op"] == "MeterUsage"]
    assert sorted(sends) == [("scans", 9), ("users", 4)]  # once each, never twice
    assert ledger_totals(emulator) == {"scans": 9, "users": 4}
    assert {h["state"] for h in svc.report()["hours"]} == {"sent"}
    svc.close()
