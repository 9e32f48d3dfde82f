"""Attacks on SaaS usage allocations (schema 6): idempotency by value, carry-forward into an
hour that already holds other tag sets, the 2,499 limit raced by two replicas on PostgreSQL,
and zero-quantity allocated records sent through boto3 to the emulator. Each test names what
a user would lose if it broke: an hour AWS refuses whole, or a unit billed twice."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.aws.metering import MeteringGateway
from sidecar.core import quantity as qty
from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.usage import saas_ledger as L  # noqa: N812
from sidecar.usage.db import UsageStore, open_store
from sidecar.usage.hours import hour_of, hour_start
from sidecar.usage.intake import IdConflictError
from sidecar.usage.overage import Basis
from sidecar.usage.saas import SAAS_SCHEMA, SaasPolicy, SaasService
from tests.helpers import ManualClock
from tests.test_saas_allocations import (
    DIMS,
    HP,
    _book,
    _doc,
    _ingest,
    _people,
    _rec,
    _send_all,
    _service,
    store,
)
from tests.usage_kit import aws_env, post, service

__all__ = ["store"]  # the fixture, shared with tests/test_saas_allocations.py


def _sealed(s: UsageStore) -> list[tuple[int, dict[str, Any]]]:
    rows = s.read(
        lambda db: db.execute("SELECT hour, record FROM saas_outbox ORDER BY hour").fetchall()
    )
    return [(int(h), json.loads(str(r))) for h, r in rows]


def _seal(s: UsageStore, hour: int, spec: L.SealSpec) -> None:
    at = hour_start(hour + 1) + 60
    s.write(lambda db: L.seal(db, hour, at, spec), locks=L.SEAL_LOCKS)


def _sums_exactly(record: dict[str, Any]) -> None:
    """What AWS checks: the allocations add up to the record, at most 2,500, tag sets unique."""
    allocs = record["UsageAllocations"]
    assert 1 <= len(allocs) <= 2500
    total = sum(qty.parse(a["AllocatedUsageQuantityAsDecimal"]) for a in allocs)
    assert total == qty.parse(record["QuantityAsDecimal"])
    sets = [tuple((t["Key"], t["Value"]) for t in a["Tags"]) for a in allocs]
    assert len(set(sets)) == len(sets)


def test_an_id_repeats_with_its_allocations_in_another_order(store: UsageStore) -> None:
    """A client that builds allocations from a map (Go's, a Python set) sends them in another
    order on its retry. Same id, same tag sets, same quantities: a repeat (200), counted once;
    a 409 would tell it the record was refused, and a retry under a new id bills it twice."""
    now = 1_800_000_000.0
    a = {"quantity": "0.5", "tags": {"team": "a", "env": "prod"}}
    b = {"quantity": 1, "tags": {"team": "b"}}
    first = {**_rec("1.5", [a, b]), "id": "r-1"}
    assert _ingest(store, [first], now)[0] == 202
    again = {
        **first,
        "allocations": [
            {"quantity": "1.0", "tags": {"team": "b"}},
            {"quantity": "0.50", "tags": {"env": "prod", "team": "a"}},
        ],
    }
    status, body = _ingest(store, [again], now)
    assert status == 200, body
    assert body[0]["repeat"] is True
    # the same tag sets and total, split otherwise: other usage, a 409 (nothing counted)
    split = {**first, "allocations": [{**a, "quantity": 1}, {**b, "quantity": "0.5"}]}
    with pytest.raises(IdConflictError):
        _ingest(store, [split], now)
    assert store.read(lambda db: L.report(db, now, HP))["totals"]["users"]["open"] == "1.5"


def test_a_carry_into_an_hour_with_other_tag_sets_never_makes_a_record_aws_refuses(
    store: UsageStore,
) -> None:
    """1,300 tag sets in an hour the fleet never sealed, 1,300 others in the open hour: carried
    together they would be 2,600 allocations (AWS refuses the record: both hours lost). The
    old hour goes one hour further instead; every unit is sealed once, each record within
    AWS's rules."""
    spec = L.SealSpec(DIMS, "license", False, HP)
    start = 1_800_000_000.0 - 1_800_000_000.0 % 3600 + 600
    old = [{"quantity": "0.001", "tags": {"old": str(i)}} for i in range(1300)]
    assert _ingest(store, [_rec("1.3", old)], start)[0] == 202
    assert _ingest(store, [{**_rec("0.25", []), "allocations": None}], start)[0] == 202
    later = start + 30 * 3600  # past BatchMeterUsage's window for the first hour
    now_hour = hour_of(later)
    new = [{"quantity": "0.002", "tags": {"new": str(i)}} for i in range(1300)]
    assert _ingest(store, [_rec("2.6", new)], later)[0] == 202
    for h in range(now_hour - 1, now_hour + 2):
        _seal(store, h, spec)
    sealed = _sealed(store)
    assert len(sealed) == 2, [h for h, _ in sealed]
    for _, record in sealed:
        _sums_exactly(record)
    assert sum(qty.parse(r["QuantityAsDecimal"]) for _, r in sealed) == qty.parse("4.15")


def test_two_replicas_racing_the_tag_set_limit_never_seal_more_than_aws_takes(
    pg_url: str,
) -> None:
    """Two sidecars on one PostgreSQL each post 1,300 new tag sets for the same customer,
    dimension and hour at the same moment: both read 0 stored sets before either commits
    unless intake serialises them. One must be refused (400), and the sealed record keeps at
    most 2,499 tag sets plus the untagged one."""
    now = 1_800_000_000.0
    stores = [open_store(SAAS_SCHEMA, database_url=pg_url) for _ in range(2)]
    answers: list[int] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(2)

    def post(n: int) -> None:
        try:
            sets = [{"quantity": "0.001", "tags": {f"r{n}": str(i)}} for i in range(1300)]
            gate.wait(10)
            answers.append(_ingest(stores[n], [_rec("1.3", sets)], now)[0])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=post, args=(n,)) for n in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[0]
        assert sorted(answers) == [202, 400]
        hour = hour_of(now)
        spec = L.SealSpec(DIMS, "license", False, HP)
        at = hour_start(hour + 1) + 60
        stores[0].write(lambda db: L.seal(db, hour, at, spec), locks=L.SEAL_LOCKS)
        ((_, record),) = _sealed(stores[1])
        _sums_exactly(record)
        assert record["QuantityAsDecimal"] == "1.3"
    finally:
        for s in stores:
            s.close()


def test_zero_usage_allocated_and_untagged_is_sent_and_accepted(
    store: UsageStore,
    emulator_server: EmulatorServer,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Quantity 0 under a tag set, and a 0 without allocations beside real usage: the sealed
    records carry allocations of 0 that AWS takes (the whole call would fail otherwise)."""
    clock = ManualClock()
    clock.t = hour_start(hour_of(clock.t)) + 600.0
    a, b = _people(emulator_server, emulator, clock, 2)
    svc = _service(store, emulator_server, emulator, monkeypatch, [a, b], clock)
    hour = hour_of(clock.t)
    try:
        zero = [{"quantity": 0, "tags": {"team": "a"}}]
        docs = [
            _doc(a, dimension="scans", quantity=0, allocations=zero),
            _doc(b, dimension="scans", quantity="0.000001", allocations=zero[:0] or None),
            _doc(b, dimension="scans", quantity=0, allocations=zero),
            _doc(b, dimension="scans", quantity=0),
        ]
        status, body = svc.post(json.dumps({"records": docs}).encode())
        assert status == 202, body
        clock.t = hour_start(hour + 1) + 120
        _send_all(svc, clock)
    finally:
        svc.close()
    book = _book(emulator_server)
    got = {r["customer"].split("/")[0]: r for r in book["records"] if r["hour"] == hour}
    assert got[a["customer_aws_account_id"]]["allocations"] == [[0, [["team", "a"]]]]
    b_rec = got[b["customer_aws_account_id"]]
    assert b_rec["quantity"] == "0.000001"
    assert sorted(map(str, b_rec["allocations"])) == sorted(
        map(str, [[0, [["team", "a"]]], ["0.000001", [["unallocated", "true"]]]])
    )


def _long(prefix: str, i: int) -> dict[str, Any]:
    """An allocation of five tags at their longest: some 2 kB on the wire."""
    tags = {f"{prefix}{k}{i:04d}".ljust(100, "k"): "v" * 256 for k in "abcde"}
    return {"quantity": "0.000001", "tags": tags}


def test_a_carry_that_would_make_a_record_of_1_mb_goes_one_hour_further(
    store: UsageStore,
) -> None:
    """300 long tag sets in an unsealed old hour, 300 others in the open hour: each hour fits a
    call, both together (600, over the 505 that fit) would not, and a record no call can carry
    is rejected unsent (all of its units lost). The old hour goes one hour further instead."""
    spec = L.SealSpec(DIMS, "license", False, HP)
    start = 1_800_000_000.0 - 1_800_000_000.0 % 3600 + 600
    later = start + 30 * 3600
    for at, prefix in ((start, "o"), (later, "n")):
        for j in range(0, 300, 50):
            part = [_long(prefix, j + n) for n in range(50)]
            assert _ingest(store, [_rec(qty.text(50), part)], at)[0] == 202
    now_hour = hour_of(later)
    for h in range(now_hour - 1, now_hour + 2):
        _seal(store, h, spec)
    sealed = _sealed(store)
    assert len(sealed) == 2, [h for h, _ in sealed]
    for _, record in sealed:
        _sums_exactly(record)
        assert record["QuantityAsDecimal"] == "0.0003"
        # as the sender sizes a call of it alone (botocore's bytes, the longest ProductCode)
        assert L.wire_bytes([json.dumps(record)], "p" * 255) < L.MAX_BATCH_BYTES


def test_two_replicas_posting_tag_sets_while_the_hour_is_sealed_bill_each_unit_once(
    pg_url: str,
) -> None:
    """Two sidecars on one PostgreSQL post usage of one customer's hour under changing tag sets
    while a third seals that hour: what landed before the seal is in the hour's record, what
    came after is carried to the next hour, and each unit of each tag set is billed exactly
    once, every record's allocations adding up to it."""
    start = 1_800_000_000.0 - 1_800_000_000.0 % 3600 + 3000
    hour = hour_of(start)
    iso = time.strftime("%Y-%m-%dT%H:30:00Z", time.gmtime(hour_start(hour)))  # in `hour`
    now = hour_start(hour + 1) + 61  # posted after its end: the seal is due
    spec = L.SealSpec(DIMS, "license", False, HP)
    stores = [open_store(SAAS_SCHEMA, database_url=pg_url) for _ in range(3)]
    want: dict[tuple[tuple[str, str], ...], int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    gate = threading.Barrier(3)
    middle = threading.Barrier(3)
    sealed = threading.Event()

    def post(n: int) -> None:
        try:
            gate.wait(10)
            for i in range(40):
                if i == 10:
                    middle.wait(10)  # the seal starts now, these posts race it
                if i == 35:
                    assert sealed.wait(60)  # and these come after it: carried
                a, b = {"team": f"{n}-{i % 4}"}, {"team": str(i % 3), "env": "x"}
                doc = {
                    **_rec(
                        "0.3",
                        [{"quantity": "0.1", "tags": a}, {"quantity": "0.2", "tags": b}],
                    ),
                    "timestamp": iso,
                    "id": f"{n}-{i}",
                }
                status, body = _ingest(stores[n], [doc], now)
                assert status == 202, body
                with lock:
                    for q, tags in ((100_000, a), (200_000, b)):
                        key = tuple(sorted(tags.items()))
                        want[key] = want.get(key, 0) + q
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=post, args=(n,)) for n in range(2)]
    try:
        for t in threads:
            t.start()
        gate.wait(10)
        middle.wait(10)
        _seal_at(stores[2], hour, now, spec)
        sealed.set()
        for t in threads:
            t.join(120)
        assert not errors, errors[0]
        _seal_at(stores[2], hour + 1, hour_start(hour + 2) + 61, spec)
        got: dict[tuple[tuple[str, str], ...], int] = {}
        billed = 0
        records = _sealed(stores[2])
        assert [h - hour for h, _ in records] == [0, 1]
        for _, record in records:
            _sums_exactly(record)
            billed += qty.parse(record["QuantityAsDecimal"])
            for a in record["UsageAllocations"]:
                key = tuple((t["Key"], t["Value"]) for t in a["Tags"])
                got[key] = got.get(key, 0) + qty.parse(a["AllocatedUsageQuantityAsDecimal"])
        assert billed == 2 * 40 * 300_000
        assert got == want
    finally:
        for s in stores:
            s.close()


def _seal_at(s: UsageStore, hour: int, at: float, spec: L.SealSpec) -> None:
    s.write(lambda db: L.seal(db, hour, at, spec), locks=L.SEAL_LOCKS)


def test_custom_mode_repeats_an_id_whose_allocations_come_in_another_order(
    tmp_path: Path,
) -> None:
    """Custom mode shares the record digest: the same id and allocations in another order is a
    repeat (200, counted once), the same tag sets split otherwise a 409."""
    clock = ManualClock()
    svc = service(tmp_path, clock)
    try:
        a = {"quantity": 2, "tags": {"team": "a"}}
        b = {"quantity": 1, "tags": {"team": "b", "env": "prod"}}
        doc = {"dimension": "scans", "quantity": 3, "id": "c-1", "allocations": [a, b]}
        assert post(svc, doc)[0] == 202
        status, body = post(svc, {**doc, "allocations": [b, a]})
        assert (status, body["repeats"]) == (200, 1), body
        other = [{**a, "quantity": 1}, {**b, "quantity": 2}]
        assert post(svc, {**doc, "allocations": other})[0] == 409
        assert svc.report()["totals"]["scans"]["accepted"] == 3
    finally:
        svc.close()


def test_tag_values_that_json_escapes_are_sized_as_sent(store: UsageStore) -> None:
    """A double quote is in AWS's tag pattern (its ' -=' is a range) and takes two bytes on
    the wire: tag sets of such values are accepted only while the sealed record, as botocore
    writes it, still fits one call (else it is rejected unsent: all of its units lost)."""
    now = 1_800_000_000.0
    spec = L.SealSpec(DIMS, "license", False, HP)

    def quoted(i: int) -> dict[str, Any]:
        tags = {f"q{k}{i:04d}".ljust(100, "k"): '"' * 256 for k in "abcde"}
        return {"quantity": "0.000001", "tags": tags}

    accepted, status = 0, 202
    while status == 202:
        status, body = _ingest(
            store, [_rec(qty.text(20), [quoted(accepted + j) for j in range(20)])], now
        )
        accepted += 20 if status == 202 else 0
    assert status == 400 and "1 MB" in body["problems"][0]["message"]
    assert accepted >= 200
    _seal(store, hour_of(now), spec)
    ((_, record),) = _sealed(store)
    _sums_exactly(record)
    assert L.wire_bytes([json.dumps(record)], "p" * 255) < L.MAX_BATCH_BYTES


def test_a_contract_covering_more_than_the_usage_sends_zero_allocations_aws_accepts(
    store: UsageStore,
    emulator_server: EmulatorServer,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """10 seats an hour covered, 3 used (team a 2, untagged 1): the record bills 0 and each
    allocation is 0 (their sum, as AWS requires); never a share of units the contract paid."""
    clock = ManualClock()
    clock.t = hour_start(hour_of(clock.t)) + 600.0
    (a,) = _people(emulator_server, emulator, clock, 1)
    aws_env(monkeypatch, emulator_server, "seller")
    emulator.meter_clock = clock.time
    svc = SaasService(
        SaasPolicy(
            dimensions=DIMS,
            hours=HP,
            calls_per_second=1024.0,
            zero_records=False,
            contract=(("users", Basis.HOUR),),
        ),
        store,
        lambda: MeteringGateway("us-east-1", 5.0),
        clock=clock,
        rng=lambda: 0.5,
    )
    hour = hour_of(clock.t)
    try:
        token = json.dumps({"registration_token": a["registration_token"]}).encode()
        assert svc.resolve(token)[0] == 200
        account = a["customer_aws_account_id"]
        store.write(
            lambda db: [
                db.execute(
                    "INSERT INTO saas_lifecycle (subject, state, state_time, event_time, "
                    "last_event, updated_at, entitlements_at) VALUES "
                    "(?, 'subscribed', 0, 0, 'GetEntitlements', ?, ?)",
                    (account, clock.t, clock.t),
                ),
                db.execute(
                    "INSERT INTO saas_entitlements (subject, dimension, value, expiration, "
                    "learned_at, kind) VALUES (?, 'users', '10', ?, ?, 'integer')",
                    (account, 4_000_000_000.0, clock.t),
                ),
            ]
        )
        docs = [
            _doc(
                a,
                dimension="users",
                quantity=2,
                allocations=[{"quantity": 2, "tags": {"team": "a"}}],
            ),
            _doc(a, dimension="users", quantity=1),
        ]
        assert svc.post(json.dumps({"records": docs}).encode())[0] == 202
        clock.t = hour_start(hour + 1) + 120
        _send_all(svc, clock)
    finally:
        svc.close()
    book = _book(emulator_server)
    (got,) = [r for r in book["records"] if r["hour"] == hour]
    assert got["quantity"] == 0
    assert sorted(map(str, got["allocations"])) == sorted(
        map(str, [[0, [["team", "a"]]], [0, [["unallocated", "true"]]]])
    )
