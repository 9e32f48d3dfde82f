"""The usage store in the seller's PostgreSQL, for many replicas (SaaS mode).

Imported only when a database URL is configured (psycopg is imported here and nowhere else).
The design is the SQLite store's, so the ledger cannot tell them apart:

- WRITERS (2) writer connections, each with its own thread, taking jobs from one queue. Each
  pending `write` runs in its own savepoint inside one transaction and they share one COMMIT
  (group commit): many concurrent POSTs cost one WAL flush on the server, and a job that raises
  rolls back alone. A second writer starts the next transaction while the first waits for its
  COMMIT's flush or for a lock another replica holds (one writer left the round trips of its
  transaction and the flush as the whole sidecar's limit). Jobs of one writer's transaction and
  of another's are independent, as those of two replicas always were: a caller's next write
  starts after its previous one returned, so its own writes keep their order. A job that needs
  a lock the other writer's transaction declared waits for it in the sidecar and joins the next
  transaction with whatever queued meanwhile (`_write_jobs`). At most 64 jobs per transaction:
  more savepoints than that overflow PostgreSQL's per-backend subtransaction cache and slow every
  other session's snapshots. A job that loses a deadlock or serialization race against another
  sidecar (two group commits touching the same rows in a different order) is rolled back to its
  savepoint and retried in the next transaction, not failed.
- A reader connection: `read` runs in a REPEATABLE READ READ ONLY transaction (one snapshot).
- A leader connection holding a session-level advisory lock: the fleet's one SENDER.
- `Db.lock(key)` is pg_advisory_xact_lock: sidecars serialise on a key until COMMIT. Locks a
  write declares (`write(locks=...)`) are taken first, in key order (`_prelock`), so writer
  transactions of the fleet cannot deadlock on them; every session is bounded by the server
  (SESSION_OPTIONS), so a sidecar frozen mid-transaction holds them for seconds, not forever.

Why one leader under an advisory lock rather than a `FOR UPDATE SKIP LOCKED` outbox: AWS's
BatchMeterUsage quota is per account (10 calls/s) and a call carries up to 25 records; one sender
fills every batch and paces the whole fleet under the quota, where senders sharing an outbox would
split batches (more calls per record) and each need a share of the quota. The lock belongs to a
database SESSION, so it needs no lease or clock: a SIGKILLed or crashed leader's connection closes,
the server ends its session, the lock is free, and another sidecar takes it on its next
`leading()`. A leader cut off by the network keeps believing it leads until its next `leading()`
fails, while the server (TCP keepalives set on the session, below) ends the session and another
sidecar takes over: for a moment two sidecars may send. That is safe because a sender only ever
sends requests that were stored before their first send, byte for byte, and AWS treats identical
requests as idempotent ("can be retried with the same records or a subset"); nothing is re-built.

A database that is DOWN when the sidecar starts (connection refused, timeout, DNS failure, the
server starting up) is an outage like any other: the store opens disconnected, every call answers
StoreUnavailableError with the reason, and the first connection that succeeds creates or migrates
the schema (under the advisory lock, as at start) before anything else runs on it; a log line is
written each way. What a retry cannot fix still stops the process before it binds (StoreError):
a malformed URL, authentication refused (wrong or missing password, no such role or database,
no pg_hba entry: the message says which) and a schema newer than this sidecar or one it cannot
migrate. Found only later, after a start without the database, a schema like that leaves the store
unavailable for good with the reason (in /readyz and an error log line): nothing is written to a
database this sidecar does not understand. Authentication refused later is reported the same way
but retried, as a password fixed on the server takes effect without a restart. libpq gives no
SQLSTATE for a failed connect, so refusals are told apart by the server's (English) message; a
server with other `lc_messages` is treated as down, i.e. retried and reported, never ignored.

Down or restarting server: every call raises StoreUnavailableError within `connect_timeout`
(3 s; at once when the port refuses), jobs already queued fail with it rather than wait, and for
`RETRY_SECONDS` after a failed connect no new attempt is made (calls fail at once). The next call
after that reconnects, so the store recovers by itself. A COMMIT cut by the connection's loss has
an unknown outcome: it is answered StoreOutcomeUnknownError (503 `store_outcome_unknown`), and the
client's retry, with the same idempotency id, is answered from the store if it had committed.
Every other failure is certain: nothing of the write was stored, and nothing will be (a write
whose caller gave up waiting is withdrawn before COMMIT, see `db.submit`).

The URL's password never appears in a message or log: `where` is the URL without it, and every
driver message is scrubbed of it. A connection pooler must be in session mode (advisory locks
and savepoints live in a session).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from sidecar.usage.db import (
    WRITE_WAIT,
    Cursor,
    Db,
    Job,
    JobQueue,
    Lock,
    Schema,
    StoreBusyError,
    StoreError,
    StoreOutcomeUnknownError,
    StoreUnavailableError,
    claim,
    finish,
    redact_url,
    scrub,
    submit,
    take_batch,
    url_secrets,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = psycopg.Connection[tuple[Any, ...]]

BATCH_MAX = 64  # savepoints per transaction; see the module docstring
WRITERS = 2  # writer connections, each running its own transactions; see the module docstring
JOB_RETRIES = 3  # deadlock / serialization failures retried in the next transaction
RETRY_SECONDS = 1.0  # after a failed connect, calls fail at once for this long
CONNECT_TIMEOUT = 3  # seconds (libpq's minimum is 2)
VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS sidecar_schema ("
    "name TEXT PRIMARY KEY, version BIGINT NOT NULL, migrated_at DOUBLE PRECISION NOT NULL)"
)
# Client-side defaults; settings in the URL win. TCP keepalives notice a dead server on an idle
# connection; tcp_user_timeout bounds a send that is never acknowledged (a vanished peer).
CLIENT_DEFAULTS = {
    "connect_timeout": str(CONNECT_TIMEOUT),
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
    "tcp_user_timeout": "15000",
    "application_name": "marketplace-sidecar",
}
# Every session asks the SERVER to bound what a stuck sidecar can hold. A sidecar frozen in the
# middle of a transaction (SIGSTOP, a paused VM, a cgroup freeze) answers TCP keepalives from its
# kernel, so only idle_in_transaction_session_timeout ends its transaction, and with it the
# advisory locks every other replica's intake and the leader's seal may need: within IDLE_TX
# seconds. Keepalives and tcp_user_timeout end the session of a sidecar cut off by the network
# (and free the sender lock of a partitioned leader) within about 20 s instead of the OS
# default of two hours. lock_timeout bounds any wait inside a job (a row another session
# holds): the job is retried in the next transaction, then answered 503.
IDLE_TX_SECONDS = 5
LOCK_TIMEOUT_MS = 2000
SESSION_OPTIONS = (
    f"-c idle_in_transaction_session_timeout={IDLE_TX_SECONDS * 1000} "
    f"-c lock_timeout={LOCK_TIMEOUT_MS} "
    "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=3 -c tcp_keepalives_count=3 "
    "-c tcp_user_timeout=15000 "
    # This sidecar writes quantities as integer micro-units (SaaS schema 3). The schema's
    # statement triggers refuse usage writes from a session without it: a replica of an older
    # sidecar still running during a rollout must not add whole units to micro-unit totals.
    "-c sidecar.quantity_unit=micro "
    # This sidecar seals contract dimensions net of the contract (SaaS schema 5); a trigger
    # refuses the seal of a session without it (saas_contract.MIGRATION_5).
    "-c sidecar.contract_seal=net "
    # This sidecar keeps open totals by tag set (SaaS schema 6); triggers refuse usage writes
    # and seals of a session without it (saas_ledger.MIGRATION_6).
    "-c sidecar.open_tags=v6"
)
# How long a transaction waits by default for the advisory locks its jobs declared
# (`write(locks=...)`) before the jobs that need them are answered StoreBusyError (503): longer
# than a live replica's transaction on a loaded machine, and than the server's bound on a frozen
# one (IDLE_TX_SECONDS), so a request that needs a frozen replica's lock still gets it once the
# server ends that transaction, within INTAKE_WAIT. An EXCLUSIVE lock that others take shared
# (the seal) asks for much less (`lock_wait`): while it waits, PostgreSQL queues every new
# shared request behind it.
PRELOCK_WAIT = IDLE_TX_SECONDS + 1.0
# Store-internal advisory locks use the two-int4 key space, which never meets the bigint keys
# `Db.lock` takes for the ledger.
LOCK_CLASS = 0x51DECA5


# What a connect failure says when retrying cannot help (see the module docstring).
REFUSALS = (
    (re.compile(r"password authentication failed for user \"[^\"]*\""), "wrong password"),
    (re.compile(r"no password supplied"), "the server wants a password and the URL has none"),
    (re.compile(r"role \"[^\"]*\" does not exist"), "no such role"),
    (re.compile(r"database \"[^\"]*\" does not exist"), "no such database"),
    (re.compile(r"no pg_hba\.conf entry"), "no pg_hba.conf entry allows this connection"),
    (re.compile(r"authentication failed"), "authentication refused"),
)
MALFORMED = re.compile(r"invalid (?:URI|connection option|[\w ]*value|port number)|missing \"=\"")


class RefusedError(StoreUnavailableError):
    """The server (or libpq) refused the connection for a reason a retry cannot fix."""


def refusal(message: str) -> str | None:
    """Why a connect failure is final (a configuration to fix), or None for a database down."""
    if MALFORMED.search(message):
        return "the database URL is malformed"
    for pattern, what in REFUSALS:
        found = pattern.search(message)
        if found:
            return f"{what} ({found.group(0)})" if what != "authentication refused" else what
    return None


def _key(label: str) -> int:
    digest = hashlib.blake2b(label.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """Our portable SQL to PostgreSQL's own: the n-th `?` outside quotes and comments becomes
    `$n`. Run through psycopg's raw cursor (`PgDb`), which sends it as it is: psycopg's `%s`
    form is re-parsed on every execute once a statement has more than 50 parameters (a POST's
    multi-row VALUES list), a quarter of a sidecar's CPU for 25-record POSTs."""
    out: list[str] = []
    i, n = 0, len(sql)
    quote: str | None = None  # "'" or '"' while inside one
    arg = 0
    while i < n:
        ch = sql[i]
        if quote is not None:
            out.append(ch)
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end])
            i = end
            continue
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(sql[i:end])
            i = end
            continue
        elif ch == "?":
            arg += 1
            out.append(f"${arg}")
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _params(params: Sequence[Any]) -> tuple[Any, ...]:
    # Booleans are INTEGER 0/1 in the portable schema; PostgreSQL would refuse a bool there.
    return tuple(int(p) if isinstance(p, bool) else p for p in params)


class PgDb:
    """`Db` over a psycopg connection."""

    dialect = "postgresql"

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        # Advisory keys this transaction already holds (True: exclusively), taken by the
        # store's `_prelock` for the whole transaction: `lock` on one of them would be a round
        # trip that cannot wait (a session never conflicts with its own locks), so it is skipped.
        self.held: dict[int, bool] = {}

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return psycopg.RawCursor(self.conn).execute(pg_sql(sql), _params(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with psycopg.RawCursor(self.conn) as cur:
            cur.executemany(pg_sql(sql), [_params(r) for r in rows])

    def lock(self, key: int, *, shared: bool = False) -> None:
        had = self.held.get(int(key))
        if had is not None and (had or shared):
            return
        if shared:
            self.conn.execute("SELECT pg_advisory_xact_lock_shared(%s::bigint)", (key,))
        else:
            self.conn.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (key,))


@dataclass
class StoreStats:
    commits: int = 0
    jobs: int = 0
    failed_commits: int = 0
    retried_jobs: int = 0


def _rolled_back(exc: BaseException) -> bool:
    """SQLSTATE class 40 (deadlock, serialization failure) or 55P03 (lock_timeout: a row held
    by a slow or frozen session): retry in another transaction. (psycopg's DeadlockDetected is
    no subclass of its TransactionRollback: ask the code.)"""
    if not isinstance(exc, psycopg.Error):
        return False
    code = str(exc.sqlstate or "")
    return code.startswith("40") or code == "55P03"


def _connection_lost(conn: Conn, exc: BaseException) -> bool:
    """The store failed (not the job): connection gone, server shutting down, disk full..."""
    if conn.closed or conn.broken:
        return True
    if _rolled_back(exc):
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


class PgStore:
    """The usage store in PostgreSQL; see the module docstring."""

    backend = "postgresql"

    def __init__(
        self,
        schema: Schema,
        url: str,
        *,
        batch_max: int = BATCH_MAX,
        retry_seconds: float = RETRY_SECONDS,
        writers: int = WRITERS,
    ) -> None:
        self.schema = schema
        self.where = redact_url(url)
        self.stats = StoreStats()
        self._secrets = url_secrets(url)
        self._url = url
        self._batch_max = batch_max
        self._retry = retry_seconds
        self._closed = False
        if not schema.postgresql.strip():
            raise StoreError(f"schema {schema.name} has no PostgreSQL form")
        try:
            given = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StoreError(f"database URL {self.where} is invalid: {self._scrub(exc)}") from None
        self._client = {k: v for k, v in CLIENT_DEFAULTS.items() if k not in given}
        own = str(given.get("options") or "")
        self._options = (SESSION_OPTIONS + " " + own).strip()  # the URL's own -c settings win
        # Shared down-state: why the last connect failed, and when (monotonic).
        self._state_lock = threading.Lock()
        self._down: str | None = None
        self._down_at = 0.0
        self._leader_key = 0
        # Set-up (schema created / migrated) done on some connection; until then every connect
        # runs it first. `_fatal`: a schema found unusable after a start without the database.
        self._ready = False
        self._fatal: str | None = None
        self._setup_lock = threading.Lock()
        self._started = False
        try:
            self._setup()
        except RefusedError as exc:
            raise StoreError(str(exc)) from None
        except StoreUnavailableError as exc:
            log.warning(
                "usage_store_starting_without_database",
                extra={"detail": f"{exc}; answering 503 until it is reachable"},
            )
        self._started = True  # from now on nothing stops the process: the store is unavailable
        self._wconns: dict[int, Conn | None] = {}  # each writer thread's own connection
        # Advisory keys the writers' transactions declared: exclusive holders, all holders.
        self._held: dict[int, int] = {}
        self._holders: dict[int, int] = {}
        self._held_changed = threading.Condition()
        self._waiter: int | None = None  # the writer waiting for a clash to end
        self._rconn: Conn | None = None
        self._lconn: Conn | None = None
        self._holding = False
        self._read_lock = threading.Lock()
        self._leader_lock = threading.Lock()
        self._queue: JobQueue = queue.SimpleQueue()
        self._writers = [
            threading.Thread(target=self._write_loop, name=f"usage-writer-{i}", daemon=True)
            for i in range(max(1, writers))
        ]
        for writer in self._writers:
            writer.start()

    @property
    def _wconn(self) -> Conn | None:
        """The calling writer thread's own connection."""
        return self._wconns.get(threading.get_ident())

    @_wconn.setter
    def _wconn(self, conn: Conn | None) -> None:
        self._wconns[threading.get_ident()] = conn

    # -- connections ---------------------------------------------------------------------

    def _scrub(self, exc: BaseException | str) -> str:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}".strip()
        return scrub(" ".join(text.split()), self._secrets)

    def _connect(self) -> Conn:
        """A new autocommit connection on a set-up database, or StoreUnavailableError."""
        if not self._ready:
            self._setup()
        return self._open()

    def _setup(self) -> None:
        """Create or migrate the schema once, on the first connection that succeeds."""
        with self._setup_lock:
            if self._fatal is not None:
                raise StoreUnavailableError(self._fatal)
            if self._ready:
                return
            try:
                self._migrate()
            except StoreError as exc:
                if not self._started:
                    raise  # at start: the process stops before binding
                self._fatal = f"usage store unusable: {exc}"
                log.error("usage_store_unusable", extra={"detail": self._fatal})
                raise StoreUnavailableError(self._fatal) from None
            self._ready = True

    def _open(self) -> Conn:
        """A new autocommit connection, or StoreUnavailableError (at once while down)."""
        self._gate()
        extra: dict[str, Any] = {**self._client, "options": self._options}
        try:
            conn: Conn = psycopg.connect(self._url, autocommit=True, **extra)
        except psycopg.Error as exc:
            text = self._scrub(exc)
            final = refusal(text)
            reason = f"{self.where}: {text}"
            with self._state_lock:
                if final is not None and reason != self._down:  # once per new reason
                    log.error("usage_store_refused", extra={"detail": f"{final}: {reason}"})
                elif self._down is None:
                    log.warning("usage_store_unreachable", extra={"detail": reason})
                self._down, self._down_at = reason, time.monotonic()
            if final is not None:
                raise RefusedError(
                    f"database {self.where} refused the connection: {final}: {text}"
                ) from None
            raise StoreUnavailableError(f"database unreachable: {reason}") from None
        with self._state_lock:
            if self._down is not None:
                log.info("usage_store_reachable", extra={"detail": self.where})
            self._down = None
        return conn

    def _lost(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(f"database connection lost: {self.where}: {self._scrub(exc)}")

    @staticmethod
    def _drop(conn: Conn | None) -> None:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _gate(self) -> None:
        """While a connect failed less than `retry` seconds ago, fail at once."""
        if self._fatal is not None:
            raise StoreUnavailableError(self._fatal)
        with self._state_lock:
            if self._down is not None and time.monotonic() - self._down_at < self._retry:
                raise StoreUnavailableError(f"database unreachable: {self._down}")

    # -- schema --------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Create or migrate the schema under a session advisory lock, so sidecars starting
        together take turns; a database newer than this sidecar is refused, untouched."""
        conn = self._open()  # StoreUnavailableError (down) or RefusedError propagate
        name, target = self.schema.name, self.schema.version
        try:
            conn.execute("SET lock_timeout = 0")  # a slow migration by another sidecar: wait
            conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, _key("schema")))
            # Advisory locks are per DATABASE: two fleets in two schemas of one database (each
            # with its own search_path) must not share one sender lock.
            here = conn.execute("SELECT current_schema()").fetchone()
            self._leader_key = _key(f"leader:{here[0] if here else ''}:{self.schema.name}")
            conn.execute(VERSION_TABLE)
            row = conn.execute(
                "SELECT version FROM sidecar_schema WHERE name = %s", (name,)
            ).fetchone()
            found = None if row is None else int(row[0])
            if found is not None and found > target:
                raise StoreError(
                    f"database {self.where} has schema {name} version {found}; this sidecar "
                    f"reads version {target} (was the sidecar downgraded?). It is left as it is"
                )
            if found == target:
                return
            if found is None:
                steps = [self.schema.postgresql]
            else:
                wanted = range(found + 1, target + 1)
                missing = [k for k in wanted if k not in self.schema.migrations]
                if missing:
                    raise StoreError(
                        f"database {self.where} has schema {name} version {found}; this sidecar "
                        f"(version {target}) has no migration to version {missing[0]}. "
                        "It is left as it is"
                    )
                steps = [self.schema.migrations[k][1] for k in range(found + 1, target + 1)]
            with conn.transaction():
                for ddl in steps:
                    conn.execute(ddl)
                conn.execute(
                    "INSERT INTO sidecar_schema VALUES (%s, %s, %s) ON CONFLICT (name) "
                    "DO UPDATE SET version = excluded.version, migrated_at = excluded.migrated_at",
                    (name, target, time.time()),
                )
            log.info(
                "usage_store_migrated",
                extra={"detail": f"{self.where}: schema {name} {found} -> {target}"},
            )
        except psycopg.Error as exc:
            if _connection_lost(conn, exc):
                # Cut off mid-way (the transaction rolled back): retried on the next connect.
                raise self._lost(exc) from None
            raise StoreError(
                f"database {self.where}: schema {name} cannot be created or migrated to version "
                f"{target} ({self._scrub(exc)}); nothing was changed"
            ) from None
        finally:
            self._drop(conn)  # ends the session: the advisory lock goes with it

    # -- writing -------------------------------------------------------------------------

    def write(
        self,
        fn: Callable[[Db], T],
        timeout: float = WRITE_WAIT,
        locks: Sequence[Lock] = (),
        lock_wait: float | None = None,
    ) -> T:
        """Run `fn` in the writer's next transaction; return once it is committed.

        Exceptions raised by `fn` roll back `fn`'s writes only and are re-raised here. Not
        committed within `timeout`: withdrawn, never committed (see `db.submit`). `locks`: the
        advisory locks `fn` takes, taken first for the whole transaction (see `_prelock`),
        waiting `lock_wait` seconds for them at most (default PRELOCK_WAIT).
        """
        if self._closed:
            raise StoreUnavailableError("the usage store is closed")
        self._gate()
        return submit(self._queue, fn, timeout, locks, lock_wait)

    def _write_loop(self) -> None:
        try:
            self._write_jobs()
        finally:
            self._drop(self._wconn)
            self._wconn = None

    def _clash(self, job: Job) -> bool:
        """`job` needs a lock another writer of this store holds (either side exclusive)."""
        return any(
            key in self._held and (exclusive or self._held[key] > 0) for key, exclusive in job.locks
        )

    def _write_jobs(self) -> None:
        """Take the next job and whatever is queued behind it: one transaction. A job needing
        a lock this store's other writer holds waits for that transaction to end first, while
        the queue fills: what must run one after the other shares one transaction (as with
        one writer) instead of two transactions queueing on the lock at the server."""
        while True:
            job = self._queue.get()
            if job is None:
                return
            me = threading.get_ident()
            with self._held_changed:
                while not job.withdrawn():
                    # First come, first served: a writer already waiting goes first, or the
                    # other writer, done, could take the next job and clash with it again.
                    ahead = self._waiter not in (None, me)
                    if not ahead and not self._clash(job):
                        break
                    if self._waiter is None:
                        self._waiter = me
                    self._held_changed.wait(0.5)
                if self._waiter == me:
                    self._waiter = None
                batch, stop = take_batch(self._queue, job, self._batch_max)
                mine = [(int(k), 1 if x else 0) for j in batch for k, x in j.locks]
                for key, exclusive in mine:
                    self._held[key] = self._held.get(key, 0) + exclusive
                    self._holders[key] = self._holders.get(key, 0) + 1
                self._held_changed.notify_all()
            try:
                if batch:
                    self._run(batch)
            except BaseException as exc:  # never leave a caller waiting
                # Nor a transaction half-run: closing the connection rolls it back, so the
                # next BEGIN cannot land inside it and commit what failed here.
                self._drop(self._wconn)
                self._wconn = None
                for j in batch:
                    if not j.done.is_set():
                        j.result, j.error = None, StoreUnavailableError(self._scrub(exc))
                        j.done.set()
                log.error("usage_store_writer_failed", extra={"detail": self._scrub(exc)})
            finally:
                with self._held_changed:
                    for key, exclusive in mine:
                        self._held[key] -= exclusive
                        self._holders[key] -= 1
                        if not self._holders[key]:
                            del self._held[key], self._holders[key]
                    self._held_changed.notify_all()
            if stop:
                return

    def _writer_conn(self) -> Conn:
        conn = self._wconn
        if conn is None or conn.closed or conn.broken:
            self._drop(conn)
            self._wconn = None
            conn = self._wconn = self._connect()
        return conn

    @staticmethod
    def _prelock(conn: Conn, jobs: list[Job], begin: str) -> tuple[dict[int, bool], list[Job]]:
        """Open the transaction (`begin`) and take every advisory lock the jobs declared, first
        thing in it: sorted by key, each in the strongest mode any job wants. Every writer
        transaction of the fleet takes its locks in that one order before it touches a row, and
        its jobs touch only rows those locks guard from one another, so no two transactions
        wait on each other in a cycle: intake can share the seal lock without deadlocking on
        hot rows. BEGIN, the locks and the first job's savepoint travel in one round trip (one
        simple query): what used to be three answers waited for is one.

        A lock not had within the jobs' shortest `lock_wait` (held by a slow or frozen replica,
        or sought by the leader's seal) is tried once more without waiting, keeping what can be
        had: the jobs whose locks are missing are returned, to be answered StoreBusyError; the
        others run. Returns (the locks held: key -> exclusively, those jobs). A failure of
        `begin` itself propagates (nothing ran)."""
        want: dict[int, bool] = {}
        for job in jobs:
            for key, exclusive in job.locks:
                want[int(key)] = want.get(int(key), False) or bool(exclusive)
        if not want:
            conn.execute(f"{begin}; SAVEPOINT job")
            return {}, []
        keys = sorted(want)
        waits = [j.lock_wait for j in jobs if j.locks and j.lock_wait is not None]
        wait_ms = max(1, round(1000 * min(waits, default=PRELOCK_WAIT)))
        ks = "{" + ",".join(str(k) for k in keys) + "}"
        xs = "{" + ",".join("t" if want[k] else "f" for k in keys) + "}"
        table = f"unnest('{ks}'::bigint[], '{xs}'::boolean[]) AS t(k, x)"
        try:
            conn.execute(  # one round trip; ints and booleans only, formatted by us
                f"{begin}; SAVEPOINT locks; SET LOCAL lock_timeout = {wait_ms}; "  # noqa: S608  # nosec B608
                "SELECT count(*) FROM (SELECT CASE WHEN x THEN pg_advisory_xact_lock(k)::text "
                f"ELSE pg_advisory_xact_lock_shared(k)::text END FROM {table}) AS taken; "
                "RELEASE SAVEPOINT locks; SET LOCAL lock_timeout TO DEFAULT; SAVEPOINT job"
            )
            return want, []
        except psycopg.errors.LockNotAvailable:
            pass
        conn.execute("ROLLBACK TO SAVEPOINT locks; RELEASE SAVEPOINT locks")
        conn.execute("SET LOCAL lock_timeout TO DEFAULT")
        got = {
            int(k): mode
            for k, mode in conn.execute(
                "SELECT k, CASE WHEN x THEN CASE WHEN pg_try_advisory_xact_lock(k) THEN 'x' "  # noqa: S608  # nosec B608
                "WHEN pg_try_advisory_xact_lock_shared(k) THEN 's' END "
                "ELSE CASE WHEN pg_try_advisory_xact_lock_shared(k) THEN 's' END END "
                f"FROM {table}; SAVEPOINT job"
            ).fetchall()
        }

        def had(key: int, exclusive: bool) -> bool:
            mode = got.get(int(key))
            return mode == "x" or (mode == "s" and not exclusive)

        held = {k: m == "x" for k, m in got.items() if m is not None}
        return held, [j for j in jobs if not all(had(k, x) for k, x in j.locks)]

    def _run(self, batch: list[Job]) -> None:
        pending = batch
        stale_ok = True  # one reconnect when a kept connection turns out dead at BEGIN
        while pending:
            pending = [j for j in pending if not j.withdrawn()]
            if not pending:
                return
            try:
                reused = self._wconn is not None
                conn = self._writer_conn()
            except StoreUnavailableError as exc:
                self._fail(pending, exc)
                return
            retry: list[Job] = []
            db = PgDb(conn)
            try:
                # READ COMMITTED whatever the server's default: a job that takes db.lock(k)
                # then sees every transaction that held k before it.
                db.held, busy = self._prelock(conn, pending, "BEGIN ISOLATION LEVEL READ COMMITTED")
            except psycopg.Error as exc:
                # No job ran yet, and the transaction goes with the connection: one the server
                # dropped while idle (a restart since the last write) costs a reconnect, not a
                # 503.
                self._drop(conn)
                self._wconn = None
                if reused and stale_ok:
                    stale_ok = False
                    continue
                self._fail(pending, self._lost(exc))
                return
            committing = False
            try:
                for job in busy:
                    finish(
                        job,
                        error=StoreBusyError(
                            "another replica's transaction holds a lock this write needs; "
                            "nothing was stored"
                        ),
                    )
                running = [j for j in pending if j not in busy]
                for n, job in enumerate(running):
                    # The first job's savepoint came with BEGIN; the previous job's is released
                    # with the same round trip as the next one's (the last one by COMMIT, which
                    # releases every savepoint).
                    if n:
                        conn.execute("RELEASE SAVEPOINT job; SAVEPOINT job")
                    try:
                        job.result = job.fn(db)
                    except Exception as exc:
                        if isinstance(exc, psycopg.Error) and _connection_lost(conn, exc):
                            raise
                        job.result = None
                        conn.execute("ROLLBACK TO SAVEPOINT job")
                        if _rolled_back(exc) and job.attempts < JOB_RETRIES:
                            job.attempts += 1
                            retry.append(job)
                        elif _rolled_back(exc):  # still deadlocked after the retries: an
                            # outage for the client (503 + Retry-After), not a dropped connection
                            job.error = StoreUnavailableError(
                                f"the database kept aborting this write ({type(exc).__name__})"
                            )
                        else:
                            job.error = exc
                done = [j for j in running if j not in retry]
                gone = claim(done)
                if gone:
                    # A waiter gave up while its job ran: its writes are in this transaction,
                    # so none of it commits; the others run again in a new one.
                    conn.execute("ROLLBACK")
                    for job in gone:
                        finish(job, error=StoreUnavailableError("withdrawn by its caller"))
                    pending = [j for j in running if j not in gone]
                    for job in pending:
                        job.result, job.error = None, None
                    continue
                committing = True
                conn.execute("COMMIT")
            except psycopg.Error as exc:
                self.stats.failed_commits += 1
                lost = conn.closed or conn.broken
                if lost:
                    self._drop(conn)
                    self._wconn = None
                else:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                failure: StoreUnavailableError
                if committing and lost:
                    # The COMMIT was sent and the connection died before its answer: it may
                    # have committed. The client must resend with the same id.
                    failure = StoreOutcomeUnknownError(
                        f"database connection lost during COMMIT: {self.where}: {self._scrub(exc)}"
                    )
                elif lost:
                    failure = self._lost(exc)
                else:
                    failure = StoreUnavailableError(f"{self.where}: {self._scrub(exc)}")
                log.error("usage_store_write_failed", extra={"detail": str(failure)})
                self._fail([j for j in pending if not j.done.is_set()], failure)
                return
            self.stats.commits += 1
            self.stats.jobs += len(done)
            self.stats.retried_jobs += len(retry)
            for job in done:
                job.done.set()
            pending = retry

    @staticmethod
    def _fail(jobs: list[Job], error: StoreUnavailableError) -> None:
        for job in jobs:
            job.result, job.error = None, error
            job.done.set()

    # -- reading -------------------------------------------------------------------------

    def read(self, fn: Callable[[Db], T]) -> T:
        """Run `fn` in one REPEATABLE READ snapshot on the reader connection."""
        if self._closed:
            raise StoreUnavailableError("the usage store is closed")
        with self._read_lock:
            conn = self._fresh_reader("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                result = fn(PgDb(conn))
                conn.execute("COMMIT")
                return result
            except BaseException as exc:
                if isinstance(exc, psycopg.Error) and _connection_lost(conn, exc):
                    self._drop(conn)
                    self._rconn = None
                    raise self._lost(exc) from None
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
                raise

    def _reader_conn(self) -> Conn:
        conn = self._rconn
        if conn is None or conn.closed or conn.broken:
            self._drop(conn)
            self._rconn = None
            conn = self._rconn = self._connect()
        return conn

    def _fresh_reader(self, first: str) -> Conn:
        """The reader connection with `first` executed on it; a kept connection the server
        dropped while idle (a restart since) is replaced once, not reported."""
        for attempt in (1, 2):
            reused = self._rconn is not None
            conn = self._reader_conn()
            try:
                conn.execute(first)
            except psycopg.Error as exc:
                self._drop(conn)
                self._rconn = None
                if reused and attempt == 1:
                    continue
                raise self._lost(exc) from None
            return conn
        raise AssertionError("unreachable")

    def available(self) -> tuple[bool, str | None]:
        """For /readyz: asks the server (one round trip on the reader connection)."""
        if self._closed:
            return False, f"usage store {self.where} is closed"
        if not self._read_lock.acquire(timeout=1.0):
            # A read is in progress: the connection works, unless it is still being set up.
            if self._fatal is not None:
                return False, self._fatal
            if not self._ready:
                return False, f"database unreachable: {self._down or self.where + ': connecting'}"
            return True, None
        try:
            self._fresh_reader("SELECT 1")
        except StoreUnavailableError as exc:
            return False, str(exc)
        finally:
            self._read_lock.release()
        return True, None

    # -- the sender role -----------------------------------------------------------------

    def leading(self) -> bool:
        """Take, or check we still hold, the fleet's sender lock (one round trip)."""
        with self._leader_lock:
            if self._closed:
                return False
            conn = self._lconn
            if conn is None or conn.closed or conn.broken:
                self._holding = False
                self._drop(conn)
                self._lconn = None
                try:
                    conn = self._lconn = self._connect()
                except StoreUnavailableError:
                    return False
            try:
                if self._holding:
                    # The session is alive, so the session-level lock is still ours.
                    conn.execute("SELECT 1")
                else:
                    row = conn.execute(
                        "SELECT pg_try_advisory_lock(%s, %s)",
                        (LOCK_CLASS, self._leader_key),
                    ).fetchone()
                    self._holding = bool(row and row[0])
                    if self._holding:
                        log.info("usage_store_leader", extra={"detail": self.where})
            except psycopg.Error as exc:
                log.warning("usage_store_leader_lost", extra={"detail": self._scrub(exc)})
                self._holding = False
                self._drop(conn)
                self._lconn = None
            return self._holding

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._writers:
            self._queue.put(None)  # each writer stops at the first it takes
        for writer in self._writers:
            writer.join(timeout=30)
        with self._leader_lock:
            self._drop(self._lconn)  # ends the session: the sender lock is released
            self._lconn, self._holding = None, False
        with self._read_lock:
            self._drop(self._rconn)
            self._rconn = None
        for conn in list(self._wconns.values()):  # a writer still stuck: its session ends
            self._drop(conn)
