"""The durable usage store: SQLite in the state dir, one writer thread, group commit.

Why SQLite: atomic multi-row transactions (seal an hour and write its exact request in one step),
crash recovery by WAL replay, and a file format with checksummed pages that `quick_check`
inspects. WAL with `synchronous=FULL` fsyncs the log at every commit, so an acknowledged POST
survives kill -9 and power loss. One writer thread takes every pending write, runs each in its own
savepoint inside ONE transaction and commits once: concurrent POSTs share one fsync, and a
rejected request rolls back alone.

The file is created under a temporary name and renamed into place once its schema is committed,
so an empty or schema-less `usage.sqlite3` can only mean damage: it is reported, never reset
(a peer's agent treated an empty queue file as "nothing to send" and lost the usage).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import sqlite3
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

DB_NAME = "usage.sqlite3"
LOCK_NAME = "usage.lock"
SCHEMA_VERSION = 1
T = TypeVar("T")
_VERSION_ROW = "INSERT INTO meta VALUES ('schema_version', '1');"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- One row per accepted record (or per allocation of a record). Never updated after the hour is
-- sealed: the sealed request is built from these rows.
CREATE TABLE records (
    seq INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    quantity INTEGER NOT NULL,
    tags TEXT,
    received_at REAL NOT NULL,
    carried_from INTEGER
);
CREATE INDEX records_by_hour ON records (dimension, hour, tags);
-- (dimension, hour) pairs holding records and not sealed yet, with running totals (so an
-- ingest never scans the hour's records).
CREATE TABLE open_hours (
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    quantity INTEGER NOT NULL DEFAULT 0,
    tagsets INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dimension, hour)
) WITHOUT ROWID;
-- Client idempotency keys: same id and digest -> the stored answer again.
CREATE TABLE keys (
    id TEXT PRIMARY KEY, digest TEXT NOT NULL, answer TEXT NOT NULL, created_at REAL NOT NULL
);
-- One row per sealed (dimension, hour): the exact MeterUsage request, written before its first
-- send, and what became of it. States: sealed, sent, conflict, expired, rejected.
CREATE TABLE hours (
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    state TEXT NOT NULL,
    purpose TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    request TEXT NOT NULL,
    sealed_at REAL NOT NULL,
    send_after REAL NOT NULL,
    deadline REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_code TEXT,
    last_error TEXT,
    record_id TEXT,
    done_at REAL,
    PRIMARY KEY (dimension, hour)
);
CREATE INDEX hours_by_state ON hours (state, send_after);
-- AWS's entitlement refusal for this pod (it is given only once): one row at most.
CREATE TABLE verdict (one INTEGER PRIMARY KEY CHECK (one = 1), error TEXT NOT NULL);
"""


class StoreError(Exception):
    """The store cannot be opened or trusted. Never answered by starting from zero."""


class StoreUnavailableError(Exception):
    """A write did not reach the disk (disk full, I/O error): nothing was stored; retry later."""


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass
class StoreStats:
    commits: int = 0
    jobs: int = 0
    failed_commits: int = 0


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"{path}: SQLite refused WAL mode (got {mode}); is the state dir local?")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


class Store:
    """Owns the database file. `write` runs a function in the writer's transaction."""

    def __init__(self, directory: Path, *, batch_max: int = 512) -> None:
        self.directory = directory
        self.path = directory / DB_NAME
        self.stats = StoreStats()
        self._batch_max = batch_max
        self._lock_fd = self._take_lock()
        try:
            if not self.path.exists():
                self._create()
            self._conn = self._open_checked()
            self._reader = _connect(self.path)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._read_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="usage-writer", daemon=True)
        self._writer.start()

    # -- opening -------------------------------------------------------------------------

    def _take_lock(self) -> int:
        try:
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"usage store in {self.directory} cannot be opened: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(
                f"another sidecar process holds the usage store in {self.directory}; "
                "two senders on one store would double-bill"
            ) from None
        return fd

    def _create(self) -> None:
        """Schema committed under a temporary name, then renamed: never a half-made store."""
        tmp = self.directory / (DB_NAME + ".new")
        for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            stale.unlink(missing_ok=True)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript("BEGIN;" + SCHEMA + _VERSION_ROW + "COMMIT;")
            conn.close()
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
            _fsync_dir(self.directory)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"usage store {self.path} cannot be created: {exc}") from None

    def _open_checked(self) -> sqlite3.Connection:
        hint = (
            "the usage store is damaged or not ours; it is left as it is. Unsent usage in it "
            "would be lost by deleting it: inspect it (sqlite3), or move it aside knowingly"
        )
        try:
            info = self.path.lstat()
            if stat.S_ISLNK(info.st_mode) or info.st_nlink > 1:
                # The lock is per state dir: a store reached through a link from another state
                # dir would have two senders, and every sealed hour would be billed twice.
                raise StoreError(
                    f"{self.path} is a symlink or hard link (maybe another sidecar's store): {hint}"
                )
            if not stat.S_ISREG(info.st_mode):
                raise StoreError(f"{self.path} is not a regular file: {hint}")
            if info.st_size == 0:
                raise StoreError(f"{self.path} is empty: {hint}")
            conn = _connect(self.path)
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(f"{self.path} fails its integrity check ({check}): {hint}")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is unreadable ({exc}): {hint}") from None
        except OSError as exc:
            raise StoreError(f"{self.path} cannot be read ({exc})") from None
        if row is None:
            raise StoreError(f"{self.path} has no schema version: {hint}")
        if row[0] != str(SCHEMA_VERSION):
            raise StoreError(
                f"{self.path} has schema version {row[0]}; this sidecar reads version "
                f"{SCHEMA_VERSION} (was the sidecar downgraded?)"
            )
        return conn

    # -- writing -------------------------------------------------------------------------

    def write(self, fn: Callable[[sqlite3.Connection], T], timeout: float = 120.0) -> T:
        """Run `fn` in the writer's next transaction; return once it is committed (fsync'd).

        Exceptions raised by `fn` roll back `fn`'s writes only and are re-raised here.
        """
        job = _Job(fn)
        self._queue.put(job)
        if not job.done.wait(timeout):
            raise StoreUnavailableError(f"the usage store did not commit within {timeout:.0f} s")
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[no-any-return]

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < self._batch_max:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Job]) -> None:
        conn = self._conn
        failure: str | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    job.result = job.fn(conn)
                except sqlite3.Error:
                    raise  # the store itself failed: the whole batch goes
                except Exception as exc:
                    job.error = exc
                    conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            conn.execute("COMMIT")
            self.stats.commits += 1
            self.stats.jobs += len(batch)
        except sqlite3.Error as exc:
            failure = f"{type(exc).__name__}: {exc}"
            self.stats.failed_commits += 1
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            log.error("usage_store_write_failed", extra={"detail": failure})
        for job in batch:
            if failure is not None:
                job.result, job.error = None, StoreUnavailableError(failure)
            job.done.set()

    # -- reading -------------------------------------------------------------------------

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on a read connection (a consistent snapshot; never blocks the writer)."""
        with self._read_lock:
            self._reader.execute("BEGIN")
            try:
                return fn(self._reader)
            finally:
                self._reader.execute("COMMIT")

    def close(self) -> None:
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout=30)
        with self._read_lock:
            self._reader.close()
        self._conn.close()
        os.close(self._lock_fd)


def dumps(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))
