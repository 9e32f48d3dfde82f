"""Attacks on SaaS mode's exactly-once promise, through the real emulator over loopback HTTP,
the real gateway and the real PostgreSQL: stampedes, two replicas racing on one idempotency id or
one customer/dimension/hour total, a stale leader still sending, a crash between AWS's answer
and storing it. Each test reads AWS's side from the emulator's ledger.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.aws.metering import MeteringGateway
from sidecar.usage.db import UsageStore, open_store
from sidecar.usage.hours import HourPolicy, hour_of, hour_start
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


def new_customer(server: Any, n: int) -> dict[str, Any]:
    resp = requests.post(
        server.url + "/_emulator/saas/customers",
        json={"customer_aws_account_id": f"{300000000000 + n}"},
        timeout=5,
    )
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def service(store: UsageStore, clock: ManualClock, gateway: Any = None) -> SaasService:
    policy = SaasPolicy(
        dimensions=DIMS, hours=HourPolicy(seal_margin=60, spread=0), calls_per_second=1000.0
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
    assert {a[1]["customer_aws_account_id"] for a in answers} == {
        person["customer_aws_account_id"]
    }
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
        answers = together([(lambda s=s: s.post(body)) for s in (a, b) * 6])
        codes = sorted(x[0] for x in answers)
        assert codes == [200] * 11 + [202], codes
    assert b.store.leading() or a.store.leading()
    leader = a if a.store.leading() else b
    send_all(leader, clock, hour)
    assert billed(server, hour)[(key(person), "users")] == 35


def test_two_replicas_cannot_push_one_total_past_aws_maximum(
    world: tuple[Any, Any, ManualClock], pg_url: str, stores: list[UsageStore]
) -> None:
    """BatchMeterUsage's Quantity tops out at 2^31-1. Two pods each adding just over half of it
    to one customer/dimension/hour at the same moment: one is refused (400, field named), the
    sent record is exactly what was acknowledged."""
    server, _, clock = world
    person = new_customer(server, 3)
    a = service(open_store(SAAS_SCHEMA, state_dir=None, database_url=pg_url), clock)
    b = service(open_store(SAAS_SCHEMA, state_dir=None, database_url=pg_url), clock)
    stores.extend([a.store, b.store])
    resolve(a, person)
    hour = hour_of(clock.t)
    half = MAX_QUANTITY // 2 + 1
    answers = together([lambda: a.post(usage(person, "gb", half)), lambda: b.post(usage(person, "gb", half))])
    codes = sorted(x[0] for x in answers)
    assert codes == [202, 400], answers
    refused = next(x[1] for x in answers if x[0] == 400)
    assert "quantity" in json.dumps(refused)
    leader = a if a.store.leading() else b
    send_all(leader, clock, hour)
    assert billed(server, hour)[(key(person), "gb")] == half
    assert ledger(server)["counts"].get("duplicate_record", 0) == 0
