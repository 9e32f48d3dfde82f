"""SaaS lifecycle events for tests: what AWS Marketplace puts on a seller's SQS queue.

`POST /_emulator/saas/events` builds one event (`build`, pure), sends it with botocore to the SQS
queue the test names (moto's server-mode SQS on loopback; any other host is refused), and applies
it to the emulator's ledger (`Effect`).

Shapes (sources):
- EventBridge (Seller Guide, "Managing SaaS subscription events with Amazon EventBridge" and
  "Amazon EventBridge events": source `aws.agreement-marketplace`, the default bus in
  us-east-1; detail-types "Purchase Agreement Created|Amended|Ended - Manufacturer|Proposer",
  "License Updated - Manufacturer", "License Deprovisioned - Manufacturer"). The envelope is
  EventBridge's own (`version`, `id`, `detail-type`, `source`, `account` = the seller,
  `time`, `region`, `resources`, `detail`); the detail carries `requestId`, `catalog`,
  `agreement.id|intent|status`, `acceptor.accountId` (the buyer), `proposer.accountId`,
  `offer.id`, `product.id|code`, and for license events `license.arn`.
- Legacy SNS (Seller Guide, "SaaS product notifications" / "Amazon SNS notifications"):
  topic `aws-mp-subscription-notification-<product code>` with `action` subscribe-success,
  subscribe-fail, unsubscribe-pending, unsubscribe-success, `customer-identifier`,
  `product-code`, `offer-identifier` (subscribe-* only) and `isFreeTrialTermPresent`; topic
  `aws-mp-entitlement-notification-<product code>` with `action` entitlement-updated. Delivered
  to SQS inside SNS's envelope (`Type` Notification, `MessageId`, `TopicArn`, `Message` = the
  JSON text, `Timestamp`, `SignatureVersion`, `Signature`, `SigningCertURL`,
  `UnsubscribeURL`), or bare with raw message delivery (`raw`: true).

Ledger effects: License Deprovisioned and unsubscribe-success start the customer's final
window (the guide: one hour to send the remaining usage; `saas.FINAL_WINDOW`) and revoke its
entitlements; Purchase Agreement Created and subscribe-success subscribe it again.
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

SOURCE = "aws.agreement-marketplace"
REGION = "us-east-1"
SELLER_ACCOUNT = "111122223333"
# Placeholder owner account of the legacy topics (the real one is in the product's AMMP page).
TOPIC_ACCOUNT = "123456789012"
EVENTBRIDGE = {
    "purchase-agreement-created": "Purchase Agreement Created",
    "purchase-agreement-amended": "Purchase Agreement Amended",
    "purchase-agreement-ended": "Purchase Agreement Ended",
    "license-updated": "License Updated",
    "license-deprovisioned": "License Deprovisioned",
}
SUBSCRIPTION_ACTIONS = (
    "subscribe-success",
    "subscribe-fail",
    "unsubscribe-pending",
    "unsubscribe-success",
)
ENTITLEMENT_ACTIONS = ("entitlement-updated",)
TYPES = (*EVENTBRIDGE, *SUBSCRIPTION_ACTIONS, *ENTITLEMENT_ACTIONS)
ROLES = ("Manufacturer", "Proposer")
# Events that start the final window / subscribe again, for the emulator's ledger.
DEPROVISIONING = frozenset({"license-deprovisioned", "unsubscribe-success"})
SUBSCRIBING = frozenset({"purchase-agreement-created", "subscribe-success"})
_STATUS = {
    "purchase-agreement-created": "ACTIVE",
    "purchase-agreement-amended": "ACTIVE",
    "purchase-agreement-ended": "CANCELLED",
}


@dataclass(frozen=True)
class Built:
    type: str
    event_id: str
    body: str
    account_id: str | None
    customer_identifier: str | None
    product_code: str


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso_ms(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _str(spec: dict[str, Any], name: str, default: str | None = None) -> str | None:
    value = spec.get(name, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a non-empty string")
    return value


def build(spec: dict[str, Any], now: float) -> Built:
    """One event's SQS message body from a test's spec (ValueError names a bad field).

    spec: `type` (one of TYPES), `product_code`, and per shape: EventBridge needs
    `customer_aws_account_id` (+ `agreement_id`, `license_arn`, `offer_id`, `role`,
    `intent`, `status`); SNS needs `customer_identifier` (+ `offer_id`, `free_trial`, `raw`).
    `id` repeats an event (the same id twice); `time` (Unix seconds) dates it, default now.
    """
    kind = spec.get("type")
    if kind not in TYPES:
        raise ValueError(f"type must be one of {', '.join(TYPES)}")
    product = _str(spec, "product_code")
    if product is None:
        raise ValueError("product_code is required")
    at = spec.get("time", now)
    if not isinstance(at, (int, float)) or isinstance(at, bool):
        raise ValueError("time must be Unix seconds")
    event_id = _str(spec, "id") or str(uuid.uuid4())
    if kind in EVENTBRIDGE:
        account = _str(spec, "customer_aws_account_id")
        if account is None or not (account.isdigit() and len(account) == 12):
            raise ValueError(
                "customer_aws_account_id (12 digits) is required for EventBridge events"
            )
        role = spec.get("role", "Manufacturer")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        agreement = _str(spec, "agreement_id", "agmt-" + uuid.uuid4().hex[:25])
        detail: dict[str, Any] = {
            "requestId": str(uuid.uuid4()),
            "catalog": "AWSMarketplace",
            "agreement": {"id": agreement},
            "acceptor": {"accountId": account},
            "proposer": {"accountId": SELLER_ACCOUNT},
            "product": {"id": f"prod-{product[:20]}", "code": product},
        }
        if kind in _STATUS:
            detail["agreement"]["status"] = _str(spec, "status", _STATUS[kind])
            detail["agreement"]["intent"] = _str(spec, "intent", "NEW")
        offer = _str(spec, "offer_id")
        if offer is not None:
            detail["offer"] = {"id": offer}
        license_arn = _str(spec, "license_arn")
        if license_arn is not None:
            detail["license"] = {"arn": license_arn}
        doc = {
            "version": "0",
            "id": event_id,
            "detail-type": f"{EVENTBRIDGE[kind]} - {role}",
            "source": SOURCE,
            "account": SELLER_ACCOUNT,
            "time": _iso(float(at)),
            "region": REGION,
            # The buyer guide's example event prints the agreement's ARN this way.
            "resources": [f"arn:aws:aws-marketplace::agreement:{agreement}"],
            "detail": detail,
        }
        return Built(kind, event_id, json.dumps(doc), account, None, product)
    ident = _str(spec, "customer_identifier")
    if ident is None:
        raise ValueError("customer_identifier is required for SNS notifications")
    message: dict[str, Any] = {
        "action": kind,
        "customer-identifier": ident,
        "product-code": product,
    }
    if kind in ("subscribe-success", "subscribe-fail"):
        message["offer-identifier"] = _str(spec, "offer_id", "offer-" + uuid.uuid4().hex[:13])
    if kind in SUBSCRIPTION_ACTIONS:
        free = spec.get("free_trial", False)
        if not isinstance(free, bool):
            raise ValueError("free_trial must be true or false")
        message["isFreeTrialTermPresent"] = "true" if free else "false"
    text = json.dumps(message)
    if spec.get("raw"):
        return Built(kind, event_id, text, None, ident, product)
    topic = (
        "aws-mp-entitlement-notification"
        if kind in ENTITLEMENT_ACTIONS
        else "aws-mp-subscription-notification"
    )
    topic_arn = f"arn:aws:sns:{REGION}:{TOPIC_ACCOUNT}:{topic}-{product}"
    envelope = {
        "Type": "Notification",
        "MessageId": event_id,
        "TopicArn": topic_arn,
        "Message": text,
        "Timestamp": _iso_ms(float(at)),
        "SignatureVersion": "1",
        "Signature": "EMULATED",
        "SigningCertURL": f"https://sns.{REGION}.amazonaws.com/SimpleNotificationService-emulated.pem",
        "UnsubscribeURL": f"https://sns.{REGION}.amazonaws.com/?Action=Unsubscribe&SubscriptionArn={topic_arn}:emulated",
    }
    return Built(kind, event_id, json.dumps(envelope), None, ident, product)


def loopback_queue(url: Any) -> str:
    """The queue URL if its host is a loopback address (tests only); ValueError otherwise."""
    if not isinstance(url, str):
        raise ValueError("queue_url must be the SQS queue's URL")
    parsed = urlparse(url)
    host = parsed.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parsed.scheme not in ("http", "https") or not loopback:
        raise ValueError(
            "queue_url must be an http URL on a loopback address (moto's SQS in tests)"
        )
    return url


def send(queue_url: str, bodies: list[str]) -> list[str]:
    """Send each body to the queue with botocore (dummy credentials: moto checks none); the ids."""
    import botocore.session
    from botocore.config import Config

    parsed = urlparse(queue_url)
    client: Any = botocore.session.get_session().create_client(
        "sqs",
        region_name=REGION,
        endpoint_url=f"{parsed.scheme}://{parsed.netloc}",
        aws_access_key_id="emulator",
        aws_secret_access_key="emulator",  # noqa: S106  # nosec B106 # moto checks no credentials
        config=Config(retries={"total_max_attempts": 2}, connect_timeout=5, read_timeout=10),
    )
    try:
        return [
            str(client.send_message(QueueUrl=queue_url, MessageBody=body)["MessageId"])
            for body in bodies
        ]
    finally:
        client.close()
