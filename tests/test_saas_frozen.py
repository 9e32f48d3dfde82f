"""A replica frozen in the middle of its intake transaction (SIGSTOP: a paused VM, a cgroup
freeze) must not stop the fleet: the other replicas keep acknowledging usage within a second,
the leader keeps sealing and sending, the server ends the frozen transaction within seconds,
the frozen replica answers again by itself once it resumes, and every acknowledged unit is
billed once. Real `run` processes, a real PostgreSQL server, the emulator over HTTP.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.usage.saas_ledger import SEAL_LOCK
from tests.saas_kit import (
    DIMS,
    Book,
    Car,
    Clients,
    Ops,
    aligned_origin,
    audit,
    describe,
    post_usage,
    resolve,
    saas_env,
    settle,
    start_fleet,
    wait_billed,
    wait_leader,
)

SCALE = 600.0  # one hour every six seconds: the leader seals while the replica is frozen
FROZEN = "frozen-replica"  # the application_name of the frozen replica's sessions


@pytest.fixture
def ops(emulator_server: EmulatorServer, emulator: Emulator) -> Ops:
    return Ops(emulator_server.url)


@pytest.fixture
def fleet() -> Iterator[list[Car]]:
    cars: list[Car] = []
    yield cars
    for car in cars:
        if car.alive():
            os.kill(car.proc.pid, signal.SIGCONT)  # a car left frozen by a failed test
            car.proc.terminate()
    for car in cars:
        car.stop(timeout=30)


def frozen_holding_seal_lock(url: str) -> bool:
    """The frozen replica has a session idle in a transaction that holds the seal lock."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
            "WHERE a.application_name = %s AND a.state = 'idle in transaction' "
            "AND l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = %s",
            (FROZEN, SEAL_LOCK),
        ).fetchone()
    return bool(row and row[0])


def frozen_in_transaction(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND state LIKE 'idle in transaction%%'",
            (FROZEN,),
        ).fetchone()
    return bool(row and row[0])


def freeze_mid_transaction(car: Car, url: str) -> float:
    """SIGSTOP `car` while its writer is inside an intake transaction holding the seal lock
    (stopped elsewhere, it is let go and stopped again); when it was frozen (monotonic)."""
    for _ in range(200):
        os.kill(car.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        deadline = stopped + 0.3  # a statement in flight ends: its session turns idle
        while time.monotonic() < deadline:
            if frozen_holding_seal_lock(url):
                return stopped
            time.sleep(0.02)
        os.kill(car.proc.pid, signal.SIGCONT)
        time.sleep(0.01 + (uuid.uuid4().int % 50) / 1000)
    raise AssertionError("never caught the replica inside an intake transaction")


def test_a_replica_frozen_mid_transaction_stops_no_other_replicas_intake_or_the_leader(
    emulator_server: EmulatorServer, ops: Ops, pg_url: str, fleet: list[Car], tmp_path: Path
) -> None:
    origin = aligned_origin(SCALE, into_hour=30.0)
    ops.configure(time_scale=SCALE, time_origin=origin)
    customers = [ops.customer(i) for i in range(4)]
    envs = [
        saas_env(emulator_server.url, database_url=pg_url, scale=SCALE, origin=origin)
        for _ in range(2)
    ]
    fleet += start_fleet(envs, tmp_path)
    leader = wait_leader(fleet)
    healthy = leader
    (victim,) = [c for c in fleet if c is not leader]
    for cust in customers:
        resolve(healthy, cust)
    # The victim's own sessions carry a name we can find in pg_stat_activity.
    victim.proc.terminate()
    victim.proc.wait(timeout=30)
    fleet.remove(victim)
    sep = "&" if "?" in pg_url else "?"
    env = saas_env(
        emulator_server.url,
        database_url=f"{pg_url}{sep}application_name={FROZEN}",
        scale=SCALE,
        origin=origin,
    )
    victim = start_fleet([env], tmp_path, prefix="victim")[0]
    fleet.append(victim)

    book = Book()
    latencies: list[float] = []
    statuses: list[int | None] = []
    with Clients(lambda: [victim], customers[:2], book, threads=4, seed=3, max_batch=10):
        frozen_at = freeze_mid_transaction(victim, pg_url)
        # The healthy replica (the leader) takes other customers' usage while the victim is
        # frozen holding the seal lock, through at least one hour boundary (one seal).
        http = requests.Session()
        ended_at: float | None = None
        n = 0
        while time.monotonic() - frozen_at < 8.0 or ended_at is None:
            assert time.monotonic() - frozen_at < 30, "the frozen transaction was never ended"
            cust = customers[2 + n % 2]
            batch = [
                {
                    **cust.fields(),
                    "dimension": DIMS[n % 3],
                    "quantity": 1 + n % 5,
                    "id": _new(book, cust.key),
                }
                for _ in range(3)
            ]
            n += 1
            began = time.monotonic()
            statuses.append(post_usage(http, healthy, batch, book))
            latencies.append(time.monotonic() - began)
            if ended_at is None and not frozen_in_transaction(pg_url):
                ended_at = time.monotonic()
        assert ended_at - frozen_at < 12.0, "the server did not end the frozen transaction"
        os.kill(victim.proc.pid, signal.SIGCONT)
        # It answers again by itself: its store reconnects after the server ended its session.
        deadline = time.monotonic() + 20
        while True:
            got = post_usage(
                http,
                victim,
                [
                    {
                        **customers[0].fields(),
                        "dimension": DIMS[0],
                        "quantity": 1,
                        "id": _new(book, customers[0].key),
                    }
                ],
                book,
            )
            if got == 202:
                break
            assert time.monotonic() < deadline, f"the resumed replica answers {got}"
            time.sleep(0.2)
    latencies.sort()
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
    summary = (
        f"{len(latencies)} posts to the healthy replica while the other was frozen: "
        f"statuses {sorted(set(map(str, statuses)))}, p50 {latencies[len(latencies) // 2]:.3f} s, "
        f"p99 {p99:.3f} s, max {latencies[-1]:.3f} s; frozen transaction ended after "
        f"{ended_at - frozen_at:.1f} s"
    )
    print(summary)
    assert statuses and all(s == 202 for s in statuses), summary
    assert p99 < 1.0, summary
    settle(book, lambda: fleet)
    ledger = wait_billed(ops, book, timeout=60)
    audit(ledger, book)
    assert book.units() > 0, describe(book, ledger)


def _new(book: Book, key: str) -> str:
    rid = uuid.uuid4().hex
    with book.lock:
        book.keys[rid] = key
    return rid
