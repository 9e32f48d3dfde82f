"""Attacks on the SaaS buyer lifecycle and contract overage (issue 23): what a queue, a crash or
a throttled GetEntitlements can do to a buyer's bill or to the backend's picture of it.

AWS's BatchMeterUsage is `FakeAws` (tests/test_saas_ledger.py), the clock a ManualClock, the
store SQLite and a real PostgreSQL (tests/pg.py), as in tests/test_saas_lifecycle.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from sidecar.usage import lifecycle
from sidecar.usage.db import UsageStore
from sidecar.usage.hours import hour_of, hour_start, iso
from sidecar.usage.overage import Basis
from sidecar.usage.saas import EntitlementReader, SaasService
from sidecar.usage.saas_events import FINAL_MARGIN
from tests.helpers import ManualClock
from tests.saas_fixtures import saas_clock
from tests.test_saas_ledger import account
from tests.test_saas_lifecycle import eb, sns
from tests.test_saas_service import Aws, Killed, body, make_service

clock = saas_clock  # the SaaS hour clock (tests/saas_fixtures.py); `backend` is there too


class Contract:
    """GetEntitlements as the buyer's contract answers it; `fail` raises on the next calls."""

    def __init__(self, clock: ManualClock, seats: int) -> None:
        self.clock = clock
        self.seats = seats
        self.fail: list[BaseException] = []
        self.calls = 0

    def __call__(self, product: str, acct: str) -> list[dict[str, Any]]:
        self.calls += 1
        if self.fail:
            raise self.fail.pop(0)
        return [{"dimension": "seats", "value": self.seats, "expiration": None, "kind": "integer"}]


def contract_service(
    store: UsageStore, aws: Aws, clock: ManualClock, contract: EntitlementReader
) -> SaasService:
    base = make_service(store, aws, clock)
    policy = type(base.policy)(
        **{**base.policy.__dict__, "contract": (("seats", Basis.HOUR),)}  # seats: a capacity
    )
    return SaasService(
        policy, store, lambda: aws, clock=clock, rng=lambda: 0.5, entitlements=contract
    )


def resolve_and_read(svc: SaasService, aws: Aws) -> None:
    """Resolve buyer 1 and wait for the entitlements read that resolving starts (a thread)."""
    aws.tokens["tok-1"] = 1
    assert svc.resolve(json.dumps({"registration_token": "tok-1"}).encode())[0] == 200
    for t in [t for t in threading.enumerate() if t.name == "entitlements"]:
        t.join(10)
        assert not t.is_alive()


def seats_entitled(svc: SaasService) -> list[Any]:
    doc = svc.customer(account(1))[1]
    return [e["value"] for e in (doc["lifecycle"] or {}).get("entitlements", [])]


class Queue:
    """An event queue that hands out its messages, then nothing; every receive is a long poll
    of 20 s on the ManualClock, and the consumer is stopped after `polls` of them."""

    def __init__(self, clock: ManualClock, stop: threading.Event, polls: int, *texts: str):
        self.clock, self.stop, self.polls = clock, stop, polls
        self.waiting = [(f"m{i}", t) for i, t in enumerate(texts, 1)]
        self.deleted: list[str] = []

    def receive(self) -> list[Any]:
        self.polls -= 1
        if self.polls <= 0:
            self.stop.set()
        self.clock.t += 20
        self.clock.mono += 20
        out, self.waiting = self.waiting, []
        return [_Msg(i, b) for i, b in out]

    def delete(self, message: Any) -> None:
        self.deleted.append(message.id)


class _Msg:
    def __init__(self, mid: str, text: str) -> None:
        self.id, self.receipt, self.body, self.sent_at, self.receives = mid, mid, text, None, 1


# -- an entitlement change whose read failed ----------------------------------------------------


def test_an_upgrade_whose_getentitlements_was_throttled_is_read_again_without_a_new_event(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """The buyer upgrades from 10 to 100 seats; GetEntitlements is throttled once at the
    event, which is deleted from the queue. Without another read the buyer is billed 90 seats
    an hour the contract covers, until some unrelated event comes (weeks)."""
    aws = Aws(clock)
    contract = Contract(clock, seats=10)
    svc = contract_service(backend(), aws, clock, contract)
    resolve_and_read(svc, aws)  # the first read (a thread in production)
    assert seats_entitled(svc) == [10]
    contract.seats = 100
    contract.fail.append(RuntimeError("ThrottlingException: Rate exceeded"))
    stop = threading.Event()
    queue = Queue(clock, stop, 40, eb("Purchase Agreement Amended", 1, clock.t))
    svc.consume(queue, stop)  # 40 long polls: about 13 minutes
    assert queue.deleted == ["m1"]
    assert seats_entitled(svc) == [100], "the amendment's entitlements were never read again"
    svc.store.close()


def test_a_crash_between_applying_an_amendment_and_reading_it_is_read_on_redelivery(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """SIGKILL after the event's transaction committed, before GetEntitlements answered: SQS
    redelivers the message, which is then a duplicate, and a duplicate read nothing."""
    aws = Aws(clock)
    contract = Contract(clock, seats=10)
    svc = contract_service(backend(), aws, clock, contract)
    resolve_and_read(svc, aws)
    contract.seats = 100
    contract.fail.append(Killed())
    text = eb("Purchase Agreement Amended", 1, clock.t)
    with pytest.raises(Killed):
        svc.handle_message("m1", text)
    # A new process; the message comes back after its visibility timeout.
    clock.t += 30
    again = contract_service(svc.store, aws, clock, contract)
    assert again.handle_message("m1", text) == "duplicate"
    assert seats_entitled(again) == [100]
    # ... and the hour bills only what the new contract does not cover.
    h = hour_of(clock.t)
    assert again.post(body(1, "seats", 40))[0] == 202
    clock.t = hour_start(h + 1) + 600
    again.tick()
    billed = {k[2]: v for k, v in aws.billed.items() if k[1] == "seats"}
    assert billed[h] in (0, "0"), billed


# -- SNS: unsubscribe-success before unsubscribe-pending ----------------------------------------


def test_an_unsubscribe_pending_received_after_its_success_moves_the_window_back(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """The SNS window counts from unsubscribe-pending (docs/saas-lifecycle.md). Delivered after
    unsubscribe-success (the queue was down; SQS does not keep order), the pending is stale
    and the window stayed success + 1 h: usage was acknowledged up to 50 minutes after AWS's
    window closed, and answered CustomerNotSubscribed."""
    aws = SnsAws(clock)
    svc = make_service(backend(), aws, clock, identity="customer_identifier", product_code="prod-1")
    aws.tokens["tok-1"] = 1
    assert svc.resolve(json.dumps({"registration_token": "tok-1"}).encode())[0] == 200
    ci = "ci-1"
    pending_at = clock.t - 3000
    assert svc.handle_message("s", sns("unsubscribe-success", ci, clock.t)) == "applied"
    svc.handle_message("p", sns("unsubscribe-pending", ci, pending_at))
    life = svc.customer(ci)[1]["lifecycle"]
    assert life["left_at"] == iso(pending_at)
    assert life["final_window_end"] == iso(pending_at + lifecycle.FINAL_WINDOW)
    clock.t = pending_at + lifecycle.FINAL_WINDOW - FINAL_MARGIN + 1  # (.123 s in the stamp)
    usage = {"customer_identifier": ci, "dimension": "seats", "quantity": 1}
    assert svc.post(json.dumps(usage).encode())[0] == 400
    svc.store.close()


class SnsAws(Aws):
    """ResolveCustomer as an SNS-era product sees it: a CustomerIdentifier too."""

    def resolve_customer(self, token: str) -> dict[str, Any]:
        answer = super().resolve_customer(token)
        return {**answer, "CustomerIdentifier": f"ci-{self.tokens[token]}"}


# -- a renewal listed next to the entitlement it replaces ---------------------------------------


@pytest.mark.parametrize("old_last", [True, False])
def test_a_renewal_listed_with_the_expiring_entitlement_keeps_covering_after_the_expiry(
    backend: Callable[[], UsageStore], clock: ManualClock, old_last: bool
) -> None:
    """GetEntitlements lists seats twice: the term ending in an hour and its renewal. Kept the
    expiring one (listed last), every seat was billed from its expiry until the next event,
    possibly the whole new term."""
    aws = Aws(clock)
    h = hour_of(clock.t)
    old = {"dimension": "seats", "value": 10, "expiration": hour_start(h + 1) + 1800}
    new = {"dimension": "seats", "value": 10, "expiration": hour_start(h + 24 * 365)}
    listed = [new, old] if old_last else [old, new]
    svc = contract_service(
        backend(), aws, clock, lambda p, a: [dict(e, kind="integer") for e in listed]
    )
    resolve_and_read(svc, aws)
    clock.t = hour_start(h + 2) + 60  # the old term ended half an hour ago
    assert svc.post(body(1, "seats", 12))[0] == 202
    clock.t = hour_start(h + 3) + 600
    svc.tick()
    billed = {k[2]: v for k, v in aws.billed.items() if k[1] == "seats"}
    assert billed[h + 2] in (2, "2"), billed
    svc.store.close()


# -- an event time no event can have ------------------------------------------------------------


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+01:00", "0001-01-01T00:30:00Z"])
def test_an_event_dated_before_aws_marketplace_is_a_dead_letter_not_a_wedged_feed(
    backend: Callable[[], UsageStore], clock: ManualClock, when: str
) -> None:
    """A time ISO 8601 allows but no event can carry (year 1, or year 0 once in UTC). Applied,
    it made the buyer `unsubscribed` (a final window closed 2,000 years ago: usage refused),
    crashed the consumer on the log line naming the time, and every read of the change feed
    or the customer answered 500 from then on."""
    aws = Aws(clock)
    svc = make_service(backend(), aws, clock)
    aws.tokens["tok-1"] = 1
    assert svc.resolve(json.dumps({"registration_token": "tok-1"}).encode())[0] == 200
    doc = json.loads(eb("License Deprovisioned", 1, clock.t))
    doc["time"] = when
    stop = threading.Event()
    queue = Queue(clock, stop, 2, json.dumps(doc), eb("License Updated", 1, clock.t))
    svc.consume(queue, stop)  # the consumer goes on to the next message
    assert queue.deleted == ["m1", "m2"]
    assert svc.dead_letters()[1]["total"] == 1
    status, feed = svc.changes(0, 0)
    assert status == 200 and [c["state"] for c in feed["changes"]] == ["subscribed"]
    assert svc.customer(account(1))[0] == 200
    assert svc.post(body(1, "seats", 1))[0] == 202  # the buyer was never unsubscribed
    svc.store.close()


# -- two reads of one buyer's entitlements, answered out of order ------------------------------


def test_an_older_getentitlements_answer_stored_last_never_replaces_a_newer_one(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """A read started before an upgrade (the first read after resolving, or a retry) answers
    slowly; the upgrade's own read answers at once and is stored; then the slow, older answer
    was stored over it: the buyer billed on the old contract until the next event."""
    aws = Aws(clock)
    contract = Contract(clock, seats=10)
    started = threading.Event()
    release = threading.Event()

    def read(product: str, acct: str) -> list[dict[str, Any]]:
        answer = contract(product, acct)  # read now; answered after `release`
        if not started.is_set():
            started.set()
            assert release.wait(10)
        return answer

    svc = contract_service(backend(), aws, clock, read)
    aws.tokens["tok-1"] = 1
    # Resolving reads the buyer's entitlements in a thread of its own: the slow read.
    assert svc.resolve(json.dumps({"registration_token": "tok-1"}).encode())[0] == 200
    assert started.wait(10)
    (slow,) = [t for t in threading.enumerate() if t.name == "entitlements"]
    clock.t += 5
    contract.seats = 100  # the buyer upgrades; its event's read answers at once
    assert svc.handle_message("m1", eb("Purchase Agreement Amended", 1, clock.t)) == "applied"
    assert seats_entitled(svc) == [100]
    release.set()
    slow.join(10)
    assert not slow.is_alive()
    assert seats_entitled(svc) == [100], "an older answer replaced the newer one"
    svc.store.close()


def test_an_sns_buyer_never_resolved_is_not_retried_for_ever(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """subscribe-success for a buyer who never finished registering: no account to read
    entitlements for. Its read is settled, not retried every few minutes for good."""
    aws = Aws(clock)
    contract = Contract(clock, seats=10)
    svc = contract_service(backend(), aws, clock, contract)
    assert svc.handle_message("m1", sns("subscribe-success", "ci-9", clock.t)) == "applied"
    stop = threading.Event()
    svc.consume(Queue(clock, stop, 10), stop)
    assert contract.calls == 0
    due = svc.store.read(
        lambda db: db.execute(
            "SELECT COUNT(*) FROM saas_events WHERE outcome = 'refresh_due'"
        ).fetchone()[0]
    )
    assert due == 0
    svc.store.close()


# -- GetEntitlements that pages slowly for ever -------------------------------------------------


def test_endless_slow_pages_stop_at_the_read_budget_not_after_an_hour(
    emulator_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Empty pages, each with a new NextToken, each taking the client's read timeout (10 s,
    played by the injected monotonic clock): MAX_PAGES (400) of them held the lifecycle
    consumer, and every event queued behind it, for over an hour (a final window missed)."""
    import requests

    from sidecar.aws import entitlement

    monkeypatch.setenv(entitlement.ENDPOINT_ENV, emulator_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    r = requests.post(
        emulator_server.url + "/_emulator/entitlements/config",
        json={"endless_pages": True},
        timeout=5,
    )
    assert r.status_code == 200, r.text
    elapsed = [0.0]

    def monotonic() -> float:
        elapsed[0] += 10.0  # every page answered just inside the read timeout
        return elapsed[0]

    with pytest.raises(entitlement.EntitlementCallError) as caught:
        entitlement.get_entitlements(
            entitlement.entitlement_client(), "prod-1", "111122223333", monotonic=monotonic
        )
    assert caught.value.info.retryable
    assert "still paging" in caught.value.info.message
    assert elapsed[0] <= entitlement.READ_BUDGET + 20


def test_a_slow_entitlements_read_never_holds_back_the_events_behind_it(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """One receive: buyer 1's amendment, then buyer 2's deprovisioning. The amendment's read
    ran before the deprovisioning was applied and before either message was deleted: a slow
    read (up to its budget) delayed the final window and could outlast the messages'
    visibility timeout (each then delivered again)."""
    aws = Aws(clock)
    seen: list[tuple[list[str], str | None]] = []
    stop = threading.Event()
    queue = Queue(
        clock,
        stop,
        2,
        eb("Purchase Agreement Amended", 1, clock.t),
        eb("License Deprovisioned", 2, clock.t),
    )

    def read(product: str, acct: str) -> list[dict[str, Any]]:
        doc = svc.customer(account(2))[1]
        seen.append((list(queue.deleted), doc.get("subscription")))
        return [{"dimension": "seats", "value": 5, "expiration": None, "kind": "integer"}]

    svc = contract_service(backend(), aws, clock, read)
    for i in (1, 2):
        aws.tokens[f"tok-{i}"] = i
        assert svc.resolve(json.dumps({"registration_token": f"tok-{i}"}).encode())[0] == 200
    for t in [t for t in threading.enumerate() if t.name == "entitlements"]:
        t.join(10)
    seen.clear()
    svc.consume(queue, stop)
    assert seen == [(["m1", "m2"], "unsubscribed")], seen
    svc.store.close()


# -- a renewal or replacement: a new agreement created, the old one ended -----------------------


def agreement_event(kind: str, agreement: str, t: float) -> str:
    doc = json.loads(eb(kind, 1, t))
    doc["detail"]["agreement"]["id"] = agreement
    return json.dumps(doc)


@pytest.mark.parametrize("ended_first", [True, False])
@pytest.mark.parametrize("created_earlier_by", [0, 2])
def test_a_renewal_ending_the_old_agreement_leaves_the_buyer_subscribed(
    backend: Callable[[], UsageStore],
    clock: ManualClock,
    ended_first: bool,
    created_earlier_by: int,
) -> None:
    """AWS: `Purchase Agreement Created` is "sent when a new purchase agreement is created,
    renewed, or replaced", `Ended` "when a purchase agreement is cancelled, expired,
    terminated, renewed, or replaced" (Buyer Guide, "AWS Marketplace Agreement EventBridge
    Events"). A renewal sends both, at the same second or nearly. The later lifecycle step won:
    the renewing buyer showed `pending_unsubscribe` for good, on the old agreement."""
    aws = Aws(clock)
    svc = make_service(backend(), aws, clock)
    aws.tokens["tok-1"] = 1
    assert svc.resolve(json.dumps({"registration_token": "tok-1"}).encode())[0] == 200
    t = clock.t
    assert (
        svc.handle_message("c0", agreement_event("Purchase Agreement Created", "agmt-old", t - 900))
        == "applied"
    )
    created = agreement_event("Purchase Agreement Created", "agmt-new", t - created_earlier_by)
    ended = agreement_event("Purchase Agreement Ended", "agmt-old", t)
    for mid, text in (
        [("e", ended), ("c", created)] if ended_first else [("c", created), ("e", ended)]
    ):
        svc.handle_message(mid, text)
    doc = svc.customer(account(1))[1]
    assert doc["subscription"] == "subscribed", doc["lifecycle"]
    assert doc["lifecycle"]["agreement_id"] == "agmt-new"
    assert svc.changes(0, 0)[1]["changes"][-1]["state"] == "subscribed"
    # ... and a real cancellation of the new agreement still ends it.
    svc.handle_message("x", agreement_event("Purchase Agreement Ended", "agmt-new", t + 60))
    assert svc.customer(account(1))[1]["subscription"] == "pending_unsubscribe"
    svc.store.close()


# -- an SNS subscribe naming a free trial --------------------------------------------------------


def test_a_free_trial_flag_is_stored_on_both_stores(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """isFreeTrialTermPresent goes into an INTEGER column: a Python bool must be stored as
    such on PostgreSQL too (a type error there would stop the consumer at every delivery)."""
    aws = SnsAws(clock)
    svc = make_service(backend(), aws, clock, identity="customer_identifier", product_code="prod-1")
    aws.tokens["tok-1"] = 1
    assert svc.resolve(json.dumps({"registration_token": "tok-1"}).encode())[0] == 200
    text = sns("subscribe-success", "ci-1", clock.t, isFreeTrialTermPresent="true")
    assert svc.handle_message("m1", text) == "applied"
    later = sns("entitlement-updated", "ci-1", clock.t + 1, isFreeTrialTermPresent="false")
    assert svc.handle_message("m2", later) == "applied"
    assert svc.customer("ci-1")[1]["lifecycle"]["free_trial"] is False
    svc.store.close()


# -- the first read, at resolve, throttled -----------------------------------------------------


def test_a_first_read_throttled_at_resolve_is_read_again_before_the_hour_is_billed_whole(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """Resolving reads the buyer's entitlements once, in a thread. Throttled (many buyers
    registering at once), they were never read until some event came: every covered seat
    billed ("entitlements never read: every unit")."""
    aws = Aws(clock)
    contract = Contract(clock, seats=10)
    contract.fail.append(RuntimeError("ThrottlingException: Rate exceeded"))
    svc = contract_service(backend(), aws, clock, contract)
    h = hour_of(clock.t)
    resolve_and_read(svc, aws)
    assert seats_entitled(svc) == []
    assert svc.post(body(1, "seats", 12))[0] == 202
    stop = threading.Event()
    svc.consume(Queue(clock, stop, 10), stop)  # no event at all: a few empty long polls
    assert seats_entitled(svc) == [10]
    clock.t = hour_start(h + 1) + 600
    svc.tick()
    billed = {k[2]: v for k, v in aws.billed.items() if k[1] == "seats"}
    assert billed[h] in (2, "2"), billed
    svc.store.close()
