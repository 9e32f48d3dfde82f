"""Attacks on the renewal rule, the entitlement retries and the schema-5 seal guard as merged:
each test names what a user would see go wrong."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from sidecar.usage import saas_events
from sidecar.usage.db import UsageStore
from sidecar.usage.hours import hour_of, hour_start
from sidecar.usage.saas import SaasService
from tests.helpers import ManualClock
from tests.test_saas_ledger import account
from tests.test_saas_lifecycle import eb
from tests.test_saas_lifecycle_attack import (  # noqa: F401
    Contract,
    Queue,
    agreement_event,
    clock,
    contract_service,
    resolve_and_read,
    seats_entitled,
)
from tests.test_saas_service import Aws, body, make_service

DAY = 86400.0


def test_a_departure_delivered_before_the_renewal_it_follows_is_not_ignored(
    backend: Callable[[], UsageStore],
    clock: ManualClock,  # noqa: F811
) -> None:
    """SQS keeps no order. A buyer renewed two days ago (Created agmt-new, Ended agmt-old) and
    cancels now (Ended agmt-new); the consumer was down, so the cancellation comes first, then
    the renewal's two events. The renewal rule took the cancellation of agmt-new for "the end
    of another agreement" (the row still named agmt-old) and dropped it as stale: the buyer
    stayed `subscribed` for good: the app kept serving a buyer who left."""
    aws = Aws(clock)
    svc = make_service(backend(), aws, clock)
    aws.tokens["tok-1"] = 1
    assert svc.resolve(json.dumps({"registration_token": "tok-1"}).encode())[0] == 200
    t = clock.t
    old_created = agreement_event("Purchase Agreement Created", "agmt-old", t - 30 * DAY)
    assert svc.handle_message("c-old", old_created) == "applied"
    cancel = agreement_event("Purchase Agreement Ended", "agmt-new", t - 600)
    renewed = agreement_event("Purchase Agreement Created", "agmt-new", t - 2 * DAY)
    replaced = agreement_event("Purchase Agreement Ended", "agmt-old", t - 2 * DAY)
    for mid, text in (("cancel", cancel), ("renewed", renewed), ("replaced", replaced)):
        svc.handle_message(mid, text)
    doc = svc.customer(account(1))[1]
    assert doc["subscription"] == "pending_unsubscribe", doc["lifecycle"]
    svc.store.close()


def test_leaving_one_product_is_not_ignored_after_subscribing_to_another(
    backend: Callable[[], UsageStore],
    clock: ManualClock,  # noqa: F811
) -> None:
    """Agreement events name no product (only license events do), so a seller's rule on the
    default bus delivers the agreements of all its products to this queue. A buyer of this
    product (agmt-1) who later buys the seller's other product (agmt-2, a week after) and then
    cancels this one: its Ended (agmt-1) was dropped as "another agreement's end", for good."""
    aws = Aws(clock)
    svc = make_service(backend(), aws, clock)
    aws.tokens["tok-1"] = 1
    assert svc.resolve(json.dumps({"registration_token": "tok-1"}).encode())[0] == 200
    t = clock.t
    for mid, text in (
        ("c1", agreement_event("Purchase Agreement Created", "agmt-1", t - 30 * DAY)),
        ("c2", agreement_event("Purchase Agreement Created", "agmt-2", t - 7 * DAY)),
        ("e1", agreement_event("Purchase Agreement Ended", "agmt-1", t - 60)),
    ):
        svc.handle_message(mid, text)
    assert svc.customer(account(1))[1]["subscription"] == "pending_unsubscribe"
    svc.store.close()


class _Batches:
    """A queue handing out its messages ten per receive (SQS's most), each receive a 20 s long
    poll on the ManualClock; the consumer stops at the receive after the last."""

    def __init__(self, clk: ManualClock, stop: threading.Event, texts: list[str]) -> None:
        self.clock, self.stop = clk, stop
        self.waiting = [(f"m{i}", t) for i, t in enumerate(texts)]

    def receive(self) -> list[Any]:
        self.clock.t += 20
        self.clock.mono += 20
        out, self.waiting = self.waiting[:10], self.waiting[10:]
        if not out:
            self.stop.set()
        return [_Msg(i, b) for i, b in out]

    def delete(self, message: Any) -> None:
        pass


class _Msg:
    def __init__(self, mid: str, text: str) -> None:
        self.id, self.receipt, self.body, self.sent_at, self.receives = mid, mid, text, None, 1


def test_a_hanging_entitlement_service_does_not_make_a_deprovisioning_miss_its_window(
    backend: Callable[[], UsageStore],
    clock: ManualClock,  # noqa: F811
) -> None:
    """GetEntitlements hangs until its read timeout (10 s, the default AWS timeout) and fails;
    SQS works. 400 license updates (a price change reaching every buyer) sit ahead of one
    buyer's License Deprovisioned. Each update's read, and every retry of the reads still due,
    ran in the consumer one after another: over an hour of timeouts before the
    deprovisioning was applied, its final window closed, the buyer's last usage refused by AWS
    (CustomerNotSubscribed). Reads that fail are retried later from the store; a pass stops
    at the first failure and within its budget, so events keep flowing."""
    calls: list[float] = []

    def hanging(product: str, acct: str) -> list[dict[str, Any]]:
        calls.append(clock.t)
        clock.t += 10.0
        clock.mono += 10.0
        raise TimeoutError("Read timeout on endpoint URL")

    svc_store = backend()
    svc = SaasService(
        make_service(svc_store, Aws(clock), clock).policy,
        svc_store,
        lambda: Aws(clock),
        clock=clock,
        rng=lambda: 0.5,
        entitlements=hanging,
    )
    t = clock.t
    texts = [eb("License Updated", i, t) for i in range(1, 401)]
    texts.append(eb("License Deprovisioned", 401, t))
    stop = threading.Event()
    svc.consume(_Batches(clock, stop, texts), stop)
    lifecycle = svc.counters().lifecycle
    assert lifecycle["applied"] == 401, lifecycle
    assert lifecycle.get("final_window_missed", 0) == 0, (clock.t - t, len(calls))
    # Each read is still due in the store, for the retries once the service answers again.
    due = svc_store.read(lambda db: saas_events.due_refreshes(db, clock.t, limit=1000))
    assert len(due) == 400
    svc_store.close()


def test_a_replica_whose_clock_runs_a_day_ahead_does_not_freeze_every_buyers_contract(
    backend: Callable[[], UsageStore],
    clock: ManualClock,  # noqa: F811
) -> None:
    """Two replicas share the store; one's clock runs a day ahead (NTP broken on its node). It
    read the buyer's 10 seats, stamped a day ahead. The buyer upgrades to 100; the other
    replica applies the event and reads 100, an answer "older" than the stored one by the
    stamps: dropped, and re-read every minute for the day. Meanwhile 90 seats an hour the
    contract covers were billed as overage."""
    store = backend()
    aws = Aws(clock)
    contract = Contract(clock, seats=10)
    ahead = ManualClock()
    ahead.t, ahead.mono = clock.t + DAY, clock.mono
    fast = contract_service(store, aws, ahead, contract)
    svc = contract_service(store, aws, clock, contract)
    resolve_and_read(svc, aws)
    assert fast.refresh_entitlements(account(1))
    assert seats_entitled(svc) == [10]
    clock.t += 60
    contract.seats = 100
    assert svc.handle_message("m1", eb("Purchase Agreement Amended", 1, clock.t)) == "applied"
    assert seats_entitled(svc) == [100], "the upgrade's read was dropped as older news"
    store.close()


class _Down:
    """A lifecycle queue that cannot be reached (SQS outage, or its endpoint blocked)."""

    def receive(self) -> list[Any]:
        raise ConnectionError("Could not connect to the endpoint URL")

    def delete(self, message: Any) -> None:
        raise AssertionError("nothing was received")


def test_a_first_read_throttled_at_resolve_is_read_again_while_the_queue_is_unreachable(
    backend: Callable[[], UsageStore],
    clock: ManualClock,  # noqa: F811
) -> None:
    """The buyer's first GetEntitlements (at resolve) is throttled, and the lifecycle queue is
    unreachable for the hour (its endpoint blocked by a network policy). The retries of due
    reads ran only after a successful receive: none for the hour, so the hour was sealed with
    "entitlements never read" and all 12 seats billed, not the 2 beyond the contract's 10."""
    aws = Aws(clock)
    contract = Contract(clock, seats=10)
    contract.fail.append(RuntimeError("ThrottlingException: Rate exceeded"))
    svc = contract_service(backend(), aws, clock, contract)
    h = hour_of(clock.t)
    resolve_and_read(svc, aws)
    assert seats_entitled(svc) == []
    assert svc.post(body(1, "seats", 12))[0] == 202
    stop = threading.Event()
    clock.stop_after_waits = 20  # 20 failed receives, backing off to a minute apart
    svc.consume(_Down(), stop)
    assert seats_entitled(svc) == [10]
    clock.t = hour_start(h + 1) + 600
    svc.tick()
    billed = {k[2]: v for k, v in aws.billed.items() if k[1] == "seats"}
    assert billed[h] in (2, "2"), billed
    svc.store.close()


def test_buyers_whose_reads_always_fail_never_starve_the_others_reads(
    backend: Callable[[], UsageStore],
    clock: ManualClock,  # noqa: F811
) -> None:
    """21 buyers' GetEntitlements fail every time (refused for them), 4 others' would answer.
    A retry pass took the 20 oldest due subjects, all of them failing ones, and backed off for
    everyone: the 4 contracts were never read, their covered units billed for 7 days."""
    refused = {account(i) for i in range(1, 22)}
    read: list[str] = []

    def reader(product: str, acct: str) -> list[dict[str, Any]]:
        if acct in refused:
            raise RuntimeError("AccessDeniedException: not entitled to read this buyer")
        read.append(acct)
        return [{"dimension": "seats", "value": 5, "expiration": None, "kind": "integer"}]

    store = backend()
    svc = SaasService(
        make_service(store, Aws(clock), clock).policy,
        store,
        lambda: Aws(clock),
        clock=clock,
        rng=lambda: 0.5,
        entitlements=reader,
    )
    stop = threading.Event()
    updates = [eb("License Updated", i, clock.t) for i in range(1, 26)]
    svc.consume(Queue(clock, stop, 2, *updates), stop)
    assert svc.counters().lifecycle["applied"] == 25
    for _ in range(4):  # an hour of retry passes, the longest backoff apart
        clock.t += 900.0
        clock.mono += 900.0
        svc.retry_entitlements()
    assert sorted(read) == sorted(account(i) for i in range(22, 26))
    due = store.read(lambda db: saas_events.due_refreshes(db, clock.t, limit=1000))
    assert sorted(due) == sorted(refused)  # still due, still tried in their turn
    store.close()
