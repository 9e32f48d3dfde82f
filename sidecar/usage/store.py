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

The store is generic over a `Schema` (custom mode's by default, SaaS mode's when given); jobs
receive a `Db` (see `db.py`), the same interface PostgreSQL's store gives them. An older file is
migrated in one transaction at open; a newer one is refused and left as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sidecar.usage import volume
from sidecar.usage.db import (
    WRITE_WAIT,
    Cursor,
    Db,
    Job,
    JobQueue,
    Lock,
    Schema,
    StoreError,
    StoreUnavailableError,
    claim,
    finish,
    submit,
    take_batch,
)

__all__ = [
    "CUSTOM_SCHEMA",
    "DB_NAME",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "dumps",
]

log = logging.getLogger(__name__)

DB_NAME = "usage.sqlite3"
LOCK_NAME = "usage.lock"
T = TypeVar("T")
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
_SET_VERSION = (
    "INSERT INTO meta VALUES ('schema_version', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- The totals of each (dimension, hour, tag set) not sealed yet ('' = no allocations): the sealed
-- request is built from them, and they go when it is. `n` records (or allocations) were added,
-- `carried` of them from an earlier hour.
CREATE TABLE open_tags (
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    tags TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    n INTEGER NOT NULL,
    carried INTEGER NOT NULL,
    PRIMARY KEY (dimension, hour, tags)
) WITHOUT ROWID;
-- (dimension, hour) pairs holding records and not sealed yet, with running totals (so an
-- ingest never scans the hour's records).
CREATE TABLE open_hours (
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    quantity INTEGER NOT NULL DEFAULT 0,
    tagsets INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dimension, hour)
) WITHOUT ROWID;
-- Client ids of the idempotency window, ~30 bytes each: 12 bytes of SHA-256(id) -> 8 bytes of
-- the record's content digest (same id, other content: 409), the hour it was received (`made`,
-- for pruning) and where it counted (hour = made + counted; it happened in hour + carried).
CREATE TABLE ids (
    id BLOB PRIMARY KEY,
    body BLOB NOT NULL,
    made INTEGER NOT NULL,
    counted INTEGER NOT NULL,
    carried INTEGER NOT NULL
) WITHOUT ROWID;
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

# Version 1 kept a row per record (and per allocation) for 48 hours and each id's full answer:
# ~390 bytes a record. Version 2 keeps the open hours' totals and ~30 bytes per id. The open
# hours' records become their totals; each id keeps its digests and the hour of its answer.
_V1_TO_V2 = """
CREATE TABLE open_tags (
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    tags TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    n INTEGER NOT NULL,
    carried INTEGER NOT NULL,
    PRIMARY KEY (dimension, hour, tags)
) WITHOUT ROWID;
INSERT INTO open_tags (dimension, hour, tags, quantity, n, carried)
    SELECT r.dimension, r.hour, COALESCE(r.tags, ''), SUM(r.quantity), COUNT(*),
           SUM(r.carried_from IS NOT NULL)
    FROM records r JOIN open_hours o ON o.dimension = r.dimension AND o.hour = r.hour
    GROUP BY r.dimension, r.hour, COALESCE(r.tags, '');
CREATE TABLE ids (
    id BLOB PRIMARY KEY,
    body BLOB NOT NULL,
    made INTEGER NOT NULL,
    counted INTEGER NOT NULL,
    carried INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO ids (id, body, made, counted, carried)
    SELECT substr(sidecar_sha256(k.id), 1, 12), substr(sidecar_unhex(k.digest), 1, 8), k.made,
           k.hour - k.made, COALESCE(k.own - k.hour, 0)
    FROM (SELECT id, digest, CAST(created_at / 3600 AS INTEGER) AS made,
                 CAST(strftime('%s', json_extract(answer, '$.hour')) AS INTEGER) / 3600 AS hour,
                 CAST(strftime('%s', json_extract(answer, '$.carried_from')) AS INTEGER) / 3600
                     AS own
          FROM keys) k;
DROP TABLE records;
DROP TABLE keys
"""

# Version 3: quantities are integer micro-units (1 unit = 1,000,000; sidecar.core.quantity), so
# fractional usage is exact. Integer history is scaled exactly (at most 2147483647 units a row
# before: 2.1e15 micro-units, far inside SQLite's 64-bit integers). The sealed requests keep their
# text (the integer `UsageQuantity`): a request AWS may have seen is resent byte for byte. The
# idempotency digests need nothing: a whole quantity enters the digest as the integer it was.
_V2_TO_V3 = """
UPDATE open_tags SET quantity = quantity * 1000000;
UPDATE open_hours SET quantity = quantity * 1000000;
UPDATE hours SET quantity = quantity * 1000000
"""

SCHEMA_VERSION = 3

# What each step writes beside the store at most (its WAL), for the room check before a
# migration (`Store._check_room`). Version 2's tables are built from version 1's records (the
# open hours' totals: at most the records' pages) and keys (~30 bytes an id, in B-tree pages at
# least half full: 64); version 3 rewrites every page of the three tables it scales.
_ROOM_V2 = (
    "SELECT (SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name = 'records') "
    "+ 64 * (SELECT COUNT(*) FROM keys)"
)
_ROOM_V3 = (
    "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name IN ('open_tags', 'open_hours', 'hours')"
)

# Custom mode's schema: no PostgreSQL form (custom mode is one pod, one file).
CUSTOM_SCHEMA = Schema(
    name=DB_NAME,
    version=SCHEMA_VERSION,
    sqlite=SCHEMA,
    postgresql="",
    migrations={2: (_V1_TO_V2, ""), 3: (_V2_TO_V3, "")},
    migration_room={2: _ROOM_V2, 3: _ROOM_V3},
)
# The setting that bounds the state volume (the emptyDir's sizeLimit), named in refusals.
VOLUME_SETTING = "MARKETPLACE_STATE_VOLUME_BYTES"
# The WAL file is cut back to this after a checkpoint: a burst must not keep the volume full.
WAL_LIMIT_BYTES = 4 * 1024 * 1024

# SQLite result codes that mean the STORE failed (disk, I/O, damage, locking): the whole
# transaction goes and every job in it hears StoreUnavailableError. Any other sqlite3 error in a
# job (a constraint, a bad statement) is that job's own mistake: its savepoint is rolled back and
# the error re-raised to its caller, as on PostgreSQL.
_STORE_FAILURES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)


def _store_failed(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is None or (code & 0xFF) in _STORE_FAILURES


class SqliteDb:
    """`Db` over a sqlite3 connection (sqlite3 already speaks '?')."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def lock(self, key: int, *, shared: bool = False) -> None:
        """Nothing to do: one writer thread serialises every transaction of this file."""


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
    conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
    # For migrations written in SQL (SQLite 3.40 has no hash and no unhex).
    conn.create_function("sidecar_sha256", 1, _sha256, deterministic=True)
    conn.create_function("sidecar_unhex", 1, _unhex, deterministic=True)
    return conn


def _sha256(text: str | bytes | None) -> bytes | None:
    if text is None:
        return None
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).digest()


def _unhex(text: str | None) -> bytes | None:
    return bytes.fromhex(text) if text is not None else None


class Store:
    """Owns the database file. `write` runs a function in the writer's transaction."""

    backend = "sqlite"

    def __init__(
        self,
        directory: Path,
        *,
        schema: Schema = CUSTOM_SCHEMA,
        batch_max: int = 512,
        volume_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.schema = schema
        # The state volume's size limit (None: the filesystem's room only), for migrations.
        self.volume_bytes = volume_bytes
        self.path = directory / schema.name
        self.where = str(self.path)
        self.stats = StoreStats()
        self._batch_max = batch_max
        self._closed = False
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
        self._queue: JobQueue = queue.SimpleQueue()
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
        tmp = self.directory / (self.schema.name + ".new")
        for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            stale.unlink(missing_ok=True)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=DELETE")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript("BEGIN;" + self.schema.sqlite + _META)
                conn.execute(_SET_VERSION, (str(self.schema.version),))
                conn.execute("COMMIT")
            finally:
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
            conn.close()
            raise StoreError(f"{self.path} has no schema version: {hint}")
        try:
            found = int(row[0])
        except (TypeError, ValueError):
            conn.close()
            raise StoreError(f"{self.path} has schema version {row[0]!r}: {hint}") from None
        if found > self.schema.version:
            conn.close()
            raise StoreError(
                f"{self.path} has schema version {found}; this sidecar reads version "
                f"{self.schema.version} (was the sidecar downgraded?). It is left as it is: "
                "run the newer sidecar, or move the file aside knowingly"
            )
        if found < self.schema.version:
            try:
                self._migrate(conn, found)
            except BaseException:
                conn.close()
                raise
        return conn

    def _migrate(self, conn: sqlite3.Connection, found: int) -> None:
        """Every step from `found` to the current version, and the new version, in ONE
        transaction: a crash or a failing step leaves the file at `found`."""
        target = self.schema.version
        missing = [k for k in range(found + 1, target + 1) if k not in self.schema.migrations]
        if missing:
            raise StoreError(
                f"{self.path} has schema version {found}; this sidecar (version {target}) has no "
                f"migration to version {missing[0]}. It is left as it is"
            )
        self._check_room(conn, found)
        steps = "".join(self.schema.migrations[k][0] + ";\n" for k in range(found + 1, target + 1))
        # Debian's SQLite zeroes every freed page (SECURE_DELETE): dropping an old table would
        # write all of it to the WAL again, and a nearly full volume would overflow.
        secure = int(conn.execute("PRAGMA secure_delete").fetchone()[0])
        conn.execute("PRAGMA secure_delete=OFF")
        try:
            conn.executescript("BEGIN IMMEDIATE;" + steps)
            conn.execute(_SET_VERSION, (str(target),))
            conn.execute("COMMIT")
            conn.execute(f"PRAGMA secure_delete={secure}")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise StoreError(
                f"{self.path}: migrating schema version {found} to {target} failed ({exc}); "
                "the store is left at its old version"
            ) from None
        log.info(
            "usage_store_migrated",
            extra={"detail": f"{self.path}: schema version {found} -> {target}"},
        )

    def _check_room(self, conn: sqlite3.Connection, found: int) -> None:
        """Refuse, before writing anything, a migration whose WAL would not fit the state
        volume. The kubelet evicts a pod whose emptyDir holds more than its sizeLimit while the
        disk (statvfs) still shows room: the bound is the configured size (VOLUME_SETTING), or
        the filesystem's room when that is less, as for usage (volume.reading)."""
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        whole = pages * page_size
        written = 0
        for k in range(found + 1, self.schema.version + 1):
            query = self.schema.migration_room.get(k)
            try:
                row = conn.execute(query).fetchone() if query else None
            except sqlite3.Error:  # no dbstat in this SQLite build: the whole file
                row = None
            written += int(row[0] or 0) if row is not None else whole
        # Each page goes to the WAL once per transaction, as a frame with a 24-byte header. A
        # row rewritten with its overflow pages frees and takes pages again: the freelist's
        # pages and the file's growth (2% of the pages, measured under 1.2%), the schema's
        # pages and the shared-memory index (32 KiB) besides.
        frames = -(-written // page_size) + pages // 50 + 64
        needed = 32 * 1024 + frames * (page_size + 24)
        files, store_file, _ = volume.files_bytes(self.directory, self.schema.name)
        st = os.statvfs(self.directory)
        room = volume.reading(
            files,
            store_file,
            pages,
            free,
            page_size,
            st.f_bavail * st.f_frsize,
            self.volume_bytes,
            VOLUME_SETTING,
        )
        left = room.limit - room.used
        if needed > left:
            fix = (
                f"give the volume more room ({VOLUME_SETTING} and the emptyDir's sizeLimit)"
                if room.source == VOLUME_SETTING
                else "free room on the disk"
            )
            raise StoreError(
                f"{self.path}: migrating schema version {found} to {self.schema.version} needs "
                f"up to {needed / volume.MIB:.2f} MiB beside the store, and the state volume has "
                f"{max(0, left) / volume.MIB:.1f} MiB left ({room.describe()}). The store is "
                f"left at version {found}, untouched: {fix}, then start again"
            )

    # -- writing -------------------------------------------------------------------------

    def write(
        self,
        fn: Callable[[Db], T],
        timeout: float = WRITE_WAIT,
        locks: Sequence[Lock] = (),
        lock_wait: float | None = None,
    ) -> T:
        """Run `fn` in the writer's next transaction; return once it is committed (fsync'd).

        Exceptions raised by `fn` roll back `fn`'s writes only and are re-raised here. Not
        committed within `timeout`: withdrawn, never committed (see `db.submit`). `locks` and
        `lock_wait` are for PostgreSQL: one writer thread already serialises this file.
        """
        if self._closed:
            raise StoreUnavailableError("the usage store is closed")
        return submit(self._queue, fn, timeout, locks)

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, stop = take_batch(self._queue, job, self._batch_max)
            while batch:
                batch = self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[Job]) -> list[Job]:
        """Run `batch` in one transaction; the jobs to run again in a new one (a job withdrawn
        by its waiter while it ran: the transaction holding its writes is rolled back)."""
        conn = self._conn
        db = SqliteDb(conn)
        failure: str | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Optimistic: no savepoint per job (two statements each, a fifth of an intake's),
            # since jobs rarely fail. When one does, the whole transaction is rolled back and
            # the batch runs again with a savepoint per job, so it is rolled back alone.
            if not self._run_plain(db, batch):
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                self._run_isolated(db, batch)
            gone = claim(batch)
            if gone:
                conn.execute("ROLLBACK")
                for job in gone:
                    finish(job, error=StoreUnavailableError("withdrawn by its caller"))
                again = [j for j in batch if j not in gone]
                for job in again:
                    job.result, job.error = None, None
                return again
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
        return []

    @staticmethod
    def _run_plain(db: SqliteDb, batch: list[Job]) -> bool:
        """Every job in the open transaction; False at the first job that raised (the caller
        rolls back). A store failure propagates: the whole batch goes."""
        for job in batch:
            try:
                job.result = job.fn(db)
            except sqlite3.Error as exc:
                if _store_failed(exc):
                    raise
                return False
            except Exception:
                return False
        return True

    @staticmethod
    def _run_isolated(db: SqliteDb, batch: list[Job]) -> None:
        """Every job in its own savepoint: a job that raises is rolled back alone and hears
        its error."""
        conn = db.conn
        for job in batch:
            job.result, job.error = None, None
            conn.execute("SAVEPOINT job")
            try:
                job.result = job.fn(db)
            except sqlite3.Error as exc:
                if _store_failed(exc):
                    raise  # the store itself failed: the whole batch goes
                job.result, job.error = None, exc
                conn.execute("ROLLBACK TO job")
            except Exception as exc:
                job.result, job.error = None, exc
                conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")

    # -- reading -------------------------------------------------------------------------

    def read(self, fn: Callable[[Db], T]) -> T:
        """Run `fn` on a read connection (a consistent snapshot; never blocks the writer)."""
        if self._closed:
            raise StoreUnavailableError("the usage store is closed")
        with self._read_lock:
            self._reader.execute("BEGIN")
            try:
                return fn(SqliteDb(self._reader))
            finally:
                self._reader.execute("COMMIT")

    def available(self) -> tuple[bool, str | None]:
        """A disk-full write is answered 503 per request; the file itself stays usable."""
        if self._closed or not self._writer.is_alive():
            return False, f"usage store {self.path} is closed"
        return True, None

    def leading(self) -> bool:
        """Always: the state dir's file lock already makes this the only process on it."""
        return not self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout=30)
        with self._read_lock:
            self._reader.close()
        self._conn.close()
        os.close(self._lock_fd)


def dumps(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))
