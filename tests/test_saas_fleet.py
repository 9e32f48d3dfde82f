"""SaaS mode end to end, through real processes: every acknowledged unit billed exactly once.

Real `marketplace-sidecar run` processes in SaaS mode, the emulator over HTTP (ResolveCustomer,
BatchMeterUsage with AWS's dedup per customer/dimension/hour) and a real PostgreSQL server (or
SQLite for one replica). Hours pass in seconds with the test-only scaled clock, shared with the
emulator. Clients resolve customers with tokens the emulator issued, then post usage with ids to
random sidecars while the sending sidecar is SIGKILLed in the middle of a batch, or PostgreSQL is
stopped and started again. At the end the emulator's ledger must equal what the sidecars
acknowledged, per customer/dimension/hour, with one record each and no DuplicateRecord.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.saas_kit import (
    DIMS,
    Book,
    Car,
    Clients,
    Customer,
    Ops,
    aligned_origin,
    audit,
    describe,
    resolve,
    saas_env,
    settle,
    spawn,
    start_fleet,
    wait_billed,
    wait_leader,
    wait_up,
)

SCALE = 600.0  # one hour every six seconds; AWS's six-hour window is 36 s
PRODUCT = "prod-saas-fleet"

# Fleet scenarios on real time (several sidecars, leader kills, restarts): the slow set.
pytestmark = pytest.mark.slow


@pytest.fixture
def ops(emulator_server: EmulatorServer, emulator: Emulator) -> Ops:
    """The emulator (reset for this test), driven over HTTP."""
    return Ops(emulator_server.url)


@pytest.fixture
def fleet() -> Iterator[list[Car]]:
    cars: list[Car] = []
    yield cars
    for car in cars:  # SIGTERM to all first: they drain side by side
        if car.alive():
            car.proc.terminate()
    for car in cars:  # a call in flight (10 s timeout) + the 3 s drain, on a loaded machine
        car.stop(timeout=30)


def scaled_clock(ops: Ops) -> float:
    """Start the shared scaled clock at the beginning of an hour; its origin."""
    origin = aligned_origin(SCALE, into_hour=30.0)
    ops.configure(time_scale=SCALE, time_origin=origin)
    return origin


def kill_sender_mid_batch(
    ops: Ops, fleet: list[Car], respawn: Callable[[Car], Car], latency: float = 1.5
) -> Car:
    """SIGKILL the leader while one of its BatchMeterUsage calls is in flight.

    With `latency`, each call spends that long in the emulator before it is processed; once one
    call of the leader completes, the next call of the same hour follows within a few hundred
    milliseconds (its batch stored first), and the kill lands during it. The emulator still
    processes that call after the kill (AWS recorded it, the sidecar never heard): proven by a
    call from the dead process's pod dated after the kill. Another sidecar must take over;
    `respawn` starts the replacement process. A kill that found no call in flight is retried."""
    ops.configure(latency=latency)
    attempts: list[str] = []
    try:
        for _ in range(3):
            leader = wait_leader(fleet)
            done = len(ops.calls("BatchMeterUsage"))
            deadline = time.monotonic() + 20
            while len(ops.calls("BatchMeterUsage")) == done:
                assert time.monotonic() < deadline, "the leader sent nothing in 20 s"
                time.sleep(0.05)
            time.sleep(0.6)
            killed_at = time.time()
            leader.kill()
            if any(c is not leader and c.alive() for c in fleet):
                successor = wait_leader(fleet, timeout=15)
                assert successor is not leader
            time.sleep(latency + 0.5)
            fleet.append(respawn(leader))
            late = [
                c
                for c in ops.calls("BatchMeterUsage")
                if c["pod"] == leader.pod and c["at"] > killed_at
            ]
            if late:
                return leader
            attempts.append(f"killed {leader.name} at {killed_at:.2f}: no call in flight")
        raise AssertionError(f"no kill while a BatchMeterUsage call was in flight: {attempts}")
    finally:
        ops.configure(latency=0.0)


def test_three_sidecars_on_postgres_bill_once_through_a_leader_kill(
    emulator_server: EmulatorServer, ops: Ops, pg_url: str, fleet: list[Car], tmp_path: Path
) -> None:
    origin = scaled_clock(ops)

    def env() -> dict[str, str]:
        return saas_env(emulator_server.url, database_url=pg_url, scale=SCALE, origin=origin)

    ops.configure(unprocessed_rate=0.1)  # AWS leaves some records unprocessed: resent
    customers = [ops.customer(i) for i in range(30)]
    idle = [ops.customer(100 + i) for i in range(2)]  # resolved, never any usage
    stranger = ops.customer(200)  # a token was issued; nobody redeemed it
    # Three processes race to create the schema of a fresh database.
    fleet += start_fleet([env() for _ in range(3)], tmp_path)

    rng = random.Random(13)
    for cust in customers + idle:
        first = rng.choice(fleet)
        got = resolve(first, cust)
        assert (got["customer_aws_account_id"], got["license_arn"]) == (
            cust.account,
            cust.license_arn,
        )
        # The same token again at another sidecar, within its lifetime (an hour of the scaled
        # clock, six seconds here): the fleet's store answers, AWS is not called again.
        again = resolve(rng.choice([c for c in fleet if c is not first]), cust)
        assert (again["customer_aws_account_id"], again["license_arn"]) == (
            cust.account,
            cust.license_arn,
        )
    assert len(ops.calls("ResolveCustomer")) == len(customers) + len(idle)
    # Every sidecar knows every customer another one resolved.
    known = fleet[1].get(f"/v1/customers/{customers[7].account}")
    assert known.status_code == 200, known.text
    assert customers[7].license_arn in known.text
    # Usage for a customer no sidecar resolved is refused, naming the customer, nothing stored.
    refused = requests.post(
        fleet[0].api + "/v1/usage",
        json={**stranger.fields(), "dimension": DIMS[0], "quantity": 5, "id": "stranger-1"},
        timeout=10,
    )
    assert refused.status_code == 400, refused.text
    assert "customer" in refused.text

    book = Book()
    with Clients(lambda: fleet, customers, book, threads=4, races=True, seed=5):
        time.sleep(7)  # more than an hour: sealed hours are being sent
        killed = kill_sender_mid_batch(
            ops, fleet, lambda dead: wait_up(spawn(env(), tmp_path, f"car{len(fleet)}"))
        )
        time.sleep(4)
    assert not killed.alive()
    settle(book, lambda: fleet)
    ledger = wait_billed(ops, book, timeout=45)
    audit(ledger, book)
    assert book.statuses[202] > 50 and book.races > 0, describe(book, ledger)
    assert book.statuses[200] > 0, "no repeat was recognised across the fleet"
    # AWS's guidance: active customers get a quantity-0 record for each hour without usage.
    for cust in idle:
        mine = [r for r in ledger["records"] if r["customer"] == cust.key]
        assert {r["dimension"] for r in mine} == set(DIMS), mine
        assert all(r["quantity"] == 0 for r in mine)
    assert ledger["counts"].get("customer_not_subscribed", 0) == 0
    assert ledger["counts"]["unprocessed"] > 0


def test_three_sidecars_adding_to_the_same_totals_answer_every_request(
    emulator_server: EmulatorServer,
    ops: Ops,
    pg_server: Any,
    pg_url: str,
    fleet: list[Car],
    tmp_path: Path,
) -> None:
    """Replicas adding to the same few customer/dimension/hour totals at once. Their writers'
    transactions (many requests each) must not deadlock one another: PostgreSQL would break
    each deadlock after a second's wait, the store would retry a few times and then fail the
    request, and the client would see its connection dropped. Every request gets an answer
    (202, 200, or 503 + Retry-After), none waits on a deadlock, every unit is billed once."""
    server_log = Path(pg_server.root) / "log"
    seen = server_log.stat().st_size
    origin = scaled_clock(ops)
    customers = [ops.customer(i) for i in range(3)]
    envs = [
        saas_env(emulator_server.url, database_url=pg_url, scale=SCALE, origin=origin)
        for _ in range(3)
    ]
    fleet += start_fleet(envs, tmp_path)
    for i, cust in enumerate(customers):
        resolve(fleet[i], cust)
    book = Book()
    with Clients(lambda: fleet, customers, book, threads=6, seed=17, max_batch=25):
        time.sleep(6)
    settle(book, lambda: fleet)
    ledger = wait_billed(ops, book, timeout=45)
    audit(ledger, book)  # includes: no live sidecar dropped a connection
    assert book.statuses[202] > 0, describe(book, ledger)
    with open(server_log, "rb") as log:
        log.seek(seen)
        deadlocks = log.read().count(b"deadlock detected")
    assert deadlocks == 0, f"PostgreSQL broke {deadlocks} deadlocks between the sidecars"


class ReadyWatch:
    """Polls every sidecar's /readyz (probe port) in the background: (time, car, status)."""

    def __init__(self, cars: list[Car]) -> None:
        self.cars = cars
        self.seen: list[tuple[float, str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ReadyWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while not self.stop.is_set():
            for car in list(self.cars):
                try:
                    status = car.get("/readyz", probe=True, timeout=3).status_code
                except requests.RequestException:
                    continue
                self.seen.append((time.time(), car.name, status))
            self.stop.wait(0.05)

    def between(self, start: float, end: float) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for at, name, status in self.seen:
            if start <= at <= end:
                out.setdefault(name, set()).add(status)
        return out


def test_postgres_restart_during_ingest_answers_503_and_loses_nothing(
    emulator_server: EmulatorServer,
    ops: Ops,
    pg_server: Any,
    pg_url: str,
    fleet: list[Car],
    tmp_path: Path,
) -> None:
    origin = scaled_clock(ops)
    customers = [ops.customer(i) for i in range(12)]
    envs = [
        saas_env(emulator_server.url, database_url=pg_url, scale=SCALE, origin=origin)
        for _ in range(3)
    ]
    fleet += start_fleet(envs, tmp_path)
    for i, cust in enumerate(customers):
        resolve(fleet[i % 3], cust)

    book = Book()
    with ReadyWatch(fleet) as ready, Clients(lambda: fleet, customers, book, threads=4, seed=9):
        time.sleep(4)
        before = book.statuses[202]
        pg_server.stop("immediate")  # returns once the server is gone
        try:
            down_at = time.time()
            time.sleep(2.5)
            refused_while_down = book.statuses[503]
        finally:
            pg_server.start()  # the session's server, for the tests after this one
        up_at = time.time()
        time.sleep(5)
    assert before > 0
    settle(book, lambda: fleet)
    ledger = wait_billed(ops, book, timeout=45)
    audit(ledger, book)

    # Clients were told to come back (503 + Retry-After), and did: every 503 was acknowledged
    # later under the same ids (the audit above), none was ever a 202 for nothing stored.
    assert refused_while_down > 0, describe(book, ledger)
    assert book.retry_after and all(v.isdigit() and int(v) >= 1 for v in book.retry_after)
    late_202 = [
        (start, end)
        for start, end, status in book.timeline
        if status == 202 and start > down_at and end < up_at
    ]
    assert not late_202, f"202 while PostgreSQL was down: {late_202[:5]}"
    # /readyz said so on every sidecar while the database was down, and recovered.
    during = ready.between(down_at + 1.0, up_at)
    assert all(503 in during.get(car.name, set()) for car in fleet), during
    for car in fleet:
        deadline = time.monotonic() + 15
        while car.get("/readyz", probe=True).status_code != 200:
            assert time.monotonic() < deadline, f"{car.name} not ready after the restart"
            time.sleep(0.1)
    assert wait_leader(fleet).alive()


def test_one_replica_on_sqlite_survives_kill_9_mid_batch(
    emulator_server: EmulatorServer, ops: Ops, fleet: list[Car], tmp_path: Path
) -> None:
    """The embedded store, customer identifiers (existing integrations, ProductCode)."""
    origin = scaled_clock(ops)
    state = tmp_path / "state"
    state.mkdir()
    env = saas_env(
        emulator_server.url,
        state_dir=state,
        scale=SCALE,
        origin=origin,
        MARKETPLACE_SAAS_IDENTITY="customer_identifier",
        MARKETPLACE_PRODUCT_CODE=PRODUCT,
    )
    customers: list[Customer] = [
        ops.customer(i, identifier=True, product_code=PRODUCT) for i in range(20)
    ]
    fleet += start_fleet([env], tmp_path)
    for cust in customers:
        got = resolve(fleet[0], cust)
        assert got["customer_identifier"] == cust.identifier

    book = Book()
    with Clients(lambda: fleet, customers, book, threads=3, seed=21):
        time.sleep(7)
        # The same state dir again: the restarted process resends what was in flight.
        kill_sender_mid_batch(
            ops, fleet, lambda dead: wait_up(spawn(dead.env, tmp_path, f"car{len(fleet)}"))
        )
        time.sleep(5)
    settle(book, lambda: fleet)
    ledger = wait_billed(ops, book, timeout=45)
    audit(ledger, book)
    assert book.statuses[202] > 30, describe(book, ledger)
    assert {r["customer"] for r in ledger["records"]} <= {c.key for c in customers}
