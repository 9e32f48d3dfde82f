"""The PostgreSQL usage store on a real server: group commit across sidecars (threads and
processes), a failing job alone rolled back, the server restarted under load, the sender's lock
passing on when its holder is SIGKILLed, the schema created by racing sidecars, and the URL's
password kept out of every message."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sidecar.usage.db import Db, Schema, StoreError, StoreUnavailableError, open_store
from sidecar.usage.pgstore import JOB_RETRIES, PgStore, pg_sql, refusal

ROOT = Path(__file__).resolve().parent.parent

DDL = """
CREATE TABLE items (id TEXT PRIMARY KEY, n BIGINT NOT NULL);
CREATE TABLE counter (k INTEGER PRIMARY KEY, v BIGINT NOT NULL);
INSERT INTO counter VALUES (1, 0);
"""
SCHEMA = Schema(name="t", version=1, sqlite=DDL, postgresql=DDL)

# A child sidecar process: opens the store and does what argv[1] (JSON) says.
CHILD = r"""
import json, sys, threading, time
from sidecar.usage.db import Schema, open_store
args = json.loads(sys.argv[1])
ddl = args["ddl"]
schema = Schema(name="t", version=1, sqlite=ddl, postgresql=ddl)
while time.time() < args.get("go", 0):
    time.sleep(0.001)
store = open_store(schema, database_url=args["url"])
if args["do"] == "open":
    print(json.dumps({"opened": True}), flush=True)
elif args["do"] == "write":
    tag = args["tag"]
    def one(i):
        def job(db):
            db.lock(7)  # the counter's read-modify-write is serialised fleet-wide
            v = db.execute("SELECT v FROM counter WHERE k = 1").fetchone()[0]
            db.execute("UPDATE counter SET v = ? WHERE k = 1", (v + 1,))
            db.execute("INSERT INTO items VALUES (?, ?)", (f"{tag}-{i}", i))
        store.write(job)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(args["n"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"jobs": store.stats.jobs, "commits": store.stats.commits}), flush=True)
elif args["do"] == "lead":
    print(json.dumps({"leading": store.leading()}), flush=True)
    time.sleep(120)
store.close()
"""


def child(args: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps({"ddl": DDL, **args})],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


def count(url: str, sql: str = "SELECT COUNT(*) FROM items") -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture
def stores() -> Iterator[list[PgStore]]:
    opened: list[PgStore] = []
    yield opened
    for store in opened:
        store.close()


def queued(stores: list[PgStore], n: int) -> None:
    """Wait until `n` jobs wait in each store's queue (behind a blocked transaction)."""
    deadline = time.monotonic() + 10
    while any(s._queue.qsize() < n for s in stores) and time.monotonic() < deadline:
        time.sleep(0.01)


def insert(key: str, n: int = 0) -> Any:
    return lambda db: db.execute("INSERT INTO items VALUES (?, ?)", (key, n))


# -- SQL dialect ---------------------------------------------------------------------------


def test_placeholders_become_numbered_and_a_literal_percent_survives() -> None:
    assert pg_sql("SELECT ? FROM t WHERE a = ?") == "SELECT $1 FROM t WHERE a = $2"
    assert pg_sql("SELECT '?', \"a?\", '50%' -- ?\n, ? /* ? */, ?") == (
        "SELECT '?', \"a?\", '50%' -- ?\n, $1 /* ? */, $2"
    )
    assert pg_sql("SELECT 'it''s ?', ?") == "SELECT 'it''s ?', $1"


def test_a_long_statement_and_a_percent_literal_run_on_postgresql(
    pg_url: str, stores: list[PgStore]
) -> None:
    """A multi-row VALUES list of 200 parameters (past psycopg's own query cache) and a `%`
    inside a literal, through the store's raw placeholders."""
    store = PgStore(SCHEMA, pg_url)
    stores.append(store)
    keys = [f"k{i}%" for i in range(100)]
    store.write(
        lambda db: db.execute(
            "INSERT INTO items VALUES " + ", ".join(["(?, ?)"] * len(keys)),  # noqa: S608
            [v for i, k in enumerate(keys) for v in (k, i)],
        )
    )
    assert store.read(
        lambda db: db.execute(
            "SELECT COUNT(*) FROM items WHERE id LIKE 'k%\\%' AND n >= ?", (0,)
        ).fetchone()[0]
    ) == len(keys)


def test_the_same_statements_run_on_postgresql(pg_url: str, stores: list[PgStore]) -> None:
    store = PgStore(SCHEMA, pg_url)
    stores.append(store)
    store.write(insert("a%b?", 5))
    rows = store.read(
        lambda db: db.execute(
            "SELECT id, n, '?', '%' FROM items WHERE id = ?", ("a%b?",)
        ).fetchall()
    )
    assert rows == [("a%b?", 5, "?", "%")]
    assert store.read(lambda db: db.dialect) == "postgresql"
    # Booleans are INTEGER 0/1 in the portable schema.
    store.write(lambda db: db.execute("UPDATE items SET n = ? WHERE id = ?", (True, "a%b?")))
    assert store.read(lambda db: db.execute("SELECT n FROM items").fetchone()[0]) == 1


def test_open_store_picks_the_backend(pg_url: str, tmp_path: Path) -> None:
    pg = open_store(SCHEMA, state_dir=tmp_path, database_url=pg_url)
    lite = open_store(SCHEMA, state_dir=tmp_path, database_url=None)
    try:
        assert (pg.backend, lite.backend) == ("postgresql", "sqlite")
        assert lite.where == str(tmp_path / "t")
    finally:
        pg.close()
        lite.close()


# -- group commit, one job's failure -------------------------------------------------------


def test_three_stores_in_threads_share_commits(pg_url: str, stores: list[PgStore]) -> None:
    # One writer each: the jobs queued behind its blocker share its next transaction.
    stores.extend(PgStore(SCHEMA, pg_url, writers=1) for _ in range(3))
    release = threading.Event()
    inside = threading.Semaphore(0)

    def blocker(db: Db) -> None:
        inside.release()
        release.wait(10)

    blockers = [threading.Thread(target=s.write, args=(blocker,)) for s in stores]
    for t in blockers:
        t.start()
    for _ in stores:  # each writer is inside its blocker's transaction: the rest queue up
        assert inside.acquire(timeout=10)
    writers = [
        threading.Thread(target=s.write, args=(insert(f"{k}-{i}"),))
        for k, s in enumerate(stores)
        for i in range(30)
    ]
    for t in writers:
        t.start()
    queued(stores, 30)
    release.set()
    for t in (*blockers, *writers):
        t.join(30)
    assert count(pg_url) == 90
    for s in stores:
        assert s.stats.jobs == 31
        assert s.stats.commits <= 4  # 31 jobs shared a handful of COMMITs


def test_three_processes_write_concurrently_and_locks_serialise_them(pg_url: str) -> None:
    go = time.time() + 1.5
    procs = [
        child({"url": pg_url, "do": "write", "tag": f"p{k}", "n": 40, "go": go}) for k in "abc"
    ]
    results = [finish(p) for p in procs]
    assert count(pg_url) == 120
    # Every read-modify-write of the counter ran under db.lock(7): none was lost.
    assert count(pg_url, "SELECT v FROM counter WHERE k = 1") == 120
    assert all(r["jobs"] == 40 for r in results)
    assert sum(r["commits"] for r in results) < 120


def test_a_failing_job_rolls_back_alone(pg_url: str, stores: list[PgStore]) -> None:
    store = PgStore(SCHEMA, pg_url, writers=1)  # the jobs queued behind the blocker: one txn
    stores.append(store)
    store.write(insert("taken"))
    release = threading.Event()
    errors: list[BaseException] = []

    def bad(db: Db) -> None:
        db.execute("INSERT INTO items VALUES ('bad', 1)")
        raise ValueError("client mistake")

    def duplicate(db: Db) -> None:
        db.execute("INSERT INTO items VALUES ('dup-side', 1)")
        db.execute("INSERT INTO items VALUES ('taken', 1)")

    def run(fn: Any) -> None:
        try:
            store.write(fn)
        except Exception as exc:
            errors.append(exc)

    inside = threading.Event()

    def blocker(db: Db) -> None:
        inside.set()
        release.wait(10)

    first = threading.Thread(target=run, args=(blocker,))
    first.start()
    assert inside.wait(10)
    threads = [threading.Thread(target=run, args=(f,)) for f in (bad, duplicate, insert("good"))]
    for t in threads:
        t.start()
    queued([store], 3)
    release.set()
    for t in (first, *threads):
        t.join(30)
    ids = store.read(lambda db: {r[0] for r in db.execute("SELECT id FROM items")})
    assert ids == {"taken", "good"}
    assert sorted(type(e).__name__ for e in errors) == ["UniqueViolation", "ValueError"]
    # taken; the blocker; then bad, duplicate and good in ONE transaction, one COMMIT.
    assert store.stats.commits == 3 and store.stats.failed_commits == 0


def test_a_deadlock_between_sidecars_is_retried_not_failed(
    pg_url: str, stores: list[PgStore]
) -> None:
    a, b = PgStore(SCHEMA, pg_url), PgStore(SCHEMA, pg_url)
    stores.extend((a, b))
    both = threading.Barrier(2)

    def crossing(first: int, second: int, key: str) -> Any:
        tries: list[int] = []

        def job(db: Db) -> None:
            db.lock(first)
            tries.append(1)
            if len(tries) == 1:  # both hold their first lock before either asks the second
                both.wait(5)
            db.lock(second)
            db.execute("INSERT INTO items VALUES (?, 0)", (key,))

        return job

    errors: list[BaseException] = []

    def run(store: PgStore, fn: Any) -> None:
        try:
            store.write(fn)
        except Exception as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(a, crossing(1, 2, "a"))),
        threading.Thread(target=run, args=(b, crossing(2, 1, "b"))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert count(pg_url) == 2
    assert a.stats.retried_jobs + b.stats.retried_jobs == 1  # the deadlock's victim, once


def test_a_write_still_aborted_after_its_retries_is_an_outage_not_a_crash(
    pg_url: str, stores: list[PgStore]
) -> None:
    """A job the server keeps aborting (class 40) gets StoreUnavailableError (the API's 503 +
    Retry-After), not the driver's exception (a dropped connection), and writes nothing."""
    store = PgStore(SCHEMA, pg_url)
    stores.append(store)
    calls: list[int] = []

    def always_aborted(db: Db) -> None:
        calls.append(1)
        db.execute("INSERT INTO items VALUES ('doomed', 0)")
        db.execute("DO $$ BEGIN RAISE EXCEPTION 'aborted' USING ERRCODE = '40001'; END $$")

    with pytest.raises(StoreUnavailableError, match="kept aborting"):
        store.write(always_aborted)
    assert len(calls) == 1 + JOB_RETRIES
    assert count(pg_url) == 0
    store.write(lambda db: db.execute("INSERT INTO items VALUES ('fine', 1)"))
    assert count(pg_url) == 1


# -- the server down, restarting -----------------------------------------------------------


@pytest.mark.slow  # writers against a crashing server
def test_a_restart_under_load_loses_no_acknowledged_write(
    pg_server: Any, pg_url: str, stores: list[PgStore]
) -> None:
    store = PgStore(SCHEMA, pg_url)
    stores.append(store)
    acked: list[str] = []
    failures: list[tuple[str, float]] = []
    not_stored: list[str] = []  # answered "not stored, and never will be"
    restarted = threading.Event()
    after: list[str] = []
    stop = threading.Event()

    def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            key = f"w{w}-{i}"
            i += 1
            began = time.monotonic()
            try:
                store.write(insert(key))
            except Exception as exc:
                failures.append((type(exc).__name__, time.monotonic() - began))
                if type(exc) is StoreUnavailableError:
                    not_stored.append(key)
                time.sleep(0.05)
                continue
            acked.append(key)
            if restarted.is_set():
                after.append(key)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        pg_server.restart(down_seconds=1.0)  # immediate stop: a crash, then recovery
        restarted.set()
        deadline = time.monotonic() + 15
        while len(after) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures, "the restart should have interrupted some writes"
    # A COMMIT cut by the crash has an unknown outcome, and says so; every other failure is
    # certain: nothing of it was stored.
    assert {name for name, _ in failures} <= {"StoreUnavailableError", "StoreOutcomeUnknownError"}
    assert not_stored
    assert max(seconds for _, seconds in failures) < 5.0  # 503 at once, not after 120 s
    assert len(after) >= 20  # the same store recovered by itself
    with psycopg.connect(pg_url) as conn:
        stored = {r[0] for r in conn.execute("SELECT id FROM items")}
    assert set(acked) <= stored  # every acknowledged write survived the crash
    assert not set(not_stored) & stored  # and no write answered "not stored" was


def test_a_stopped_server_is_503_at_once_and_readyz_says_why(
    pg_server: Any, pg_url: str, stores: list[PgStore]
) -> None:
    store = PgStore(SCHEMA, pg_url)
    stores.append(store)
    store.write(insert("before"))
    assert store.available() == (True, None)
    pg_server.stop()
    try:
        errors: list[tuple[BaseException, float]] = []

        def one(i: int) -> None:
            began = time.monotonic()
            try:
                store.write(insert(f"down-{i}"))
            except Exception as exc:
                errors.append((exc, time.monotonic() - began))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(errors) == 20
        assert all(isinstance(e, StoreUnavailableError) and s < 5.0 for e, s in errors)
        with pytest.raises(StoreUnavailableError):
            store.read(lambda db: db.execute("SELECT 1").fetchone())
        ok, why = store.available()
        assert not ok and why is not None and "database" in why and store.where in why
        assert not store.leading()
    finally:
        pg_server.start()
    deadline = time.monotonic() + 10
    while store.available()[0] is False and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.available() == (True, None)
    store.write(insert("after"))
    assert store.read(lambda db: db.execute("SELECT COUNT(*) FROM items").fetchone()[0]) == 2


# -- the sender role -----------------------------------------------------------------------


def test_a_sigkilled_leader_is_replaced_within_seconds_never_two_at_once(
    pg_url: str, stores: list[PgStore]
) -> None:
    a, b = PgStore(SCHEMA, pg_url), PgStore(SCHEMA, pg_url)
    stores.extend((a, b))
    proc = child({"url": pg_url, "do": "lead"})
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"leading": True}
        for _ in range(3):
            assert (a.leading(), b.leading()) == (False, False)
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        seen: list[tuple[bool, bool]] = []
        while time.monotonic() - killed < 10:
            seen.append((a.leading(), b.leading()))
            if any(seen[-1]):
                break
            time.sleep(0.05)
        took = time.monotonic() - killed
    finally:
        proc.kill()
        proc.wait()
    assert (True, True) not in seen
    assert any(seen[-1]) and took < 8.0
    for _ in range(5):
        assert a.leading() != b.leading()  # exactly one, and it stays
    # A graceful stop hands over too.
    leader, other = (a, b) if a.leading() else (b, a)
    leader.close()
    deadline = time.monotonic() + 5
    while not other.leading() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert other.leading()


def test_two_fleets_in_two_schemas_of_one_database_each_have_a_sender(
    pg_url: str, stores: list[PgStore]
) -> None:
    """Advisory locks are per database: the sender lock is per schema (search_path) too."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA fleet_a; CREATE SCHEMA fleet_b")
    a1, a2, b1 = (PgStore(SCHEMA, f"{pg_url}?options=-csearch_path%3Dfleet_{x}") for x in "aab")
    stores.extend((a1, a2, b1))
    assert (a1.leading(), a2.leading(), b1.leading()) == (True, False, True)
    a1.write(insert("in-a"))
    assert count(pg_url, "SELECT COUNT(*) FROM fleet_a.items") == 1
    assert count(pg_url, "SELECT COUNT(*) FROM fleet_b.items") == 0


# -- schema ---------------------------------------------------------------------------------


def test_three_sidecars_starting_together_create_the_schema_once(pg_url: str) -> None:
    slow = DDL + "SELECT pg_sleep(0.3);"  # widen the window a race would need
    go = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                json.dumps({"ddl": slow, "url": pg_url, "do": "open", "go": go}),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    assert [finish(p) for p in procs] == [{"opened": True}] * 3
    assert count(pg_url, "SELECT version FROM sidecar_schema WHERE name = 't'") == 1
    assert count(pg_url, "SELECT COUNT(*) FROM counter") == 1  # the DDL ran once


def test_a_database_from_a_newer_sidecar_is_refused_untouched(pg_url: str) -> None:
    store = PgStore(SCHEMA, pg_url)
    store.write(insert("kept"))
    store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE sidecar_schema SET version = 2 WHERE name = 't'")
    with pytest.raises(StoreError, match=r"version 2; this sidecar reads version 1"):
        PgStore(SCHEMA, pg_url)
    assert count(pg_url, "SELECT version FROM sidecar_schema") == 2
    assert count(pg_url) == 1


def test_an_older_database_is_migrated_in_one_transaction(pg_url: str) -> None:
    store = PgStore(SCHEMA, pg_url)
    store.write(insert("kept", 3))
    store.close()
    broken = Schema(
        name="t",
        version=3,
        sqlite=DDL,
        postgresql=DDL,
        migrations={
            2: ("", "ALTER TABLE items ADD COLUMN note TEXT"),
            3: ("", "ALTER TABLE nowhere ADD COLUMN x TEXT"),
        },
    )
    with pytest.raises(StoreError, match=r"cannot be created or migrated to version 3"):
        PgStore(broken, pg_url)
    with psycopg.connect(pg_url) as conn:  # step 2 was undone with step 3
        cols = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'items'"
            )
        }
    assert cols == {"id", "n"}
    assert count(pg_url, "SELECT version FROM sidecar_schema") == 1
    v2 = Schema(
        name="t",
        version=2,
        sqlite=DDL,
        postgresql=DDL,
        migrations={2: ("", "ALTER TABLE items ADD COLUMN note TEXT")},
    )
    store = PgStore(v2, pg_url)
    try:
        assert store.read(lambda db: db.execute("SELECT id, n, note FROM items").fetchall()) == [
            ("kept", 3, None)
        ]
    finally:
        store.close()
    assert count(pg_url, "SELECT version FROM sidecar_schema") == 2


def test_a_version_without_its_migration_is_refused(pg_url: str) -> None:
    PgStore(SCHEMA, pg_url).close()
    v3 = Schema(name="t", version=3, sqlite=DDL, postgresql=DDL, migrations={3: ("", "SELECT 1")})
    with pytest.raises(StoreError, match="no migration to version 2"):
        PgStore(v3, pg_url)


# -- the password ---------------------------------------------------------------------------


def test_the_password_appears_in_no_message_or_log(
    pg_server: Any, pg_url: str, caplog: pytest.LogCaptureFixture, stores: list[PgStore]
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "Hunter2%3Azz"  # written percent-encoded: "Hunter2:zz" once decoded
    secrets = (secret, "Hunter2:zz", "Hunter2")
    with_pw = pg_url.replace("postgres@", f"postgres:{secret}@")
    store = PgStore(SCHEMA, with_pw)  # the test server trusts any password
    stores.append(store)
    messages = [store.where]
    assert store.where == pg_url
    dead = with_pw.replace(f":{pg_server.port}/", ":1/")
    degraded = PgStore(SCHEMA, dead)  # a database down at start: opened, unavailable
    stores.append(degraded)
    messages.append(str(degraded.available()[1]))
    for url in (dead + "?sslmode=bogus", "postgresql://u:Hunter2%zz@127.0.0.1:1/db"):
        with pytest.raises(StoreError) as caught:
            PgStore(SCHEMA, url)
        messages.append(str(caught.value))
    pg_server.stop()
    try:
        with pytest.raises(StoreUnavailableError) as down:
            store.write(insert("x"))
        messages.append(str(down.value))
        messages.append(str(store.available()[1]))
        store.leading()
    finally:
        pg_server.start()
    messages += [r.getMessage() + str(getattr(r, "detail", "")) for r in caplog.records]
    leaked = [m for m in messages if any(s in m for s in secrets)]
    assert leaked == []
    assert any("127.0.0.1:1/" in m for m in messages)  # the messages do say where


# -- a database down when the sidecar starts -----------------------------------------------


@contextlib.contextmanager
def password_role(pg_server: Any, password: str) -> Iterator[str]:
    """A role the session's server authenticates by password (the rest of the test cluster
    trusts any password); yields its name. The pg_hba line names only this role."""
    role = "pw_" + os.urandom(4).hex()
    hba = Path(pg_server.data) / "pg_hba.conf"
    before = hba.read_text()
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + before)
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield role
    finally:
        hba.write_text(before)
        with psycopg.connect(pg_server.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(f"DROP ROLE {role}")


def fake_server(answer: bytes | None) -> tuple[socket.socket, threading.Thread]:
    """A hostile 'PostgreSQL' on loopback: refuses SSL, then sends `answer` (an ErrorResponse)
    to every startup packet, or says nothing at all (None) until the client gives up."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            if answer is None:
                continue
            with contextlib.suppress(OSError):
                while True:
                    head = conn.recv(8)
                    if len(head) < 8:
                        break
                    size, code = struct.unpack("!II", head)
                    conn.recv(size - 8)
                    if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                        conn.sendall(b"N")
                        continue
                    conn.sendall(answer)
                    break
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def stop_fake(listener: socket.socket, thread: threading.Thread) -> None:
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() that close() alone would not
    listener.close()
    thread.join(5)
    assert not thread.is_alive()


def error_response(sqlstate: str, message: str) -> bytes:
    fields = b"".join(
        k + v.encode() + b"\0"
        for k, v in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!I", len(body) + 4) + body


def test_a_server_down_at_start_opens_unavailable_then_sets_up_by_itself(
    pg_server: Any, pg_url: str, stores: list[PgStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.usage.pgstore")
    pg_server.stop()
    try:
        began = time.monotonic()
        store = PgStore(SCHEMA, pg_url, retry_seconds=0.2)  # no StoreError: an outage
        stores.append(store)
        assert time.monotonic() - began < 5
        with pytest.raises(StoreUnavailableError, match="database unreachable"):
            store.write(insert("while-down"))
        with pytest.raises(StoreUnavailableError):
            store.read(lambda db: db.execute("SELECT 1").fetchone())
        ok, why = store.available()
        assert not ok and why is not None and store.where in why
        assert not store.leading()
    finally:
        pg_server.start()
    deadline = time.monotonic() + 10
    while not store.available()[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.available() == (True, None)
    store.write(insert("after"))  # the schema was created on the first connection
    assert count(pg_url) == 1
    assert count(pg_url, "SELECT version FROM sidecar_schema WHERE name = 't'") == 1
    assert store.leading()
    events = [r.getMessage() for r in caplog.records]
    assert "usage_store_starting_without_database" in events
    assert events.index("usage_store_reachable") < events.index("usage_store_migrated")


@pytest.mark.parametrize(
    "answer",
    [
        error_response("57P03", "the database system is starting up"),
        error_response("57P01", "terminating connection due to administrator command"),
        None,  # accepts and never answers: connect_timeout
    ],
    ids=["starting-up", "shutting-down", "silent"],
)
def test_a_server_starting_up_or_silent_at_start_is_an_outage(
    answer: bytes | None, stores: list[PgStore]
) -> None:
    listener, thread = fake_server(answer)
    port = listener.getsockname()[1]
    try:
        url = f"postgresql://postgres:pw@127.0.0.1:{port}/db?connect_timeout=2"
        store = PgStore(SCHEMA, url)
        stores.append(store)
        ok, why = store.available()
        assert not ok and why is not None and "database unreachable" in why
        assert "pw@" not in why
    finally:
        stop_fake(listener, thread)


def test_only_what_a_retry_cannot_fix_is_a_refusal() -> None:
    # (Name lookups are refused in tests: the DNS failure is psycopg's own message.)
    down = (
        "failed to resolve host 'db.example': [Errno -2] Name or service not known",
        'connection to server at "10.0.0.5", port 5432 failed: timeout expired',
        'connection to server at "10.0.0.5", port 5432 failed: Connection refused',
        "FATAL: the database system is starting up",
        "FATAL: the database system is in recovery mode",
        "FATAL: sorry, too many clients already",
        "server closed the connection unexpectedly",
    )
    assert [refusal(m) for m in down] == [None] * len(down)
    assert refusal('FATAL:  database "usage" does not exist') == (
        'no such database (database "usage" does not exist)'
    )
    assert refusal('FATAL: no pg_hba.conf entry for host "10.0.0.9"') is not None


def test_refusals_stop_the_open_naming_which_never_the_password(
    pg_server: Any, pg_url: str
) -> None:
    secret = "S3cret-pw"
    base = pg_url.rsplit("/", 1)[0]
    with password_role(pg_server, "right-one") as role:
        cases = {
            "wrong password": pg_url.replace("postgres@", f"{role}:{secret}@"),
            "no password": pg_url.replace("postgres@", f"{role}@"),
            "no such role": pg_url.replace("postgres@", f"nobody_here:{secret}@"),
            "no such database": f"{base}/no_such_db".replace("postgres@", f"postgres:{secret}@"),
            "malformed": pg_url + "?sslmode=bogus",
        }
        for what, url in cases.items():
            began = time.monotonic()
            with pytest.raises(StoreError) as caught:
                PgStore(SCHEMA, url)
            message = str(caught.value)
            assert time.monotonic() - began < 5
            assert secret not in message
            expected = {
                "no password": "has none",
                "malformed": "malformed",
            }.get(what, what)
            assert expected in message, (what, message)
    assert count(pg_url, "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'items'") == 0


def test_a_newer_schema_found_after_a_start_without_the_database_is_never_written(
    pg_server: Any, pg_url: str, stores: list[PgStore], caplog: pytest.LogCaptureFixture
) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE sidecar_schema (name TEXT PRIMARY KEY, version BIGINT NOT NULL, "
            "migrated_at DOUBLE PRECISION NOT NULL)"
        )
        conn.execute("INSERT INTO sidecar_schema VALUES ('t', 5, 0)")
    pg_server.stop()
    try:
        store = PgStore(SCHEMA, pg_url, retry_seconds=0.1)
        stores.append(store)
    finally:
        pg_server.start()
    for _ in range(3):  # stays unavailable: not a down database that comes back
        ok, why = store.available()
        assert not ok and why is not None and "version 5" in why, why
        with pytest.raises(StoreUnavailableError, match="version 5"):
            store.write(insert("never"))
        assert not store.leading()
        time.sleep(0.15)
    assert count(pg_url, "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'items'") == 0
    assert count(pg_url, "SELECT version FROM sidecar_schema") == 5
    assert [r for r in caplog.records if r.getMessage() == "usage_store_unusable"]


def test_readyz_is_not_fooled_by_a_read_stuck_connecting(stores: list[PgStore]) -> None:
    """While a read waits on a silent server, /readyz must not take 'a read is in progress'
    for 'the connection works'."""
    listener, thread = fake_server(None)
    port = listener.getsockname()[1]
    try:
        url = f"postgresql://postgres@127.0.0.1:{port}/db?connect_timeout=2"
        store = PgStore(SCHEMA, url, retry_seconds=0.05)
        stores.append(store)
        time.sleep(0.1)

        def read() -> None:
            with contextlib.suppress(StoreUnavailableError):
                store.read(lambda db: db.execute("SELECT 1").fetchone())

        stuck = threading.Thread(target=read)
        stuck.start()
        deadline = time.monotonic() + 2
        while not store._read_lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store._read_lock.locked()
        ok, why = store.available()
        assert not ok and why is not None and "database unreachable" in why
        stuck.join(10)
    finally:
        stop_fake(listener, thread)


# -- round trips per transaction ---------------------------------------------------


def traced_round_trips(store: PgStore, job: Any, tmp_path: Path, **kw: Any) -> int:
    """Run `job` alone in `store` (one writer) with libpq's protocol trace on the writer's
    connection: how many times the client sent something and waited for the answer."""
    store.write(insert("warm-up"))  # the writer's connection exists, idle between writes
    (conn,) = [c for c in store._wconns.values() if c is not None]
    path = tmp_path / "trace.txt"
    with path.open("w") as out:
        conn.pgconn.trace(out.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            store.write(job, **kw)
        finally:
            conn.pgconn.untrace()
    sides = [line.split("\t", 1)[0] for line in path.read_text().splitlines()]
    # A round trip: what the client sent, then the server's answers (F lines, then B lines).
    return sum(1 for a, b in itertools.pairwise(sides) if (a, b) == ("F", "B"))


def test_a_write_with_declared_locks_costs_four_round_trips(
    pg_url: str, stores: list[PgStore], tmp_path: Path
) -> None:
    """BEGIN, the declared locks and the first savepoint in one round trip; `db.lock` on a
    declared key costs none; then the job's two statements and the COMMIT. The store before
    this took seven (BEGIN, locks, SAVEPOINT, lock, SELECT, INSERT, COMMIT)."""
    store = PgStore(SCHEMA, pg_url, writers=1)
    stores.append(store)

    def job(db: Db) -> None:
        db.lock(7)
        v = db.execute("SELECT v FROM counter WHERE k = 1").fetchone()[0]
        db.execute("INSERT INTO items VALUES (?, ?)", ("traced", v))

    assert traced_round_trips(store, job, tmp_path, locks=[(7, True)]) == 4
    assert count(pg_url) == 2


def test_a_failing_statement_of_the_last_job_rolls_back_that_job_alone(
    pg_url: str, stores: list[PgStore]
) -> None:
    """The last job of a group commit fails on its last statement: that job alone is rolled
    back and answered its error, the others commit (once). (A pipelined variant sent that
    statement with the COMMIT; this guards the same contract for whatever comes next.)"""
    store = PgStore(SCHEMA, pg_url, writers=1)
    stores.append(store)
    store.write(insert("taken"))
    release, inside = threading.Event(), threading.Event()
    errors: dict[str, BaseException] = {}

    def blocker(db: Db) -> None:
        inside.set()
        release.wait(10)

    def duplicate_last(db: Db) -> None:
        db.execute("INSERT INTO items VALUES ('dup-side', 1)")
        db.execute("UPDATE counter SET v = v + 100 WHERE k = 1")
        db.execute("INSERT INTO items VALUES ('taken', 1)")  # fails: the key is taken

    def run(name: str, fn: Any) -> None:
        try:
            store.write(fn)
        except Exception as exc:
            errors[name] = exc

    first = threading.Thread(target=run, args=("blocker", blocker))
    first.start()
    assert inside.wait(10)
    good = threading.Thread(target=run, args=("good", insert("good")))
    good.start()
    queued([store], 1)  # good first, then the failing one: the last job of the transaction
    dup = threading.Thread(target=run, args=("dup", duplicate_last))
    dup.start()
    queued([store], 2)
    release.set()
    for t in (first, good, dup):
        t.join(30)
    assert set(errors) == {"dup"} and type(errors["dup"]).__name__ == "UniqueViolation"
    ids = store.read(lambda db: {r[0] for r in db.execute("SELECT id FROM items")})
    assert ids == {"taken", "good"}
    assert count(pg_url, "SELECT v FROM counter WHERE k = 1") == 0
    assert store.stats.commits == 3 and store.stats.failed_commits == 0


def test_a_failing_commit_fails_every_job_of_its_transaction(
    pg_url: str, stores: list[PgStore]
) -> None:
    """A COMMIT that fails itself (a deferred constraint) has rolled the whole transaction
    back: every job in it is answered 503-style (StoreUnavailableError), nothing is stored,
    and the store goes on."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE deferred (k INTEGER UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    store = PgStore(SCHEMA, pg_url, writers=1)
    stores.append(store)

    def twice(db: Db) -> None:
        db.execute("INSERT INTO items VALUES ('with-it', 1)")
        db.execute("INSERT INTO deferred VALUES (1)")
        db.execute("INSERT INTO deferred VALUES (1)")  # refused only at COMMIT

    with pytest.raises(StoreUnavailableError):
        store.write(twice)
    assert count(pg_url) == 0 and count(pg_url, "SELECT COUNT(*) FROM deferred") == 0
    assert store.stats.failed_commits == 1
    store.write(insert("after"))
    assert count(pg_url) == 1
