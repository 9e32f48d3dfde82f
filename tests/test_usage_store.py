"""The usage store: durable settings, group commit, and damage reported, never reset."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from sidecar.usage.store import DB_NAME, Store, StoreError, StoreUnavailableError


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
                "INSERT INTO records (record_id, dimension, hour, quantity, received_at) "
                "VALUES (?, 'scans', 1, 1, 0)",
                (f"r{i}",),
            )
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert store.read(lambda c: c.execute("SELECT COUNT(*) FROM records").fetchone()[0]) == 32
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
                "INSERT INTO keys VALUES (?, 'd', ?, 0)", [(str(i), "x" * 500) for i in range(200)]
            )
        )
    assert store.read(lambda c: c.execute("SELECT COUNT(*) FROM keys").fetchone()[0]) == 0
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
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 2"):
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
