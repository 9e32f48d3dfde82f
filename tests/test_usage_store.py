"""The usage store: durable settings, group commit, and damage reported, never reset."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sidecar.usage.db import Db, Schema, open_store
from sidecar.usage.store import CUSTOM_SCHEMA, DB_NAME, Store, StoreError, StoreUnavailableError


def test_wal_and_full_sync_are_in_force(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert oct((tmp_path / DB_NAME).stat().st_mode & 0o777) == "0o600"
    finally:
        store.close()


def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    store = Store(tmp_path)
    gate = threading.Barrier(32)

    def one(i: int) -> None:
        gate.wait()
        store.write(
            lambda c: c.execute(
                "INSERT INTO open_hours (dimension, hour, quantity) VALUES (?, 1, 1)", (f"r{i}",)
            )
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert (
            store.read(lambda c: c.execute("SELECT COUNT(*) FROM open_hours").fetchone()[0]) == 32
        )
        assert store.stats.jobs == 32
        assert store.stats.commits < 32  # one fsync served several writers
    finally:
        store.close()


def test_a_failing_write_rolls_back_alone(tmp_path: Path) -> None:
    store = Store(tmp_path)
    release = threading.Event()
    errors: list[BaseException] = []

    def blocker(c: sqlite3.Connection) -> None:
        release.wait(5)

    def bad(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO meta VALUES ('bad', 'x')")
        raise ValueError("client mistake")

    def good(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO meta VALUES ('good', 'y')")

    def run(fn: object) -> None:
        try:
            store.write(fn)  # type: ignore[arg-type]
        except ValueError as exc:
            errors.append(exc)

    first = threading.Thread(target=run, args=(blocker,))
    first.start()
    threads = [threading.Thread(target=run, args=(f,)) for f in (bad, good)]
    for t in threads:
        t.start()
    release.set()
    for t in (first, *threads):
        t.join()
    keys = store.read(lambda c: {r[0] for r in c.execute("SELECT key FROM meta")})
    store.close()
    assert "good" in keys and "bad" not in keys
    assert [str(e) for e in errors] == ["client mistake"]


def test_a_full_disk_is_an_error_for_the_writer_never_a_partial_write(tmp_path: Path) -> None:
    store = Store(tmp_path)
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(StoreUnavailableError, match="full"):
        store.write(
            lambda c: c.executemany(
                "INSERT INTO ids VALUES (?, x'00', 0, 0, 0)",
                [(f"{i:03}".encode() * 170,) for i in range(200)],
            )
        )
    assert store.read(lambda c: c.execute("SELECT COUNT(*) FROM ids").fetchone()[0]) == 0
    store.close()


def test_garbage_in_place_of_the_store_is_refused_and_left_untouched(tmp_path: Path) -> None:
    Store(tmp_path).close()
    path = tmp_path / DB_NAME
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\x5a" * (4096 - 100)  # the schema page overwritten
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"damaged|unreadable|integrity"):
        Store(tmp_path)
    assert path.read_bytes() == bytes(data)


def test_an_empty_store_file_is_damage_not_a_fresh_start(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"")
    with pytest.raises(StoreError, match="empty"):
        Store(tmp_path)
    assert (tmp_path / DB_NAME).stat().st_size == 0


def test_a_store_from_a_newer_sidecar_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 4"):
        Store(tmp_path)


def test_a_second_process_on_the_same_store_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    store = Store(tmp_path)
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from sidecar.usage.store import Store\n"
                "try:\n    Store(Path(sys.argv[1]))\nexcept Exception as e:\n    print(e)",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "double-bill" in out.stdout
    finally:
        store.close()


# -- the generic store: a Schema, migrations, the Db interface ------------------------------

V1_DDL = "CREATE TABLE items (id TEXT PRIMARY KEY, n BIGINT NOT NULL);"
V1 = Schema(name="t.sqlite3", version=1, sqlite=V1_DDL, postgresql=V1_DDL)


def _meta_version(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(
            conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        )
    finally:
        conn.close()


def test_open_store_without_a_url_is_sqlite_in_the_state_dir(tmp_path: Path) -> None:
    store = open_store(V1, state_dir=tmp_path, database_url=None)
    try:
        assert (store.backend, store.where) == ("sqlite", str(tmp_path / "t.sqlite3"))
        assert store.available() == (True, None) and store.leading()

        def job(db: Db) -> str:
            db.lock(1)  # a no-op here: one writer thread serialises everything
            db.execute("INSERT INTO items VALUES (?, ?)", ("a", 1))
            return db.dialect

        assert store.write(job) == "sqlite"
        assert store.read(lambda db: db.execute("SELECT n FROM items").fetchall()) == [(1,)]
    finally:
        store.close()
    assert store.available()[0] is False
    with pytest.raises(StoreUnavailableError, match="closed"):
        store.write(job)


def test_a_jobs_sql_mistake_rolls_back_that_job_alone(tmp_path: Path) -> None:
    """A constraint violation is the job's own error (as on PostgreSQL), not a store failure
    that would fail every job sharing its transaction."""
    store = Store(tmp_path, schema=V1)
    release = threading.Event()
    errors: list[BaseException] = []

    def dup(db: Db) -> None:
        db.execute("INSERT INTO items VALUES ('side', 0)")
        db.execute("INSERT INTO items VALUES ('taken', 0)")

    def run(fn: Any) -> None:
        try:
            store.write(fn)
        except Exception as exc:
            errors.append(exc)

    inside = threading.Event()

    def blocker(db: Db) -> None:
        inside.set()
        release.wait(5)

    store.write(lambda db: db.execute("INSERT INTO items VALUES ('taken', 0)"))
    first = threading.Thread(target=run, args=(blocker,))
    first.start()
    assert inside.wait(5)
    threads = [
        threading.Thread(target=run, args=(f,))
        for f in (dup, lambda db: db.execute("INSERT INTO items VALUES ('good', 0)"))
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while store._queue.qsize() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in (first, *threads):
        t.join()
    ids = store.read(lambda db: {r[0] for r in db.execute("SELECT id FROM items")})
    store.close()
    assert ids == {"taken", "good"}
    assert [type(e) for e in errors] == [sqlite3.IntegrityError]


def test_an_older_store_is_migrated_in_one_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path, schema=V1)
    store.write(lambda db: db.execute("INSERT INTO items VALUES ('kept', 3)"))
    store.close()
    path = tmp_path / "t.sqlite3"
    broken = replace(
        V1,
        version=3,
        migrations={
            2: ("ALTER TABLE items ADD COLUMN note TEXT", ""),
            3: ("ALTER TABLE nowhere ADD COLUMN x TEXT", ""),
        },
    )
    with pytest.raises(StoreError, match="migrating schema version 1 to 3 failed"):
        Store(tmp_path, schema=broken)
    conn = sqlite3.connect(path)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(items)")]
    conn.close()
    assert columns == ["id", "n"]  # step 2 was undone with step 3
    assert _meta_version(path) == "1"
    v2 = replace(V1, version=2, migrations={2: ("ALTER TABLE items ADD COLUMN note TEXT", "")})
    store = Store(tmp_path, schema=v2)
    try:
        rows = store.read(lambda db: db.execute("SELECT id, n, note FROM items").fetchall())
        assert rows == [("kept", 3, None)]
    finally:
        store.close()
    assert _meta_version(path) == "2"


def test_a_version_without_its_migration_is_refused_untouched(tmp_path: Path) -> None:
    Store(tmp_path, schema=V1).close()
    before = (tmp_path / "t.sqlite3").read_bytes()
    with pytest.raises(StoreError, match="no migration to version 2"):
        Store(tmp_path, schema=replace(V1, version=2))
    assert (tmp_path / "t.sqlite3").read_bytes() == before


def test_the_custom_store_keeps_its_file_and_version(tmp_path: Path) -> None:
    Store(tmp_path).close()
    assert CUSTOM_SCHEMA.name == DB_NAME == "usage.sqlite3"
    assert _meta_version(tmp_path / DB_NAME) == "3"


def test_psycopg_is_imported_only_for_a_database_url(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path\n"
        "import sidecar.app, sidecar.usage.service\n"
        "from sidecar.usage.db import Schema, open_store\n"
        "d = 'CREATE TABLE x (a TEXT);'\n"
        "open_store(Schema('x.sqlite3', 1, d, d), state_dir=Path(sys.argv[1])).close()\n"
        "print('psycopg' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "False", out.stderr
