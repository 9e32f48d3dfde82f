"""The custom store's size: a few dozen bytes per record for the idempotency window, usage
refused (503, nothing stored) before the state volume's limit, warnings from 80%, and a store
written by version 1 migrated in place losing nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.config import ConfigError, load
from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.usage.hours import hour_of, hour_start, iso_hour
from sidecar.usage.store import DB_NAME
from sidecar.usage.volume import MIB, files_bytes, reading
from tests import usage_v1
from tests.helpers import ManualClock, loopback_env, start_sidecar
from tests.usage_kit import ledger_totals, post, run_for, service

H0 = hour_of(ManualClock().t)


def _store_bytes(state: Path) -> int:
    """What the volume holds after a checkpoint (the WAL folded in, as it is at rest)."""
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return files_bytes(state, DB_NAME)[0]


def test_records_with_ids_cost_under_64_bytes_each_in_the_store(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Version 1 kept ~390 bytes per record for 48 hours (a row per record and its answer):
    the chart's 64 MiB volume was full at ~1 record/s. 20,000 records with ids, in 1,000-record
    POSTs and with three allocations, must cost under 64 bytes each."""
    svc = service(tmp_path, clock)
    empty = _store_bytes(tmp_path)
    teams = [{"quantity": 1, "tags": {"team": t}} for t in ("a", "b", "c")]
    n = 0
    for batch in range(20):
        records = [
            {"dimension": "scans", "quantity": 3, "id": f"job-{batch}-{i}", "allocations": teams}
            for i in range(1000)
        ]
        status, _ = post(svc, records)
        assert status == 202
        n += len(records)
        clock.t += 180  # an hour passes every 20 POSTs: sealing and pruning run as usual
        svc.tick(clock.t)
    svc.close()
    per_record = (_store_bytes(tmp_path) - empty) / n
    assert per_record < 64, f"{per_record:.0f} bytes per record"


def test_ids_are_kept_for_the_whole_window_then_pruned(tmp_path: Path, clock: ManualClock) -> None:
    svc = service(tmp_path, clock)
    assert post(svc, {"dimension": "scans", "quantity": 1, "id": "old"})[0] == 202
    clock.t += 48 * 3600 - 60
    svc.tick(clock.t)
    assert post(svc, {"dimension": "scans", "quantity": 1, "id": "old"})[0] == 200
    assert post(svc, {"dimension": "scans", "quantity": 2, "id": "old"})[0] == 409
    clock.t = hour_start(hour_of(clock.t) + 2)
    svc.tick(clock.t)
    count = svc.store.read(lambda c: c.execute("SELECT COUNT(*) FROM ids").fetchone()[0])
    assert count == 0  # more than 49 hours: gone, as version 1's keys went after 48
    svc.close()


def test_a_full_volume_answers_503_and_stores_nothing_then_heals(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    """The limit comes from the setting (statvfs shows the node's disk): a 16 MiB volume with
    12.6 MiB taken by another file (+ 2 MiB for SQLite's cache) refuses any new usage."""
    svc = service(tmp_path, clock, volume_bytes=16 * MIB)
    assert post(svc, {"dimension": "scans", "quantity": 1, "id": "before"})[0] == 202
    ballast = tmp_path / "ballast"
    ballast.write_bytes(b"\1" * int(12.6 * MIB))
    clock.mono += 1  # a file from outside the store is seen within a second (volume.Guard)
    records = [{"dimension": "scans", "quantity": 1, "id": f"r{i}"} for i in range(1000)]
    status, body = post(svc, records)
    assert status == 503, body
    assert body["error"] == "state_volume_full" and body["retry_after"] > 0
    assert "90%" in body["message"]
    report = svc.report()
    assert report["totals"]["scans"]["accepted"] == 1  # nothing of the refused POST
    assert any("state volume" in w and "refused" in w for w in report["warnings"])
    assert report["state_volume"]["limit_bytes"] == 16 * MIB
    assert report["state_volume"]["limit_source"] == "MARKETPLACE_STATE_VOLUME_BYTES"
    count = svc.store.read(lambda c: c.execute("SELECT COUNT(*) FROM ids").fetchone()[0])
    assert count == 1
    assert svc.counters().refused_volume_full == 1
    ballast.unlink()  # room again: the same POST is taken, once
    assert post(svc, records)[0] == 202
    assert post(svc, records)[0] == 200
    run_for(svc, clock, 3 * 3600)
    assert ledger_totals(emulator) == {"scans": 1001}
    svc.close()


def test_the_stores_own_writes_are_refused_before_the_volume_is_full(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Writes measure the volume at most once a second, and this clock never moves: only the
    bound on the store's own growth (volume.Guard) can make them measure. A 16 MiB volume
    (the smallest allowed) filled by 1,000-record POSTs is refused at 90%, and its files never
    pass the limit."""
    svc = service(tmp_path, clock, volume_bytes=16 * MIB)
    (tmp_path / "ballast").write_bytes(b"\1" * (8 * MIB))
    svc.report()  # a reading with the ballast (as the loop takes every pass)
    largest = 0
    for n in range(400):
        records = [
            {"dimension": "scans", "quantity": 1, "id": f"{n}-{i}-{'x' * 40}"} for i in range(1000)
        ]
        status, body = post(svc, records)
        largest = max(largest, files_bytes(tmp_path, DB_NAME)[0])
        if status == 503:
            assert body["error"] == "state_volume_full"
            break
        assert status == 202, body
    else:
        raise AssertionError("a filling volume was never refused")
    assert n > 3  # the store grew before it was refused
    assert largest < 16 * MIB
    reading = svc.report()["state_volume"]
    assert reading["percent"] >= 90 and reading["used_bytes"] < 16 * MIB
    svc.close()


def test_warnings_from_80_percent_in_the_report_readyz_and_metrics(
    tmp_path: Path, clock: ManualClock
) -> None:
    svc = service(tmp_path, clock, volume_bytes=16 * MIB)
    assert svc.report()["warnings"] == [] and svc.notices() == []
    used = svc.counters().volume_used_bytes
    (tmp_path / "ballast").write_bytes(b"\1" * (int(0.83 * 16 * MIB) - used))
    assert post(svc, {"dimension": "scans", "quantity": 1})[0] == 202  # under 90%: stored
    warnings = svc.report()["warnings"]
    assert len(warnings) == 1 and "state volume 8" in warnings[0], warnings
    assert svc.notices() == warnings
    counters = svc.counters()
    assert counters.volume_limit_bytes == 16 * MIB
    assert 0.8 <= counters.volume_used_bytes / counters.volume_limit_bytes < 0.9
    svc.close()


def test_the_running_sidecar_warns_on_readyz_and_metrics_then_refuses(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    """The wiring: the chart's setting reaches the service, /readyz (both listeners) and
    /metrics say the volume is filling, and a POST past 90% is a 503 that stores nothing."""
    car = start_sidecar(
        loopback_env(
            emulator_server.url,
            MARKETPLACE_MODE="custom",
            MARKETPLACE_DIMENSIONS="scans",
            MARKETPLACE_STATE_DIR=str(tmp_path),
            MARKETPLACE_STATE_VOLUME_BYTES="16Mi",
        )
    )
    try:
        car.wait_for(lambda d: d["state"] == "entitled", 15)
        record = {"dimension": "scans", "quantity": 2, "id": "x"}
        assert requests.post(car.api + "/v1/usage", json=record, timeout=10).status_code == 202
        assert "warnings" not in car.get("/readyz").json()
        volume = car.get("/v1/usage").json()["state_volume"]
        ballast = tmp_path / "ballast"
        ballast.write_bytes(b"\1" * (int(0.84 * 16 * MIB) - volume["used_bytes"]))
        time.sleep(1.05)  # a POST measures when the last reading is a second old (volume.Guard)
        second = {"dimension": "scans", "quantity": 3, "id": "y"}
        assert requests.post(car.api + "/v1/usage", json=second, timeout=10).status_code == 202
        for probe in (False, True):
            ready = car.get("/readyz", probe=probe)
            assert ready.status_code == 200, ready.text
            assert "state volume 8" in ready.json()["warnings"][0]
        metrics = _metrics(car.get("/metrics", probe=True).text)
        assert metrics["marketplace_usage_state_volume_limit_bytes"] == 16 * MIB
        assert metrics["marketplace_usage_state_volume_used_bytes"] >= 0.8 * 16 * MIB
        ballast.write_bytes(b"\1" * (int(0.9 * 16 * MIB) - volume["used_bytes"]))
        third = {"dimension": "scans", "quantity": 4, "id": "z"}
        refused = requests.post(car.api + "/v1/usage", json=third, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "state_volume_full"
        assert refused.headers["Retry-After"]
        report = car.get("/v1/usage").json()
        assert report["totals"]["scans"]["accepted"] == 5  # nothing of the refused POST
        metrics = _metrics(car.get("/metrics", probe=True).text)
        assert metrics["marketplace_usage_refused_volume_full_total"] == 1
    finally:
        car.stop()


def _metrics(text: str) -> dict[str, float]:
    lines = (line.split(" ") for line in text.splitlines() if line and line[0] != "#")
    return {parts[0]: float(parts[-1]) for parts in lines}


def test_a_bad_volume_setting_stops_the_sidecar_before_it_listens(
    emulator_server: EmulatorServer, tmp_path: Path
) -> None:
    car = start_sidecar(
        loopback_env(
            emulator_server.url,
            MARKETPLACE_MODE="custom",
            MARKETPLACE_DIMENSIONS="scans",
            MARKETPLACE_STATE_DIR=str(tmp_path),
            MARKETPLACE_STATE_VOLUME_BYTES="64MB",
        ),
        wait=False,
    )
    assert car.proc.wait(timeout=60) == 2
    assert "MARKETPLACE_STATE_VOLUME_BYTES" in car.logs()
    with pytest.raises(requests.ConnectionError):
        car.get("/healthz")


def test_the_filesystem_bounds_the_limit_when_it_has_less_room() -> None:
    found = reading(10 * MIB, 8 * MIB, 2048, 0, 4096, 5 * MIB, 64 * MIB, "setting")
    assert (found.limit, found.source) == (15 * MIB, "filesystem")
    found = reading(10 * MIB, 8 * MIB, 2048, 1024, 4096, 500 * MIB, 64 * MIB, "setting")
    assert (found.used, found.limit, found.source) == (8 * MIB, 64 * MIB, "setting")
    grown = reading(10 * MIB, 8 * MIB, 3072, 0, 4096, 500 * MIB, 64 * MIB, "setting")
    assert grown.used == 16 * MIB  # pages in the WAL not yet in the file count too


@pytest.mark.parametrize(
    ("value", "expected"),
    [("64Mi", 64 * MIB), ("268435456", 256 * MIB), (" 1Gi ", 1024 * MIB), ("", None)],
)
def test_the_volume_setting_takes_the_charts_size_limit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str, expected: int | None
) -> None:
    _custom_env(monkeypatch, tmp_path, value)
    assert load()[0].state_volume_bytes == expected


@pytest.mark.parametrize("value", ["64M", "10Mi", "abc", "-1", "1.5Gi"])
def test_a_bad_volume_setting_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    _custom_env(monkeypatch, tmp_path, value)
    with pytest.raises(ConfigError) as caught:
        load()
    assert caught.value.problems[0].startswith("MARKETPLACE_STATE_VOLUME_BYTES: must be")


def _custom_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, volume: str) -> None:
    for name in list(os.environ):
        if name.startswith("MARKETPLACE_"):
            monkeypatch.delenv(name)
    for name, value in {
        "PRODUCT_CODE": "prod-abc",
        "MODE": "custom",
        "DIMENSIONS": "scans",
        "STATE_DIR": str(tmp_path),
        "STATE_VOLUME_BYTES": volume,
    }.items():
        monkeypatch.setenv(f"MARKETPLACE_{name}", value)


# -- migration of a store written by version 1 --------------------------------------------


def _v1_store(state: Path, now: float) -> dict[str, dict[str, Any]]:
    """A version 1 store: a sealed hour not sent yet, an open hour with ids, allocations, an
    anonymous record and a carried one. The answers version 1 gave, by id."""
    conn = usage_v1.create(state)
    conn.execute("BEGIN")
    usage_v1.ingest(conn, [{"dimension": "scans", "quantity": 7, "id": "sealed-1"}], now - 3600)
    usage_v1.seal(conn, H0 - 1, now - 60)
    team = [{"quantity": 1, "tags": {"team": "x"}}, {"quantity": 2, "tags": {"team": "y"}}]
    answers = usage_v1.ingest(
        conn,
        [
            {"dimension": "scans", "quantity": 5, "id": "a1"},
            {"dimension": "users", "quantity": 3, "id": "a2", "allocations": team},
            {"dimension": "scans", "quantity": 3},
        ],
        now,
    )
    answers += usage_v1.ingest(
        conn, [{"dimension": "scans", "quantity": 4, "id": "c1"}], now, carried_from=H0 - 2
    )
    conn.execute("COMMIT")
    conn.close()
    return {a["id"]: a for a in [*answers, {"id": "sealed-1", "hour": iso_hour(H0 - 1)}]}


def test_a_version_1_store_is_migrated_in_place_losing_nothing(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    answers = _v1_store(tmp_path, clock.t)
    svc = service(tmp_path, clock)
    version = svc.store.read(
        lambda c: c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    )
    tables = svc.store.read(
        lambda c: {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    )
    assert version == "3" and not {"records", "keys"} & tables
    # Every id is still known: the same answer for a repeat, 409 for other content.
    status, body = post(svc, {"dimension": "scans", "quantity": 5, "id": "a1"})
    assert status == 200 and body["records"] == [{**answers["a1"], "repeat": True}]
    status, body = post(svc, {"dimension": "scans", "quantity": 4, "id": "c1"})
    assert body["records"] == [{**answers["c1"], "repeat": True}]
    assert body["records"][0]["carried_from"] == iso_hour(H0 - 2)
    team = [{"quantity": 1, "tags": {"team": "x"}}, {"quantity": 2, "tags": {"team": "y"}}]
    assert (
        post(svc, {"dimension": "users", "quantity": 3, "id": "a2", "allocations": team})[0] == 200
    )
    assert post(svc, {"dimension": "scans", "quantity": 6, "id": "a1"})[0] == 409
    assert post(svc, {"dimension": "scans", "quantity": 7, "id": "sealed-1"})[0] == 200
    open_hours = {(h["dimension"], h["state"]): h for h in svc.report()["hours"]}
    assert open_hours[("scans", "open")]["quantity"] == 12
    assert open_hours[("scans", "open")]["carried_records"] == 1
    assert open_hours[("scans", "sealed")]["quantity"] == 7
    # New usage joins the migrated totals; everything is sent once.
    assert post(svc, {"dimension": "users", "quantity": 1, "allocations": team[:1]})[0] == 202
    run_for(svc, clock, 3 * 3600)
    assert ledger_totals(emulator) == {"scans": 7 + 12, "users": 4}
    users = [r for r in emulator.ledger()["records"] if r["dimension"] == "users"]
    allocations = {tags[0][1]: q for q, tags in json.loads(users[0]["allocations"])}
    assert allocations == {"x": 2, "y": 2}
    svc.close()


def test_a_settled_hours_allocations_are_dropped_after_the_window_its_audit_row_kept(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    """The hour rows stay for audit, but 2,000 allocations (~100 kB of request) are dropped once
    the hour is settled and the window has passed: never sent again, never growing the volume."""
    svc = service(tmp_path, clock)
    allocations = [{"quantity": 1, "tags": {"job": f"j{i}"}} for i in range(2000)]
    assert post(svc, {"dimension": "scans", "quantity": 2000, "allocations": allocations})[0] == 202
    run_for(svc, clock, 3 * 3600)
    (sent,) = [h for h in svc.report()["hours"] if h["dimension"] == "scans"]
    assert sent["state"] == "sent"

    def size() -> int:
        return int(
            svc.store.read(
                lambda c: c.execute("SELECT SUM(length(request)) FROM hours").fetchone()[0]
            )
        )

    assert size() > 50_000
    clock.t += 48 * 3600
    svc.tick(clock.t)
    assert size() < 1_000
    (kept,) = [h for h in svc.report()["hours"] if h["dimension"] == "scans"]
    assert kept == sent  # state, quantity, timestamp and MeteringRecordId: the audit row
    svc.close()


def test_migrating_a_large_version_1_store_needs_little_room_beside_it(
    tmp_path: Path, clock: ManualClock
) -> None:
    """The pods that need the migration most have large stores in a nearly full volume. The
    migration must not write the dropped tables again (SQLite builds with SECURE_DELETE zero
    every freed page, through the WAL): at most ~35% beside the old store, not 2x."""
    conn = usage_v1.create(tmp_path)
    for batch in range(30):
        records = [
            {"dimension": "scans", "quantity": 1, "id": f"{batch:04}-{i:04}-" + "x" * 22}
            for i in range(1000)
        ]
        conn.execute("BEGIN")
        usage_v1.ingest(conn, records, clock.t)
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = files_bytes(tmp_path, DB_NAME)[0]
    svc = service(tmp_path, clock)
    peak = files_bytes(tmp_path, DB_NAME)[0]  # the migration's WAL, not yet checkpointed
    assert post(svc, {"dimension": "scans", "quantity": 1, "id": "0007-0007-" + "x" * 22})[0] == 200
    svc.close()
    after_checkpoint = _store_bytes(tmp_path)
    assert max(peak, after_checkpoint) < 1.35 * before, (before, peak, after_checkpoint)
