"""SaaS stores of schema 5 written by the last sidecar whose open totals had no tag set
(tests/legacy_v5/, made by commit 62bf24a's own code: see make.py there), opened by this one
(schema 6: totals by tag set, for usage allocations). On SQLite and PostgreSQL the upgraded
store must show the same report, answer every id it acknowledged exactly as before (a repeat:
200 with the stored answer; other content: 409), resend the stored call as it was stored, bill
every unit exactly once, and take allocated usage in the hour left open by the old code. On a
shared PostgreSQL an old replica still running must fail loudly, never bill a part as a whole."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.core import quantity as qty
from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.usage import saas_ledger as L  # noqa: N812
from sidecar.usage.db import UsageStore, open_store
from sidecar.usage.hours import HourPolicy, hour_of, hour_start, iso
from sidecar.usage.saas import SAAS_SCHEMA, SaasPolicy, SaasService
from tests.helpers import NOW, ManualClock
from tests.test_ledger_legacy_v3 import A, B, BatchRecording
from tests.test_quantity_migration import _dumped
from tests.usage_kit import aws_env

LEGACY = Path(__file__).parent / "legacy_v5"
ANSWERS: dict[str, dict[str, Any]] = json.loads((LEGACY / "answers.json").read_text())
H0 = hour_of(NOW)
DIMS = ("scans", "users")


def _load(backend: str, tmp_path: Path, url: str | None) -> None:
    if backend == "sqlite":
        conn = sqlite3.connect(tmp_path / SAAS_SCHEMA.name)
        conn.executescript((LEGACY / "saas_sqlite.sql").read_text())
        conn.close()
    else:
        import psycopg

        assert url is not None
        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute((LEGACY / "saas_postgresql.sql").read_text().encode())


@pytest.fixture(params=["sqlite", "postgresql"])
def legacy_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, UsageStore]]:
    """The schema-5 store, as its own code left it, opened (migrated) by today's code."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    _load(request.param, tmp_path, url)
    store = open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url)
    yield f"saas_{request.param}", store
    with contextlib.suppress(Exception):
        store.close()


def test_a_schema_5_saas_store_reports_answers_and_bills_once_after_the_upgrade(
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
        assert report["records_by_state"]["open"] == 2
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
            tagged = {**doc, "allocations": [{"quantity": answer["quantity"], "tags": {"t": "x"}}]}
            assert svc.post(json.dumps(tagged).encode())[0] == 409, rid  # other allocations
        # Allocated usage in the hour the old code left open, beside its untagged total.
        team = {
            "customer_aws_account_id": A[0],
            "license_arn": A[1],
            "dimension": "scans",
            "quantity": "0.5",
            "allocations": [{"quantity": "0.5", "tags": {"team": "a"}}],
            "timestamp": iso(3600 * (H0 - 1) + 900),
        }
        assert svc.post(json.dumps(team).encode())[0] == 202
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
        for t in _dumped(f"{name}.sql", "saas_batches", LEGACY)
        if '"QuantityAsDecimal":"7.000001"' in t
    ]
    assert len(stored) == 1 and BatchRecording.sent[0] == stored[0]  # the stored call, first
    book = requests.get(emulator_server.url + "/_emulator/saas/ledger", timeout=5).json()
    billed = {
        (r["customer"].split("/")[0], r["dimension"], r["hour"]): (r["quantity"], r["allocations"])
        for r in book["records"]
    }
    assert billed == {
        (A[0], "scans", H0 - 2): ("7.000001", []),
        (B[0], "users", H0 - 2): (3, []),
        (A[0], "scans", H0 - 1): (
            "6.5",
            [["0.5", [["team", "a"]]], [6, [["unallocated", "true"]]]],
        ),
        (B[0], "scans", H0 - 1): ("0.25", []),
    }
    assert book["counts"].get("duplicate_record", 0) == 0


# -- schema 5 -> 6 on a fleet: a replica of the schema-5 sidecar still running ------------------

# What the schema-5 sidecar's sessions set (its pgstore.SESSION_OPTIONS, commit 62bf24a).
SCHEMA_5_SESSION = (
    "-c idle_in_transaction_session_timeout=5000 -c lock_timeout=2000 "
    "-c sidecar.quantity_unit=micro -c sidecar.contract_seal=net"
)
# The schema-5 sidecar's statements, word for word (its saas_ledger._add_to_totals for one
# total, its _seal_hour's read and db.insert_new's outbox insert; psycopg's placeholders).
OLD_INTAKE = (
    "INSERT INTO saas_open (customer, dimension, hour, quantity) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (customer, dimension, hour) DO UPDATE SET "
    "quantity = saas_open.quantity + excluded.quantity "
    "RETURNING customer, dimension, hour, quantity"
)
OLD_TOTALS = "SELECT customer, dimension, quantity FROM saas_open WHERE hour = %s"
OLD_SEAL_OUTBOX = (
    "INSERT INTO saas_outbox (customer, dimension, hour, quantity, zero, record, state, "
    "sealed_at, deadline) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (customer, dimension, hour) DO NOTHING"
)


def test_a_schema_5_replica_still_running_fails_loudly_and_bills_nothing_wrong(
    pg_url: str, tmp_path: Path
) -> None:
    """A rolling upgrade on one PostgreSQL: a replica of the schema-5 sidecar keeps its session
    and never reads the schema version again. After a new replica migrated the store and took
    allocated usage, the old one's intake (its upsert on the old key) is refused, and its seal,
    which would read a tag set's part as a total of its own, is refused by the database before
    it writes a record; the new replica then seals the hour with its allocations."""
    import psycopg

    hour = H0 - 1  # open in the fixture: A used 6 scans, B 0.25
    _load("postgresql", tmp_path, pg_url)
    old = psycopg.connect(pg_url, options=SCHEMA_5_SESSION)  # opened before the upgrade
    new = open_store(SAAS_SCHEMA, database_url=pg_url)  # migrates 5 -> 6
    try:
        version = new.read(
            lambda db: db.execute(
                "SELECT version FROM sidecar_schema WHERE name = ?", (SAAS_SCHEMA.name,)
            ).fetchone()
        )
        assert version is not None and int(version[0]) == 6
        from sidecar.usage.validate import Limits, parse_saas

        doc = {
            "customer_aws_account_id": A[0],
            "license_arn": A[1],
            "dimension": "scans",
            "quantity": 2,
            "allocations": [{"quantity": 2, "tags": {"team": "a"}}],
        }
        now = NOW - 60
        records = parse_saas(json.dumps(doc).encode(), Limits(DIMS, 86400), now, "license")
        hp = HourPolicy(60, 0)
        new.write(
            lambda db: L.ingest(db, records, now, hp, accept_unresolved=True),
            locks=L.ingest_locks(records),
        )
        a = f"{A[0]}/{A[1]}"
        with pytest.raises(psycopg.Error) as refused:
            old.execute(OLD_INTAKE, (a, "scans", hour, 1))
        assert "ON CONFLICT" in str(refused.value) or "schema 6" in str(refused.value)
        old.rollback()
        # The old leader's seal: its totals read (A's 8 and, as a total of its own, team a's 2),
        # then its outbox rows: refused.
        totals = old.execute(OLD_TOTALS, (hour,)).fetchall()
        assert sorted((str(c), int(q)) for c, _, q in totals if c == a) == [
            (a, 2 * qty.SCALE),
            (a, 8 * qty.SCALE),
        ]
        row = (a, "scans", hour, 2 * qty.SCALE, 0, "{}", "sealed", NOW, NOW + 86400)
        with pytest.raises(psycopg.errors.RaiseException) as sealed:
            old.execute(OLD_SEAL_OUTBOX, row)
        assert "schema 6" in str(sealed.value) and "upgrade every replica" in str(sealed.value)
        old.rollback()
        with pytest.raises(psycopg.errors.RaiseException, match="upgrade every replica"):
            old.execute("DELETE FROM saas_open WHERE hour = %s", (hour,))
        old.rollback()
        assert (
            new.read(
                lambda db: db.execute(
                    "SELECT COUNT(*) FROM saas_outbox WHERE hour = ?", (hour,)
                ).fetchone()
            )[0]
            == 0
        )
        spec = L.SealSpec(DIMS, "license", False, hp)
        at = hour_start(H0) + 120
        assert new.write(lambda db: L.seal(db, hour, at, spec), locks=L.SEAL_LOCKS) == [(hour, 2)]
        text = new.read(
            lambda db: db.execute(
                "SELECT record FROM saas_outbox WHERE hour = ? AND customer = ?", (hour, a)
            ).fetchone()
        )
        record = json.loads(str(text[0]))
        assert record["QuantityAsDecimal"] == "8"
        assert [x["AllocatedUsageQuantityAsDecimal"] for x in record["UsageAllocations"]] == [
            "2",
            "6",
        ]
    finally:
        old.close()
        new.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_schema_5_store_that_cannot_be_migrated_is_refused_untouched(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Something in the way of the migration (a table or function of the name it creates, left
    by hand): the open is refused, naming the schema, and the store is left exactly as the old
    code wrote it, still version 5, its totals under the old key."""
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    _load(backend, tmp_path, url)
    if url is None:
        conn = sqlite3.connect(tmp_path / SAAS_SCHEMA.name)
        conn.execute("CREATE TABLE saas_open_v6 (x INTEGER)")
        conn.commit()
        conn.close()
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute(
                "CREATE FUNCTION saas_open_tags_guard() RETURNS trigger LANGUAGE plpgsql "
                "AS $$ BEGIN RETURN NULL; END $$"
            )
    with pytest.raises(Exception, match=r"version 6|migrat") as refused:
        open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url).close()
    assert "saas" in str(refused.value)

    def shape() -> tuple[int, list[Any]]:
        if url is None:
            conn = sqlite3.connect(tmp_path / SAAS_SCHEMA.name)
            try:
                version = conn.execute(
                    "SELECT value FROM meta WHERE key = 'schema_version'"
                ).fetchone()
                rows = conn.execute("SELECT * FROM saas_open ORDER BY customer").fetchall()
            finally:
                conn.close()
        else:
            import psycopg

            with psycopg.connect(url, autocommit=True) as pg:
                version = pg.execute("SELECT version FROM sidecar_schema").fetchone()
                rows = pg.execute("SELECT * FROM saas_open ORDER BY customer").fetchall()
        assert version is not None
        return int(version[0]), [tuple(r) for r in rows]

    version, rows = shape()
    assert version == 5
    assert [len(r) for r in rows] == [4, 4]  # customer, dimension, hour, quantity: no tags
    assert sorted(int(r[3]) for r in rows) == [250_000, 6 * qty.SCALE]


@pytest.mark.parametrize("writer", ["intake", "seal"])
def test_a_schema_5_write_in_flight_during_the_upgrade_commits_first_and_is_migrated(
    writer: str, pg_url: str, tmp_path: Path
) -> None:
    """The old replica is adding to a total (intake) or writing an hour's records (seal) when a
    new replica starts: the migration waits for it (it locks the outbox, then the totals, as the
    old code writes them) instead of failing or deadlocking; what the old code committed is
    migrated as it was (the total counted once, as the hour's total), and its next write is
    refused."""
    import threading
    import time

    import psycopg

    hour = H0 - 1
    a = f"{A[0]}/{A[1]}"
    _load("postgresql", tmp_path, pg_url)
    old = psycopg.connect(pg_url, options=SCHEMA_5_SESSION)
    if writer == "intake":
        old.execute(OLD_INTAKE, (a, "scans", hour, qty.SCALE))  # 6 + 1, not committed
    else:
        sealed = (a, "scans", hour, 6 * qty.SCALE, 0, "{}", "sealed", NOW, NOW + 86400)
        old.execute(OLD_SEAL_OUTBOX, sealed)
        old.execute("DELETE FROM saas_open WHERE hour = %s AND customer = %s", (hour, a))
    opened: list[UsageStore] = []
    failed: list[BaseException] = []

    def upgrade() -> None:
        try:
            opened.append(open_store(SAAS_SCHEMA, database_url=pg_url))
        except BaseException as exc:  # reported by the assertion below
            failed.append(exc)

    thread = threading.Thread(target=upgrade, daemon=True)
    thread.start()
    try:
        with psycopg.connect(pg_url, autocommit=True) as watch:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                row = watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND NOT granted"
                ).fetchone()
                if row and int(row[0]) > 0:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the migration never waited for the old replica's write")
        old.commit()
        thread.join(60)
        assert not failed and opened, failed
        store = opened[0]
        open_rows = store.read(
            lambda db: db.execute(
                "SELECT customer, tags, quantity FROM saas_open WHERE hour = ? ORDER BY customer",
                (hour,),
            ).fetchall()
        )
        outbox = store.read(
            lambda db: db.execute(
                "SELECT customer, quantity FROM saas_outbox WHERE hour = ?", (hour,)
            ).fetchall()
        )
        b = f"{B[0]}/{B[1]}"
        if writer == "intake":
            assert [(str(c), str(t), int(q)) for c, t, q in open_rows] == [
                (a, "", 7 * qty.SCALE),
                (b, "", qty.SCALE // 4),
            ]
            assert outbox == []
        else:
            assert [(str(c), str(t), int(q)) for c, t, q in open_rows] == [(b, "", qty.SCALE // 4)]
            assert [(str(c), int(q)) for c, q in outbox] == [(a, 6 * qty.SCALE)]
        with pytest.raises(psycopg.Error):
            old.execute(OLD_INTAKE, (a, "scans", hour, qty.SCALE))
        old.rollback()
        with pytest.raises(psycopg.errors.RaiseException, match="upgrade every replica"):
            old.execute(OLD_SEAL_OUTBOX, (b, "scans", hour, 1, 0, "{}", "sealed", NOW, NOW))
        old.rollback()
    finally:
        old.close()
        for s in opened:
            s.close()
