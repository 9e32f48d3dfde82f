"""Attacks on the renewal rule, the entitlement retries and the schema-5 seal guard as merged:
each test names what a user would see go wrong."""

from __future__ import annotations

import json
from collections.abc import Callable

from sidecar.usage.db import UsageStore
from tests.helpers import ManualClock
from tests.test_saas_ledger import account
from tests.test_saas_lifecycle_attack import agreement_event, backend, clock  # noqa: F401
from tests.test_saas_service import Aws, make_service

DAY = 86400.0


def test_a_departure_delivered_before_the_renewal_it_follows_is_not_ignored(
    backend: Callable[[], UsageStore],  # noqa: F811
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
    backend: Callable[[], UsageStore],  # noqa: F811
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
