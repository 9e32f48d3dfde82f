"""A departure names a license, not a buyer (issue 23, license identity): with customers keyed
by account/license, a buyer's account can hold an old license (a replaced or ended agreement)
and a new one. `License Deprovisioned` for the old one must leave the new one alone: its usage
accepted and billed in its own hour, not refused after the window nor sealed early.

AWS's BatchMeterUsage is `FakeAws` (tests/test_saas_ledger.py), the clock a ManualClock, the
store SQLite and a real PostgreSQL (tests/pg.py), as in tests/test_saas_lifecycle_attack.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sidecar.usage import lifecycle
from sidecar.usage.db import UsageStore
from sidecar.usage.hours import hour_of, hour_start
from sidecar.usage.saas_events import FINAL_MARGIN
from tests.helpers import ManualClock
from tests.saas_fixtures import saas_clock
from tests.test_saas_ledger import account
from tests.test_saas_lifecycle import eb
from tests.test_saas_service import Aws, make_service

ACCOUNT = account(1)
L1 = f"arn:aws:license-manager::294406891311:license/l-{1:032x}"
L2 = f"arn:aws:license-manager::294406891311:license/l-{2:032x}"


clock = saas_clock  # the SaaS hour clock (tests/saas_fixtures.py); `backend` is there too


class TwoLicenses(Aws):
    """ResolveCustomer for one account holding two licenses: token -> its license."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock)
        self.licenses = {"tok-old": L1, "tok-new": L2}

    def resolve_customer(self, token: str) -> dict[str, Any]:
        return {
            "CustomerAWSAccountId": ACCOUNT,
            "LicenseArn": self.licenses[token],
            "ProductCode": "prod-1",
        }


def event(kind: str, t: float, *, agreement: str, license: str | None) -> str:
    """An EventBridge event of account 1 naming `agreement` and, if given, `license` (without
    its leading `arn:`, as the Seller Guide's example prints it)."""
    doc = json.loads(eb(kind, 1, t))
    doc["detail"]["agreement"]["id"] = agreement
    if license is None:
        doc["detail"].pop("license", None)
    else:
        doc["detail"]["license"] = {"arn": license.removeprefix("arn:")}
    return json.dumps(doc)


def usage(license: str, quantity: int) -> bytes:
    return json.dumps(
        {
            "customer_aws_account_id": ACCOUNT,
            "license_arn": license,
            "dimension": "seats",
            "quantity": quantity,
        }
    ).encode()


def who(license: str) -> str:
    return f"{ACCOUNT}/{license}"


def sent(aws: Aws, license: str, hour: int) -> int:
    """How many records for (license, seats, hour) were sent to BatchMeterUsage."""
    return sum(
        1
        for text in aws.bodies
        for r in json.loads(text)["UsageRecords"]
        if aws.key_of(r) == (who(license), "seats", hour)
    )


def two_licenses(make: Callable[[], UsageStore], clock: ManualClock) -> tuple[Any, TwoLicenses]:
    """Account 1 subscribed under agreement A1 (license L1), then resolved for L2 (a new
    agreement whose `Created` has not arrived yet): two customers of one account."""
    aws = TwoLicenses(clock)
    svc = make_service(make(), aws, clock)
    assert (
        svc.handle_message(
            "c1",
            event("Purchase Agreement Created", clock.t - 7200, agreement="agmt-1", license=None),
        )
        == "applied"
    )
    for token in ("tok-old", "tok-new"):
        assert svc.resolve(json.dumps({"registration_token": token}).encode())[0] == 200
    return svc, aws


def test_deprovisioning_an_old_license_leaves_the_new_license_billed_in_its_own_hour(
    backend: Callable[[], UsageStore],
    clock: ManualClock,
) -> None:
    """L1 deprovisioned, L2 live: L2's usage is 202 after L1's window and billed once, in its
    own hour, at the hourly seal; L1's open hour alone is sealed early, and L1's usage is
    refused after its window. Before the fix, L2 was refused and early-sealed as well."""
    svc, aws = two_licenses(backend, clock)
    h = hour_of(clock.t)
    assert svc.post(usage(L1, 5))[0] == 202
    assert svc.post(usage(L2, 3))[0] == 202
    gone = event("License Deprovisioned", clock.t, agreement="agmt-1", license=L1)
    assert svc.handle_message("d", gone) == "applied"
    svc.tick()
    assert aws.billed.get((who(L1), "seats", h)) in (5, "5"), aws.billed  # the early seal
    assert (who(L2), "seats", h) not in aws.billed, "L2's open hour was sealed early"
    # The backend is not told to revoke L2: each customer shows its own license's state.
    shown = {c["license_arn"]: c["subscription"] for c in svc.customer(ACCOUNT)[1]["customers"]}
    assert shown == {L1: "unsubscribed", L2: "subscribed"}, shown
    # Later in the hour, still inside L1's window: L2's usage stays in hour h (not carried).
    clock.t += 600
    status, doc = svc.post(usage(L2, 4))
    assert status == 202, doc
    assert "carried_from" not in doc["records"][0], doc
    # After L1's window (less the margin): L1 refused, L2 accepted, in its own hour.
    clock.t = hour_start(h) + 600 + lifecycle.FINAL_WINDOW - FINAL_MARGIN + 1
    status, refused = svc.post(usage(L1, 1))
    assert status == 400 and "unsubscribed" in json.dumps(refused), refused
    status, doc = svc.post(usage(L2, 2))
    assert status == 202, doc
    assert "carried_from" not in doc["records"][0], doc
    svc.tick()  # L1's last pass
    clock.t = hour_start(h + 3) + 600
    svc.tick()
    assert aws.billed[(who(L2), "seats", h)] in (7, "7"), aws.billed
    assert aws.billed[(who(L2), "seats", h + 1)] in (2, "2"), aws.billed
    assert sent(aws, L2, h) == 1 and sent(aws, L2, h + 1) == 1
    assert sent(aws, L1, h) == 1
    # L2 still gets its zero records (it did not leave); L1 none after it left.
    assert (who(L2), "seats", h + 2) in aws.billed
    assert not [k for k in aws.billed if k[0] == who(L1) and k[2] > h]
    svc.store.close()


def test_a_departure_naming_no_license_still_applies_to_the_whole_account(
    backend: Callable[[], UsageStore],
    clock: ManualClock,
) -> None:
    """An event without a license ARN cannot say which license left: every customer of the
    account is refused after the window, as before (docs/saas-lifecycle.md)."""
    svc, aws = two_licenses(backend, clock)
    h = hour_of(clock.t)
    assert svc.post(usage(L2, 3))[0] == 202
    gone = event("License Deprovisioned", clock.t, agreement="agmt-1", license=None)
    assert svc.handle_message("d", gone) == "applied"
    svc.tick()
    assert aws.billed.get((who(L2), "seats", h)) in (3, "3"), aws.billed
    clock.t += lifecycle.FINAL_WINDOW - FINAL_MARGIN
    assert svc.post(usage(L1, 1))[0] == 400
    assert svc.post(usage(L2, 1))[0] == 400
    svc.store.close()


def test_a_second_license_leaving_gets_its_own_window_then_both_are_refused(
    backend: Callable[[], UsageStore],
    clock: ManualClock,
) -> None:
    """L1 left, then L2: L2 keeps its final window (its usage billed), and the second
    departure never makes L1 a live customer again for good (both leave the account)."""
    svc, _ = two_licenses(backend, clock)
    gone = event("License Deprovisioned", clock.t, agreement="agmt-1", license=L1)
    assert svc.handle_message("d1", gone) == "applied"
    clock.t += lifecycle.FINAL_WINDOW
    assert svc.post(usage(L1, 1))[0] == 400
    assert svc.post(usage(L2, 1))[0] == 202
    gone = event("License Deprovisioned", clock.t, agreement="agmt-2", license=L2)
    assert svc.handle_message("d2", gone) == "applied"
    assert svc.post(usage(L2, 1))[0] == 202  # inside L2's own final window
    clock.t += lifecycle.FINAL_WINDOW - FINAL_MARGIN
    assert svc.post(usage(L2, 1))[0] == 400
    assert svc.post(usage(L1, 1))[0] == 400
    svc.store.close()
