"""Stores written by the integer-only sidecar (tests/legacy_v2/, made by its own code: see
make.py there) upgraded to micro-unit quantities: custom SQLite 2 -> 3, SaaS SQLite and SaaS
PostgreSQL 2 -> 3. Integer history stays exact, stored requests are resent byte for byte,
ids stored before still answer by value, and customers resolved before have no agreement id."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from sidecar.aws.metering import MeteringGateway
from sidecar.core import quantity as qty
from sidecar.emulator.service import EmulatorServer
from sidecar.usage import saas_ledger as L  # noqa: N812
from sidecar.usage.db import StoreError, UsageStore, open_store
from sidecar.usage.hours import HourPolicy, hour_of, iso
from sidecar.usage.saas import SAAS_SCHEMA
from sidecar.usage.service import UsagePolicy, UsageService
from sidecar.usage.store import DB_NAME
from sidecar.usage.validate import Limits, RejectedError, parse_saas
from sidecar.usage.volume import CACHE_RESERVE, MIB, files_bytes
from tests.helpers import NOW, ManualClock, loopback_env, start_sidecar
from tests.test_saas_ledger import FakeAws
from tests.usage_kit import post, run_for

LEGACY = Path(__file__).parent / "legacy_v2"
H0 = hour_of(NOW)
DIMS = ("scans", "users")
HP = HourPolicy(seal_margin=60, spread=600)
LATE = f'"timestamp": "{iso(NOW - 60)}"'  # the open hour H0-1, which holds migrated usage
A = "111111111111/arn:aws:license-manager::111111111111:license:l-111111111111"
B = "222222222222/arn:aws:license-manager::222222222222:license:l-222222222222"


def _dumped(name: str, table: str, folder: Path = LEGACY) -> list[str]:
    """The request texts exactly as the old sidecar stored them (from its dump)."""
    texts = []
    for line in (folder / name).read_text().splitlines():
        if line.startswith(f'INSERT INTO "{table}"') or line.startswith(
            f"INSERT INTO public.{table} "
        ):
            texts += [t.replace("''", "'") for t in re.findall(r"'(\{.*?\})'", line)]
    return texts


# -- custom mode ------------------------------------------------------------------------------


class Recording(MeteringGateway):
    """The real boto3 gateway, keeping each request it is given (what goes on the wire)."""

    sent: ClassVar[list[dict[str, Any]]] = []

    def meter_usage(self, request: dict[str, Any], dry_run: bool = False) -> str:
        Recording.sent.append(json.loads(json.dumps(request)))
        return super().meter_usage(request, dry_run)


def _custom(state: Path, clock: ManualClock, volume_bytes: int | None = None) -> UsageService:
    policy = UsagePolicy(
        product_code="prod-abc",
        dimensions=DIMS,
        state_dir=state,
        entitlement_check="none",
        backoff_base=2.0,
        backoff_cap=300.0,
        hours=HP,
        volume_bytes=volume_bytes,
    )
    return UsageService(policy, lambda: Recording("us-east-1", 5.0), clock=clock, rng=lambda: 0.5)


def test_a_custom_store_of_the_integer_sidecar_is_upgraded_losing_nothing(
    tmp_path: Path, clock: ManualClock
) -> None:
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.executescript((LEGACY / "custom.sql").read_text())
    conn.close()
    stored = {
        json.loads(t)["UsageDimension"]: t
        for t in _dumped("custom.sql", "hours")
        if hour_of(json.loads(t)["Timestamp"]) == H0 - 2
    }
    assert set(stored) == {"scans", "users"}  # hour H0-2's two requests, sealed, never sent
    clock.t = NOW
    Recording.sent = []
    svc = _custom(tmp_path, clock)
    try:
        version, requests, raw = svc.store.read(
            lambda c: (
                c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0],
                {
                    d: r
                    for d, r in c.execute(
                        "SELECT dimension, request FROM hours WHERE hour = ?", (H0 - 2,)
                    )
                },
                c.execute("SELECT quantity FROM open_hours").fetchall(),
            )
        )
        assert version == "3"
        assert requests == stored  # never rewritten
        assert raw == [(9 * qty.SCALE,)]  # integer history, exact in micro-units
        quantities = {(h["dimension"], h["state"]): h["quantity"] for h in svc.report()["hours"]}
        assert quantities == {
            ("scans", "sent"): 2,
            ("scans", "sealed"): 7,
            ("users", "sealed"): 3,
            ("scans", "open"): 9,
        }
        # The same id, by value: 5, "5", 5.0 are repeats; another value is a conflict.
        for spelling in ("5", 5.0, "5.000000", 5):
            status, body = post(svc, {"dimension": "scans", "quantity": spelling, "id": "a1"})
            assert status == 200 and body["records"][0]["repeat"], spelling
            assert body["records"][0]["quantity"] == 5
        assert post(svc, {"dimension": "scans", "quantity": "5.1", "id": "a1"})[0] == 409
        team = [{"quantity": "1.0", "tags": {"team": "x"}}, {"quantity": 2, "tags": {"team": "y"}}]
        repeat = post(
            svc, {"dimension": "users", "quantity": 3.0, "id": "u-1", "allocations": team}
        )
        assert repeat[0] == 200
        # New fractional usage joins the migrated total exactly.
        late = iso(NOW - 60).encode()  # for the open hour H0-1, which holds the migrated 9
        status, body = svc.post(
            b'{"dimension": "scans", "quantity": 0.5, "id": "half", "timestamp": "' + late + b'"}'
        )
        assert status == 202 and body["records"][0]["quantity"] == "0.5"
        open_now = [h for h in svc.report()["hours"] if h["state"] == "open"]
        assert [h["quantity"] for h in open_now] == ["9.5"]
        run_for(svc, clock, 2 * 3600)
    finally:
        svc.close()
    old = [r for r in Recording.sent if "UsageQuantity" in r]
    assert sorted(json.dumps(r, sort_keys=True) for r in old) == sorted(
        json.dumps(json.loads(t), sort_keys=True) for t in stored.values()
    )  # resent as stored: the integer fields and the ClientToken AWS may have seen
    new = [r for r in Recording.sent if "UsageQuantity" not in r]
    assert [(r["UsageDimension"], r["UsageQuantityAsDecimal"]) for r in new] == [("scans", "9.5")]


def test_an_hour_total_above_the_decimal_range_is_refused_at_intake_naming_the_field(
    tmp_path: Path, clock: ManualClock
) -> None:
    svc = _custom(tmp_path, clock)
    try:
        assert post(svc, {"dimension": "scans", "quantity": "9999999999.999998"})[0] == 202
        assert post(svc, {"dimension": "scans", "quantity": "0.000001"})[0] == 202
        status, body = post(
            svc,
            [{"dimension": "users", "quantity": 1}, {"dimension": "scans", "quantity": "0.000001"}],
        )
        assert status == 400
        assert body["field"] == "records[1].quantity"
        assert "9999999999.999999" in body["message"]
        report = svc.report()
        assert [h["quantity"] for h in report["hours"]] == [qty.MAX_TEXT]  # nothing else stored
    finally:
        svc.close()


# -- SaaS mode: SQLite and PostgreSQL ---------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def legacy_saas(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], UsageStore]]:
    """The old SaaS store, as its own code left it, on either backend; opens it with today's."""
    opened: list[UsageStore] = []
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

    def make() -> UsageStore:
        s = open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url)
        opened.append(s)
        return s

    yield make
    for s in opened:
        with contextlib.suppress(Exception):
            s.close()


def _ingest(store: UsageStore, body: str | bytes, now: float) -> tuple[int, list[dict[str, Any]]]:
    raw = body.encode() if isinstance(body, str) else body
    records = parse_saas(raw, Limits(DIMS, max_age=24 * 3600), now, "license")
    return store.write(
        lambda db: L.ingest(db, records, now, HP, accept_unresolved=False),
        locks=L.ingest_locks(records),
    )


def _who(customer: str) -> str:
    account, _, arn = customer.partition("/")
    return f'"customer_aws_account_id": "{account}", "license_arn": "{arn}"'


def test_a_saas_store_of_the_integer_sidecar_is_upgraded_losing_nothing(
    legacy_saas: Callable[[], UsageStore],
) -> None:
    store = legacy_saas()
    now = NOW
    (stored_call,) = [t for t in _dumped_saas() if '"Quantity":7' in t]
    # The call the old sender stored and never had answered goes out again, byte for byte.
    batch, _ = store.write(lambda db: L.next_batch(db, now, None))
    assert batch is not None and batch.body == stored_call
    aws = FakeAws(lambda: now)
    settled = store.write(
        lambda db: L.answer(db, batch.id, aws.batch_meter_usage(batch.request), now)
    )
    assert settled.sent == 2
    assert aws.billed == {(A, "scans", H0 - 2): 7, (B, "users", H0 - 2): 3}
    # Ids stored by the old sidecar answer by value.
    for spelling in ("5", "5.0", "5.000000"):
        status, answers = _ingest(
            store, f'{{{_who(A)}, "dimension": "scans", "quantity": {spelling}, "id": "k-3"}}', now
        )
        assert status == 200 and answers[0]["repeat"] and answers[0]["quantity"] == 5
    with pytest.raises(L.IdConflictError):
        _ingest(store, f'{{{_who(A)}, "dimension": "scans", "quantity": "5.5", "id": "k-3"}}', now)
    # Fractions join the migrated open total exactly; counters and audit stay in units.
    for _ in range(10):
        assert (
            _ingest(store, f'{{{_who(A)}, "dimension": "scans", "quantity": 0.1, {LATE}}}', now)[0]
            == 202
        )
    report = store.read(lambda db: L.report(db, now, HP))
    assert report["totals"]["scans"]["open"] == 6  # 5 migrated + ten tenths, exactly
    assert report["totals"]["scans"]["sent"] == 9  # 2 before the upgrade, 7 after
    assert report["totals"]["users"]["sent"] == 3
    store.write(
        lambda db: L.seal(db, H0 - 1, now + 60, L.SealSpec(DIMS, "license", False, HP)),
        locks=L.SEAL_LOCKS,
    )
    new, _ = store.write(lambda db: L.next_batch(db, now + 61, None))
    assert new is not None
    assert new.request["UsageRecords"][0]["QuantityAsDecimal"] == "6"
    assert "Quantity" not in new.request["UsageRecords"][0]
    # Customers resolved before the upgrade have no agreement id; a new resolve keeps one.
    customers, _ = store.read(lambda db: L.list_customers(db))
    assert {c["customer"]: c["agreement_id"] for c in customers} == {A: None, B: None}
    answer = {
        "CustomerAWSAccountId": "111111111111",
        "LicenseArn": A.partition("/")[2],
        "ProductCode": "p",
        "Metadata": {"AgreementId": "agmt-1234567890abcdef"},
    }
    store.write(lambda db: L.save_customer(db, A, answer, now, "d" * 64, now + 3600))
    again = {k: v for k, v in answer.items() if k != "Metadata"}
    store.write(lambda db: L.save_customer(db, A, again, now + 1, "e" * 64, now + 3600))
    assert store.read(lambda db: L.find_customers(db, A))[0]["agreement_id"] == (
        "agmt-1234567890abcdef"
    )


def _dumped_saas() -> list[str]:
    return _dumped("saas_sqlite.sql", "saas_batches")


def test_the_postgresql_dump_holds_the_same_calls_as_the_sqlite_one() -> None:
    """Both legacy stores were written by the same old code: the sending call is alike (the
    PostgreSQL test above compares against the SQLite dump's text)."""
    sqlite_calls = {t for t in _dumped("saas_sqlite.sql", "saas_batches")}
    pg_calls = {t for t in _dumped("saas_postgresql.sql", "saas_batches")}
    assert sqlite_calls == pg_calls and len(sqlite_calls) == 2


def test_the_hour_total_limit_is_the_decimal_fields_for_saas_too(
    legacy_saas: Callable[[], UsageStore],
) -> None:
    store = legacy_saas()
    now = NOW
    body = f'{{{_who(B)}, "dimension": "users", "quantity": "9999999999.999999"}}'
    assert _ingest(store, body, now)[0] == 202
    with pytest.raises(RejectedError) as info:
        _ingest(store, f'[{{{_who(B)}, "dimension": "users", "quantity": 0.000001}}]', now)
    assert info.value.body()["field"] == "records[0].quantity"
    report = store.read(lambda db: L.report(db, now, HP))
    assert report["totals"]["users"]["open"] == qty.MAX_TEXT


def test_a_replica_of_the_integer_sidecar_still_running_cannot_write_the_upgraded_database(
    pg_url: str,
) -> None:
    """During a rollout an old replica keeps its connections and never reads the schema version
    again. Its own statements (word for word from the integer sidecar's ingest and seal), on a
    session without this sidecar's settings, are refused: 7 units must never be added to a
    micro-unit total (billing 0.000007), nor a micro-unit sum be sealed as whole units.
    (SQLite needs no guard: one replica holds the file's lock, and an older one refuses a
    version-3 file at open.)"""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as pg:
        pg.execute((LEGACY / "saas_postgresql.sql").read_text().encode())
    store = open_store(SAAS_SCHEMA, database_url=pg_url)  # today's sidecar migrates it
    try:
        store.read(lambda db: db.execute("SELECT 1").fetchone())
        old_statements = [
            "INSERT INTO saas_open (customer, dimension, hour, quantity) VALUES "
            "(%s, 'scans', 500000, 7) ON CONFLICT (customer, dimension, hour) DO UPDATE SET "
            "quantity = saas_open.quantity + excluded.quantity RETURNING quantity",
            "INSERT INTO saas_records (id, customer, dimension, hour, quantity, received_at, "
            "carried_from) VALUES ('old-1', %s, 'scans', 500000, 7, 0, NULL)",
            "INSERT INTO saas_outbox (customer, dimension, hour, quantity, zero, record, state, "
            "sealed_at, deadline) VALUES (%s, 'scans', 499999, 5000000, 0, '{}', 'sealed', 0, 0)",
        ]
        with psycopg.connect(pg_url, autocommit=True) as old:
            # Its upsert of a total names the key schema 6 replaced: refused before any trigger
            # runs (saas_ledger.MIGRATION_6), loudly all the same.
            with pytest.raises(psycopg.errors.InvalidColumnReference, match="ON CONFLICT"):
                old.execute(old_statements[0], (A,))
            for sql in old_statements[1:]:
                with pytest.raises(psycopg.errors.RaiseException, match="micro-unit"):
                    old.execute(sql, (A,))
        rows = store.read(lambda db: db.execute("SELECT quantity FROM saas_open").fetchall())
        assert [int(q) for (q,) in rows] == [5 * qty.SCALE]  # untouched
        body = f'{{{_who(A)}, "dimension": "scans", "quantity": 1, {LATE}}}'
        assert _ingest(store, body, NOW)[0] == 202  # today's sidecar writes as usual
    finally:
        store.close()


def test_postgresql_counters_hold_more_history_than_a_bigint_of_micro_units(pg_url: str) -> None:
    """A dimension's counters add up its whole history. In BIGINT micro-units they would end at
    9.2e12 units and every later state change (the trigger) would fail: no record sent again.
    (SQLite, one replica, has no wider integer: its counters turn inexact past that, never
    fail; docs/saas.md says so.)"""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as pg:
        pg.execute((LEGACY / "saas_postgresql.sql").read_text().encode())
    store = open_store(SAAS_SCHEMA, database_url=pg_url)
    try:
        _counters_past_a_bigint(store)
    finally:
        store.close()


def _counters_past_a_bigint(store: UsageStore) -> None:
    huge = 2**63 - 1  # a BIGINT's largest value, in micro-units: ~9.2e12 units already counted
    store.write(
        lambda db: db.execute(
            "INSERT INTO saas_counts (hour, dimension, state, records, quantity) "
            "VALUES (?, 'scans', 'sent', 0, ?)",
            (H0 - 2, huge),
        )
    )
    batch, _ = store.write(lambda db: L.next_batch(db, NOW, None))
    assert batch is not None
    aws = FakeAws(lambda: NOW)
    settled = store.write(
        lambda db: L.answer(db, batch.id, aws.batch_meter_usage(batch.request), NOW)
    )
    assert settled.sent == 2
    report = store.read(lambda db: L.report(db, NOW, HP))
    assert report["totals"]["scans"]["sent"] == qty.to_json(huge + 2 * qty.SCALE + 7 * qty.SCALE)


# -- room for the migration: the configured volume, not the disk ------------------------------


def _big_v2_store(state: Path) -> bytes:
    """The integer sidecar's store (legacy_v2/custom.sql) after two busy days: 48 settled hours
    of two dimensions, each request with 1,000 allocations (~55 kB, kept 48 hours), about 6 MiB
    the v2 -> v3 step rewrites. Its bytes, checkpointed, as the volume holds them at rest."""
    conn = sqlite3.connect(state / DB_NAME)
    conn.executescript((LEGACY / "custom.sql").read_text())
    conn.execute("PRAGMA journal_mode=WAL")
    rows = []
    for back in range(4, 52):
        hour = H0 - back
        for dimension in DIMS:
            allocations = [
                {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "job", "Value": f"job-{i:05}"}]}
                for i in range(1000)
            ]
            request = {
                "ClientToken": f"{hour:08}{dimension:>24}".replace(" ", "0"),
                "ProductCode": "prod-abc",
                "Timestamp": hour * 3600 + 3599,
                "UsageAllocations": allocations,
                "UsageDimension": dimension,
                "UsageQuantity": 1000,
            }
            stamp = float(hour * 3600 + 3660)
            rows.append(
                (dimension, hour, "sent", "usage", 1000, json.dumps(request), stamp, stamp,
                 stamp + 6 * 3600, 1, None, None, f"m-{hour}-{dimension}", stamp + 60)
            )  # fmt: skip
    conn.executemany("INSERT INTO hours VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return (state / DB_NAME).read_bytes()


def test_a_migration_that_would_overrun_the_configured_volume_is_refused_untouched(
    tmp_path: Path, clock: ManualClock
) -> None:
    """The kubelet evicts a pod whose emptyDir holds more than its sizeLimit, while the disk
    (statvfs) still shows room: the v2 -> v3 step writes its WAL beside the store, so it is
    measured against MARKETPLACE_STATE_VOLUME_BYTES before anything is written. Refused: a
    clear error, the store byte for byte as it was, still version 2. With room, the same store
    migrates, and its WAL stays within what the check counted (the check is an upper bound)."""
    before = _big_v2_store(tmp_path)
    clock.t = NOW
    with pytest.raises(StoreError) as caught:
        _custom(tmp_path, clock, volume_bytes=16 * MIB)
    message = str(caught.value)
    assert "MARKETPLACE_STATE_VOLUME_BYTES" in message and "version 2, untouched" in message
    needed = float(re.findall(r"needs up to ([0-9.]+) MiB", message)[0]) * MIB
    assert (tmp_path / DB_NAME).read_bytes() == before
    conn = sqlite3.connect(tmp_path / DB_NAME)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    conn.close()
    at_rest = files_bytes(tmp_path, DB_NAME)[0]
    svc = _custom(tmp_path, clock, volume_bytes=64 * MIB)
    try:
        peak = files_bytes(tmp_path, DB_NAME)[0]  # the migration's WAL, not yet cut back
        version = svc.store.read(
            lambda c: c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        )
        assert version == ("3",)
        # What the refused start protected against: the WAL alone would have filled 16 MiB.
        assert peak + CACHE_RESERVE > 16 * MIB, peak
        assert peak - at_rest <= needed, (peak - at_rest, needed)
        sent = [h for h in svc.report()["hours"] if h["state"] == "sent"]
        assert len(sent) == 1 + 48 * 2 and sum(h["quantity"] for h in sent) == 2 + 96_000
    finally:
        svc.close()


def test_the_running_sidecar_refuses_the_migration_before_it_listens(
    tmp_path: Path, emulator_server: EmulatorServer
) -> None:
    """The wiring: the chart's setting reaches the migration; the sidecar exits 1 naming it,
    before any port is bound, and the store is left as it was."""
    before = _big_v2_store(tmp_path)
    car = start_sidecar(
        loopback_env(
            emulator_server.url,
            MARKETPLACE_MODE="custom",
            MARKETPLACE_DIMENSIONS=",".join(DIMS),
            MARKETPLACE_STATE_DIR=str(tmp_path),
            MARKETPLACE_STATE_VOLUME_BYTES="16Mi",
        ),
        wait=False,
    )
    assert car.proc.wait(timeout=60) == 1
    logs = car.logs()
    assert "usage_store_unusable" in logs and "MARKETPLACE_STATE_VOLUME_BYTES" in logs
    assert (tmp_path / DB_NAME).read_bytes() == before


def test_a_volume_smaller_than_the_store_refuses_the_migration_untouched(
    tmp_path: Path, clock: ManualClock
) -> None:
    """MARKETPLACE_STATE_VOLUME_BYTES below what the store already takes (a sizeLimit cut after
    the fact): no room at all, refused before anything is written, the store as it was."""
    before = _big_v2_store(tmp_path)
    assert len(before) > 4 * MIB
    clock.t = NOW
    with pytest.raises(StoreError) as caught:
        _custom(tmp_path, clock, volume_bytes=4 * MIB)
    assert "version 2, untouched" in str(caught.value) and "0.0 MiB left" in str(caught.value)
    assert (tmp_path / DB_NAME).read_bytes() == before
    assert {p.name for p in tmp_path.iterdir()} <= {DB_NAME, "usage.lock"}


def test_a_nearly_full_tmpfs_refuses_the_migration_untouched(
    tmp_path: Path, clock: ManualClock
) -> None:
    """No volume setting: the filesystem's room bounds the migration. A real 12 MiB tmpfs
    holding the 6 MiB store has no room for its rewrite: refused cleanly, never half-made (an
    ENOSPC in the middle would roll back, but only after filling the volume)."""
    import subprocess

    built = tmp_path / "built"
    built.mkdir()
    before = _big_v2_store(built)
    vol = tmp_path / "vol"
    vol.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "tmpfs", str(vol)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (root needed): {out.stderr.strip()}")
    try:
        (vol / DB_NAME).write_bytes(before)
        clock.t = NOW
        with pytest.raises(StoreError) as caught:
            _custom(vol, clock)
        assert "version 2, untouched" in str(caught.value), caught.value
        assert "free room on the disk" in str(caught.value)
        assert (vol / DB_NAME).read_bytes() == before
        assert {p.name for p in vol.iterdir()} <= {DB_NAME, "usage.lock"}
    finally:
        if subprocess.run(["umount", str(vol)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(vol)], check=True)
