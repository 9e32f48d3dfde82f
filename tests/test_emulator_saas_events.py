"""The emulator's SaaS lifecycle events (`POST /_emulator/saas/events`) onto moto's server-mode SQS,
and the agreement lifecycle on its BatchMeterUsage ledger (the final hour after deprovisioning)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.moto_sqs import MotoSqs
from tests.test_emulator import client

PRODUCT = "prod-saas-emulated"
BUYER = "210987654321"


@pytest.fixture(scope="module")
def sqs() -> Iterator[MotoSqs]:
    server = MotoSqs()
    yield server
    server.close()


@pytest.fixture
def queue(sqs: MotoSqs) -> str:
    return sqs.queue()


def emit(server: EmulatorServer, **spec: Any) -> requests.Response:
    return requests.post(server.url + "/_emulator/saas/events", json=spec, timeout=10)


def ok(server: EmulatorServer, **spec: Any) -> dict[str, Any]:
    r = emit(server, **spec)
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.parametrize(
    ("kind", "detail_type"),
    [
        ("purchase-agreement-created", "Purchase Agreement Created - Manufacturer"),
        ("purchase-agreement-amended", "Purchase Agreement Amended - Manufacturer"),
        ("purchase-agreement-ended", "Purchase Agreement Ended - Manufacturer"),
        ("license-updated", "License Updated - Manufacturer"),
        ("license-deprovisioned", "License Deprovisioned - Manufacturer"),
    ],
)
def test_eventbridge_events_reach_the_queue_in_eventbridges_envelope(
    emulator_server: EmulatorServer,
    emulator: Emulator,
    sqs: MotoSqs,
    queue: str,
    kind: str,
    detail_type: str,
) -> None:
    sent = ok(
        emulator_server,
        queue_url=queue,
        type=kind,
        product_code=PRODUCT,
        customer_aws_account_id=BUYER,
        agreement_id="agmt-1234567890abcdefghijklmno",
        license_arn="arn:aws:license-manager::210987654321:license:l-0123456789abcdef",
        time=1_830_000_000,
    )
    (doc,) = sqs.bodies(queue, 1)
    assert doc["id"] == sent["event_id"]
    assert doc["source"] == "aws.agreement-marketplace"
    assert doc["detail-type"] == detail_type
    assert doc["region"] == "us-east-1"
    assert doc["time"] == "2027-12-28T13:20:00Z"
    detail = doc["detail"]
    assert detail["acceptor"]["accountId"] == BUYER
    assert detail["agreement"]["id"] == "agmt-1234567890abcdefghijklmno"
    assert detail["product"]["code"] == PRODUCT
    assert detail["license"]["arn"].endswith("l-0123456789abcdef")
    if kind.startswith("purchase-agreement"):
        assert detail["agreement"]["status"] in ("ACTIVE", "CANCELLED")


@pytest.mark.parametrize(
    ("kind", "topic"),
    [
        ("subscribe-success", "aws-mp-subscription-notification"),
        ("subscribe-fail", "aws-mp-subscription-notification"),
        ("unsubscribe-pending", "aws-mp-subscription-notification"),
        ("unsubscribe-success", "aws-mp-subscription-notification"),
        ("entitlement-updated", "aws-mp-entitlement-notification"),
    ],
)
def test_legacy_sns_notifications_arrive_in_the_sns_to_sqs_envelope(
    emulator_server: EmulatorServer,
    emulator: Emulator,
    sqs: MotoSqs,
    queue: str,
    kind: str,
    topic: str,
) -> None:
    sent = ok(
        emulator_server,
        queue_url=queue,
        type=kind,
        product_code=PRODUCT,
        customer_identifier="X01EXAMPLEX",
        free_trial=True,
    )
    (env,) = sqs.bodies(queue, 1)
    assert env["Type"] == "Notification"
    assert env["MessageId"] == sent["event_id"]
    assert env["TopicArn"].endswith(f":{topic}-{PRODUCT}")
    datetime.fromisoformat(env["Timestamp"].replace("Z", "+00:00"))
    message = json.loads(env["Message"])
    assert message["action"] == kind
    assert message["customer-identifier"] == "X01EXAMPLEX"
    assert message["product-code"] == PRODUCT
    # The guide: offer-identifier only with subscribe-success and subscribe-fail.
    assert ("offer-identifier" in message) == kind.startswith("subscribe-")
    if topic == "aws-mp-subscription-notification":
        assert message["isFreeTrialTermPresent"] == "true"


def test_raw_delivery_and_duplicates(
    emulator_server: EmulatorServer, emulator: Emulator, sqs: MotoSqs, queue: str
) -> None:
    """`raw`: the bare message (SNS raw message delivery); `copies`: the same message again (AWS
    delivers at least once); `id`: an event repeated later under the same id."""
    ok(
        emulator_server,
        queue_url=queue,
        type="unsubscribe-pending",
        product_code=PRODUCT,
        customer_identifier="X01EXAMPLEX",
        raw=True,
    )
    (raw,) = sqs.bodies(queue, 1)
    assert raw["action"] == "unsubscribe-pending"
    first = ok(
        emulator_server,
        queue_url=queue,
        type="license-updated",
        product_code=PRODUCT,
        customer_aws_account_id=BUYER,
        copies=2,
    )
    ok(
        emulator_server,
        queue_url=queue,
        type="license-updated",
        product_code=PRODUCT,
        customer_aws_account_id=BUYER,
        id=first["event_id"],
    )
    docs = sqs.bodies(queue, 3)
    assert [d["id"] for d in docs] == [first["event_id"]] * 3
    assert len(set(first["message_ids"])) == 2


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"type": "subscribe-later"}, "type"),
        ({"type": "license-updated", "customer_aws_account_id": "12"}, "customer_aws_account_id"),
        ({"type": "subscribe-success"}, "customer_identifier"),
        ({"type": "license-updated", "customer_aws_account_id": BUYER, "role": "x"}, "role"),
        ({"type": "license-updated", "customer_aws_account_id": BUYER, "copies": 0}, "copies"),
    ],
)
def test_bad_specs_are_400_naming_the_field_and_send_nothing(
    emulator_server: EmulatorServer,
    emulator: Emulator,
    sqs: MotoSqs,
    queue: str,
    spec: dict[str, Any],
    field: str,
) -> None:
    r = emit(emulator_server, queue_url=queue, product_code=PRODUCT, **spec)
    assert r.status_code == 400
    assert field in r.json()["error"]
    assert sqs.visible(queue) == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://192.0.2.1:9324/123456789012/q",
        "https://sqs.us-east-1.amazonaws.com/123456789012/q",
        "http://169.254.169.254/latest",
        None,
    ],
)
def test_only_a_loopback_queue_is_written_to(emulator_server: EmulatorServer, url: Any) -> None:
    r = emit(
        emulator_server,
        queue_url=url,
        type="license-updated",
        product_code=PRODUCT,
        customer_aws_account_id=BUYER,
    )
    assert r.status_code == 400
    assert "queue_url" in r.json()["error"]


def test_a_queue_that_does_not_exist_is_a_502_not_a_500(emulator_server: EmulatorServer) -> None:
    r = emit(
        emulator_server,
        queue_url="http://127.0.0.1:1/123456789012/nowhere",
        type="license-updated",
        product_code=PRODUCT,
        customer_aws_account_id=BUYER,
    )
    assert r.status_code == 502
    assert "SQS send failed" in r.json()["error"]


# -- the agreement lifecycle on the ledger ------------------------------------------------------


def record(cust: dict[str, Any], stamp: float, quantity: int) -> dict[str, Any]:
    return {
        "CustomerAWSAccountId": cust["customer_aws_account_id"],
        "LicenseArn": cust["license_arn"],
        "Dimension": "seats",
        "Quantity": quantity,
        "Timestamp": datetime.fromtimestamp(stamp, UTC),
    }


def test_a_deprovisioned_customer_is_metered_for_the_final_hour_then_not(
    emulator_server: EmulatorServer, emulator: Emulator, sqs: MotoSqs, queue: str
) -> None:
    """License Deprovisioned starts the guide's one-hour final window: the remaining usage is
    accepted inside it, CustomerNotSubscribed after it; the entitlements are revoked at once;
    a new agreement subscribes the customer again."""
    cust = requests.post(
        emulator_server.url + "/_emulator/saas/customers",
        json={"customer_aws_account_id": BUYER},
        timeout=5,
    ).json()
    requests.post(
        emulator_server.url + "/_emulator/entitlements",
        json={
            "product_code": PRODUCT,
            "customer_aws_account_id": BUYER,
            "entitlements": [{"dimension": "seats", "integer": 10}],
        },
        timeout=5,
    ).raise_for_status()
    meter = client(emulator_server)
    now = emulator.now()
    hour = (int(now) // 3600) * 3600
    sent = ok(
        emulator_server,
        queue_url=queue,
        type="license-deprovisioned",
        product_code=PRODUCT,
        customer_aws_account_id=BUYER,
        license_arn=cust["license_arn"],
    )
    assert sent["applied_to"] == [f"{BUYER}/{cust['license_arn']}"]
    inside = meter.batch_meter_usage(UsageRecords=[record(cust, hour + 1, 4)])
    assert [r["Status"] for r in inside["Results"]] == ["Success"]
    ents = requests.get(emulator_server.url + "/_emulator/entitlements", timeout=5).json()
    assert ents["entitlements"][f"{PRODUCT}/{BUYER}"] == []
    # A second deprovisioning (a duplicate event) does not move the window's start.
    ok(
        emulator_server,
        queue_url=queue,
        type="license-deprovisioned",
        product_code=PRODUCT,
        customer_aws_account_id=BUYER,
    )
    emulator.reconfigure({"clock_offset": 3600.0})  # AWS's clock: one hour later
    after = meter.batch_meter_usage(UsageRecords=[record(cust, hour + 3600 + 1, 4)])
    assert [r["Status"] for r in after["Results"]] == ["CustomerNotSubscribed"]
    ok(
        emulator_server,
        queue_url=queue,
        type="purchase-agreement-created",
        product_code=PRODUCT,
        customer_aws_account_id=BUYER,
    )
    again = meter.batch_meter_usage(UsageRecords=[record(cust, hour + 3600 + 2, 4)])
    assert [r["Status"] for r in again["Results"]] == ["Success"]
    assert len(sqs.bodies(queue, 3)) == 3


def test_unsubscribe_success_starts_the_window_for_a_customer_identifier_customer(
    emulator_server: EmulatorServer, emulator: Emulator, queue: str
) -> None:
    cust = requests.post(
        emulator_server.url + "/_emulator/saas/customers",
        json={"customer_identifier": "cust-legacy-9", "product_code": PRODUCT},
        timeout=5,
    ).json()
    sent = ok(
        emulator_server,
        queue_url=queue,
        type="unsubscribe-success",
        product_code=PRODUCT,
        customer_identifier="cust-legacy-9",
    )
    assert sent["applied_to"] == ["cust-legacy-9"]
    ledger = requests.get(emulator_server.url + "/_emulator/saas/ledger", timeout=5).json()
    (shown,) = [c for c in ledger["customers"] if c["customer"] == "cust-legacy-9"]
    assert shown["deprovisioned_at"] is not None
    assert cust["customer_identifier"] == "cust-legacy-9"


def test_a_buyers_events_name_the_agreement_resolve_customer_answers(
    emulator_server: EmulatorServer, emulator: Emulator, sqs: MotoSqs, queue: str
) -> None:
    """AWS names the buyer's agreement in each of its events: without `agreement_id`, every
    event of one buyer and product carries the id ResolveCustomer's Metadata.AgreementId gives
    (a fresh id per event made every Ended look like a renewal's end of another agreement)."""
    cust = requests.post(
        emulator_server.url + "/_emulator/saas/customers",
        json={"customer_aws_account_id": BUYER, "product_code": PRODUCT},
        timeout=5,
    ).json()
    kinds = ("purchase-agreement-created", "purchase-agreement-amended", "purchase-agreement-ended")
    for kind in kinds:
        ok(
            emulator_server,
            queue_url=queue,
            type=kind,
            product_code=PRODUCT,
            customer_aws_account_id=BUYER,
        )
    ok(
        emulator_server,
        queue_url=queue,
        type="license-updated",
        product_code=PRODUCT,
        customer_aws_account_id="111122223333",
    )
    docs = sqs.bodies(queue, 4)
    named = [d["detail"]["agreement"]["id"] for d in docs]
    assert named[:3] == [cust["agreement_id"]] * 3
    assert named[3] != cust["agreement_id"]  # another buyer, another agreement
