"""Stores written by the last two-ledger sidecar (tests/legacy_v3/, made by its own code: see
make.py there): custom mode's SQLite schema 3 and SaaS mode's schema 4 on SQLite and PostgreSQL,
with decimal quantities, allocations, a carried record, a sent hour, a sealed hour whose
requests were stored and never answered, and an open hour. Whatever form the ledger takes, a
pod or fleet upgraded onto such a store must show the same report, answer every id it
acknowledged exactly as before (a repeat: 200 with the stored answer; other content: 409), resend
each stored request as it was stored (AWS may have seen it), and bill every unit exactly once.
The tests speak to the services, not to tables, so they hold across a change of schema."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests

from sidecar.aws.metering import MeteringGateway
from sidecar.core import quantity as qty
from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.usage.db import UsageStore, open_store
from sidecar.usage.hours import HourPolicy, hour_of, iso
from sidecar.usage.saas import SAAS_SCHEMA, SaasPolicy, SaasService
from sidecar.usage.service import UsagePolicy, UsageService
from sidecar.usage.store import DB_NAME
from tests.helpers import NOW, ManualClock
from tests.test_quantity_migration import Recording, _dumped
from tests.usage_kit import aws_env, post, run_for

LEGACY = Path(__file__).parent / "legacy_v3"
ANSWERS: dict[str, dict[str, Any]] = json.loads((LEGACY / "answers.json").read_text())
H0 = hour_of(NOW)
DIMS = ("scans", "users")
A = ("111111111111", "arn:aws:license-manager::111111111111:license:l-111111111111")
B = ("222222222222", "arn:aws:license-manager::222222222222:license:l-222222222222")


def _stored(name: str, table: str) -> list[str]:
    return _dumped(name, table, LEGACY)


def _custom(state: Path, clock: ManualClock) -> UsageService:
    policy = UsagePolicy(
        product_code="prod-abc",
        dimensions=DIMS,
        state_dir=state,
        entitlement_check="none",
        backoff_base=2.0,
        backoff_cap=300.0,
        hours=HourPolicy(seal_margin=60, spread=600),
    )
    return UsageService(policy, lambda: Recording("us-east-1", 5.0), clock=clock, rng=lambda: 0.5)


def test_a_custom_store_of_the_two_ledger_sidecar_reports_answers_and_sends_as_before(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.executescript((LEGACY / "custom.sql").read_text())
    conn.close()
    stored = [
        t for t in _stored("custom.sql", "hours") if '"UsageQuantityAsDecimal":"2.5"' not in t
    ]
    assert len(stored) == 2  # hour H0-2's two requests, sealed, never sent
    clock.t = NOW
    Recording.sent = []
    svc = _custom(tmp_path, clock)
    try:
        hours = {(h["dimension"], h["hour"], h["state"]): h for h in svc.report()["hours"]}
        assert {k: h["quantity"] for k, h in hours.items()} == {
            ("scans", iso(3600 * (H0 - 3)), "sent"): "2.5",
            ("scans", iso(3600 * (H0 - 2)), "sealed"): "7.000001",
            ("users", iso(3600 * (H0 - 2)), "sealed"): "3.25",
            ("scans", iso(3600 * (H0 - 1)), "open"): "6.5",
            ("users", iso(3600 * (H0 - 1)), "open"): 4,
        }
        assert hours[("scans", iso(3600 * (H0 - 1)), "open")]["carried_records"] == 1
        assert hours[("scans", iso(3600 * (H0 - 3)), "sent")]["metering_record_id"] == "m-1"
        # Every id answers exactly as the old ledger did; other content is a conflict.
        x, y = {"team": "x"}, {"team": "y"}
        teams: dict[str, list[dict[str, Any]]] = {
            "t-1": [{"quantity": "1.25", "tags": x}, {"quantity": 2, "tags": y}],
            "t-2": [{"quantity": 4, "tags": y}],
        }
        for rid, answer in ANSWERS["custom"].items():
            doc: dict[str, Any] = {
                "id": rid,
                "dimension": answer["dimension"],
                "quantity": answer["quantity"],
            }
            if rid in teams:
                doc["allocations"] = teams[rid]
            if "carried_from" in answer:
                doc["timestamp"] = iso(3600 * (H0 - 2) + 900)
            status, body = post(svc, doc)
            assert (status, body["records"]) == (200, [{**answer, "repeat": True}]), rid
            other = {**doc, "quantity": qty.to_json(qty.parse(str(answer["quantity"])) + 1)}
            if rid in teams:  # the same units for another team
                moved = [{**a, "tags": {"team": f"z{i}"}} for i, a in enumerate(teams[rid])]
                other = {**doc, "allocations": moved}
            assert post(svc, other)[0] == 409, rid
        run_for(svc, clock, 2 * 3600)
        after = {(h["dimension"], h["hour"]): h["state"] for h in svc.report()["hours"]}
        assert set(after.values()) == {"sent"}
    finally:
        svc.close()
    old = [json.dumps(r, sort_keys=True, separators=(",", ":")) for r in Recording.sent[:2]]
    assert sorted(old) == sorted(stored)  # byte for byte, the same ClientToken
    new = {r["UsageDimension"]: r for r in Recording.sent[2:]}
    assert {d: r["UsageQuantityAsDecimal"] for d, r in new.items()} == {
        "scans": "6.5",
        "users": "4",
    }
    assert new["users"]["UsageAllocations"] == [
        {"AllocatedUsageQuantityAsDecimal": "4", "Tags": [{"Key": "team", "Value": "y"}]}
    ]
    billed = sorted((r["dimension"], r["quantity_micros"]) for r in emulator.ledger()["records"])
    # Each once; the hour sent before the upgrade is not sent again.
    assert billed == [
        ("scans", 6_500_000),
        ("scans", 7_000_001),
        ("users", 3_250_000),
        ("users", 4_000_000),
    ]


# -- SaaS mode ----------------------------------------------------------------------------------


class BatchRecording(MeteringGateway):
    """The real boto3 gateway, keeping each BatchMeterUsage request's records."""

    sent: ClassVar[list[list[dict[str, Any]]]] = []

    def batch_meter_usage(self, request: dict[str, Any]) -> dict[str, Any]:
        BatchRecording.sent.append(json.loads(json.dumps(request["UsageRecords"])))
        return super().batch_meter_usage(request)


@pytest.fixture(params=["sqlite", "postgresql"])
def legacy_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, UsageStore]]:
    """The old SaaS store, as its own code left it, opened with today's code."""
    if request.param == "sqlite":
        conn = sqlite3.connect(tmp_path / SAAS_SCHEMA.name)
        conn.executescript((LEGACY / "saas_sqlite.sql").read_text())
        conn.close()
        url = None
    else:
        import psycopg

        url = request.getfixturevalue("pg_url")
        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute((LEGACY / "saas_postgresql.sql").read_text().encode())
    store = open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url)
    yield f"saas_{request.param}", store
    with contextlib.suppress(Exception):
        store.close()


def test_a_saas_store_of_the_two_ledger_sidecar_reports_answers_and_sends_as_before(
    legacy_store: tuple[str, UsageStore],
    emulator_server: EmulatorServer,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name, store = legacy_store
    aws_env(monkeypatch, emulator_server, "seller")
    clock = ManualClock()
    clock.t = NOW
    emulator.meter_clock = clock.time
    for account, arn in (A, B):
        resp = requests.post(
            emulator_server.url + "/_emulator/saas/customers",
            json={
                "customer_aws_account_id": account,
                "license_arn": arn,
                "product_code": "prod-abc",
            },
            timeout=5,
        )
        assert resp.status_code == 200, resp.text
    policy = SaasPolicy(
        dimensions=DIMS,
        hours=HourPolicy(seal_margin=60, spread=0),
        calls_per_second=1024.0,
        zero_records=False,
    )
    BatchRecording.sent = []
    svc = SaasService(
        policy, store, lambda: BatchRecording("us-east-1", 5.0), clock=clock, rng=lambda: 0.5
    )
    try:
        report = svc.report()
        assert {d: {s: v for s, v in t.items() if v} for d, t in report["totals"].items()} == {
            "scans": {"accepted": "15.750001", "sent": "2.5", "sealed": "7.000001", "open": "6.25"},
            "users": {"accepted": 3, "sealed": 3},
        }
        customers = {c["customer_aws_account_id"]: c for c in svc.customers()[1]["customers"]}
        assert customers[A[0]]["agreement_id"] == "agmt-1111111111111111111111111"
        assert customers[B[0]]["agreement_id"] is None
        for rid, answer in ANSWERS[name].items():
            account, arn = A if answer["customer"].startswith(A[0]) else B
            doc: dict[str, Any] = {
                "customer_aws_account_id": account,
                "license_arn": arn,
                "id": rid,
                "dimension": answer["dimension"],
                "quantity": answer["quantity"],
            }
            if "carried_from" in answer:
                doc["timestamp"] = iso(3600 * (H0 - 2) + 900)
            status, body = svc.post(json.dumps(doc).encode())
            assert (status, body["records"]) == (200, [{**answer, "repeat": True}]), rid
            other = {**doc, "quantity": qty.to_json(qty.parse(str(answer["quantity"])) + 1)}
            assert svc.post(json.dumps(other).encode())[0] == 409, rid
        clock.t = 3600 * (H0 + 1) + 120
        for _ in range(20):
            svc.tick()
            if not svc.counters().records_by_state["sealed"]:
                break
            clock.t += 5
            clock.mono += 5
        assert svc.counters().records_by_state["sealed"] == 0
    finally:
        svc.close()
    stored = [
        json.loads(t)["UsageRecords"]
        for t in _stored(f"{name}.sql", "saas_batches")
        if '"QuantityAsDecimal":"7.000001"' in t
    ]
    assert len(stored) == 1 and BatchRecording.sent[0] == stored[0]  # the stored call, first
    book = requests.get(emulator_server.url + "/_emulator/saas/ledger", timeout=5).json()
    billed = {
        (r["customer"].split("/")[0], r["dimension"], r["hour"]): r["quantity"]
        for r in book["records"]
    }
    assert billed == {
        (A[0], "scans", H0 - 2): "7.000001",
        (B[0], "users", H0 - 2): 3,
        (A[0], "scans", H0 - 1): 6,
        (B[0], "scans", H0 - 1): "0.25",
    }
    assert book["counts"].get("duplicate_record", 0) == 0
