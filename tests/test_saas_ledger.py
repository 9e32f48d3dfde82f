"""SaaS ledger: the same transactions on SQLite and on a real PostgreSQL server.

AWS is played by `FakeAws`, a small in-process stand-in with BatchMeterUsage's documented
semantics (dedup per customer/dimension/hour keeping the first quantity, DuplicateRecord,
CustomerNotSubscribed, UnprocessedRecords, one out-of-range timestamp refusing the whole call).
It stands in for AWS, not for any of our code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.aws.errors import classify
from sidecar.aws.metering import AwsCallError
from sidecar.core import quantity as qty
from sidecar.usage import saas_ledger as L  # noqa: N812
from sidecar.usage.db import Db, UsageStore, open_store
from sidecar.usage.hours import HOUR, HourPolicy, hour_of, hour_start, iso
from sidecar.usage.saas import SAAS_SCHEMA
from sidecar.usage.store import dumps
from sidecar.usage.validate import Limits, RejectedError, parse_saas

DIMS = ("api_calls", "seats", "storage_gb")
HP = HourPolicy(seal_margin=60, spread=0)
T0 = 1_790_000_000.0 - (1_790_000_000 % HOUR) + 600  # 10 minutes into an hour
SPEC = L.SealSpec(DIMS, "license", True, HP)


def account(i: int) -> str:
    return f"{100000000000 + i}"


def license_arn(i: int) -> str:
    return f"arn:aws:license-manager::294406891311:license/l-{i:032x}"


def key(i: int) -> str:
    return f"{account(i)}/{license_arn(i)}"


class FakeAws:
    """AWS's BatchMeterUsage as documented; `now` is AWS's clock."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.billed: dict[tuple[str, str, int], Any] = {}  # int, or a decimal string
        self.bodies: list[str] = []  # every request, as sent (sorted-key JSON)
        self.unsubscribed: set[str] = set()
        self.unprocessed_once: set[tuple[str, str, int]] = set()
        self.fail_next: list[str] = []
        # BatchMeterUsage's window (model 1.44.8): "up to 24 hours in the past"; the previous
        # billing month's records "until 06:00 UTC on the first day of the next month".
        self.window: float = 24 * HOUR
        self.month_grace: float = 6 * HOUR
        self.future: float = 300.0  # AWS's (undocumented) tolerance for future timestamps
        self.out_of_bounds_calls = 0
        self.bad_licenses: set[str] = set()  # InvalidLicenseException for any record of these
        self.unpublished: set[str] = set()  # InvalidUsageDimensionException

    def in_window(self, stamp: float, now: float) -> bool:
        day = datetime.fromtimestamp(stamp, UTC)
        after = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=UTC)
        closed = now >= after.timestamp() + self.month_grace
        return now - self.window < stamp <= now + self.future and not closed

    @staticmethod
    def key_of(r: dict[str, Any]) -> tuple[str, str, int]:
        who = r.get("CustomerIdentifier") or f"{r['CustomerAWSAccountId']}/{r['LicenseArn']}"
        return who, r["Dimension"], hour_of(r["Timestamp"])

    def batch_meter_usage(self, request: dict[str, Any]) -> dict[str, Any]:
        records = request["UsageRecords"]
        assert len(records) <= 25
        assert not ("ProductCode" in request and any("LicenseArn" in r for r in records))
        self.bodies.append(dumps(request))
        if self.fail_next:
            code = self.fail_next.pop(0)
            raise AwsCallError(classify(code, "fake", http_status=400))
        if any(r.get("LicenseArn") in self.bad_licenses for r in records):
            raise AwsCallError(classify("InvalidLicenseException", "not this customer's"))
        if any(r["Dimension"] in self.unpublished for r in records):
            raise AwsCallError(classify("InvalidUsageDimensionException", "not published"))
        now = self.now()
        if any(not self.in_window(float(r["Timestamp"]), now) for r in records):
            self.out_of_bounds_calls += 1
            raise AwsCallError(classify("TimestampOutOfBoundsException", "out of bounds"))
        results, unprocessed = [], []
        for r in records:
            k = self.key_of(r)
            if k in self.unprocessed_once:
                self.unprocessed_once.discard(k)
                unprocessed.append(r)
                continue
            # One kind per record; compared by value (17 and "17.0" are one quantity). Billed
            # as `qty.to_json` shows it: whole values as ints.
            assert not ("Quantity" in r and "QuantityAsDecimal" in r), r
            value = qty.to_json(
                qty.parse(r["QuantityAsDecimal"])
                if "QuantityAsDecimal" in r
                else qty.parse(r.get("Quantity", 0))
            )
            if k[0] in self.unsubscribed:
                status = "CustomerNotSubscribed"
            elif k in self.billed and self.billed[k] != value:
                status = "DuplicateRecord"
            else:
                self.billed.setdefault(k, value)
                status = "Success"
            results.append(
                {"UsageRecord": r, "Status": status, "MeteringRecordId": f"m-{hash(k) & 0xFFFF}"}
            )
        return {"Results": results, "UnprocessedRecords": unprocessed}


@pytest.fixture(params=["sqlite", "postgresql"])
def open_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], UsageStore]]:
    """Opens (and reopens: a restart) the SaaS store on either backend."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    opened: list[UsageStore] = []

    def make() -> UsageStore:
        s = open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url)
        opened.append(s)
        return s

    yield make
    for s in opened:
        with contextlib.suppress(Exception):  # a store the test closed itself
            s.close()


def resolve(store: UsageStore, ids: range, at: float = T0 - 300) -> None:
    def fn(db: Db) -> None:
        if len(ids) > 100:  # many customers: one statement (save_customer is tested below)
            db.executemany(
                "INSERT INTO saas_customers (customer, account_id, license_arn, product_code, "
                "state, state_since, resolved_at) VALUES (?, ?, ?, 'prod-1', 'active', ?, ?)",
                [(key(i), account(i), license_arn(i), at, at) for i in ids],
            )
            return
        for i in ids:
            answer = {
                "CustomerAWSAccountId": account(i),
                "LicenseArn": license_arn(i),
                "ProductCode": "prod-1",
            }
            L.save_customer(db, key(i), answer, at, f"digest-{i}", at + HOUR)

    store.write(fn)


def usage(store: UsageStore, items: list[tuple[int, str, int]], now: float) -> tuple[int, Any]:
    body = [
        {
            "customer_aws_account_id": account(i),
            "license_arn": license_arn(i),
            "dimension": d,
            "quantity": q,
        }
        for i, d, q in items
    ]
    recs = parse_saas(json.dumps(body).encode(), Limits(DIMS), now, "license")
    return store.write(lambda db: L.ingest(db, recs, now, HP, accept_unresolved=False))


def send_all(store: UsageStore, aws: FakeAws, now: float, limit: int = 100_000) -> int:
    """The sender's loop, by hand: calls made."""
    calls = 0
    while calls < limit:
        batch, _ = store.write(lambda db: L.next_batch(db, now, None))
        if batch is None:
            return calls
        calls += 1
        try:
            resp = aws.batch_meter_usage(batch.request)
        except AwsCallError as exc:
            code = exc.info.code
            store.write(
                functools.partial(L.split, batch_id=batch.id, now=now, product_code=None, code=code)
            )
            continue
        store.write(functools.partial(L.answer, batch_id=batch.id, response=resp, now=now))
    raise AssertionError("sending did not finish")


def send_fast(store: UsageStore, aws: FakeAws, now: float, per_txn: int = 100) -> int:
    """Like `send_all` (successful calls only) with many calls per transaction: the batching
    under test is the same, the test spends less time in fsync."""

    def chunk(db: Db) -> int:
        n = 0
        while n < per_txn:
            batch, _ = L.next_batch(db, now, None)
            if batch is None:
                break
            L.answer(db, batch.id, aws.batch_meter_usage(batch.request), now)
            n += 1
        return n

    calls = 0
    while True:
        n = store.write(chunk)
        calls += n
        if n < per_txn:
            return calls


def states(store: UsageStore) -> dict[str, int]:
    return store.read(lambda db: L.counts(db, T0 + 10 * HOUR))[0]


@pytest.mark.slow  # 30,000 records: minutes on PostgreSQL
def test_thirty_thousand_records_seal_into_full_calls(
    open_db: Callable[[], UsageStore],
) -> None:
    store = open_db()
    resolve(store, range(10_000))
    assert (
        usage(store, [(i, d, i % 7 + 1) for i in range(0, 10_000, 50) for d in DIMS], T0)[0] == 202
    )
    hour = hour_of(T0)
    now = hour_start(hour + 1) + 120
    sealed = store.write(lambda db: L.seal(db, hour, now, SPEC))
    assert sealed == [(hour, 30_000)]
    aws = FakeAws(lambda: now)
    calls = send_fast(store, aws, now)
    assert calls == math.ceil(30_000 / 25) == 1200
    assert all(len(json.loads(b)["UsageRecords"]) == 25 for b in aws.bodies)
    assert len(aws.billed) == 30_000
    assert sum(aws.billed.values()) == sum((i % 7 + 1) * 3 for i in range(0, 10_000, 50))
    assert states(store)["sent"] == 30_000


def test_one_bad_record_is_isolated_and_the_rest_sent(
    open_db: Callable[[], UsageStore],
) -> None:
    store = open_db()
    resolve(store, range(9))
    hour = hour_of(T0)
    usage(store, [(i, d, 5) for i in range(8) for d in DIMS], T0)  # 24 records
    usage(store, [(8, "seats", 9)], T0)
    spec = L.SealSpec(DIMS, "license", False, HP)
    now = hour_start(hour + 1) + 120
    store.write(lambda db: L.seal(db, hour, now, spec))
    assert states(store)["sealed"] == 25
    aws = FakeAws(lambda: now)
    aws.bad_licenses = {license_arn(8)}  # AWS refuses every call holding customer 8's record
    calls = send_all(store, aws, now)
    # The full call, then one call per halving until the record is alone (ceil(log2 25) = 5);
    # the halves found good go back to the pool and leave in one more call.
    assert calls - 1 <= math.log2(25) + 1 + 1, calls
    got = states(store)
    assert got["sent"] == 24 and got["rejected"] == 1
    assert len(aws.billed) == 24
    report = store.read(lambda db: L.report(db, now, HP))
    assert any("rejected" in w for w in report["warnings"])


def test_duplicate_record_is_never_sent_again(open_db: Callable[[], UsageStore]) -> None:
    store = open_db()
    resolve(store, range(2))
    hour = hour_of(T0)
    usage(store, [(0, "seats", 4), (1, "seats", 6)], T0)
    now = hour_start(hour + 1) + 120
    store.write(lambda db: L.seal(db, hour, now, L.SealSpec(DIMS, "license", False, HP)))
    aws = FakeAws(lambda: now)
    aws.billed[(key(0), "seats", hour)] = 99  # AWS holds another quantity already
    send_all(store, aws, now)
    for later in range(5):  # more passes of the sender: nothing is re-sent
        assert send_all(store, aws, now + later) == 0
    sent_for_0 = [b for b in aws.bodies if account(0) in b]
    assert len(sent_for_0) == 1
    assert aws.billed[(key(0), "seats", hour)] == 99
    got = states(store)
    assert got["conflict"] == 1 and got["sent"] == 1
    report = store.read(lambda db: L.report(db, now, HP))
    assert any("DuplicateRecord" in w for w in report["warnings"])


def test_not_subscribed_customer_is_marked_and_gets_no_more_zero_records(
    open_db: Callable[[], UsageStore],
) -> None:
    store = open_db()
    resolve(store, range(3))
    hour = hour_of(T0)
    usage(store, [(1, "seats", 2)], T0)
    now = hour_start(hour + 1) + 120
    store.write(lambda db: L.seal(db, hour, now, SPEC))
    aws = FakeAws(lambda: now)
    aws.unsubscribed.add(key(1))
    send_all(store, aws, now)
    customers = store.read(lambda db: L.find_customers(db, account(1)))
    assert customers[0]["state"] == "not_subscribed"
    assert states(store)["not_subscribed"] == 3  # its three records, kept with that state
    later = now + HOUR
    store.write(lambda db: L.seal(db, hour + 1, later, SPEC))
    rows = store.read(
        lambda db: db.execute(
            "SELECT customer FROM saas_outbox WHERE hour = ?", (hour + 1,)
        ).fetchall()
    )
    assert {r[0] for r in rows} == {key(0), key(2)}
    counts = store.read(lambda db: L.counts(db, later))[1]
    assert counts == {"active": 2, "not_subscribed": 1}


def test_unprocessed_records_go_into_a_later_call_unchanged(
    open_db: Callable[[], UsageStore],
) -> None:
    store = open_db()
    resolve(store, range(10))
    hour = hour_of(T0)
    usage(store, [(i, d, i + 1) for i in range(10) for d in DIMS], T0)
    now = hour_start(hour + 1) + 120
    store.write(lambda db: L.seal(db, hour, now, SPEC))
    aws = FakeAws(lambda: now)
    aws.unprocessed_once = {(key(i), "seats", hour) for i in (0, 3, 7)}
    assert send_all(store, aws, now) == 2  # 25 (3 of them unprocessed), then 5 + those 3
    assert len(aws.billed) == 30 and states(store)["sent"] == 30
    sent = [r for b in aws.bodies for r in json.loads(b)["UsageRecords"]]
    first = {dumps(r) for r in json.loads(aws.bodies[0])["UsageRecords"]}
    again = [
        dumps(r) for r in sent if FakeAws.key_of(r) in {(key(i), "seats", hour) for i in (0, 3, 7)}
    ]
    assert len(again) == 6 and set(again) <= first  # the same record text, twice


def test_crash_between_batch_stored_and_answer_stored_resends_identical_bytes(
    open_db: Callable[[], UsageStore],
) -> None:
    store = open_db()
    resolve(store, range(4))
    hour = hour_of(T0)
    usage(store, [(i, "api_calls", 10 + i) for i in range(4)], T0)
    now = hour_start(hour + 1) + 120
    store.write(lambda db: L.seal(db, hour, now, SPEC))
    aws = FakeAws(lambda: now)
    batch, _ = store.write(lambda db: L.next_batch(db, now, None))
    assert batch is not None
    aws.batch_meter_usage(batch.request)  # AWS got it; the process dies before the answer
    store.close()
    store = open_db()
    again, _ = store.write(lambda db: L.next_batch(db, now + 30, None))
    assert again is not None and again.id == batch.id and again.body == batch.body
    assert send_all(store, aws, now + 30) == 1
    assert aws.bodies[0] == aws.bodies[1]
    assert states(store)["sent"] == 12 and len(aws.bodies) == 2


def test_throttled_batch_keeps_its_exact_request(open_db: Callable[[], UsageStore]) -> None:
    store = open_db()
    resolve(store, range(2))
    hour = hour_of(T0)
    now = hour_start(hour + 1) + 120
    store.write(lambda db: L.seal(db, hour, now, SPEC))
    first, _ = store.write(lambda db: L.next_batch(db, now, None))
    assert first is not None
    store.write(lambda db: L.failed(db, first.id, "ThrottlingException", now))
    second, _ = store.write(lambda db: L.next_batch(db, now + 5, None))
    assert second is not None and (second.id, second.body) == (first.id, first.body)
    assert second.attempts == 1


@pytest.mark.parametrize("hours_late", [7, 20, 23.9])
def test_records_inside_batchmeterusages_day_are_billed_not_expired(
    open_db: Callable[[], UsageStore], hours_late: float
) -> None:
    """Issue 21: BatchMeterUsage takes records up to 24 hours old; a call stored at sealing and
    never answered (AWS down) is still billed, whole, once AWS answers 7 to 23 hours later.
    Before, SaaS records expired after MeterUsage's six hours."""
    store = open_db()
    resolve(store, range(30))
    hour = hour_of(T0)
    now = hour_start(hour + 1) + 120
    store.write(lambda db: L.seal(db, hour, now, SPEC))
    batch, _ = store.write(lambda db: L.next_batch(db, now, None))  # stored, never answered
    assert batch is not None
    late = hour_start(hour) + hours_late * HOUR
    aws = FakeAws(lambda: late)
    assert send_all(store, aws, late) == 4
    assert aws.bodies[0] == batch.body  # the stored call, resent as is
    assert len(aws.billed) == 90 and states(store)["sent"] == 90
    assert states(store)["expired"] == 0


def test_records_past_the_window_expire_unsent(open_db: Callable[[], UsageStore]) -> None:
    """Past BatchMeterUsage's 24 hours (counted from the hour's start, minus the safety
    margin), nothing is sent: every record expires, named in the report."""
    store = open_db()
    resolve(store, range(30))
    hour = hour_of(T0)
    now = hour_start(hour + 1) + 120
    store.write(lambda db: L.seal(db, hour, now, SPEC))
    batch, _ = store.write(lambda db: L.next_batch(db, now, None))  # stored, never answered
    assert batch is not None
    late = hour_start(hour) + 24 * HOUR - HP.window_safety + 1
    aws = FakeAws(lambda: late)
    assert send_all(store, aws, late) == 0
    assert aws.bodies == []
    assert states(store)["expired"] == 90
    warnings = store.read(lambda db: L.report(db, late, HP))["warnings"]
    assert any("90 records expired unsent" in w and "24 h" in w for w in warnings), warnings


def test_ingest_refuses_unknown_customers_and_keeps_ids_idempotent(
    open_db: Callable[[], UsageStore],
) -> None:
    store = open_db()
    resolve(store, range(1))
    limits = Limits(DIMS)

    def post(doc: Any, accept: bool = False) -> tuple[int, Any]:
        recs = parse_saas(json.dumps(doc).encode(), limits, T0, "license")
        return store.write(lambda db: L.ingest(db, recs, T0, HP, accept_unresolved=accept))

    stranger = {"customer_aws_account_id": account(5), "license_arn": license_arn(5)}
    with pytest.raises(RejectedError) as err:
        post({**stranger, "dimension": "seats", "quantity": 1})
    assert err.value.problems[0].field == "customer"
    assert post({**stranger, "dimension": "seats", "quantity": 1}, accept=True)[0] == 202
    known = {"customer_aws_account_id": account(0), "license_arn": license_arn(0)}
    rec = {**known, "dimension": "seats", "quantity": 3, "id": "req-1"}
    assert post(rec)[0] == 202
    assert post(rec)[0] == 200
    with pytest.raises(L.IdConflictError):
        post({**rec, "quantity": 4})
    with pytest.raises(L.IdConflictError):  # same id, same numbers, another customer
        post({**rec, **stranger}, accept=True)
    totals = store.read(lambda db: L.report(db, T0, HP))["totals"]
    assert totals["seats"]["open"] == 4


def test_late_usage_for_a_sealed_hour_is_carried_into_the_open_hour(
    open_db: Callable[[], UsageStore],
) -> None:
    store = open_db()
    resolve(store, range(1))
    hour = hour_of(T0)
    now = hour_start(hour + 1) + 120
    store.write(lambda db: L.seal(db, hour, now, SPEC))
    late = {
        "customer_aws_account_id": account(0),
        "license_arn": license_arn(0),
        "dimension": "seats",
        "quantity": 7,
        "timestamp": iso(T0),
    }
    recs = parse_saas(json.dumps(late).encode(), Limits(DIMS), now, "license")
    status, answers = store.write(lambda db: L.ingest(db, recs, now, HP, accept_unresolved=False))
    assert status == 202
    assert answers[0]["carried_from"] != answers[0]["hour"]
    rows = store.read(lambda db: db.execute("SELECT hour, quantity FROM saas_open").fetchall())
    assert [(int(h), int(q)) for h, q in rows] == [(hour + 1, 7 * qty.SCALE)]  # micro-units


def test_no_usage_slips_into_an_hour_while_another_sidecar_seals_it(pg_url: str) -> None:
    """Many replicas on PostgreSQL: ingests racing a seal of their hour lose nothing (the seal
    lock). Every acknowledged unit is in the sealed record or carried into the open hour."""
    import threading

    poster = open_store(SAAS_SCHEMA, database_url=pg_url)
    sealer = open_store(SAAS_SCHEMA, database_url=pg_url)
    try:
        resolve(poster, range(4))
        hour = hour_of(T0)
        now = hour_start(hour + 1) + 120  # late usage for `hour`, still countable there
        acked = 0
        count_lock = threading.Lock()
        done = threading.Event()

        def post() -> None:
            nonlocal acked
            while not done.is_set():
                items = [(i, "seats", 1) for i in range(4)]
                body = [
                    {
                        "customer_aws_account_id": account(i),
                        "license_arn": license_arn(i),
                        "dimension": d,
                        "quantity": q,
                        "timestamp": iso(T0),
                    }
                    for i, d, q in items
                ]
                recs = parse_saas(json.dumps(body).encode(), Limits(DIMS), now, "license")
                poster.write(
                    functools.partial(
                        L.ingest, records=recs, now=now, policy=HP, accept_unresolved=False
                    )
                )
                with count_lock:
                    acked += 4

        threads = [threading.Thread(target=post) for _ in range(3)]
        for t in threads:
            t.start()
        threading.Event().wait(0.3)
        sealer.write(lambda db: L.seal(db, hour, now, L.SealSpec(DIMS, "license", False, HP)))
        threading.Event().wait(0.3)
        done.set()
        for t in threads:
            t.join()
        sealed, open_rows = sealer.read(
            lambda db: (
                db.execute(
                    "SELECT SUM(quantity) FROM saas_outbox WHERE hour = ?", (hour,)
                ).fetchone()[0],
                db.execute("SELECT hour, SUM(quantity) FROM saas_open GROUP BY hour").fetchall(),
            )
        )
        assert sealed and int(sealed) > 0
        assert all(int(h) > hour for h, _ in open_rows)  # nothing left behind in the sealed hour
        assert int(sealed) + sum(int(q) for _, q in open_rows) == acked * qty.SCALE  # micro-units
    finally:
        poster.close()
        sealer.close()


def test_records_are_stamped_mid_hour_and_never_after_the_sealing_moment() -> None:
    """Issue 19.1: AWS bills the hour, so the stamp sits where clock skew matters least."""
    h = hour_of(T0)
    assert L.record_timestamp(h, hour_start(h + 1) + 60) == hour_start(h) + 1800
    assert L.record_timestamp(h, hour_start(h) + 100) == hour_start(h)  # the drain, early
    assert L.record_timestamp(h, hour_start(h) + 1000) == hour_start(h) + 700  # 5 min before


def test_a_timestamp_refusal_is_regrouped_by_hour_and_never_rejected(
    open_db: Callable[[], UsageStore],
) -> None:
    """A call of two hours refused for a Timestamp becomes one call per hour (the good hour is
    billed); a lone record refused inside its window goes back to the pool, never 'rejected'."""
    store = open_db()
    resolve(store, range(4), at=T0 - 4 * HOUR)
    hour = hour_of(T0)
    usage(store, [(i, "seats", 5) for i in range(3)], T0)
    usage(store, [(3, "seats", 7)], T0 - 2 * HOUR)
    spec = L.SealSpec(DIMS, "license", False, HP)
    now = hour_start(hour + 1) + 120
    store.write(lambda db: L.seal(db, hour, now, spec))
    batch, _ = store.write(lambda db: L.next_batch(db, now, None))
    assert batch is not None and batch.records == 4
    calls = store.write(
        lambda db: L.regroup(db, batch.id, now, None, by="hour", code=L.TIMESTAMP_CODE)
    )
    assert calls == 2
    aws = FakeAws(lambda: now)
    aws.window = now - hour_start(hour - 1)  # the older hour is refused, the newer accepted
    sent = refused = 0
    for _ in range(2):
        b, _ = store.write(lambda db: L.next_batch(db, now, None))
        assert b is not None
        try:
            resp = aws.batch_meter_usage(b.request)
        except AwsCallError as exc:
            refused += 1
            settled = store.write(  # bisection, as an older version did
                functools.partial(
                    L.split, batch_id=b.id, now=now, product_code=None, code=exc.info.code
                )
            )
            assert not settled.rejected
            continue
        store.write(functools.partial(L.answer, batch_id=b.id, response=resp, now=now))
        sent += 1
    assert (sent, refused) == (1, 1)
    got = states(store)
    assert got["sent"] == 3 and got["rejected"] == 0 and got["sealed"] == 1


def test_a_quarantined_dimension_leaves_the_pool_and_comes_back_only_if_configured(
    open_db: Callable[[], UsageStore],
) -> None:
    store = open_db()
    resolve(store, range(30))
    hour = hour_of(T0)
    usage(store, [(i, d, 1 + i) for i in range(30) for d in DIMS], T0)
    now = hour_start(hour + 1) + 120
    store.write(lambda db: L.seal(db, hour, now, SPEC))
    first, _ = store.write(lambda db: L.next_batch(db, now, None))  # holds some "seats"
    assert first is not None and '"seats"' in first.body
    held = store.write(lambda db: L.quarantine(db, "seats", now, L.DIMENSION_CODE, "not published"))
    assert held == 30
    aws = FakeAws(lambda: now)
    aws.unpublished = {"seats"}
    calls = send_all(store, aws, now)
    assert calls == math.ceil(60 / 25)  # the released call's good records went back to the pool
    got = states(store)
    assert got["sent"] == 60 and got["quarantined"] == 30 and got["rejected"] == 0
    assert store.write(lambda db: L.release_quarantined(db, ("api_calls", "storage_gb"))) == 0
    assert states(store)["quarantined"] == 30  # a dimension no longer configured stays held
    assert store.write(lambda db: L.release_quarantined(db, DIMS)) == 30
    aws.unpublished = set()
    assert send_all(store, aws, now) == 2
    assert len(aws.billed) == 90 and states(store)["sent"] == 90
