"""SaaS intake is set-based, and sealing never misses what it acknowledged.

A POST costs a fixed number of statements whatever its records (it cost several per record:
three sidecars on one PostgreSQL acknowledged 0.06x plain INSERTs). And intake racing the seal
of the same hour on another replica, over and over on a real PostgreSQL server: every record
acknowledged 202 is in the total of the hour its answer names (its own, or a later one when
the seal won), and the outbox holds each unit exactly once, which AWS then bills once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sidecar.core.quantity import SCALE
from sidecar.usage import saas_ledger as L  # noqa: N812
from sidecar.usage.db import (
    INTAKE_WAIT,
    Cursor,
    Db,
    StoreBusyError,
    StoreUnavailableError,
    UsageStore,
    open_store,
)
from sidecar.usage.hours import HOUR, hour_of, hour_start, iso_hour
from sidecar.usage.pgstore import PgStore
from sidecar.usage.saas import SAAS_SCHEMA
from sidecar.usage.validate import Limits, RejectedError, SaasRecord, parse_saas
from tests.test_saas_ledger import DIMS, HP, T0, FakeAws, account, key, license_arn, resolve

NO_ZERO = L.SealSpec(DIMS, "license", False, HP)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UsageStore]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    s = open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url)
    yield s
    s.close()


def records(items: list[dict[str, Any]], now: float) -> list[SaasRecord]:
    return parse_saas(json.dumps(items).encode(), Limits(DIMS), now, "license")


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def item(i: int, dim: str, qty: int, **extra: Any) -> dict[str, Any]:
    return {
        "customer_aws_account_id": account(i),
        "license_arn": license_arn(i),
        "dimension": dim,
        "quantity": qty,
        **extra,
    }


class Counted:
    """The store's own `Db`, counting the statements a transaction function sends."""

    def __init__(self, db: Db) -> None:
        self.db = db
        self.statements = 0

    @property
    def dialect(self) -> str:
        return self.db.dialect

    def execute(self, sql: str, params: Any = ()) -> Cursor:
        self.statements += 1
        return self.db.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> None:
        self.statements += 1
        self.db.executemany(sql, rows)

    def lock(self, key: int, *, shared: bool = False) -> None:
        self.db.lock(key, shared=shared)


def ingest_counted(store: UsageStore, recs: list[SaasRecord], now: float) -> tuple[Any, int]:
    def fn(db: Db) -> tuple[Any, int]:
        counted = Counted(db)
        out = L.ingest(counted, recs, now, HP, accept_unresolved=False)
        return out, counted.statements

    return store.write(fn, locks=L.ingest_locks(recs))


def test_a_post_costs_the_same_few_statements_whatever_its_records(store: UsageStore) -> None:
    resolve(store, range(30))
    now = T0
    one = records([item(0, "seats", 1, id="one-0")], now)
    (status, _), single = ingest_counted(store, one, now)
    assert status == 202
    many = records(
        [item(i, DIMS[i % 3], i + 1, id=f"many-{i}") for i in range(25)]
        + [item(i, DIMS[i % 3], 1) for i in range(25, 30)],
        now,
    )
    (status, answers), batch = ingest_counted(store, many, now)
    assert status == 202 and len(answers) == 30
    # customers + sealed hours, keys, totals: per POST, not per record (the record-by-record
    # intake sent two to four per record plus one per customer: 6 for one record with an id,
    # 141 for these 30; set-based with a row per record, 4)
    assert single <= 3 and batch <= 3, (single, batch)
    # The same POST again: every id answered from the store in one more statement, nothing added.
    again = records([item(i, DIMS[i % 3], i + 1, id=f"many-{i}") for i in range(25)], now)
    (status, repeats), repeated = ingest_counted(store, again, now)
    assert status == 200 and all(a["repeat"] for a in repeats) and repeated <= 3
    assert [a["id"] for a in repeats] == [f"many-{i}" for i in range(25)]
    assert repeats[3]["quantity"] == 4 and repeats[3]["hour"] == iso_hour(hour_of(now))
    totals = store.read(
        lambda db: db.execute(
            "SELECT (SELECT SUM(quantity) FROM saas_open), (SELECT COUNT(*) FROM saas_keys)"
        ).fetchone()
    )
    assert (int(totals[0]), int(totals[1])) == ((1 + sum(range(1, 26)) + 5) * SCALE, 26)


def test_set_based_intake_keeps_the_record_by_record_answers(store: UsageStore) -> None:
    """The first failing record names the answer, in the order the checks ran per record:
    unresolved customer, then its id, then its hour total; nothing of a refused POST is kept."""
    resolve(store, range(3))
    now = T0
    (status, _), _ = ingest_counted(store, records([item(0, "seats", 5, id="k1")], now), now)
    assert status == 202

    def post(items: list[dict[str, Any]]) -> Any:
        try:
            return ingest_counted(store, records(items, now), now)[0]
        except (RejectedError, L.IdConflictError) as exc:
            return exc

    # An id reused for other usage, before an unresolved customer: 409 names the id.
    got = post([item(1, "seats", 1), item(0, "seats", 6, id="k1"), item(9, "seats", 1)])
    assert isinstance(got, L.IdConflictError) and got.field == "records[1].id"
    # The unresolved customer first: 400 names it.
    got = post([item(9, "seats", 1), item(0, "seats", 6, id="k1")])
    assert isinstance(got, RejectedError) and got.problems[0].field == "records[0].customer"
    # A total pushed past the maximum by the second of two records for one total, before a
    # conflicting id: 400 names that record's quantity.
    big = 9_999_999_999  # QuantityAsDecimal's largest whole number
    got = post(
        [item(2, "api_calls", big - 10), item(2, "api_calls", 11), item(0, "seats", 6, id="k1")]
    )
    assert isinstance(got, RejectedError) and got.problems[0].field == "records[1].quantity"
    # The same id twice in one POST: counted once, the second answered as its repeat.
    status, answers = post([item(1, "seats", 2, id="k2"), item(1, "seats", 2, id="k2")])
    assert status == 202 and not answers[0].get("repeat") and answers[1]["repeat"]
    assert answers[1]["id"] == "k2" and answers[1]["hour"] == answers[0]["hour"]
    open_ = store.read(
        lambda db: db.execute("SELECT customer, dimension, quantity FROM saas_open").fetchall()
    )
    assert sorted((str(c), str(d), int(q)) for c, d, q in open_) == [
        (key(0), "seats", 5 * SCALE),
        (key(1), "seats", 2 * SCALE),
    ]


# -- intake racing the seal, two replicas, real PostgreSQL ---------------------------------

ROUNDS = 40
POSTERS = 4


def _seal_until_done(store: UsageStore, through: int, now: float) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            store.write(
                lambda db: L.seal(db, through, now, NO_ZERO),
                locks=L.SEAL_LOCKS,
                lock_wait=L.SEAL_LOCK_WAIT,
            )
            return
        except StoreBusyError:
            assert time.monotonic() < deadline, "the seal never got its lock"
            time.sleep(0.01)


def test_intake_racing_the_seal_on_another_replica_loses_and_doubles_nothing(
    pg_url: str,
) -> None:
    """Replica A takes POSTs for hour H from several threads while replica B seals H, at a
    random moment, ROUNDS times (a new hour each round). Each intake transaction lingers a few
    ms after its statements, as on a loaded machine, to widen the window between "is H sealed?"
    and COMMIT. Afterwards every acknowledged record is in the outbox total of the hour its
    answer names, nothing is left open in a sealed hour, and AWS bills each unit once."""
    intake = PgStore(SAAS_SCHEMA, pg_url)
    sealer = PgStore(SAAS_SCHEMA, pg_url)
    try:
        resolve(intake, range(6))
        rng = random.Random(21)  # test data and timing only
        first = hour_of(T0) + 1
        acked: list[dict[str, Any]] = []
        acked_lock = threading.Lock()
        refused: list[str] = []

        def post(recs: list[SaasRecord], now: float, linger: float) -> None:
            def fn(db: Db) -> tuple[int, list[dict[str, Any]]]:
                out = L.ingest(db, recs, now, HP, accept_unresolved=False)
                time.sleep(linger)  # inside the transaction: the race window
                return out

            try:
                status, answers = intake.write(fn, INTAKE_WAIT, L.ingest_locks(recs))
            except StoreUnavailableError as exc:  # 503: not stored, not counted
                refused.append(type(exc).__name__)
                return
            assert status == 202
            with acked_lock:
                acked.extend(answers)

        aws = FakeAws(time.time)

        def send(now: float) -> None:
            """The leader sends what it sealed (AWS's clock: the round's)."""
            aws.now = lambda: now
            while True:
                batch, _ = sealer.write(lambda db: L.next_batch(db, now, None))
                if batch is None:
                    return
                answer = aws.batch_meter_usage(batch.request)
                sealer.write(
                    functools.partial(L.answer, batch_id=batch.id, response=answer, now=now)
                )

        carried = 0
        for r in range(ROUNDS):
            hour = first + r
            now = hour_start(hour + 1) + HP.seal_margin + 1  # H may be sealed
            stop = threading.Event()

            def poster(seed: int, hour: int = hour, now: float = now, stop: Any = stop) -> None:
                prng = random.Random(seed)
                while not stop.is_set():
                    items = [
                        item(
                            prng.randrange(6),
                            prng.choice(DIMS),
                            prng.randint(1, 9),
                            timestamp=stamp(hour_start(hour) + prng.randrange(HOUR)),
                        )
                        for _ in range(prng.choice((1, 1, 3, 25)))
                    ]
                    recs = records(items, now)
                    post(recs, now, prng.uniform(0, 0.004))

            before = len(acked)
            threads = [threading.Thread(target=poster, args=(r * 100 + p,)) for p in range(POSTERS)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.0, 0.05))  # intake in flight when the seal starts
            _seal_until_done(sealer, hour, now)
            deadline = time.monotonic() + 10
            while len(acked) < before + 20 and time.monotonic() < deadline:
                time.sleep(0.005)  # some intake after the seal too: carried into H+1
            stop.set()
            for t in threads:
                t.join()
            carried += sum(1 for a in acked[before:] if a.get("carried_from"))
            send(now)
        last = first + ROUNDS
        _seal_until_done(sealer, last, hour_start(last + 1) + HP.seal_margin + 1)
        send(hour_start(last + 1) + HP.seal_margin + 1)

        want: dict[tuple[str, str, str], int] = {}
        for a in acked:
            k = (a["customer"], a["dimension"], a["hour"])
            want[k] = want.get(k, 0) + int(a["quantity"])

        def outbox(db: Db) -> tuple[dict[tuple[str, str, str], int], int]:
            rows = db.execute("SELECT customer, dimension, hour, quantity FROM saas_outbox")
            got = {(str(c), str(d), iso_hour(int(h))): int(q) for c, d, h, q in rows}
            left = db.execute("SELECT COUNT(*) FROM saas_open WHERE hour <= ?", (last,))
            return got, int(left.fetchone()[0])

        got, left_open = sealer.read(outbox)
        assert left_open == 0, "usage left in an hour already sealed: never sent"
        assert got == {k: v * SCALE for k, v in want.items()}, "the outbox differs from the acks"
        assert len(acked) > ROUNDS * 20 and carried > 0, (len(acked), carried)
        assert len(refused) < len(acked) // 10, refused[:5]

        billed = {(c, d, iso_hour(h)): q for (c, d, h), q in aws.billed.items()}
        assert billed == want
    finally:
        with contextlib.suppress(Exception):
            intake.close()
        sealer.close()


def waiters(conn: psycopg.Connection[Any]) -> int:
    """Sessions waiting for an advisory lock."""
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    ).fetchone()
    return int(row[0]) if row else 0


def test_a_post_waiting_for_another_replicas_lock_holds_up_no_other_post(pg_url: str) -> None:
    """Another replica's transaction holds the total of (customer 0, seats) (slow, or frozen
    until the server ends it). A POST for it waits; a POST for another customer on the same
    replica is answered meanwhile, not after that wait (one writer per replica made it
    queue behind the waiting transaction for the whole lock wait)."""
    store = PgStore(SAAS_SCHEMA, pg_url)
    try:
        resolve(store, range(2))
        now = T0
        held = records([item(0, "seats", 1)], now)
        free = records([item(1, "seats", 1)], now)
        (key_held,) = [k for k, exclusive in L.ingest_locks(held) if exclusive]
        done: dict[str, float] = {}

        def post(name: str, recs: list[SaasRecord]) -> None:
            with contextlib.suppress(StoreUnavailableError):
                store.write(
                    lambda db: L.ingest(db, recs, now, HP, accept_unresolved=False),
                    INTAKE_WAIT,
                    L.ingest_locks(recs),
                )
            done[name] = time.monotonic()

        with (
            psycopg.connect(pg_url, autocommit=True) as other,
            psycopg.connect(pg_url, autocommit=True) as watch,
        ):
            other.execute("BEGIN")
            other.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (key_held,))
            waiting = threading.Thread(target=post, args=("held", held))
            waiting.start()
            deadline = time.monotonic() + 10
            while not waiters(watch):
                assert time.monotonic() < deadline, "the POST never waited for the lock"
                time.sleep(0.01)
            answered = threading.Thread(target=post, args=("free", free))
            answered.start()
            answered.join(30)
            still_waiting = "held" not in done
            other.execute("COMMIT")
            waiting.join(30)
        assert "free" in done and still_waiting, "the free POST waited for the held one"
        assert done["free"] < done["held"]
    finally:
        store.close()
