"""The SaaS buyer lifecycle: EventBridge and SNS events applied once, in order, to the store;
metering follows the customer's state (final window, early seal, no zero records after).

AWS's BatchMeterUsage is `FakeAws` (tests/test_saas_ledger.py), the clock a ManualClock; the
queue tests use moto's SQS in server mode (tests/test_saas_events_queue.py).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.usage import lifecycle
from sidecar.usage import saas_ledger as L  # noqa: N812
from sidecar.usage.db import Schema, UsageStore, open_store
from sidecar.usage.hours import HOUR, hour_of, hour_start
from sidecar.usage.saas import SAAS_SCHEMA, SaasService
from sidecar.usage.saas_events import FINAL_MARGIN
from tests.helpers import ManualClock
from tests.saas_fixtures import saas_clock
from tests.test_saas_ledger import account, key, license_arn
from tests.test_saas_service import Aws, Killed, body, make_service

AGREEMENT = "agmt-4mwg1nevbokzw95eca5797ixs"


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def eb(kind: str, i: int, t: float, *, role: str = "Manufacturer", eid: str | None = None) -> str:
    """An EventBridge event as the Seller Guide's examples show it."""
    detail: dict[str, Any] = {
        "requestId": str(uuid.uuid4()),
        "catalog": "AWSMarketplace",
        "agreement": {"id": f"{AGREEMENT}{i}", "status": "ACTIVE"},
        "acceptor": {"accountId": account(i)},
        "proposer": {"accountId": "123456512334"},
        "offer": {"id": "offer-1234567890123"},
    }
    if kind.startswith("License"):
        detail["product"] = {"code": "prod-1", "id": "prod-qtwveEXAMPLE"}
        detail["license"] = {"arn": license_arn(i)}
    return json.dumps(
        {
            "version": "0",
            "id": eid or str(uuid.uuid4()),
            "detail-type": f"{kind} - {role}",
            "source": "aws.agreement-marketplace",
            "account": "294406891311",
            "time": stamp(t),
            "region": "us-east-1",
            "resources": [f"arn:aws:aws-marketplace::aws:agreement:{AGREEMENT}{i}"],
            "detail": detail,
        }
    )


def sns(action: str, identifier: str, t: float, *, eid: str | None = None, **more: Any) -> str:
    """A legacy SNS notification as SQS receives it (the SNS envelope)."""
    message = {"action": action, "customer-identifier": identifier, "product-code": "prod-1"}
    message.update(more)
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": eid or str(uuid.uuid4()),
            "TopicArn": "arn:aws:sns:us-east-1:287250355862:aws-mp-subscription-notification-x",
            "Message": json.dumps(message),
            "Timestamp": stamp(t).replace("Z", ".123Z"),
        }
    )


clock = saas_clock  # the SaaS hour clock (tests/saas_fixtures.py); `backend` is there too


def resolved(svc: SaasService, aws: Aws, i: int) -> None:
    aws.tokens[f"tok-{i}"] = i
    status, _ = svc.resolve(json.dumps({"registration_token": f"tok-{i}"}).encode())
    assert status == 200


def count(svc: SaasService, sql: str) -> int:
    row = svc.store.read(lambda db: db.execute(sql).fetchone())
    return int(row[0])


# -- parsing (pure) ---------------------------------------------------------------------------


def test_both_envelopes_and_both_roles_parse_to_the_same_facts() -> None:
    t = 1_800_000_000.0
    for role in ("Manufacturer", "Proposer"):
        ev = lifecycle.parse(eb("Purchase Agreement Created", 7, t, role=role), t)
        assert (ev.kind, ev.state, ev.account_id, ev.time) == (
            "created",
            "subscribed",
            account(7),
            t,
        )
        assert ev.agreement_id == f"{AGREEMENT}7" and ev.subject == account(7)
    dep = lifecycle.parse(eb("License Deprovisioned", 7, t), t)
    assert dep.kind == "deprovisioned" and dep.license_arn == license_arn(7)
    assert dep.product_code == "prod-1" and dep.kind in lifecycle.FINAL
    # The guide's example prints the ARN without "arn:": the license id is what matches.
    assert lifecycle.license_id("aws:license-manager:us-east-1:1:l-e52ca6f38bf84d0f") == (
        "l-e52ca6f38bf84d0f"
    )
    ok = lifecycle.parse(
        sns(
            "subscribe-success",
            "cust-1",
            t,
            isFreeTrialTermPresent="true",
            **{"offer-identifier": "offer-abc"},
        ),
        t,
    )
    assert (ok.kind, ok.subject, ok.free_trial, ok.offer_id) == (
        "subscribe_success",
        "ci:cust-1",
        True,
        "offer-abc",
    )
    assert int(ok.time) == int(t)
    # Raw message delivery (no envelope): dated by the queue, named by a digest of the text.
    raw = json.dumps({"action": "entitlement-updated", "customer-identifier": "cust-1"})
    a, b = lifecycle.parse(raw, 5.0), lifecycle.parse(raw, 9.0)
    assert a.id == b.id and a.time == 5.0 and a.kind == "entitlement_updated"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("not json", "not JSON"),
        ("[1]", "JSON object"),
        ('{"hello": 1}', "neither"),
        (json.dumps({"source": "aws.ec2", "detail-type": "X - Manufacturer"}), "source"),
        (
            json.dumps({"source": "aws.agreement-marketplace", "detail-type": "Offer Released"}),
            "detail-type",
        ),
        (eb("License Updated", 1, 1.8e9).replace('"time": "', '"time": "x'), "time"),
        (eb("License Updated", 1, 1.8e9).replace(account(1), "12"), "accountId"),
        (json.dumps({"Type": "Notification", "Message": "{", "MessageId": "m"}), "Message"),
        (json.dumps({"action": "explode", "customer-identifier": "c"}), "action"),
        # Not text: refused by its JSON type (raised TypeError: unhashable), never echoed.
        (json.dumps({"action": {"token": "s3cret"}, "customer-identifier": "c"}), "JSON object$"),
        (json.dumps({"action": ["a"], "customer-identifier": "c"}), "JSON array$"),
        ("x" * (lifecycle.MAX_BODY + 1), "bytes"),
        ("[" * 100_000, "nested"),  # under MAX_BODY; json.loads raised RecursionError
        (
            json.dumps({"Type": "Notification", "Message": "[" * 100_000, "MessageId": "m"}),
            "nested",
        ),
        (eb("License Updated", 1, 10.0 + 3 * 86400), "future"),  # received at 10.0
    ],
)
def test_a_message_that_is_no_lifecycle_event_is_named_not_guessed(text: str, named: str) -> None:
    with pytest.raises(lifecycle.EventError, match=named):
        lifecycle.parse(text, 0.0)


def test_a_hostile_message_is_a_dead_letter_and_the_consumer_goes_on(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Deep nesting used to escape handle_message as RecursionError (killing the consumer);
    a far-future time used to freeze the buyer's state: no real event was ever newer."""
    svc = make_service(open_store(SAAS_SCHEMA, state_dir=tmp_path), Aws(clock), clock)
    assert svc.handle_message("deep", "[" * 100_000) == "dead_letter"
    future = eb("Purchase Agreement Created", 1, clock.t + 10 * 365 * 86400)
    assert svc.handle_message("fut", future, clock.t) == "dead_letter"
    assert svc.handle_message("end", eb("License Deprovisioned", 1, clock.t - 5)) == "applied"
    assert svc.changes(0, 0)[1]["changes"][-1]["state"] == "unsubscribed"
    assert count(svc, "SELECT COUNT(*) FROM saas_dead_letters") == 2
    svc.store.close()


# -- the store decides once -------------------------------------------------------------------


def test_the_same_event_twice_is_applied_once(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    svc = make_service(backend(), Aws(clock), clock)
    text = eb("Purchase Agreement Created", 1, clock.t - 5)
    assert svc.handle_message("m1", text) == "applied"
    assert svc.handle_message("m2", text) == "duplicate"  # SQS delivered it again
    assert count(svc, "SELECT COUNT(*) FROM saas_events") == 1
    status, feed = svc.changes(0, 0)
    assert status == 200 and [c["state"] for c in feed["changes"]] == ["subscribed"]
    assert count(svc, "SELECT COUNT(*) FROM saas_changes") == 1


def test_an_event_older_than_the_known_state_never_overrides_it(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    svc = make_service(backend(), Aws(clock), clock)
    t = clock.t
    assert svc.handle_message("e", eb("Purchase Agreement Ended", 1, t - 10)) == "applied"
    # The creation, delivered after the end it preceded: its facts are old, the state stays.
    assert svc.handle_message("c", eb("Purchase Agreement Created", 1, t - 60)) == "stale"
    life = svc.store.read(lambda db: db.execute("SELECT state FROM saas_lifecycle").fetchone()[0])
    assert life == "pending_unsubscribe"
    # A later subscription (the buyer came back) does override it.
    assert svc.handle_message("r", eb("Purchase Agreement Created", 1, t - 1)) == "applied"
    assert svc.changes(0, 0)[1]["changes"][-1]["state"] == "subscribed"


# -- metering follows the lifecycle -----------------------------------------------------------


def test_usage_is_refused_after_the_final_window_naming_the_state(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    aws = Aws(clock)
    svc = make_service(backend(), aws, clock)
    resolved(svc, aws, 1)
    svc.handle_message("d", eb("License Deprovisioned", 1, clock.t))
    doc = svc.customer(account(1))[1]
    assert doc["subscription"] == "unsubscribed"
    assert doc["lifecycle"]["agreement_id"] == f"{AGREEMENT}1"
    assert doc["lifecycle"]["final_window_end"] is not None
    assert svc.post(body(1, "seats", 3))[0] == 202  # inside the window: still billed
    clock.t += lifecycle.FINAL_WINDOW - FINAL_MARGIN
    status, refused = svc.post(body(1, "seats", 3))
    assert status == 400, refused
    problem = refused["error"]["problems"][0] if "problems" in refused.get("error", {}) else refused
    assert "unsubscribed" in json.dumps(problem) and "customer" in json.dumps(problem)
    # Another customer of the same fleet is not touched.
    resolved(svc, aws, 2)
    assert svc.post(body(2, "seats", 1))[0] == 202


def test_deprovisioning_seals_the_open_hour_at_once_and_stops_zero_records(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    aws = Aws(clock)
    svc = make_service(backend(), aws, clock)
    resolved(svc, aws, 1)
    resolved(svc, aws, 2)
    h = hour_of(clock.t)
    assert svc.post(body(1, "seats", 5))[0] == 202
    svc.tick()
    assert (key(1), "seats", h) not in aws.billed  # the hour is open: nothing sent yet
    svc.handle_message("d", eb("License Deprovisioned", 1, clock.t))
    svc.tick()
    # Sent inside the final window, before its hour ends (the hourly seal comes after it).
    assert aws.billed[(key(1), "seats", h)] in (5, "5")
    # Usage later in the window goes to the next hour, sealed in the window's last minutes.
    clock.t += 60
    status, doc = svc.post(body(1, "seats", 2))
    assert status == 202 and doc["records"][0]["hour"] != doc["records"][0].get("carried_from")
    clock.t = hour_start(h) + 600 + lifecycle.FINAL_WINDOW - FINAL_MARGIN + 1
    svc.tick()
    assert aws.billed[(key(1), "seats", h + 1)] in (2, "2")
    # Hours after: customer 2 gets its zero records, the one who left none.
    clock.t = hour_start(h + 3) + 600
    svc.tick()
    assert (key(2), "seats", h + 2) in aws.billed
    assert not [k for k in aws.billed if k[0] == key(1) and k[2] >= h + 2]
    assert len([k for k in aws.billed if k[0] == key(1)]) == 2  # nothing but its usage


def test_a_buyer_leaving_early_in_an_hour_has_that_hour_sealed_once_inside_the_window(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """Deprovisioned at minute 2: the window ends at minute 2 of the next hour, and its last
    pass (10 minutes before) falls in this hour. Sealing this hour at once would carry the
    buyer's later usage to the next hour, which cannot be sent before it starts: after the
    window. The hour is sealed once, at the last pass, with everything in it."""
    aws = Aws(clock)
    svc = make_service(backend(), aws, clock)
    resolved(svc, aws, 1)
    h = hour_of(clock.t)
    clock.t = hour_start(h) + 120
    assert svc.post(body(1, "seats", 5))[0] == 202
    svc.handle_message("d", eb("License Deprovisioned", 1, clock.t))
    svc.tick()
    clock.t = hour_start(h) + 1200
    status, doc = svc.post(body(1, "seats", 2))
    assert status == 202 and "carried_from" not in doc["records"][0], doc
    clock.t = hour_start(h) + 120 + lifecycle.FINAL_WINDOW - FINAL_MARGIN + 1  # minute 52
    svc.tick()
    assert aws.billed[(key(1), "seats", h)] in (7, "7")
    assert svc.post(body(1, "seats", 1))[0] == 400  # intake closed for the buyer
    clock.t = hour_start(h + 2) + 600
    svc.tick()
    assert [k for k in aws.billed if k[0] == key(1)] == [(key(1), "seats", h)]


def test_the_leader_killed_inside_the_final_window_loses_nothing(
    tmp_path: Path, clock: ManualClock
) -> None:
    aws = Aws(clock)
    svc = make_service(open_store(SAAS_SCHEMA, state_dir=tmp_path), aws, clock)
    resolved(svc, aws, 1)
    h = hour_of(clock.t)
    assert svc.post(body(1, "api_calls", 9))[0] == 202
    svc.handle_message("d", eb("License Deprovisioned", 1, clock.t))
    aws.kill_after_receive = True  # AWS took the call, the sender died before its answer
    with pytest.raises(Killed):
        svc.tick()
    svc.store.close()
    aws.kill_after_receive = False
    clock.t += 120  # a new leader, still inside the window
    again = make_service(open_store(SAAS_SCHEMA, state_dir=tmp_path), aws, clock)
    again.tick()
    assert aws.billed[(key(1), "api_calls", h)] in (9, "9")
    sent = [b for b in aws.bodies if "api_calls" in b]
    assert len(sent) == 2 and sent[0] == sent[1]  # the stored request resent byte for byte
    again.store.close()


def test_an_entitlement_downgrade_while_usage_is_in_flight(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    contract = {"seats": 10}
    asked: list[tuple[str, str]] = []

    def read(product: str, acct: str) -> list[dict[str, Any]]:
        asked.append((product, acct))
        return [{"dimension": "seats", "value": contract["seats"], "expiration": clock.t + HOUR}]

    aws = Aws(clock)
    svc = make_service(backend(), aws, clock)
    svc = SaasService(svc.policy, svc.store, lambda: aws, clock=clock, entitlements=read)
    resolved(svc, aws, 1)
    svc.handle_message("c", eb("License Updated", 1, clock.t))
    doc = svc.customer(account(1))[1]
    assert [(e["dimension"], e["value"]) for e in doc["lifecycle"]["entitlements"]] == [
        ("seats", 10)
    ]
    stop = threading.Event()
    posted: list[int] = []

    def usage() -> None:
        while not stop.is_set():
            posted.append(svc.post(body(1, "seats", 1))[0])

    t = threading.Thread(target=usage)
    t.start()
    contract["seats"] = 2  # the buyer's contract shrinks while usage flows
    svc.handle_message("u", eb("License Updated", 1, clock.t + 1))
    stop.set()
    t.join(timeout=30)
    doc = svc.customer(account(1))[1]
    assert [(e["dimension"], e["value"]) for e in doc["lifecycle"]["entitlements"]] == [
        ("seats", 2)
    ]
    assert asked and all(a == ("prod-1", account(1)) for a in asked)
    # Entitlements inform the backend; they never drop acknowledged usage.
    assert posted and set(posted) == {202}
    total = count(svc, "SELECT SUM(quantity) FROM saas_open WHERE dimension = 'seats'")
    assert total == len(posted) * 1_000_000


def test_the_change_feed_cursor_works_across_replicas_and_restarts(
    pg_url: str, clock: ManualClock
) -> None:
    a = make_service(open_store(SAAS_SCHEMA, database_url=pg_url), Aws(clock), clock)
    b = make_service(open_store(SAAS_SCHEMA, database_url=pg_url), Aws(clock), clock)
    a.handle_message("1", eb("Purchase Agreement Created", 1, clock.t))
    _, first = b.changes(0, 0)
    assert [c["subject"] for c in first["changes"]] == [account(1)]
    cursor = int(first["cursor"])
    _, none = b.changes(cursor, 0)
    assert none["changes"] == [] and int(none["cursor"]) == cursor
    got: list[dict[str, Any]] = []
    waiter = threading.Thread(target=lambda: got.append(b.changes(cursor, 10)[1]))
    waiter.start()
    a.handle_message("2", sns("subscribe-fail", "cust-9", clock.t))
    waiter.join(timeout=15)
    assert got and [c["state"] for c in got[0]["changes"]] == ["subscribe_failed"]
    b.store.close()
    c = make_service(open_store(SAAS_SCHEMA, database_url=pg_url), Aws(clock), clock)
    assert c.changes(int(got[0]["cursor"]), 0)[1]["changes"] == []  # survives a restart
    a.store.close()
    c.store.close()


# -- schema 3 -> 4 ----------------------------------------------------------------------------

SCHEMA_3 = Schema(
    name=SAAS_SCHEMA.name,
    version=3,
    sqlite=SAAS_SCHEMA.sqlite.split("\n-- One row per buyer the lifecycle")[0],
    postgresql=SAAS_SCHEMA.postgresql.split("\n-- One row per buyer the lifecycle")[0],
    migrations={k: v for k, v in SAAS_SCHEMA.migrations.items() if k <= 3},
)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_schema_3_store_is_migrated_keeping_customers_and_usage(
    kind: str, tmp_path: Path, clock: ManualClock, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_url") if kind == "postgresql" else None
    aws = Aws(clock)
    old = open_store(SCHEMA_3, state_dir=tmp_path, database_url=url)
    with pytest.raises(Exception, match="saas_lifecycle"):
        old.read(lambda db: db.execute("SELECT * FROM saas_lifecycle").fetchall())
    # What schema 3's sidecar writes: a resolved customer (save_customer is its code,
    # unchanged) and an open hour total.
    answer = {
        "CustomerAWSAccountId": account(1),
        "LicenseArn": license_arn(1),
        "ProductCode": "prod-1",
        "Metadata": {"AgreementId": "agmt-old"},
    }
    old.write(lambda db: L.save_customer(db, key(1), answer, clock.t, "d", clock.t + HOUR))
    old.write(
        lambda db: db.execute(
            "INSERT INTO saas_open (customer, dimension, hour, quantity) VALUES (?, ?, ?, ?)",
            (key(1), "seats", hour_of(clock.t), 4_000_000),
        )
    )
    old.close()
    new = make_service(open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url), aws, clock)
    doc = new.customer(account(1))[1]
    assert doc["subscription"] == "subscribed" and doc["lifecycle"] is None
    assert doc["agreement_id"] == "agmt-old"
    assert count(new, "SELECT SUM(quantity) FROM saas_open") == 4_000_000
    assert new.handle_message("d", eb("License Deprovisioned", 1, clock.t)) == "applied"
    assert new.customer(account(1))[1]["subscription"] == "unsubscribed"
    new.store.close()


def test_events_for_another_product_are_kept_aside(tmp_path: Path, clock: ManualClock) -> None:
    svc = make_service(
        open_store(SAAS_SCHEMA, state_dir=tmp_path),
        Aws(clock),
        clock,
        product_code="prod-2",
        identity="customer_identifier",
    )
    assert svc.handle_message("x", eb("License Deprovisioned", 1, clock.t)) == "dead_letter"
    assert count(svc, "SELECT COUNT(*) FROM saas_lifecycle") == 0
    svc.store.close()


def test_a_license_update_dates_no_state_an_older_end_still_counts(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    svc = make_service(backend(), Aws(clock), clock)
    t = clock.t
    assert svc.handle_message("u", eb("License Updated", 1, t - 5)) == "applied"
    # The end happened before the update but arrived after it: still the buyer's last state.
    assert svc.handle_message("e", eb("Purchase Agreement Ended", 1, t - 30)) == "applied"
    states = [c["state"] for c in svc.changes(0, 0)[1]["changes"]]
    assert states == ["pending_unsubscribe"]


@pytest.mark.parametrize("cursor", ["²", "9999999999999999999"])
def test_a_cursor_that_is_no_int64_is_a_400_naming_since(
    backend: Callable[[], UsageStore], clock: ManualClock, cursor: str
) -> None:
    """`str.isdigit` takes superscripts and other scripts' digits, and 19 digits pass int64's
    top: both reached the store (a 500) instead of the client's 400."""
    from urllib.parse import quote

    from sidecar.server.api import Router

    svc = make_service(backend(), Aws(clock), clock)
    router = Router(None, lambda: None, saas=svc, readiness=lambda: (True, None))
    reply = router.handle("GET", "/v1/customers/changes", b"", f"since={quote(cursor)}")
    assert reply.status == 400 and "since" in reply.body["error"]["message"], reply.body
    assert router.handle("GET", "/v1/customers/changes", b"", "since=0").status == 200


def test_long_polls_of_the_change_feed_never_take_usage_intakes_connections(
    tmp_path: Path, clock: ManualClock
) -> None:
    """The API listener has API_LIMITS.max_connections slots; each long poll holds one for up to
    20 s. As many polls as slots used to fill it: POST /v1/usage was answered 503 busy."""
    import requests

    from sidecar.server.api import API_LIMITS, LocalServer, Router

    aws = Aws(clock)
    svc = make_service(open_store(SAAS_SCHEMA, state_dir=tmp_path), aws, clock)
    resolved(svc, aws, 1)
    router = Router(None, lambda: None, saas=svc, readiness=lambda: (True, None))
    server = LocalServer(("127.0.0.1", 0), router, API_LIMITS, name="api")
    server.serve_in_thread("api")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    _, top = svc.changes(0, 0)
    polls = API_LIMITS.max_connections
    answers: list[int] = []

    def poll() -> None:
        r = requests.get(f"{base}/v1/customers/changes?since={top['cursor']}&wait=20", timeout=30)
        answers.append(r.status_code)

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(polls)]
    try:
        for p in pollers:
            p.start()
        deadline = time.monotonic() + 15
        while server._live + len(answers) < polls:  # every poll in flight or answered
            assert time.monotonic() < deadline, (server._live, answers)
            time.sleep(0.02)
        r = requests.post(f"{base}/v1/usage", data=body(1, "seats", 1), timeout=10)
        assert r.status_code == 202, r.text
        # A poll turned away is told when to come back, not left hanging.
        assert all(code in (200, 429) for code in answers), answers
        from marketplace_sidecar_client import CustomerError, customer_changes

        with pytest.raises(CustomerError) as busy:
            customer_changes(top["cursor"], wait=5, url=base)
        assert busy.value.reason == "unavailable" and busy.value.retry_after, busy.value
    finally:
        svc.handle_message("wake", eb("Purchase Agreement Created", 2, clock.t - 1))
        for p in pollers:
            p.join(timeout=30)
        server.shutdown()
        server.server_close()
        svc.store.close()
    assert len(answers) == polls and answers.count(200) >= 1, answers
