"""Usage allocations in SaaS mode (issue 21, stage 1): the ledger keeps each (customer, dimension,
hour)'s total with its tag sets, and the sealed UsageRecord carries them as UsageAllocations
(AllocatedUsageQuantityAsDecimal, Tags) that add up to its quantity exactly, on SQLite and
PostgreSQL, through boto3 to the emulator over loopback HTTP."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.aws.metering import MeteringGateway
from sidecar.core import quantity as qty
from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.usage import saas_ledger as L  # noqa: N812
from sidecar.usage.db import UsageStore, insert_new, open_store
from sidecar.usage.hours import HourPolicy, hour_of, hour_start
from sidecar.usage.overage import Basis
from sidecar.usage.saas import SAAS_SCHEMA, SaasPolicy, SaasService
from sidecar.usage.validate import Limits, RejectedError, parse_saas
from tests.helpers import ManualClock
from tests.usage_kit import aws_env

DIMS = ("scans", "users")
HP = HourPolicy(seal_margin=60, spread=0)
FAR = 4_000_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UsageStore]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    s = open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url)
    yield s
    with contextlib.suppress(Exception):
        s.close()


def _people(
    server: EmulatorServer, emulator: Emulator, clock: ManualClock, n: int
) -> list[dict[str, Any]]:
    emulator.meter_clock = clock.time  # tokens issued on the test's clock
    made = []
    for i in range(n):
        resp = requests.post(
            server.url + "/_emulator/saas/customers",
            json={"customer_aws_account_id": f"{400000000000 + i}", "token_ttl_seconds": 86400},
            timeout=5,
        )
        assert resp.status_code == 200, resp.text
        made.append(dict(resp.json()))
    return made


def _service(
    store: UsageStore,
    server: EmulatorServer,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    people: list[dict[str, Any]],
    clock: ManualClock,
) -> SaasService:
    aws_env(monkeypatch, server, "seller")
    emulator.meter_clock = clock.time
    svc = SaasService(
        SaasPolicy(dimensions=DIMS, hours=HP, calls_per_second=1024.0, zero_records=False),
        store,
        lambda: MeteringGateway("us-east-1", 5.0),
        clock=clock,
        rng=lambda: 0.5,
    )
    for p in people:
        token = json.dumps({"registration_token": p["registration_token"]}).encode()
        assert svc.resolve(token)[0] == 200
    return svc


def _doc(p: dict[str, Any], **record: Any) -> dict[str, Any]:
    return {
        "customer_aws_account_id": p["customer_aws_account_id"],
        "license_arn": p["license_arn"],
        **record,
    }


def _send_all(svc: SaasService, clock: ManualClock) -> None:
    for _ in range(40):
        svc.tick()
        if not svc.counters().records_by_state["sealed"]:
            return
        clock.t += 5
        clock.mono += 5
    raise AssertionError("records still sealed")


def _book(server: EmulatorServer) -> dict[str, Any]:
    return dict(requests.get(server.url + "/_emulator/saas/ledger", timeout=5).json())


def _allocs(kept: list[Any]) -> dict[tuple[tuple[str, str], ...], Any]:
    """The emulator's [[quantity, [[key, value], ...]], ...] by tag set."""
    return {tuple((k, v) for k, v in tags): q for q, tags in kept}


TEAM_A = {"team": "a"}


def test_allocated_decimal_usage_is_billed_exactly_with_its_tag_sets(
    store: UsageStore,
    emulator_server: EmulatorServer,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """0.1 posted ten times under team=a bills exactly 1, allocated to team=a; a customer with
    tagged and untagged usage in one hour gets one record whose allocations add up to it, the
    untagged part under custom mode's `unallocated` tag set. Each bills once."""
    clock = ManualClock()
    clock.t = hour_start(hour_of(clock.t)) + 600.0
    a, b = _people(emulator_server, emulator, clock, 2)
    svc = _service(store, emulator_server, emulator, monkeypatch, [a, b], clock)
    hour = hour_of(clock.t)
    try:
        tenth = [{"quantity": "0.1", "tags": TEAM_A}]
        for p in (a, b):
            for i in range(10):
                doc = _doc(
                    p,
                    dimension="scans",
                    quantity="0.1",
                    allocations=tenth,
                    id=f"{p['customer_aws_account_id']}-{i}",
                )
                assert svc.post(json.dumps(doc).encode())[0] == 202
        mixed = [
            _doc(a, dimension="scans", quantity="0.5"),
            _doc(
                a,
                dimension="scans",
                quantity="0.75",
                allocations=[
                    {"quantity": "0.25", "tags": {"team": "b", "env": "prod"}},
                    {"quantity": "0.5", "tags": TEAM_A},
                ],
            ),
        ]
        assert svc.post(json.dumps({"records": mixed}).encode())[0] == 202
        assert svc.report()["totals"]["scans"]["open"] == "3.25"
        assert svc.counters().records_by_state["open"] == 2  # per customer/dimension/hour
        clock.t = hour_start(hour + 1) + 120
        _send_all(svc, clock)
    finally:
        svc.close()
    book = _book(emulator_server)
    assert book["counts"].get("duplicate_record", 0) == 0
    got = {r["customer"].split("/")[0]: r for r in book["records"] if r["hour"] == hour}
    assert set(got) == {a["customer_aws_account_id"], b["customer_aws_account_id"]}
    only_a = got[b["customer_aws_account_id"]]
    assert (only_a["quantity"], only_a["allocations"]) == (1, [[1, [["team", "a"]]]])
    both = got[a["customer_aws_account_id"]]
    assert both["quantity"] == "2.25"
    assert _allocs(both["allocations"]) == {
        (("team", "a"),): "1.5",
        (("env", "prod"), ("team", "b")): "0.25",
        (("unallocated", "true"),): "0.5",
    }
    assert all(r["repeats"] == 0 for r in book["records"])


def test_an_id_repeats_with_the_same_allocations_and_conflicts_with_others(
    store: UsageStore,
    emulator_server: EmulatorServer,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same id, same allocations (quantities by value: "0.50" is 0.5): 200 with the stored
    answer; same id, the same units under another tag set: 409, nothing counted."""
    clock = ManualClock()
    clock.t = hour_start(hour_of(clock.t)) + 600.0
    (a,) = _people(emulator_server, emulator, clock, 1)
    svc = _service(store, emulator_server, emulator, monkeypatch, [a], clock)
    try:
        first = _doc(
            a,
            id="x-1",
            dimension="users",
            quantity="1.5",
            allocations=[
                {"quantity": "0.5", "tags": TEAM_A},
                {"quantity": 1, "tags": {"team": "b"}},
            ],
        )
        status, answer = svc.post(json.dumps(first).encode())
        assert status == 202
        same = {
            **first,
            "quantity": "1.50",
            "allocations": [
                {"quantity": "0.50", "tags": TEAM_A},
                {"quantity": "1.0", "tags": {"team": "b"}},
            ],
        }
        status, again = svc.post(json.dumps(same).encode())
        assert (status, again["records"]) == (200, [{**answer["records"][0], "repeat": True}])
        moved = {
            **first,
            "allocations": [
                {"quantity": "0.5", "tags": {"team": "c"}},
                {"quantity": 1, "tags": {"team": "b"}},
            ],
        }
        status, doc = svc.post(json.dumps(moved).encode())
        assert status == 409 and doc["field"] == "id"
        assert svc.report()["totals"]["users"]["open"] == "1.5"
    finally:
        svc.close()


def _ingest(store: UsageStore, docs: list[dict[str, Any]], now: float) -> tuple[int, Any]:
    records = parse_saas(json.dumps(docs).encode(), Limits(DIMS, 24 * 3600), now, "license")
    try:
        return store.write(
            lambda db: L.ingest(db, records, now, HP, accept_unresolved=True),
            locks=L.ingest_locks(records),
        )
    except RejectedError as exc:
        return exc.status, exc.body()


ACCT = "111111111111"
ARN = "arn:aws:license-manager::111111111111:license:l-1"
OTHER = "222222222222"
OTHER_ARN = "arn:aws:license-manager::222222222222:license:l-2"


def _rec(quantity: str, allocations: list[dict[str, Any]], account: str = ACCT) -> dict[str, Any]:
    arn = ARN if account == ACCT else OTHER_ARN
    return {
        "customer_aws_account_id": account,
        "license_arn": arn,
        "dimension": "users",
        "quantity": quantity,
        "allocations": allocations,
    }


def test_at_most_2499_tag_sets_per_customer_dimension_hour(store: UsageStore) -> None:
    """As in custom mode: one of the record's 2,500 allocations is kept for untagged usage. The
    2,500th distinct tag set of a customer's hour is a 400 naming the record's `allocations`,
    nothing of the POST is counted; a tag set already there, or another customer's, is fine."""
    now = 1_800_000_000.0
    many = [{"quantity": "0.000001", "tags": {"n": str(i)}} for i in range(L.MAX_TAG_SETS)]
    assert _ingest(store, [_rec("0.002499", many)], now)[0] == 202
    status, body = _ingest(
        store,
        [
            _rec("1", [{"quantity": 1, "tags": {"n": "0"}}]),
            _rec("1", [{"quantity": 1, "tags": {"n": "new"}}]),
        ],
        now,
    )
    assert status == 400 and body["field"] == "records[1].allocations"
    assert "2499 distinct tag sets" in body["problems"][0]["message"]
    assert _ingest(store, [_rec("1", [{"quantity": 1, "tags": {"n": "0"}}])], now)[0] == 202
    assert _ingest(store, [_rec("1", [{"quantity": 1, "tags": {"n": "x"}}], OTHER)], now)[0] == 202
    open_users = store.read(lambda db: L.report(db, now, HP))["totals"]["users"]["open"]
    assert open_users == "2.002499"  # the refused POST's first record was not counted either


def test_tag_sets_that_would_make_a_record_of_1_mb_are_refused_at_intake(
    store: UsageStore,
) -> None:
    """Long tags: some 2 kB an allocation, so a few hundred tag sets would make one usage
    record too large for any BatchMeterUsage call (under 1 MB). Refused when posted (400
    naming `allocations`), never accepted and then stuck unsendable."""
    now = 1_800_000_000.0

    def big(i: int) -> dict[str, Any]:
        tags = {f"{k}{i:04d}".ljust(100, "k"): "v" * 256 for k in "abcde"}
        return {"quantity": "0.000001", "tags": tags}

    accepted = 0
    status = 202
    while status == 202:
        part = [big(accepted + j) for j in range(50)]
        status, body = _ingest(store, [_rec(qty.text(50), part)], now)
        accepted += 50 if status == 202 else 0
    assert status == 400 and body["field"] == "records[0].allocations"
    assert "1 MB" in body["problems"][0]["message"]
    assert accepted == 500  # 505 such tag sets fit (docs/saas.md), 550 do not
    # What was accepted seals into a record that a call carries, under 1 MB on the wire.
    spec = L.SealSpec(DIMS, "license", False, HP)
    hour = hour_of(now)
    store.write(lambda db: L.seal(db, hour, hour_start(hour + 1) + 60, spec), locks=L.SEAL_LOCKS)
    batch, _ = store.write(lambda db: L.next_batch(db, hour_start(hour + 1) + 61, "p" * 255))
    assert batch is not None and batch.records == 1
    assert len(json.dumps(batch.request).encode()) < L.MAX_BATCH_BYTES


def test_a_call_is_under_1_mb_as_botocore_writes_it() -> None:
    """The batcher's size is the request botocore sends (json.dumps' default separators), not
    the compact stored text: for records of many allocations the two differ by percents."""
    from botocore.session import get_session

    client = get_session().create_client(
        "meteringmarketplace",
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",  # nosec B106 # never sent
    )
    model = client.meta.service_model.operation_model("BatchMeterUsage")
    record = {
        "Timestamp": 1_800_000_000,
        "Dimension": "users",
        "QuantityAsDecimal": "2",
        "CustomerAWSAccountId": ACCT,
        "LicenseArn": ARN,
        "UsageAllocations": L.allocations(
            2 * qty.SCALE,
            {json.dumps({"team": str(i)}): qty.SCALE // 100 for i in range(200)},
            2 * qty.SCALE,
        ),
    }
    texts = [json.dumps(record, sort_keys=True, separators=(",", ":"))] * 3
    request = json.loads(L._request_body(texts, "prod-1"))
    from botocore.serialize import create_serializer

    wire = create_serializer("json").serialize_to_request(request, model)["body"]
    assert L.wire_bytes(texts, "prod-1") == len(wire)
    assert len(wire) > len(L._request_body(texts, "prod-1")) * 1.05


def test_allocations_share_what_a_contract_leaves_to_bill_exactly() -> None:
    """A contract covering part of an allocated hour: the record bills the rest, and the
    allocations (which AWS requires to add up to the record's quantity) split it in proportion
    to each tag set's usage, exactly, to the micro-unit."""
    m = qty.SCALE
    a, b = json.dumps({"team": "a"}), json.dumps({"team": "b"})
    # 16 used (a 12, untagged 4), 10 covered: 6 billed, a 4.5, untagged 1.5.
    assert L.allocations(16 * m, {a: 12 * m}, 6 * m) == [
        {"AllocatedUsageQuantityAsDecimal": "4.5", "Tags": [{"Key": "team", "Value": "a"}]},
        {
            "AllocatedUsageQuantityAsDecimal": "1.5",
            "Tags": [{"Key": "unallocated", "Value": "true"}],
        },
    ]
    # Thirds: 1 micro-unit left over, to the largest remainder, then the first tag set.
    shares = L.allocations(3, {a: 1, b: 1}, 2)
    assert shares is not None
    assert [s["AllocatedUsageQuantityAsDecimal"] for s in shares] == ["0.000001", "0.000001", "0"]
    for total, parts, billed in [(7, {a: 3, b: 2}, 5), (10**16 - 1, {a: 10**15 + 7}, 12345)]:
        got = L.allocations(total, parts, billed)
        assert got is not None
        assert sum(qty.parse(s["AllocatedUsageQuantityAsDecimal"]) for s in got) == billed
    assert L.allocations(5 * m, {}, 5 * m) is None  # untagged only: no allocations


def test_a_contract_hour_with_tag_sets_seals_a_record_aws_accepts(
    store: UsageStore,
    emulator_server: EmulatorServer,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the service and the emulator: 10 seats an hour covered, 13.5 used (team a 9,
    team b 4, untagged 0.5): the record bills 3.5 with allocations adding up to 3.5 (the
    emulator refuses any other sum with InvalidUsageAllocationsException)."""
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
        assert (
            svc.resolve(json.dumps({"registration_token": a["registration_token"]}).encode())[0]
            == 200
        )
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
                    (account, FAR, clock.t),
                ),
            ]
        )
        doc = _doc(
            a,
            dimension="users",
            quantity="13.5",
            allocations=[
                {"quantity": 9, "tags": TEAM_A},
                {"quantity": 4, "tags": {"team": "b"}},
                {"quantity": "0.5", "tags": {"unallocated": "true"}},
            ],
        )
        assert svc.post(json.dumps(doc).encode())[0] == 202
        clock.t = hour_start(hour + 1) + 120
        _send_all(svc, clock)
    finally:
        svc.close()
    (got,) = [r for r in _book(emulator_server)["records"] if r["hour"] == hour]
    assert got["quantity"] == "3.5"
    shares = _allocs(got["allocations"])
    assert sum(qty.parse(str(q)) for q in shares.values()) == qty.parse("3.5")
    # 3.5 x 9/13.5 = 2.333333|33, x 4/13.5 = 1.037037|04, x 0.5/13.5 = 0.129629|63.
    assert shares == {
        (("team", "a"),): "2.333333",
        (("team", "b"),): "1.037037",
        (("unallocated", "true"),): "0.12963",  # the largest remainder: the micro-unit left
    }


def test_carried_hours_keep_their_tag_sets(store: UsageStore) -> None:
    """An hour too old to seal (the fleet was down) moves into the open hour with its tag sets,
    and the record of that hour carries them, added to that hour's own."""
    spec = L.SealSpec(DIMS, "license", False, HP)
    start = 1_800_000_000.0 - 1_800_000_000.0 % 3600 + 600
    old = hour_of(start)
    untagged = {**_rec("0.5", []), "allocations": None}
    assert (
        _ingest(store, [_rec("1.5", [{"quantity": "1.5", "tags": TEAM_A}]), untagged], start)[0]
        == 202
    )
    later = start + 30 * 3600  # past BatchMeterUsage's window for `old`
    now_hour = hour_of(later)
    store.write(lambda db: L.seal(db, now_hour - 1, later, spec), locks=L.SEAL_LOCKS)
    assert _ingest(store, [_rec("1", [{"quantity": 1, "tags": {"team": "b"}}])], later)[0] == 202
    seal_at = hour_start(now_hour + 1) + 60
    store.write(lambda db: L.seal(db, now_hour, seal_at, spec), locks=L.SEAL_LOCKS)
    rows = store.read(
        lambda db: db.execute("SELECT hour, record FROM saas_outbox ORDER BY hour").fetchall()
    )
    assert [int(h) for h, _ in rows] == [now_hour] and old < now_hour
    record = json.loads(rows[0][1])
    assert record["QuantityAsDecimal"] == "3"
    assert record["UsageAllocations"] == [
        {"AllocatedUsageQuantityAsDecimal": "1.5", "Tags": [{"Key": "team", "Value": "a"}]},
        {"AllocatedUsageQuantityAsDecimal": "1", "Tags": [{"Key": "team", "Value": "b"}]},
        {
            "AllocatedUsageQuantityAsDecimal": "0.5",
            "Tags": [{"Key": "unallocated", "Value": "true"}],
        },
    ]


def test_a_post_of_many_tagged_records_is_one_transaction_whatever_its_tag_sets(
    store: UsageStore,
) -> None:
    """Six customers' records of 2,499 allocations each in one POST (some 700 kB of JSON, under
    the 1 MiB body limit): 15,000 open rows, 75,000 values, more than one PostgreSQL statement
    may bind; all counted, or (one more tag set) none."""
    now = 1_800_000_000.0
    accounts = [f"33333333333{i}" for i in range(6)]

    def rec(account: str, n: int) -> dict[str, Any]:
        return {
            "customer_aws_account_id": account,
            "license_arn": f"arn:aws:license-manager::{account}:license:l-{account}",
            "dimension": "users",
            "quantity": qty.text(n),
            "allocations": [{"quantity": "0.000001", "tags": {"n": str(i)}} for i in range(n)],
        }

    full = [rec(a, L.MAX_TAG_SETS) for a in accounts]
    status, body = _ingest(store, [*full[:5], rec(accounts[5], L.MAX_TAG_SETS + 1)], now)
    assert status == 400 and body["field"] == "records[5].allocations"
    assert _ingest(store, full, now)[0] == 202
    rows = store.read(lambda db: db.execute("SELECT COUNT(*) FROM saas_open").fetchone())
    assert int(rows[0]) == 6 * (L.MAX_TAG_SETS + 1)
    report = store.read(lambda db: L.report(db, now, HP))
    assert report["totals"]["users"]["open"] == qty.text(6 * L.MAX_TAG_SETS)


def test_a_record_too_large_to_send_is_rejected_not_left_to_stop_every_call(
    store: UsageStore,
) -> None:
    """A sealed record that alone makes a request of 1 MB or more (intake never seals one; a
    store written by other code might hold it) would stay first in the pool forever and no
    call would ever be made again: it is settled 'rejected' (alerted on), the others sent."""
    now = 1_800_000_000.0
    hour = hour_of(now) - 2
    huge = {"Timestamp": int(hour_start(hour)), "Dimension": "users", "QuantityAsDecimal": "1",
            "CustomerAWSAccountId": ACCT, "LicenseArn": ARN,
            "UsageAllocations": [{"AllocatedUsageQuantityAsDecimal": "0",
                                  "Tags": [{"Key": f"k{i}", "Value": "v" * 256}]}
                                 for i in range(4000)]}  # fmt: skip
    small = {**huge, "CustomerAWSAccountId": OTHER, "LicenseArn": OTHER_ARN}
    small.pop("UsageAllocations")
    rows = [
        (f"{ACCT}/{ARN}", "users", hour, qty.SCALE, 0, json.dumps(huge), "sealed", now, now + 3600),
        (f"{OTHER}/{OTHER_ARN}", "users", hour, qty.SCALE, 0, json.dumps(small), "sealed", now,
         now + 3600),
    ]  # fmt: skip
    store.write(
        lambda db: insert_new(
            db, "saas_outbox", L.OUTBOX_COLUMNS, "customer, dimension, hour", rows
        )
    )
    batch, settled = store.write(lambda db: L.next_batch(db, now, None))
    assert batch is not None and batch.records == 1
    assert batch.request["UsageRecords"][0]["CustomerAWSAccountId"] == OTHER
    assert settled.rejected == ((f"{ACCT}/{ARN}", "users", hour),)
    states = store.read(lambda db: L.report(db, now, HP))["records_by_state"]
    assert (states["rejected"], states["sealed"]) == (1, 1)


def test_two_replicas_adding_tag_sets_at_once_lose_nothing(pg_url: str) -> None:
    """Two sidecars on one PostgreSQL, four threads each posting allocated usage for the same
    customer and dimension (new tag sets and existing ones mixed, in either order): every unit
    lands in its tag set, the hour's total is their sum, the tag-set limit counts each set once,
    and the sealed record's allocations say so exactly."""
    import threading

    now = 1_800_000_000.0
    stores = [open_store(SAAS_SCHEMA, database_url=pg_url) for _ in range(2)]
    errors: list[BaseException] = []

    def post(n: int) -> None:
        try:
            store = stores[n % 2]
            for i in range(40):
                tags = [{"team": str((n + i) % 7)}, {"team": str((n * i) % 5), "env": "x"}]
                doc = _rec(
                    "0.3",
                    [
                        {"quantity": "0.1", "tags": tags[0]},
                        {"quantity": "0.2", "tags": tags[1]},
                    ],
                )
                status, body = _ingest(store, [doc], now)
                assert status == 202, body
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=post, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[0]
        want: dict[tuple[tuple[str, str], ...], int] = {}
        for n in range(8):
            for i in range(40):
                for q, tags in ((100_000, {"team": str((n + i) % 7)}),
                                (200_000, {"team": str((n * i) % 5), "env": "x"})):  # fmt: skip
                    key = tuple(sorted(tags.items()))
                    want[key] = want.get(key, 0) + q
        hour = hour_of(now)
        spec = L.SealSpec(DIMS, "license", False, HP)
        at = hour_start(hour + 1) + 60
        assert stores[0].write(lambda db: L.seal(db, hour, at, spec), locks=L.SEAL_LOCKS) == [
            (hour, 1)
        ]
        text = stores[1].read(lambda db: db.execute("SELECT record FROM saas_outbox").fetchone())
        record = json.loads(str(text[0]))
        assert record["QuantityAsDecimal"] == qty.text(8 * 40 * 300_000) == "96"
        got = {
            tuple((t["Key"], t["Value"]) for t in a["Tags"]): qty.parse(
                a["AllocatedUsageQuantityAsDecimal"]
            )
            for a in record["UsageAllocations"]
        }
        assert got == want and len(got) == 12
    finally:
        for s in stores:
            s.close()


def test_a_departed_buyers_hour_sealed_early_keeps_its_tag_sets(store: UsageStore) -> None:
    """A license deprovisioned mid-hour: its open usage is sealed at once (the final window),
    and that record carries its tag sets as the hourly seal's would."""
    from tests.test_saas_license_departures import ACCOUNT, L1, event, two_licenses, who

    clock = ManualClock()
    clock.t = hour_start(hour_of(clock.t)) + 600.0
    svc, aws = two_licenses(lambda: store, clock)
    hour = hour_of(clock.t)
    doc = {
        "customer_aws_account_id": ACCOUNT,
        "license_arn": L1,
        "dimension": "seats",
        "quantity": "2.5",
        "allocations": [{"quantity": 2, "tags": TEAM_A}, {"quantity": "0.5", "tags": {"b": "c"}}],
    }
    assert svc.post(json.dumps(doc).encode())[0] == 202
    assert svc.post(json.dumps({**doc, "quantity": 1, "allocations": None}).encode())[0] == 202
    gone = event("License Deprovisioned", clock.t, agreement="agmt-1", license=L1)
    assert svc.handle_message("d", gone) == "applied"
    svc.tick()  # the early seal, inside the hour
    (record,) = [
        r
        for text in aws.bodies
        for r in json.loads(text)["UsageRecords"]
        if aws.key_of(r) == (who(L1), "seats", hour)
    ]
    assert record["QuantityAsDecimal"] == "3.5"
    assert record["UsageAllocations"] == [
        {"AllocatedUsageQuantityAsDecimal": "0.5", "Tags": [{"Key": "b", "Value": "c"}]},
        {"AllocatedUsageQuantityAsDecimal": "2", "Tags": [{"Key": "team", "Value": "a"}]},
        {
            "AllocatedUsageQuantityAsDecimal": "1",
            "Tags": [{"Key": "unallocated", "Value": "true"}],
        },
    ]
