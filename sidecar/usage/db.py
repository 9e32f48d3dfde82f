"""The usage store's interface, whatever the backend: SQLite for one replica, PostgreSQL for many.

A ledger (custom mode's `ledger`, SaaS mode's `saas_ledger`) is a set of functions taking a `Db`:
the store runs each one inside its writer's transaction (`write`: group commit, one savepoint per
job) or a read snapshot (`read`). The same statements run on both backends, so they keep to the
portable subset: `?` placeholders, `INSERT ... ON CONFLICT`, BIGINT / DOUBLE PRECISION / TEXT,
booleans as INTEGER 0/1, `int()` around aggregates (PostgreSQL's SUM(bigint) is a Decimal). On
PostgreSQL a failed statement aborts the transaction: a job must not catch a database error and
carry on (SQLite would let it); it lets it propagate, and its savepoint is rolled back.

`open_store` picks the backend: a database URL means PostgreSQL (psycopg is imported only then),
otherwise the state directory's SQLite file.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

T = TypeVar("T")

# How long a caller waits for its write's transaction by default (the leader's own writes: a
# seal of a big hour may take a while, and withdrawing it would only make it start again).
WRITE_WAIT = 120.0
# How long POST /v1/usage waits. A 503 after it means "not stored, and never will be" (the job
# is withdrawn), so it stays under a product's usual HTTP timeout (the client library's is
# 10 s): the product hears a certain answer rather than a timeout of its own.
INTAKE_WAIT = 8.0
# How long a caller whose COMMIT is already on its way waits for the answer before saying
# "unknown": bounded by the server's and the network's own limits (pgstore: tcp_user_timeout).
COMMIT_WAIT = 30.0


class StoreError(Exception):
    """The store cannot be opened or trusted. Never answered by starting from zero."""


class StoreUnavailableError(Exception):
    """A write (or read) did not happen and never will: the database is unreachable,
    restarting, the disk is full, or the store was too slow and the write was withdrawn before
    its COMMIT. Answer 503 with Retry-After; resending is safe, with or without an id."""


class StoreOutcomeUnknownError(StoreUnavailableError):
    """The write's COMMIT was sent but its answer never came (the connection was lost during
    it, or it outlasted the wait): it may be stored. Answer 503 and say so: resend with the SAME
    idempotency id, which counts once whatever happened; without an id it may count twice."""


class StoreBusyError(StoreUnavailableError):
    """A lock the write needs is held elsewhere (another replica, maybe frozen mid-transaction)
    past the store's short wait: nothing was written; try again later."""


class Cursor(Protocol):
    """What `Db.execute` returns (sqlite3's and psycopg's cursors both fit)."""

    @property
    def rowcount(self) -> int: ...

    # Any, not `tuple | None`: `execute(...).fetchone()[0]` on a query that always returns a row
    # (COUNT, MIN) type-checks without a cast; check for None where a row may be missing.
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[tuple[Any, ...]]: ...

    def __iter__(self) -> Iterator[tuple[Any, ...]]: ...


class Db(Protocol):
    """What a transaction function receives."""

    @property
    def dialect(self) -> str: ...  # "sqlite" | "postgresql"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...  # '?' placeholders

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def lock(self, key: int, *, shared: bool = False) -> None:
        """A transaction-scoped lock on `key` (a signed 64-bit int), released at COMMIT.

        PostgreSQL: pg_advisory_xact_lock[_shared], so sidecars of one fleet serialise on it.
        SQLite: nothing to do, one writer thread already serialises every transaction.
        A lock a transaction may wait for while holding others must also be declared to
        `write(..., locks=...)`, so the store takes it first, in the fleet's one order.
        """
        ...


INSERT_ROWS = 500  # rows per multi-row INSERT: one round trip each, far below either parameter cap


def insert_new(
    db: Db, table: str, columns: Sequence[str], key: str, rows: Sequence[Sequence[Any]]
) -> None:
    """Insert `rows` (values in `columns` order), INSERT_ROWS per multi-row statement; a row whose
    `key` is taken is skipped (ON CONFLICT DO NOTHING). `table`, `columns` and `key` are the
    caller's constants, never input."""
    row = "(" + ", ".join(["?"] * len(columns)) + ")"
    for i in range(0, len(rows), INSERT_ROWS):
        chunk = rows[i : i + INSERT_ROWS]
        db.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES "  # noqa: S608  # nosec B608 # constant names; values are bound
            + ", ".join([row] * len(chunk))
            + f" ON CONFLICT ({key}) DO NOTHING",
            [v for r in chunk for v in r],
        )


# (key, exclusive): an advisory lock a write needs. The store takes the union of its batch's
# locks at the start of the transaction, sorted by key, the strongest mode of each; see pgstore.
Lock = tuple[int, bool]


@dataclass(frozen=True)
class Schema:
    """A ledger's tables, versioned.

    `name` is the SQLite file in the state dir and, on PostgreSQL, the row of the version table
    (`sidecar_schema (name, version)`). SQLite keeps the version in `meta (key, value)` under
    'schema_version' (a schema may create `meta` itself, as custom mode's does, or leave it to the
    store). `migrations[k]` = (sqlite DDL, postgresql DDL) taking version k-1 to k; all the steps
    an open needs run in ONE transaction, and a store newer than `version` is refused untouched.
    `migration_room[k]` is a SQLite query giving an upper bound of the bytes step k writes beside
    the store (its WAL); a step without one is bounded by the whole file (see store.Store).
    """

    name: str
    version: int
    sqlite: str
    postgresql: str
    migrations: Mapping[int, tuple[str, str]] = field(default_factory=dict)
    migration_room: Mapping[int, str] = field(default_factory=dict)


class UsageStore(Protocol):
    """The store a service holds (SQLite `Store` or PostgreSQL `PgStore`)."""

    @property
    def backend(self) -> str: ...  # "sqlite" | "postgresql"

    @property
    def where(self) -> str: ...  # the file, or the URL without its password

    def write(
        self,
        fn: Callable[[Db], T],
        timeout: float = WRITE_WAIT,
        locks: Sequence[Lock] = (),
        lock_wait: float | None = None,
    ) -> T:
        """Run `fn` in the writer's next transaction; return once it is COMMITTED.

        `fn`'s own exceptions roll back `fn` alone and are re-raised. StoreUnavailableError
        when the store cannot write (at once) or `fn` was not committed within `timeout`: then
        it is withdrawn and never will be. StoreOutcomeUnknownError when its COMMIT was sent and
        no answer came (see `submit`). `locks`: the advisory locks `fn` takes (`Db.lock`);
        `lock_wait`: how long to wait for them (None: the store's default), then StoreBusyError.
        """
        ...

    def read(self, fn: Callable[[Db], T]) -> T: ...  # a consistent snapshot

    def available(self) -> tuple[bool, str | None]: ...  # for /readyz: (False, why)

    def leading(self) -> bool:
        """Take, or check we still hold, the fleet's SENDER role (SQLite: always True)."""
        ...

    def close(self) -> None: ...


def open_store(
    schema: Schema, *, state_dir: Path | None = None, database_url: str | None = None
) -> UsageStore:
    """The store for this configuration; StoreError (a clear message) when it cannot be used."""
    if database_url:
        try:
            from sidecar.usage.pgstore import PgStore
        except ImportError as exc:  # psycopg is a dependency; a broken install says so
            raise StoreError(f"PostgreSQL support is not installed (psycopg): {exc}") from None
        return PgStore(schema, database_url)
    if state_dir is None:
        raise StoreError("no usage store: set a database URL or a state directory")
    from sidecar.usage.store import Store

    return Store(state_dir, schema=schema)


def redact_url(url: str) -> str:
    """`postgresql://user@host:port/db`: the URL without its password or query (which may hold
    `password=`), for logs, messages and /readyz."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://(unparseable URL)"
    if not parts.scheme or "://" not in url:
        return "(connection string hidden)"
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return f"{parts.scheme}://{user + '@' if user else ''}{hosts}{parts.path}"


def url_secrets(url: str) -> list[str]:
    """The URL's password as written and decoded (longest first), to scrub from messages."""
    found: set[str] = set()
    try:
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        if ":" in userinfo:
            found.add(userinfo.partition(":")[2])
        for value in parse_qs(parts.query).get("password", []):
            found.add(value)
    except ValueError:
        pass
    found |= {unquote(s) for s in found}
    found.discard("")
    return sorted(found, key=len, reverse=True)


def scrub(message: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        message = message.replace(secret, "***")
    return message


# -- the writer queue both stores share -------------------------------------------------------


# One lock for every job's state, so a waiter's give-up and the writer's COMMIT cannot cross.
_GATE = threading.Lock()


@dataclass
class Job:
    """One `write` waiting for the writer thread's next transaction.

    `state`: queued (not in a COMMIT yet: its waiter may withdraw it), withdrawn (the waiter
    answered "not stored"; the writer skips it, or rolls back the transaction it ran in),
    committing (the writer is sending the COMMIT: its waiter waits for the outcome). The
    writer moves every job of a transaction to committing in one step before COMMIT (`claim`).
    """

    fn: Callable[[Db], Any]
    locks: tuple[Lock, ...] = ()
    lock_wait: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    attempts: int = 0
    state: str = "queued"

    def withdrawn(self) -> bool:
        return self.state == "withdrawn"


def claim(jobs: Sequence[Job]) -> list[Job]:
    """Before COMMIT: every job not withdrawn becomes `committing`, atomically against the
    waiters; the withdrawn ones are returned. If any were, the caller must roll the transaction
    back (their writes are in it) and run the others again."""
    with _GATE:
        gone = [j for j in jobs if j.state == "withdrawn"]
        if not gone:
            for j in jobs:
                j.state = "committing"
        return gone


def finish(job: Job, result: Any = None, error: BaseException | None = None) -> None:
    job.result, job.error = result, error
    job.done.set()


def _withdraw(job: Job) -> bool:
    """The waiter gives up: True if the job can no longer be committed."""
    with _GATE:
        if job.state == "committing":
            return False
        job.state = "withdrawn"
        return True


JobQueue = queue.SimpleQueue[Job | None]


def submit(
    jobs: JobQueue,
    fn: Callable[[Db], T],
    timeout: float,
    locks: Sequence[Lock] = (),
    lock_wait: float | None = None,
) -> T:
    """Queue `fn` for the writer and wait until its transaction is committed (or failed).

    After `timeout` the job is withdrawn unless its COMMIT is already on its way: withdrawn,
    it is never committed (StoreUnavailableError: resending is safe). Otherwise the outcome is
    awaited for COMMIT_WAIT more and, still unknown, StoreOutcomeUnknownError."""
    job = Job(fn, tuple(locks), lock_wait)
    jobs.put(job)
    if not job.done.wait(timeout):
        if _withdraw(job):
            raise StoreUnavailableError(
                f"the usage store did not commit within {timeout:.0f} s; the write was "
                "withdrawn and will not be stored"
            )
        if not job.done.wait(COMMIT_WAIT):
            raise StoreOutcomeUnknownError(
                f"the usage store's COMMIT did not answer within {timeout + COMMIT_WAIT:.0f} s"
            )
    if job.error is not None:
        raise job.error
    return job.result  # type: ignore[no-any-return]


def take_batch(jobs: JobQueue, first: Job, batch_max: int) -> tuple[list[Job], bool]:
    """`first` and whatever else is already waiting, up to `batch_max`: one transaction, one
    fsync for all of them (group commit). True when the queue also said stop (None). Jobs
    their waiters withdrew are left out (they never run)."""
    batch = [first]
    stop = False
    while len(batch) < batch_max:
        try:
            more = jobs.get_nowait()
        except queue.Empty:
            break
        if more is None:
            stop = True
            break
        batch.append(more)
    return [j for j in batch if not j.withdrawn()], stop
