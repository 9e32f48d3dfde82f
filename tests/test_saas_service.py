"""SaasService: resolve, ingest, leader-only sealing and sending, on SQLite and PostgreSQL.

AWS is `FakeAws` (tests/test_saas_ledger.py) plus ResolveCustomer: an in-process stand-in for
AWS's documented behaviour, not for our code.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.aws.errors import classify
from sidecar.aws.metering import AwsCallError
from sidecar.usage.db import UsageStore, open_store
from sidecar.usage.hours import HOUR, HourPolicy, hour_of, hour_start, iso
from sidecar.usage.saas import EXPIRED_HINT, SAAS_SCHEMA, SaasPolicy, SaasService
from tests.helpers import ManualClock
from tests.saas_fixtures import saas_clock
from tests.test_saas_ledger import DIMS, FakeAws, account, key, license_arn


class Killed(BaseException):
    """The process dies here (nothing after it runs)."""


class Aws(FakeAws):
    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock.time)
        self.tokens: dict[str, int] = {}
        self.resolve_calls = 0
        self.resolve_fail: list[str] = []
        self.kill_after_receive = False

    def resolve_customer(self, token: str) -> dict[str, Any]:
        self.resolve_calls += 1
        if self.resolve_fail:
            raise AwsCallError(classify(self.resolve_fail.pop(0), "fake", http_status=400))
        if token == "expired":
            raise AwsCallError(classify("ExpiredTokenException", "expired"))
        if token not in self.tokens:
            raise AwsCallError(classify("InvalidTokenException", "unknown"))
        i = self.tokens[token]
        return {
            "CustomerAWSAccountId": account(i),
            "LicenseArn": license_arn(i),
            "ProductCode": "prod-1",
        }

    def batch_meter_usage(self, request: dict[str, Any]) -> dict[str, Any]:
        answer = super().batch_meter_usage(request)
        if self.kill_after_receive:
            raise Killed
        return answer


clock = saas_clock  # the SaaS hour clock (tests/saas_fixtures.py); `backend` is there too


def make_service(store: UsageStore, aws: Aws, clock: ManualClock, **over: Any) -> SaasService:
    policy = SaasPolicy(
        dimensions=DIMS,
        hours=HourPolicy(seal_margin=60, spread=0),
        calls_per_second=over.pop("calls_per_second", 1000.0),
        **over,
    )
    return SaasService(policy, store, lambda: aws, clock=clock, rng=lambda: 0.5)


def body(i: int, dimension: str, quantity: int, **extra: Any) -> bytes:
    doc = {
        "customer_aws_account_id": account(i),
        "license_arn": license_arn(i),
        "dimension": dimension,
        "quantity": quantity,
        **extra,
    }
    return json.dumps(doc).encode()


def test_resolve_stores_the_customer_and_answers_a_repeat_from_the_store(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    aws = Aws(clock)
    aws.tokens["tok-1"] = 1
    svc = make_service(backend(), aws, clock)
    status, doc = svc.resolve(json.dumps({"registration_token": "tok-1"}).encode())
    assert status == 200 and doc["customer_aws_account_id"] == account(1)
    assert doc["from_store"] is False and doc["state"] == "active"
    status, again = svc.resolve(json.dumps({"registration_token": "tok-1"}).encode())
    assert status == 200 and again["from_store"] is True and aws.resolve_calls == 1
    clock.t += 2 * HOUR  # past the token's lifetime: asked again
    svc.resolve(json.dumps({"registration_token": "tok-1"}).encode())
    assert aws.resolve_calls == 2
    assert svc.customer(account(1))[1]["license_arn"] == license_arn(1)
    assert svc.customer("999")[0] == 404
    assert svc.customers()[1]["total"] == 1
    stored = svc.store.read(lambda db: db.execute("SELECT * FROM saas_customers").fetchall())
    assert "tok-1" not in repr(stored)  # only its digest


def test_resolve_errors(backend: Callable[[], UsageStore], clock: ManualClock) -> None:
    aws = Aws(clock)
    aws.tokens["tok-2"] = 2
    svc = make_service(backend(), aws, clock)
    assert svc.resolve(b"{}")[1]["field"] == "registration_token"
    status, doc = svc.resolve(json.dumps({"registration_token": "nope"}).encode())
    assert (status, doc["error"]) == (400, "invalid_token")
    status, doc = svc.resolve(json.dumps({"registration_token": "expired"}).encode())
    assert (status, doc["error"], doc["hint"]) == (410, "expired_token", EXPIRED_HINT)
    aws.resolve_fail = ["ThrottlingException", "InternalServiceErrorException"]
    status, doc = svc.resolve(json.dumps({"registration_token": "tok-2"}).encode())
    assert status == 200 and aws.resolve_calls == 5
    aws.resolve_fail = ["ThrottlingException"] * 50
    started = clock.mono
    status, doc = svc.resolve(json.dumps({"registration_token": "tok-3"}).encode())
    assert status == 503 and doc["retry_after"] > 0
    assert clock.mono - started <= 10.0


def test_usage_is_refused_for_unknown_customers_and_wrong_identity(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    aws = Aws(clock)
    aws.tokens["t"] = 1
    svc = make_service(backend(), aws, clock)
    status, doc = svc.post(body(1, "seats", 3))
    assert status == 400 and doc["field"] == "customer"
    svc.resolve(b'{"registration_token": "t"}')
    assert svc.post(body(1, "seats", 3, id="a"))[0] == 202
    assert svc.post(body(1, "seats", 3, id="a"))[0] == 200
    assert svc.post(body(1, "seats", 4, id="a"))[0] == 409
    status, doc = svc.post(
        json.dumps({"customer_identifier": "c-1", "dimension": "seats", "quantity": 1}).encode()
    )
    assert status == 400
    fields = {p["field"] for p in doc["problems"]}
    assert {"customer_identifier", "customer_aws_account_id", "license_arn"} <= fields
    # Allocations are checked as custom mode's: here they do not add up to the quantity.
    status, doc = svc.post(body(1, "seats", 1, allocations=[{"quantity": 2, "tags": {"a": "b"}}]))
    assert status == 400 and doc["field"] == "allocations"
    assert svc.report()["totals"]["seats"]["open"] == 3
    assert svc.counters().units_accepted["seats"] == 3


def test_a_store_that_cannot_write_answers_503(
    pg_server: Any, pg_url: str, clock: ManualClock
) -> None:
    aws = Aws(clock)
    svc = make_service(
        open_store(SAAS_SCHEMA, database_url=pg_url), aws, clock, accept_unresolved=True
    )
    try:
        pg_server.stop()
        status, doc = svc.post(body(1, "seats", 3))
        assert status == 503 and doc["retry_after"] > 0
        assert svc.ready()[0] is False
    finally:
        pg_server.start()
    for _ in range(50):  # the store reconnects by itself
        status, _ = svc.post(body(1, "seats", 3))
        if status == 202:
            break
        threading.Event().wait(0.2)
    assert status == 202
    assert svc.report()["totals"]["seats"]["accepted"] == 3
    svc.close()


def test_leader_seals_sends_and_marks_not_subscribed(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    aws = Aws(clock)
    svc = make_service(backend(), aws, clock)
    for i in range(3):
        aws.tokens[f"t{i}"] = i
        assert svc.resolve(json.dumps({"registration_token": f"t{i}"}).encode())[0] == 200
    svc.post(body(0, "seats", 5))
    svc.post(body(1, "api_calls", 7))
    aws.unsubscribed.add(key(2))
    hour = hour_of(clock.t)
    clock.t = hour_start(hour + 1) + 120
    assert svc._is_leader()
    svc.tick()
    c = svc.counters()
    assert c.records_by_state["sent"] == 6 and c.records_by_state["not_subscribed"] == 3
    assert c.customers_by_state == {"active": 2, "not_subscribed": 1}
    assert c.alerts["not_subscribed"] == 1 and c.batch_calls == {"ok": 1}
    assert c.leader is True
    assert aws.billed[(key(0), "seats", hour)] == 5 and aws.billed[(key(1), "api_calls", hour)] == 7
    assert svc.customer(account(2))[1]["state"] == "not_subscribed"
    assert any("not subscribed" in w for w in svc.report()["warnings"])


def test_throttling_pauses_sending_and_resends_the_same_request(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    aws = Aws(clock)
    svc = make_service(backend(), aws, clock, accept_unresolved=True, zero_records=False)
    svc.post(body(0, "seats", 5))
    clock.t = hour_start(hour_of(clock.t) + 1) + 120
    aws.fail_next = ["ThrottlingException"]
    svc.tick()
    assert len(aws.bodies) == 1 and svc.counters().batch_calls == {"throttled": 1}
    svc.tick()  # still paused
    assert len(aws.bodies) == 1
    clock.mono += 400
    svc.tick()
    assert len(aws.bodies) == 2 and aws.bodies[0] == aws.bodies[1]
    assert svc.counters().records_by_state["sent"] == 1


def test_rate_limit_spaces_calls(backend: Callable[[], UsageStore], clock: ManualClock) -> None:
    aws = Aws(clock)
    svc = make_service(backend(), aws, clock, accept_unresolved=True, calls_per_second=2.0)
    for i in range(60):
        svc.post(body(i, "seats", 1))
    clock.t = hour_start(hour_of(clock.t) + 1) + 120
    start = clock.mono
    svc.tick()
    assert len(aws.bodies) == 3
    assert clock.mono - start >= (3 - 1) / 2.0


def test_drain_on_one_replica_seals_the_open_hour_and_sends(
    tmp_path: Path, clock: ManualClock
) -> None:
    aws = Aws(clock)
    store = open_store(SAAS_SCHEMA, state_dir=tmp_path)
    svc = make_service(store, aws, clock, accept_unresolved=True, zero_records=False)
    svc.post(body(0, "seats", 5))
    svc.drain(5.0)
    assert aws.billed == {(key(0), "seats", hour_of(clock.t)): 5}
    svc.close()


def test_two_sidecars_on_one_database_only_the_leader_sends_and_a_killed_leader_is_taken_over(
    pg_url: str, clock: ManualClock
) -> None:
    aws = Aws(clock)
    a = make_service(open_store(SAAS_SCHEMA, database_url=pg_url), aws, clock)
    b = make_service(open_store(SAAS_SCHEMA, database_url=pg_url), aws, clock)
    for i in range(20):
        aws.tokens[f"t{i}"] = i
        (a if i % 2 else b).resolve(json.dumps({"registration_token": f"t{i}"}).encode())
    threads = []
    expected: dict[tuple[str, str, int], int] = {}
    hour = hour_of(clock.t)
    for svc, step in ((a, 1), (b, 2)):

        def post(svc: SaasService = svc, step: int = step) -> None:
            for i in range(20):
                assert svc.post(body(i, DIMS[i % 3], step))[0] == 202

        threads.append(threading.Thread(target=post))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(20):
        expected[(key(i), DIMS[i % 3], hour)] = 3
    assert a._is_leader() and not b._is_leader()
    clock.t = hour_start(hour + 1) + 120
    b.tick() if b._is_leader() else None
    assert aws.bodies == []  # the follower sends nothing
    aws.kill_after_receive = True
    with pytest.raises(Killed):
        a.tick()  # AWS got the first call; the leader dies before storing the answer
    assert len(aws.bodies) == 1
    a.store.close()  # its session ends: the sender role is free
    aws.kill_after_receive = False
    # The server frees the lock once its backend has processed the disconnect: soon, not at once.
    deadline = time.monotonic() + 10
    while not b._is_leader():
        assert time.monotonic() < deadline, "the sender role was not taken over"
        time.sleep(0.05)
    b.tick()
    assert aws.bodies[1] == aws.bodies[0]  # the stored batch again, byte for byte
    billed = {k: v for k, v in aws.billed.items() if v}
    assert billed == expected
    assert len(aws.billed) == 20 * 3  # zero records for the rest
    assert all(len(json.loads(x)["UsageRecords"]) == 25 for x in aws.bodies[:2])
    assert b.counters().records_by_state["sent"] == 60


# -- against the project's emulator, through the real gateway over loopback HTTP ---------------


def test_through_the_emulator_one_record_per_customer_dimension_hour(
    emulator_server: Any, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import requests

    from sidecar.aws.metering import MeteringGateway
    from tests.usage_kit import aws_env

    aws_env(monkeypatch, emulator_server, "seller")
    clock = ManualClock()
    clock.t = hour_start(hour_of(clock.t)) + 600.0
    emulator.meter_clock = clock.time
    emulator.config.unprocessed_rate = 0.2  # some records answered as UnprocessedRecords

    def customer(**spec: Any) -> dict[str, Any]:
        resp = requests.post(
            emulator_server.url + "/_emulator/saas/customers", json=spec, timeout=5
        )
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    people = [customer(customer_aws_account_id=f"{200000000000 + i}") for i in range(12)]
    store = open_store(SAAS_SCHEMA, state_dir=tmp_path)
    policy = SaasPolicy(
        dimensions=DIMS, hours=HourPolicy(seal_margin=60, spread=0), calls_per_second=1000.0
    )
    svc = SaasService(policy, store, lambda: MeteringGateway("us-east-1", 5.0), clock=clock)
    for p in people:
        status, doc = svc.resolve(
            json.dumps({"registration_token": p["registration_token"]}).encode()
        )
        assert status == 200 and doc["license_arn"] == p["license_arn"], doc
    requests.post(
        emulator_server.url + "/_emulator/saas/unsubscribe",
        json={"customer_aws_account_id": people[11]["customer_aws_account_id"]},
        timeout=5,
    )
    hour = hour_of(clock.t)
    want: dict[tuple[str, str], int] = {}
    for n in range(60):  # several posts per customer/dimension, summed into one record
        p = people[n % 11]
        dimension = DIMS[n % 3]
        doc = {
            "customer_aws_account_id": p["customer_aws_account_id"],
            "license_arn": p["license_arn"],
            "dimension": dimension,
            "quantity": n,
        }
        assert svc.post(json.dumps(doc).encode())[0] == 202
        k = (f"{p['customer_aws_account_id']}/{p['license_arn']}", dimension)
        want[k] = want.get(k, 0) + n
    clock.t = hour_start(hour + 1) + 120
    for _ in range(10):
        svc.tick()
        if not svc.counters().records_by_state["sealed"]:
            break
    book = requests.get(emulator_server.url + "/_emulator/saas/ledger", timeout=5).json()
    billed = {
        (r["customer"], r["dimension"]): r["quantity"] for r in book["records"] if r["hour"] == hour
    }
    assert {k: v for k, v in billed.items() if v} == {k: v for k, v in want.items() if v}
    assert len(billed) == 11 * 3  # zero records for the rest; none for the unsubscribed one
    assert book["counts"].get("duplicate_record", 0) == 0
    assert book["counts"].get("unprocessed", 0) > 0  # and they were sent again, unchanged
    c = svc.counters()
    assert c.records_by_state["sent"] == 33 and c.records_by_state["not_subscribed"] == 3
    assert c.customers_by_state["not_subscribed"] == 1
    svc.close()


# -- clocks that disagree, and a dimension AWS does not know (issue 19) -------------------------


def emulated_service(
    server: Any,
    emulator: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    people: int,
    zero_records: bool = True,
    at: float | None = None,
) -> tuple[SaasService, ManualClock, list[dict[str, Any]]]:
    """A SaasService on SQLite sending through boto3 to the emulator over loopback HTTP, with
    `people` customers resolved. The emulator's clock is the test's (plus its clock_offset),
    starting at `at` (default: ten minutes into the current hour).
    Without zero records, hours without usage seal nothing: "nothing sealed" means "sent"."""
    import requests

    from sidecar.aws.metering import MeteringGateway
    from tests.usage_kit import aws_env

    aws_env(monkeypatch, server, "seller")
    clock = ManualClock()
    clock.t = hour_start(hour_of(clock.t)) + 600.0 if at is None else at
    emulator.meter_clock = clock.time
    http = requests.Session()
    made = []
    for i in range(people):
        resp = http.post(
            server.url + "/_emulator/saas/customers",
            json={"customer_aws_account_id": f"{300000000000 + i}", "token_ttl_seconds": 86400},
            timeout=5,
        )
        assert resp.status_code == 200, resp.text
        made.append(dict(resp.json()))
    store = open_store(SAAS_SCHEMA, state_dir=tmp_path)
    svc = SaasService(
        SaasPolicy(
            dimensions=DIMS,
            hours=HourPolicy(seal_margin=60, spread=0),
            calls_per_second=1024.0,  # 1/1024 s pauses add up exactly on the manual clock
            zero_records=zero_records,
        ),
        store,
        lambda: MeteringGateway("us-east-1", 5.0),
        clock=clock,
        rng=lambda: 0.5,
    )
    for p in made:
        status, _ = svc.resolve(
            json.dumps({"registration_token": p["registration_token"]}).encode()
        )
        assert status == 200
    return svc, clock, made


def use(
    svc: SaasService, people: list[dict[str, Any]], quantity: Callable[[int, str], int]
) -> dict[tuple[str, str], int]:
    """Each customer uses each dimension once; what AWS should bill, by (customer, dimension)."""
    want = {}
    for n, p in enumerate(people):
        for dimension in DIMS:
            doc = {
                "customer_aws_account_id": p["customer_aws_account_id"],
                "license_arn": p["license_arn"],
                "dimension": dimension,
                "quantity": quantity(n, dimension),
            }
            assert svc.post(json.dumps(doc).encode())[0] == 202
            want[(f"{p['customer_aws_account_id']}/{p['license_arn']}", dimension)] = doc[
                "quantity"
            ]
    return want


def billed_in(server: Any, hour: int) -> dict[tuple[str, str], int]:
    import requests

    book = requests.get(server.url + "/_emulator/saas/ledger", timeout=5).json()
    assert book["counts"].get("duplicate_record", 0) == 0
    out: dict[tuple[str, str], int] = {}
    for r in book["records"]:
        if r["hour"] == hour:
            assert (r["customer"], r["dimension"]) not in out
            out[(r["customer"], r["dimension"])] = r["quantity"]
    return out


def batch_calls(emulator: Any) -> int:
    return sum(1 for c in emulator.calls if c["op"] == "BatchMeterUsage")


def run_until_sent(svc: SaasService, clock: ManualClock, step: float, passes: int) -> int:
    """Ticks (wall and monotonic time moving `step` between them) until nothing is sealed."""
    for n in range(passes):
        svc.tick()
        if not svc.counters().records_by_state["sealed"]:
            return n + 1
        clock.t += step
        clock.mono += step
    raise AssertionError(f"records still sealed after {passes} passes")


def test_sender_clock_400s_ahead_of_aws_bills_the_hour_instead_of_rejecting_it(
    emulator_server: Any, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19.1 as reported: AWS's clock 400 s behind the sender's, 300 s of future tolerance,
    the hour sealed 61 s after it ends. Stamped at the hour's last second, every record was in
    AWS's future and bisection marked each one rejected; stamped mid-hour, it is billed."""
    svc, clock, people = emulated_service(
        emulator_server, emulator, tmp_path, monkeypatch, 5, zero_records=False
    )
    emulator.config.clock_offset = -400.0
    emulator.config.meter_future_seconds = 300.0
    hour = hour_of(clock.t)
    want = use(svc, people, lambda n, d: n + 1)
    clock.t = hour_start(hour + 1) + 61
    run_until_sent(svc, clock, 30, 5)
    states = svc.counters().records_by_state
    assert states["rejected"] == 0 and states["sent"] == 15, states
    assert billed_in(emulator_server, hour) == want
    svc.close()


def test_a_timestamp_in_aws_future_is_retried_until_accepted_never_rejected(
    emulator_server: Any, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS's clock two hours behind (beyond any stamp's slack): each call is refused whole as
    out of bounds. That is a clock problem: the stored call is resent with backoff, reported
    (warnings, /readyz reason, metric), and billed once the clocks agree, inside the window."""
    svc, clock, people = emulated_service(
        emulator_server, emulator, tmp_path, monkeypatch, 5, zero_records=False
    )
    emulator.config.clock_offset = -7200.0
    emulator.config.meter_future_seconds = 30.0
    hour = hour_of(clock.t)
    want = use(svc, people, lambda n, d: 10 * n + len(d))
    clock.t = hour_start(hour + 1) + 61
    svc.tick()
    states = svc.counters().records_by_state
    assert states["sealed"] == 15 and states["rejected"] == 0, states
    assert svc.counters().batch_calls.get("clock_skew", 0) >= 1
    assert svc.ready() == (True, None)  # ready: the usage is taken and kept
    assert [n for n in svc.notices() if n.startswith("clock_skew:")], svc.notices()
    warnings = svc.report()["warnings"]
    assert any("Timestamp inside AWS's window" in w for w in warnings), warnings
    # AWS accepts once its clock + 30 s reaches the stamp: about 2.5 h after the hour.
    passes = run_until_sent(svc, clock, 300, 40)
    assert clock.t < hour_start(hour) + 6 * HOUR - 120  # inside the window, not expired
    states = svc.counters().records_by_state
    assert states["sent"] == 15 and states["rejected"] == 0 and states["expired"] == 0
    assert billed_in(emulator_server, hour) == want
    assert batch_calls(emulator) <= passes + 1  # one stored call, retried once per pause
    assert not [n for n in svc.notices() if n.startswith("clock_skew:")]  # healed
    svc.close()


def test_a_clock_that_never_agrees_expires_the_hour_at_its_deadline_not_rejected(
    emulator_server: Any, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS's clock a day behind: every stamp stays in its future for the whole of
    BatchMeterUsage's 24-hour window (issue 21; it was 8 h behind against a 6-hour window)."""
    svc, clock, people = emulated_service(
        emulator_server, emulator, tmp_path, monkeypatch, 3, zero_records=False
    )
    emulator.config.clock_offset = -25 * 3600.0
    hour = hour_of(clock.t)
    use(svc, people, lambda n, d: n + 1)
    clock.t = hour_start(hour + 1) + 61
    run_until_sent(svc, clock, 900, 110)
    states = svc.counters().records_by_state
    assert states["expired"] == 9 and states["rejected"] == 0 and states["sent"] == 0, states
    assert clock.t >= hour_start(hour) + 24 * HOUR - 120  # expired only at the deadline
    assert billed_in(emulator_server, hour) == {}
    assert batch_calls(emulator) <= 110
    svc.close()


def test_aws_clock_eight_hours_behind_is_waited_out_inside_the_day(
    emulator_server: Any, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21: the clock-skew resend lasts until BatchMeterUsage's deadline (24 h), not
    MeterUsage's (6 h): AWS 8 h behind accepts the stamps about 8.5 h after the hour starts,
    and the hour is billed, once, where it used to expire."""
    svc, clock, people = emulated_service(
        emulator_server, emulator, tmp_path, monkeypatch, 3, zero_records=False
    )
    emulator.config.clock_offset = -8 * 3600.0
    emulator.config.meter_future_seconds = 30.0
    hour = hour_of(clock.t)
    want = use(svc, people, lambda n, d: n + 1)
    clock.t = hour_start(hour + 1) + 61
    svc.tick()
    deadline = iso(hour_start(hour) + 24 * HOUR - 120)  # /readyz and GET /v1/usage say so
    assert [n for n in svc.notices() if n.startswith("clock_skew:") and deadline in n]
    assert any(f"until {deadline}, then expired" in w for w in svc.report()["warnings"])
    run_until_sent(svc, clock, 900, 60)
    assert hour_start(hour) + 8 * HOUR < clock.t < hour_start(hour) + 10 * HOUR
    states = svc.counters().records_by_state
    assert states["sent"] == 9 and states["expired"] == 0 and states["rejected"] == 0, states
    assert billed_in(emulator_server, hour) == want
    assert svc.counters().batch_calls.get("clock_skew", 0) >= 1
    svc.close()


def test_a_dimension_quarantined_mid_bisection_strands_no_good_record(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """A call refused for one customer's license is bisected; its tried half holds only the
    unpublished dimension, so that half's refusal quarantines it. The untried half (good
    records of a published dimension, and the bad license) must go back to the pool: billed,
    and the bad record rejected, not held by a half-call nothing will ever send or expire."""
    aws = Aws(clock)
    aws.unpublished = {"seats"}
    aws.bad_licenses = {license_arn(99)}  # AWS refuses any call holding this record
    svc = make_service(backend(), aws, clock, zero_records=False)
    people = [*range(1, 25), 99]
    for i in people:
        aws.tokens[f"t{i}"] = i
        assert svc.resolve(json.dumps({"registration_token": f"t{i}"}).encode())[0] == 200
    for i in range(1, 14):  # sorted first in the call: the tried half is all "seats"
        assert svc.post(body(i, "seats", 1))[0] == 202
    good = {}
    for i in range(14, 25):
        assert svc.post(body(i, "api_calls", 7))[0] == 202
        good[key(i)] = 7
    assert svc.post(body(99, "api_calls", 5))[0] == 202
    hour = hour_of(clock.t)
    clock.t = hour_start(hour + 1) + 120
    for _ in range(10):
        svc.tick()
    billed = {c: q for (c, d, h), q in aws.billed.items() if d == "api_calls" and h == hour}
    assert billed == good  # 77 acknowledged units, each billed once
    states = svc.counters().records_by_state
    assert states["quarantined"] == 13 and states["rejected"] == 1 and states["sealed"] == 0
    assert svc.counters().batch_calls["dimension_refused"] == 1
    svc.close()


def test_an_unpublished_dimension_is_quarantined_and_the_others_bill_exactly_once(
    emulator_server: Any, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19.7: 100 customers x 3 dimensions, "seats" not published. One refused call per
    dimension proves it; its records are held (never rejected), the others bill in full calls:
    the good records' 8 calls plus a small constant, not hundreds of bisection calls."""
    svc, clock, people = emulated_service(emulator_server, emulator, tmp_path, monkeypatch, 100)
    emulator.config.dimensions = ["api_calls", "storage_gb"]
    hour = hour_of(clock.t)
    want = use(svc, people, lambda n, d: n + len(d))
    clock.t = hour_start(hour + 1) + 120
    run_until_sent(svc, clock, 1, 20)
    calls = batch_calls(emulator)
    assert calls <= 8 + 4, calls  # 200 good records = 8 full calls
    good = {k: v for k, v in want.items() if k[1] != "seats"}
    assert billed_in(emulator_server, hour) == good
    states = svc.counters().records_by_state
    assert states["sent"] == 200 and states["quarantined"] == 100 and states["rejected"] == 0
    assert svc.counters().batch_calls["dimension_refused"] == 1
    assert svc.ready() == (True, None)  # ready: the other dimensions bill
    (why,) = [n for n in svc.notices() if n.startswith("dimension_quarantined:")]
    assert "seats" in why
    assert any("dimension seats" in w for w in svc.report()["warnings"])

    # The next hour: the quarantined dimension's records never enter a call.
    use(svc, people, lambda n, d: 1000 + n)
    clock.t = hour_start(hour + 2) + 120
    before = batch_calls(emulator)
    run_until_sent(svc, clock, 1, 20)
    assert batch_calls(emulator) - before == 8
    assert svc.counters().records_by_state["quarantined"] == 200

    # A restart with the dimension still configured tries it once more: a few calls, held again.
    svc.close()
    again = SaasService(
        svc.policy,
        open_store(SAAS_SCHEMA, state_dir=tmp_path),
        svc._factory,
        clock=clock,
        rng=lambda: 0.5,
    )
    before = batch_calls(emulator)
    run_until_sent(again, clock, 1, 20)
    assert batch_calls(emulator) - before <= 4
    assert again.counters().records_by_state["quarantined"] == 200

    # The seller publishes it and restarts: the held records, still in AWS's window, bill once.
    again.close()
    emulator.config.dimensions = None
    fixed = SaasService(
        svc.policy,
        open_store(SAAS_SCHEMA, state_dir=tmp_path),
        svc._factory,
        clock=clock,
        rng=lambda: 0.5,
    )
    before = batch_calls(emulator)
    run_until_sent(fixed, clock, 1, 20)
    assert batch_calls(emulator) - before == 8  # 200 held records, in full calls
    assert billed_in(emulator_server, hour) == want
    states = fixed.counters().records_by_state
    assert states["quarantined"] == 0 and states["sent"] == 600 and states["rejected"] == 0
    assert not [n for n in fixed.notices() if n.startswith("dimension_quarantined:")]
    fixed.close()
