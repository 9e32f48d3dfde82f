"""Attacks on SaaS mode's exactly-once promise, through the real emulator over loopback HTTP,
the real gateway and the real PostgreSQL: stampedes, two replicas racing on one idempotency id or
one customer/dimension/hour total, a stale leader still sending, a crash between AWS's answer
and storing it. Each test reads AWS's side from the emulator's ledger.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.aws.metering import MeteringGateway
from sidecar.usage.db import UsageStore, open_store
from sidecar.usage.hours import HourPolicy, hour_of, hour_start, iso
from sidecar.usage.saas import SAAS_SCHEMA, SaasPolicy, SaasService
from sidecar.usage.validate import MAX_QUANTITY
from tests.helpers import ManualClock
from tests.usage_kit import aws_env

DIMS = ("users", "gb", "calls")


class Killed(BaseException):
    """The process dies here: nothing after it runs."""


@pytest.fixture
def world(
    emulator_server: Any, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, Any, ManualClock]]:
    aws_env(monkeypatch, emulator_server, "seller")
    clock = ManualClock()
    clock.t = hour_start(hour_of(clock.t)) + 600.0
    emulator.meter_clock = clock.time
    yield emulator_server, emulator, clock
    emulator.config.latency = 0.0


@pytest.fixture
def stores() -> Iterator[list[UsageStore]]:
    opened: list[UsageStore] = []
    yield opened
    for s in opened:
        with contextlib.suppress(Exception):
            s.close()


def new_customer(server: Any, n: int, **spec: Any) -> dict[str, Any]:
    resp = requests.post(
        server.url + "/_emulator/saas/customers",
        json={"customer_aws_account_id": f"{300000000000 + n}", **spec},
        timeout=5,
    )
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def service(store: UsageStore, clock: ManualClock, gateway: Any = None) -> SaasService:
    policy = SaasPolicy(
        # 1024 calls/s: its pauses (1/1024 s) add up exactly on the manual monotonic clock
        dimensions=DIMS,
        hours=HourPolicy(seal_margin=60, spread=0),
        calls_per_second=1024.0,
    )
    gw = gateway or MeteringGateway("us-east-1", 5.0)
    return SaasService(policy, store, lambda: gw, clock=clock, rng=lambda: 0.5)


def usage(person: dict[str, Any], dimension: str, quantity: int, **extra: Any) -> bytes:
    doc = {
        "customer_aws_account_id": person["customer_aws_account_id"],
        "license_arn": person["license_arn"],
        "dimension": dimension,
        "quantity": quantity,
        **extra,
    }
    return json.dumps(doc).encode()


def resolve(svc: SaasService, person: dict[str, Any]) -> None:
    status, doc = svc.resolve(
        json.dumps({"registration_token": person["registration_token"]}).encode()
    )
    assert status == 200, doc


def key(person: dict[str, Any]) -> str:
    return f"{person['customer_aws_account_id']}/{person['license_arn']}"


def ledger(server: Any) -> dict[str, Any]:
    return dict(requests.get(server.url + "/_emulator/saas/ledger", timeout=5).json())


def billed(server: Any, hour: int) -> dict[tuple[str, str], int]:
    return {
        (r["customer"], r["dimension"]): int(r["quantity"])
        for r in ledger(server)["records"]
        if r["hour"] == hour
    }


def send_all(svc: SaasService, clock: ManualClock, hour: int) -> None:
    clock.t = max(clock.t, hour_start(hour + 1) + 120)
    for _ in range(20):
        svc.tick()
        if not svc.counters().records_by_state["sealed"]:
            return
        clock.t += 30
    raise AssertionError("records still sealed after 20 passes")


def together(fns: list[Any]) -> list[Any]:
    """Run the callables at the same moment in threads; their results in order."""
    out: list[Any] = [None] * len(fns)
    gate = threading.Barrier(len(fns))

    def run(i: int) -> None:
        gate.wait()
        out[i] = fns[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_a_resolve_stampede_of_one_token_calls_resolve_customer_once(
    world: tuple[Any, Any, ManualClock], tmp_path: Path, stores: list[UsageStore]
) -> None:
    """The buyer's browser retries, the registration page is reloaded: 50 concurrent resolves
    of one token must not become 50 ResolveCustomer calls (AWS throttles that API too)."""
    server, emulator, clock = world
    person = new_customer(server, 1)
    stores.append(open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=None))
    svc = service(stores[0], clock)
    emulator.config.latency = 0.3  # AWS takes its time: every request arrives during the call
    body = json.dumps({"registration_token": person["registration_token"]}).encode()
    answers = together([lambda: svc.resolve(body)] * 50)
    assert [a[0] for a in answers] == [200] * 50
    assert {a[1]["customer_aws_account_id"] for a in answers} == {person["customer_aws_account_id"]}
    calls = [c for c in emulator.calls if c["op"].endswith("ResolveCustomer")]
    assert len(calls) == 1, f"{len(calls)} ResolveCustomer calls for one token"


def test_one_id_posted_to_two_replicas_at_once_is_stored_once(
    world: tuple[Any, Any, ManualClock], pg_url: str, stores: list[UsageStore]
) -> None:
    """Client retries land on two pods (PostgreSQL, two stores): one 202, the rest 200, and the
    hour's record carries the quantity once."""
    server, _, clock = world
    person = new_customer(server, 2)
    a = service(open_store(SAAS_SCHEMA, state_dir=None, database_url=pg_url), clock)
    b = service(open_store(SAAS_SCHEMA, state_dir=None, database_url=pg_url), clock)
    stores.extend([a.store, b.store])
    resolve(a, person)
    hour = hour_of(clock.t)
    for n in range(5):
        body = usage(person, "users", 7, id=f"retry-{n}")
        answers = together([(lambda s=s, body=body: s.post(body)) for s in (a, b) * 6])
        codes = sorted(x[0] for x in answers)
        assert codes == [200] * 11 + [202], codes
    assert b.store.leading() or a.store.leading()
    leader = a if a.store.leading() else b
    send_all(leader, clock, hour)
    assert billed(server, hour)[(key(person), "users")] == 35


def test_two_replicas_cannot_push_one_total_past_aws_maximum(
    world: tuple[Any, Any, ManualClock], pg_url: str, stores: list[UsageStore]
) -> None:
    """BatchMeterUsage's QuantityAsDecimal tops out at 9999999999.999999. Two pods each adding
    just over half of it to one customer/dimension/hour at the same moment: one is refused (400,
    field named), the sent record is exactly what was acknowledged."""
    server, _, clock = world
    person = new_customer(server, 3)
    a = service(open_store(SAAS_SCHEMA, state_dir=None, database_url=pg_url), clock)
    b = service(open_store(SAAS_SCHEMA, state_dir=None, database_url=pg_url), clock)
    stores.extend([a.store, b.store])
    resolve(a, person)
    hour = hour_of(clock.t)
    half = MAX_QUANTITY // 2 + 1
    answers = together(
        [lambda: a.post(usage(person, "gb", half)), lambda: b.post(usage(person, "gb", half))]
    )
    codes = sorted(x[0] for x in answers)
    assert codes == [202, 400], answers
    refused = next(x[1] for x in answers if x[0] == 400)
    assert "quantity" in json.dumps(refused)
    leader = a if a.store.leading() else b
    send_all(leader, clock, hour)
    assert billed(server, hour)[(key(person), "gb")] == half
    assert ledger(server)["counts"].get("duplicate_record", 0) == 0


def test_a_stale_leader_sending_beside_the_new_one_bills_each_record_once(
    world: tuple[Any, Any, ManualClock], pg_url: str, pg_server: Any, stores: list[UsageStore]
) -> None:
    """The leader's own session is cut (the server ended it); another sidecar takes the sender
    role while the old one, not knowing yet, seals and sends in the same moment. With a third
    of the records answered as UnprocessedRecords, both regroup. AWS must see one quantity per
    customer/dimension/hour, never a DuplicateRecord, and both sidecars' ledgers agree."""
    import psycopg

    server, emulator, clock = world
    emulator.config.unprocessed_rate = 0.3
    people = [new_customer(server, 100 + i) for i in range(40)]
    a = service(open_store(SAAS_SCHEMA, state_dir=None, database_url=pg_url), clock)
    b = service(open_store(SAAS_SCHEMA, state_dir=None, database_url=pg_url), clock)
    stores.extend([a.store, b.store])
    for p in people:
        resolve(a, p)
    hour = hour_of(clock.t)
    want: dict[tuple[str, str], int] = {}
    for n, p in enumerate(people):
        for d, dimension in enumerate(DIMS):
            q = n * 10 + d + 1
            assert (a if n % 2 else b).post(usage(p, dimension, q))[0] == 202
            want[(key(p), dimension)] = q
    assert a.store.leading() and not b.store.leading()
    pid = a.store._lconn.info.backend_pid  # type: ignore[attr-defined]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # pg_terminate_backend only signals: the session (and its lock) goes a moment later.
        deadline = time.monotonic() + 10
        while admin.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s UNION ALL "
            "SELECT 1 FROM pg_locks WHERE pid = %s",
            (pid, pid),
        ).fetchone():
            assert time.monotonic() < deadline, "the terminated session never went"
            time.sleep(0.01)
    # and b takes the lead on its next try (poll: it may be mid-attempt).
    deadline = time.monotonic() + 30
    while not b.store.leading():
        assert time.monotonic() < deadline, "b never took the lead after a's session was cut"
        time.sleep(0.05)
    clock.t = hour_start(hour + 1) + 120
    together([a.tick, b.tick, a.tick, b.tick])
    for _ in range(20):
        b.tick()
        if not b.counters().records_by_state["sealed"]:
            break
        clock.t += 30
    assert billed(server, hour) == want
    counts = ledger(server)["counts"]
    assert counts.get("duplicate_record", 0) == 0
    assert b.counters().records_by_state["sent"] == len(want)
    assert b.counters().records_by_state["conflict"] == 0


class CrashingGateway:
    """The real gateway; the process dies at `step` of the `at`-th call: before it is sent,
    or after AWS answered but before the answer is stored."""

    def __init__(self, at: int, step: str) -> None:
        self.real = MeteringGateway("us-east-1", 5.0)
        self.at, self.step, self.calls = at, step, 0

    def resolve_customer(self, token: str) -> dict[str, Any]:
        return self.real.resolve_customer(token)

    def batch_meter_usage(self, request: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.calls == self.at and self.step == "before":
            raise Killed
        answer = self.real.batch_meter_usage(request)
        if self.calls == self.at and self.step == "after":
            raise Killed
        return answer


@pytest.mark.parametrize("step", ["before", "after"])
@pytest.mark.parametrize("at", [1, 2, 4])
def test_a_crash_at_each_step_of_sending_then_a_restart_bills_exactly_once(
    world: tuple[Any, Any, ManualClock], tmp_path: Path, step: str, at: int
) -> None:
    """Killed before a stored call is sent, or after AWS answered it but before the answer is
    stored, with unprocessed records and throttling around: the restarted sidecar resends the
    stored request and AWS holds each record once, with the acknowledged quantity."""
    server, emulator, clock = world
    emulator.config.unprocessed_rate = 0.25
    people = [new_customer(server, 200 + i) for i in range(20)]
    store = open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=None)
    first = service(store, clock, CrashingGateway(at, step))
    for p in people:
        resolve(first, p)
    hour = hour_of(clock.t)
    want = {}
    for n, p in enumerate(people):
        for dimension in DIMS:
            assert first.post(usage(p, dimension, n + 1))[0] == 202
            want[(key(p), dimension)] = n + 1
    clock.t = hour_start(hour + 1) + 120
    with pytest.raises(Killed):
        for _ in range(20):
            first.tick()
    store.close()
    second = service(open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=None), clock)
    try:
        send_all(second, clock, hour)
        assert billed(server, hour) == want
        assert ledger(server)["counts"].get("duplicate_record", 0) == 0
        assert second.counters().records_by_state["sent"] == len(want)
    finally:
        second.close()


def test_a_buyer_registering_again_just_after_an_hour_keeps_that_hours_zero_records(
    world: tuple[Any, Any, ManualClock], tmp_path: Path, stores: list[UsageStore]
) -> None:
    """AWS's guidance: every active customer gets a record each hour, quantity 0 without usage.
    A buyer who opens the registration page again between the hour's end and its seal (a new
    token for the same customer) was active all that hour: its zero records must still go."""
    server, _, clock = world
    person = new_customer(server, 300)
    other = new_customer(server, 301)
    stores.append(open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=None))
    svc = service(stores[0], clock)
    resolve(svc, person)
    resolve(svc, other)
    hour = hour_of(clock.t)
    assert svc.post(usage(other, "users", 5))[0] == 202
    clock.t = hour_start(hour + 1) + 20  # the hour is over, not sealed yet (margin 60 s)
    # The same customer, a new registration token.
    again = new_customer(server, 300, license_arn=person["license_arn"])
    assert again["license_arn"] == person["license_arn"]
    resolve(svc, again)
    send_all(svc, clock, hour)
    got = billed(server, hour)
    assert {d: got.get((key(person), d)) for d in DIMS} == dict.fromkeys(DIMS, 0)
    assert got[(key(other), "users")] == 5


class ResolvesDuringTheCall:
    """The real gateway; while a BatchMeterUsage call is on the wire, `during` runs (the buyer
    subscribes again and the registration handler resolves the new token)."""

    def __init__(self) -> None:
        self.real = MeteringGateway("us-east-1", 5.0)
        self.during: Any = None

    def resolve_customer(self, token: str) -> dict[str, Any]:
        return self.real.resolve_customer(token)

    def batch_meter_usage(self, request: dict[str, Any]) -> dict[str, Any]:
        answer = self.real.batch_meter_usage(request)
        during, self.during = self.during, None
        if during is not None:
            during()
        return answer


def test_a_customer_resubscribing_while_aws_answers_not_subscribed_stays_active(
    world: tuple[Any, Any, ManualClock], tmp_path: Path, stores: list[UsageStore]
) -> None:
    """AWS answers CustomerNotSubscribed for a call made before the buyer subscribed again; the
    fresh resolve, stored while that answer was on its way, is the newer truth: the customer
    stays active (and keeps its zero records), the old record is kept as not_subscribed."""
    server, _, clock = world
    person = new_customer(server, 400)
    gateway = ResolvesDuringTheCall()
    stores.append(open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=None))
    svc = service(stores[0], clock, gateway)
    resolve(svc, person)
    hour = hour_of(clock.t)
    assert svc.post(usage(person, "users", 9))[0] == 202
    requests.post(
        server.url + "/_emulator/saas/unsubscribe",
        json={"customer_aws_account_id": person["customer_aws_account_id"]},
        timeout=5,
    )

    def subscribe_again() -> None:
        clock.t += 1
        again = new_customer(server, 400, license_arn=person["license_arn"])
        resolve(svc, again)

    gateway.during = subscribe_again
    send_all(svc, clock, hour)
    assert svc.counters().records_by_state["not_subscribed"] == 3  # AWS's answer is kept
    status, doc = svc.customer(person["customer_aws_account_id"])
    assert status == 200 and doc["state"] == "active", doc
    send_all(svc, clock, hour + 1)  # active customers get their zero records
    assert {d: billed(server, hour + 1).get((key(person), d)) for d in DIMS} == dict.fromkeys(
        DIMS, 0
    )


def test_replicas_with_skewed_clocks_lose_nothing_across_the_leaders_seal(
    world: tuple[Any, Any, ManualClock], pg_url: str, stores: list[UsageStore]
) -> None:
    """Pods' clocks disagree by minutes. The leader (clock ahead) seals hour H while a pod whose
    clock is behind still posts into H: that usage lands in H+1, said so in the answer, and is
    billed there; nothing is lost or billed twice."""
    server, _, clock = world  # the leader's clock (and AWS's)
    person = new_customer(server, 500)
    behind = ManualClock()
    leader = service(open_store(SAAS_SCHEMA, state_dir=None, database_url=pg_url), clock)
    pod = service(open_store(SAAS_SCHEMA, state_dir=None, database_url=pg_url), behind)
    stores.extend([leader.store, pod.store])
    resolve(leader, person)
    assert leader.store.leading()
    hour = hour_of(clock.t)
    assert leader.post(usage(person, "users", 4))[0] == 202
    clock.t = hour_start(hour + 1) + 120
    leader.tick()  # seals H and sends it
    behind.t = hour_start(hour + 1) - 240  # four minutes behind: still in H for this pod
    status, doc = pod.post(usage(person, "users", 6))
    assert status == 202 and doc["records"][0]["hour"] != doc["records"][0].get("carried_from")
    assert "carried_from" in doc["records"][0]
    status, doc = pod.post(usage(person, "gb", 8, timestamp=iso(behind.t - 60)))
    assert status == 202 and "carried_from" in doc["records"][0], doc
    send_all(leader, clock, hour + 1)
    assert billed(server, hour)[(key(person), "users")] == 4
    later = billed(server, hour + 1)
    assert later[(key(person), "users")] == 6 and later[(key(person), "gb")] == 8
    assert ledger(server)["counts"].get("duplicate_record", 0) == 0


def test_aws_clock_ahead_with_throttling_and_unprocessed_records_sends_the_rest(
    world: tuple[Any, Any, ManualClock], tmp_path: Path, stores: list[UsageStore]
) -> None:
    """Sending was throttled for hours; then AWS's clock is far enough ahead of the sidecar's
    that the oldest hour's records are out of AWS's window while the sidecar still thinks they
    are sendable: each call holding one is refused whole (TimestampOutOfBounds), while a third
    of the records of every accepted call come back unprocessed. The old hour's calls are
    resent as stored until its deadline (a clock disagreement, never bisected), then expire;
    the newer hour is billed exactly, each record once, never billed twice."""
    from sidecar.emulator.service import Fault

    server, emulator, clock = world
    people = [new_customer(server, 600 + i) for i in range(12)]
    stores.append(open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=None))
    svc = service(stores[0], clock)
    for p in people:
        resolve(svc, p)
    old = hour_of(clock.t)
    for n, p in enumerate(people):
        assert svc.post(usage(p, "users", n + 1))[0] == 202
    emulator.config.faults = [Fault("ThrottlingException", rate=1.0, op="BatchMeterUsage")]
    clock.t = hour_start(old + 1) + 120
    svc.tick()  # sealed; throttled
    want = {}
    for n, p in enumerate(people):
        for dimension in DIMS:
            assert svc.post(usage(p, dimension, 100 + n))[0] == 202
            want[(key(p), dimension)] = 100 + n
    clock.t = hour_start(old + 2) + 120
    svc.tick()  # sealed; throttled
    emulator.config.faults = []
    emulator.config.unprocessed_rate = 0.3
    emulator.meter_clock = lambda: clock.t + 3900.0
    # BatchMeterUsage's window is 24 h (issue 21; this test used MeterUsage's 6 h before)
    clock.t = hour_start(old) + 24 * 3600 - 200  # the sidecar: 80 s left; AWS: already past
    svc._failures, svc._resume_at = 0, 0.0
    for _ in range(20):  # the backoff pauses pass on the monotonic clock too
        svc.tick()
        if not svc.counters().records_by_state["sealed"]:
            break
        clock.t += 30
        clock.mono += 30
    assert billed(server, old) == {}
    assert billed(server, old + 1) == want
    book = ledger(server)["counts"]
    assert book.get("duplicate_record", 0) == 0 and book.get("out_of_bounds_batches", 0) >= 1
    states = svc.counters().records_by_state
    assert states["sealed"] == 0 and states["conflict"] == 0
    assert states["expired"] == len(people) * len(DIMS) and states["rejected"] == 0
    calls = [c for c in emulator.calls if c["op"].endswith("BatchMeterUsage")]
    assert len(calls) < 300, len(calls)  # 226 measured when bisection isolated each record
