"""SaaS outbox growth (issue 19, item 8): settled rows are pruned after 48 hours into a per-hour
summary, and a scrape or GET /v1/usage reads what it reads whatever the store's history.

Cost is measured as work, not time: SQLite's virtual machine steps (a progress handler) and
PostgreSQL's rows read from saas_outbox in the transaction (pg_stat_xact_user_tables).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.usage import saas_ledger as L  # noqa: N812
from sidecar.usage.db import Db, Schema, UsageStore, open_store
from sidecar.usage.hours import hour_of, hour_start, iso_hour
from sidecar.usage.saas import SAAS_SCHEMA
from tests.test_saas_ledger import (
    DIMS,
    HP,
    SPEC,
    T0,
    FakeAws,
    account,
    key,
    license_arn,
    resolve,
    send_fast,
)

CUSTOMERS = 100  # x 3 dimensions: 300 records an hour (quantity-0 records on)
BASE = hour_of(T0)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UsageStore]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    s = open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url)
    yield s
    with contextlib.suppress(Exception):
        s.close()


def build(store: UsageStore, aws: FakeAws, hours: range) -> None:
    """Seal and send each hour at its own time: one hour of history per step."""
    for h in hours:
        now = hour_start(h + 1) + 120
        aws.now = lambda now=now: now  # type: ignore[misc]
        assert store.write(lambda db, h=h, now=now: L.seal(db, h, now, SPEC))  # type: ignore[misc]
        send_fast(store, aws, now)


def by_state(store: UsageStore) -> dict[tuple[str, str], tuple[int, int]]:
    """(dimension, state) -> (records, quantity) counted from the rows themselves."""
    rows = store.read(
        lambda db: db.execute(
            "SELECT dimension, state, COUNT(*), SUM(quantity) FROM saas_outbox "
            "GROUP BY dimension, state"
        ).fetchall()
    )
    return {(str(d), str(s)): (int(n), int(q or 0)) for d, s, n, q in rows}


def work(store: UsageStore, fn: Callable[[Db], Any]) -> int:
    """Work `fn` does in one read transaction: SQLite VM steps / PostgreSQL outbox rows read."""

    def run(db: Db) -> int:
        if db.dialect == "sqlite":
            conn = db.conn  # type: ignore[attr-defined]
            steps = [0]

            def tick() -> int:
                steps[0] += 1
                return 0

            conn.set_progress_handler(tick, 100)
            try:
                fn(db)
            finally:
                conn.set_progress_handler(None, 0)
            return steps[0]
        fn(db)
        row = db.execute(
            "SELECT COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0) "
            "FROM pg_stat_xact_user_tables WHERE relname = 'saas_outbox'"
        ).fetchone()
        return int(row[0]) if row else 0

    return store.read(run)


def analyze(store: UsageStore) -> None:
    """PostgreSQL plans from statistics; autovacuum would gather them on a live store."""
    if store.backend == "postgresql":
        store.write(lambda db: db.execute("ANALYZE"))


def pruned(store: UsageStore, now: float) -> None:
    """The sender's hourly prune: transactions until it says done."""
    after = store.write(functools.partial(L.prune, now=now))
    while after is not None:
        after = store.write(functools.partial(L.prune, now=now, after=after))


def test_scrape_and_report_work_does_not_grow_with_history(store: UsageStore) -> None:
    """52 hours of history, then 152: the sender prunes hourly, and what a scrape and a
    GET /v1/usage read stays the same (on main both read every outbox row ever sealed)."""
    few = 20  # x 3 dimensions: 60 records an hour
    resolve(store, range(few), at=hour_start(BASE))
    aws = FakeAws(lambda: T0)
    aws.unsubscribed.add(key(7))  # some not_subscribed rows among the sent ones

    def cost(hours: int) -> tuple[int, int]:
        now = hour_start(BASE + hours) + 600
        pruned(store, now)
        analyze(store)
        scrape = functools.partial(L.counts, now=now)
        listing = functools.partial(L.report, now=now, policy=HP)
        records = store.read(scrape)[0]
        assert records["sent"] == hours * 3 * (few - 1)  # exact, pruned rows included
        assert records["not_subscribed"] == 3  # AWS marked the customer at its first hour
        return work(store, scrape), work(store, listing)

    build(store, aws, range(BASE, BASE + 52))
    short = cost(52)
    build(store, aws, range(BASE + 52, BASE + 152))  # three times the history
    long = cost(152)
    assert long[0] <= short[0] * 1.2 + 50, (short, long)
    assert long[1] <= short[1] * 1.2 + 50, (short, long)
    assert sum(n for n, _ in by_state(store).values()) <= 49 * 3 * few  # 48 hours kept


def per_hour(store: UsageStore, where: str = "") -> dict[tuple[int, str, str], tuple[int, int]]:
    rows = store.read(
        lambda db: db.execute(
            "SELECT hour, dimension, state, COUNT(*), SUM(quantity) FROM saas_outbox "  # noqa: S608
            f"{where} GROUP BY hour, dimension, state"
        ).fetchall()
    )
    return {(int(h), str(d), str(s)): (int(n), int(q or 0)) for h, d, s, n, q in rows}


def prune_all(store: UsageStore, now: float, max_hours: int) -> int:
    """The service's prune loop: transactions until done; returns how many."""
    after: int | None = None
    passes = 0
    while True:
        passes += 1
        after = store.write(functools.partial(L.prune, now=now, after=after, max_hours=max_hours))
        if after is None:
            return passes


def test_prune_keeps_the_rest_exact_and_never_an_unsent_record(store: UsageStore) -> None:
    resolve(store, range(CUSTOMERS), at=hour_start(BASE))
    aws = FakeAws(lambda: T0)
    aws.unsubscribed.add(key(3))
    aws.billed[(key(5), "seats", BASE + 1)] = 99  # a DuplicateRecord: conflict
    build(store, aws, range(BASE, BASE + 10))
    # Hour BASE+10 is sealed and its first call stored (state 'sending') but not answered: the
    # leader froze. Its records stay 'sealed'; a retry of that exact call still needs them.
    stuck = BASE + 10
    at_stuck = hour_start(stuck + 1) + 120
    store.write(lambda db: L.seal(db, stuck, at_stuck, SPEC))
    batch, _ = store.write(lambda db: L.next_batch(db, at_stuck, None))
    assert batch is not None and batch.records == 25
    before = store.read(lambda db: L.counts(db, at_stuck))[0]
    settled = per_hour(store, "WHERE state <> 'sealed'")
    unsent = per_hour(store, "WHERE state = 'sealed'")
    assert sum(n for n, _ in unsent.values()) == 3 * (CUSTOMERS - 1)

    # 48 hours after hour BASE+5 began: hours BASE..BASE+4 go, in transactions of 2 hours.
    assert prune_all(store, hour_start(BASE + 5 + 48) + 30, max_hours=2) == 3
    left = per_hour(store)
    assert {k: v for k, v in left.items() if k[0] >= BASE + 5} == {
        k: v for k, v in {**settled, **unsent}.items() if k[0] >= BASE + 5
    }
    assert not [k for k in left if k[0] < BASE + 5]
    assert store.read(lambda db: L.counts(db, at_stuck))[0] == before

    # Much later: every settled row is gone; the unsent ones of the frozen hour stay.
    assert prune_all(store, hour_start(stuck + 49) + 30, max_hours=24) == 1
    assert per_hour(store) == unsent
    assert store.read(lambda db: L.counts(db, at_stuck))[0] == before
    names = {iso_hour(h): h for h in range(BASE, stuck + 1)}
    summary = {
        (names[r["hour"]], r["dimension"], r["state"]): (r["records"], r["quantity"])
        for r in store.read(lambda db: L.hour_summary(db, BASE))
    }
    assert summary == settled
    assert summary[(BASE + 1, "seats", "conflict")] == (1, 0)
    assert summary[(BASE, "seats", "not_subscribed")] == (1, 0)
    # The frozen call is still answerable: AWS's late answer settles its records.
    aws.now = lambda: at_stuck
    response = aws.batch_meter_usage(batch.request)
    store.write(functools.partial(L.answer, batch_id=batch.id, response=response, now=at_stuck))
    after = store.read(lambda db: L.counts(db, at_stuck))[0]
    assert after["sent"] == before["sent"] + 25 and after["sealed"] == before["sealed"] - 25


def test_a_version_1_store_is_migrated_with_exact_counters(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The counters of a store written by the previous release start from its rows."""
    for backend in ("sqlite", "postgresql"):
        url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
        if url:
            # A database of its own, so the version table starts empty.
            import psycopg

            name = "migrate_v1"
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name}")
                conn.execute(f"CREATE DATABASE {name}")
            url = url.rsplit("/", 1)[0] + "/" + name
        (tmp_path / backend).mkdir()
        v1 = Schema(name=SAAS_SCHEMA.name, version=1, sqlite=L.DDL, postgresql=L.DDL)
        old = open_store(v1, state_dir=tmp_path / backend, database_url=url)
        # Customers as the version-1 table holds them (today's save_customer also writes the
        # agreement id, a version-3 column).
        old.write(
            lambda db: db.executemany(
                "INSERT INTO saas_customers (customer, account_id, license_arn, product_code, "
                "state, state_since, resolved_at) VALUES (?, ?, ?, 'prod-1', 'active', ?, ?)",
                [
                    (key(i), account(i), license_arn(i), hour_start(BASE), hour_start(BASE))
                    for i in range(20)
                ],
            )
        )
        sent_at = hour_start(BASE + 2) + 120
        aws = FakeAws(functools.partial(float, sent_at))  # AWS's clock agrees with the sender's
        aws.unsubscribed.add(key(2))
        # Today's seal also reads who left (saas_lifecycle's columns it reads, as of schema
        # 5) and the open totals' tag sets (schema 6): an empty table and a column of '' (every
        # total untagged) for the seal, dropped after, so the store is version 1 again when it
        # is migrated.
        old.write(
            lambda db: [
                db.execute(
                    "CREATE TABLE saas_lifecycle "
                    "(subject TEXT, left_at DOUBLE PRECISION, left_license TEXT)"
                ),
                db.execute("ALTER TABLE saas_open ADD COLUMN tags TEXT NOT NULL DEFAULT ''"),
            ]
        )
        for h in (BASE, BASE + 1):
            now = hour_start(h + 1) + 120
            old.write(lambda db, h=h, now=now: L.seal(db, h, now, SPEC))  # type: ignore[misc]
        old.write(
            lambda db: [
                db.execute("DROP TABLE saas_lifecycle"),
                db.execute("ALTER TABLE saas_open DROP COLUMN tags"),
            ]
        )
        send_fast(old, aws, sent_at, per_txn=1)
        rows = by_state(old)
        old.close()
        new = open_store(SAAS_SCHEMA, state_dir=tmp_path / backend, database_url=url)
        try:
            kept = new.read(
                lambda db: db.execute(
                    "SELECT dimension, state, SUM(records), SUM(quantity) FROM saas_counts "
                    "GROUP BY dimension, state HAVING SUM(records) <> 0"
                ).fetchall()
            )
            assert {(str(d), str(s)): (int(n), int(q)) for d, s, n, q in kept} == rows
            assert set(DIMS) == {d for d, _ in rows}
        finally:
            new.close()
