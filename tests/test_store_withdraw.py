"""A write the store did not commit in time is answered "not stored" and is then NEVER stored.

The writer is frozen on a real lock held by another connection (SQLite's write lock, a
PostgreSQL row lock) past the caller's wait, then released: the write that was inside the
stuck transaction and the one still queued behind it must both be gone, and the store must go
on working. A 503 that said "nothing was stored" for usage committed later would be billed
twice by a product that resends without an id, as the README allows.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sidecar.emulator.service import Emulator
from sidecar.usage.db import Db, Schema, StoreUnavailableError
from sidecar.usage.pgstore import PgStore
from sidecar.usage.store import Store
from tests.helpers import ManualClock
from tests.usage_kit import post, service

DDL = """
CREATE TABLE items (id TEXT PRIMARY KEY, n BIGINT NOT NULL);
CREATE TABLE counter (k INTEGER PRIMARY KEY, v BIGINT NOT NULL);
INSERT INTO counter VALUES (1, 0);
"""
SCHEMA = Schema(name="t.sqlite3", version=1, sqlite=DDL, postgresql=DDL)


def insert(key: str) -> Callable[[Db], None]:
    def job(db: Db) -> None:
        db.execute("UPDATE counter SET v = v + 1 WHERE k = 1")
        db.execute("INSERT INTO items VALUES (?, 0)", (key,))

    return job


def give_up_while_blocked(store: Any, queue_empty: Callable[[], bool]) -> list[BaseException]:
    """Two writes with a short wait against a writer stuck on the lock: one inside the stuck
    transaction, one queued behind it. Both must be answered StoreUnavailableError."""
    errors: list[BaseException] = []

    def write(key: str) -> None:
        try:
            store.write(insert(key), timeout=0.5)
        except BaseException as exc:  # the test inspects it
            errors.append(exc)

    first = threading.Thread(target=write, args=("inside",))
    first.start()
    deadline = time.monotonic() + 5
    while not queue_empty() and time.monotonic() < deadline:  # the writer took it
        time.sleep(0.005)
    second = threading.Thread(target=write, args=("queued",))
    second.start()
    first.join(10)
    second.join(10)
    return errors


def test_sqlite_a_write_given_up_on_a_blocked_writer_is_never_stored(tmp_path: Path) -> None:
    store = Store(tmp_path, schema=SCHEMA)
    try:
        other = sqlite3.connect(tmp_path / SCHEMA.name, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # holds the write lock: the writer waits on it
        errors = give_up_while_blocked(store, store._queue.empty)
        assert [type(e) for e in errors] == [StoreUnavailableError, StoreUnavailableError]
        other.execute("ROLLBACK")  # the writer goes on
        store.write(insert("after"))
        other.close()
        rows = store.read(lambda db: db.execute("SELECT id FROM items").fetchall())
        total = store.read(lambda db: db.execute("SELECT v FROM counter").fetchone()[0])
        assert [r[0] for r in rows] == ["after"]
        assert total == 1
    finally:
        store.close()


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[PgStore]:
    # One writer: the writes these tests queue wait behind the blocked transaction, not in a
    # second writer's (test_saas_intake.py covers a replica's second writer).
    store = PgStore(SCHEMA, pg_url, writers=1)
    yield store
    store.close()


def test_postgres_a_write_given_up_on_a_blocked_writer_is_never_stored(
    pg_url: str, pg_store: PgStore
) -> None:
    with psycopg.connect(pg_url) as other:  # a transaction: the row stays locked
        other.execute("SELECT v FROM counter WHERE k = 1 FOR UPDATE")
        errors = give_up_while_blocked(pg_store, pg_store._queue.empty)
        assert [type(e) for e in errors] == [StoreUnavailableError, StoreUnavailableError]
        other.rollback()  # the writer's UPDATE may go on now
    pg_store.write(insert("after"))
    with psycopg.connect(pg_url) as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM items")] == ["after"]
        row = conn.execute("SELECT v FROM counter").fetchone()
        assert row is not None and row[0] == 1


def test_custom_mode_a_503_for_a_stuck_store_is_never_billed(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    """Through the service: the POST waits INTAKE_WAIT on a writer stuck behind another
    connection's write lock, answers 503 "not stored", and once the lock goes the usage is
    still not there (the resend the 503 invites is the only copy)."""
    svc = service(tmp_path, clock)
    try:
        other = sqlite3.connect(tmp_path / "usage.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        status, body = post(svc, {"dimension": "scans", "quantity": 7})
        assert (status, body["error"]) == (503, "store_unavailable"), body
        assert "not stored" in body["message"]
        other.execute("ROLLBACK")
        other.close()
        assert post(svc, {"dimension": "users", "quantity": 1})[0] == 202  # the writer goes on
        totals = svc.report()["totals"]
        assert "scans" not in totals or totals["scans"]["accepted"] == 0, totals
        assert totals["users"]["accepted"] == 1
    finally:
        svc.close()


def test_postgres_a_lock_held_elsewhere_fails_only_the_writes_that_need_it(
    pg_url: str, pg_store: PgStore
) -> None:
    """A replica frozen while holding a declared lock (here: another connection's open
    transaction) costs the writes that need that lock a quick 503, never the others in the
    same transaction, and never a wait as long as the freeze."""
    inside, release = threading.Event(), threading.Event()

    def gate(db: Db) -> None:  # keeps the writer busy while the two writes queue up
        inside.set()
        release.wait(10)

    results: dict[str, Any] = {}

    def write(name: str, key: int) -> None:
        began = time.monotonic()
        try:
            pg_store.write(insert(name), locks=[(key, True)], lock_wait=0.5)
            results[name] = ("ok", time.monotonic() - began)
        except StoreUnavailableError as exc:
            results[name] = (type(exc).__name__, time.monotonic() - began)

    with psycopg.connect(pg_url) as other:
        other.execute("SELECT pg_advisory_xact_lock(41)")  # held until this transaction ends
        first = threading.Thread(target=pg_store.write, args=(gate,))
        first.start()
        assert inside.wait(10)
        threads = [
            threading.Thread(target=write, args=("blocked", 41)),
            threading.Thread(target=write, args=("free", 42)),
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while pg_store._queue.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        release.set()
        for t in (first, *threads):
            t.join(15)
        other.rollback()
    assert results["blocked"][0] == "StoreBusyError" and results["blocked"][1] < 5, results
    assert results["free"][0] == "ok", results
    with psycopg.connect(pg_url) as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM items")] == ["free"]
