"""SaaS buyer lifecycle events: parse one SQS message body into an `Event`, pure (no I/O, no clock).

Two envelope shapes reach the queue (Seller Guide, "Managing SaaS subscription events with Amazon
EventBridge" and "SaaS product notifications"; docs/saas-lifecycle.md):

- EventBridge (source `aws.agreement-marketplace`): `id`, `time`, `detail-type`, `detail`. Agreement
  events carry `detail.agreement.id` (+ `status`, `intent`) and `detail.acceptor.accountId`;
  license events also `detail.product.code` and `detail.license.arn` (the guide's example prints
  the ARN without its leading `arn:`; the license id `l-...` is what is compared).
- The legacy SNS topics delivered to SQS: an SNS envelope (`Type` Notification, `MessageId`,
  `Timestamp`, `Message` = a JSON text) or, with raw message delivery, the message itself:
  `action`, `customer-identifier`, `product-code`, `offer-identifier`, `isFreeTrialTermPresent`.
  SNS messages carry no event id of their own: the envelope's MessageId names them (raw: a digest
  of the body, so the same text twice is the same event).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

SOURCE = "aws.agreement-marketplace"
MAX_BODY = 256 * 1024  # SQS's own message limit
# Customer lifecycle states the local API shows.
STATES = ("subscribed", "pending_unsubscribe", "unsubscribed", "subscribe_failed")
# The Seller Guide: after License Deprovisioned, "a 1-hour final reporting window" for
# BatchMeterUsage; the SNS unsubscribe-pending is the same moment in the older integration.
FINAL_WINDOW = 3600.0
# How far an event's own time may lie after its arrival (SentTimestamp): an event "from the
# future" would outrank every real event of its buyer for good (older never overrides newer).
MAX_AHEAD = 900.0
# No event is older than AWS Marketplace (2012): an earlier time (ISO 8601 allows year 1, which
# is year 0 in UTC for a positive offset) would close the buyer's final window millennia ago
# and break every date shown for it.
EARLIEST = 1_325_376_000.0  # 2012-01-01T00:00:00Z

# detail-type without its role suffix -> what it means here.
_EVENTBRIDGE = {
    "Purchase Agreement Created": "created",
    "Purchase Agreement Amended": "amended",
    "Purchase Agreement Ended": "ended",
    "License Updated": "license_updated",
    "License Deprovisioned": "deprovisioned",
}
_ROLES = ("Manufacturer", "Proposer")
_SNS = {
    "subscribe-success": "subscribe_success",
    "subscribe-fail": "subscribe_fail",
    "unsubscribe-pending": "unsubscribe_pending",
    "unsubscribe-success": "unsubscribe_success",
    "entitlement-updated": "entitlement_updated",
}
# What each kind does to the customer's state (None: no state change, only facts or entitlements).
TRANSITION: dict[str, str | None] = {
    "created": "subscribed",
    "amended": None,
    "ended": "pending_unsubscribe",
    "license_updated": None,
    "deprovisioned": "unsubscribed",
    "subscribe_success": "subscribed",
    "subscribe_fail": "subscribe_failed",
    "unsubscribe_pending": "pending_unsubscribe",
    "unsubscribe_success": "unsubscribed",
    "entitlement_updated": None,
}
# Kinds after which the contract's entitlements are read again (GetEntitlements).
REFRESH = frozenset(
    {"created", "amended", "license_updated", "subscribe_success", "entitlement_updated"}
)
# Kinds that open the final metering window (sealing the customer's open hour at once). The
# EventBridge guide starts it at License Deprovisioned; for the SNS topics, sellers' accounts
# (and hosted vendors) start it at unsubscribe-pending. unsubscribe-success opens one only if
# no unsubscribe-pending was seen (a lost or late message): the earlier window is kept.
FINAL = frozenset({"deprovisioned", "unsubscribe_pending", "unsubscribe_success"})
_ACCOUNT = re.compile(r"\d{12}")
_TEXT = re.compile(r"[\x21-\x7e]{1,2048}")
_LICENSE_ID = re.compile(r"l-[0-9a-zA-Z]+")


class EventError(ValueError):
    """A message that is not a lifecycle event this sidecar understands (dead-lettered)."""


@dataclass(frozen=True)
class Event:
    id: str  # EventBridge `id`, the SNS MessageId, or a digest of a raw SNS body
    kind: str  # a key of TRANSITION
    time: float  # when AWS says it happened (Unix seconds)
    source: str  # "eventbridge" | "sns"
    detail_type: str  # the detail-type or the SNS action, as received
    account_id: str | None = None
    customer_identifier: str | None = None
    agreement_id: str | None = None
    license_arn: str | None = None
    product_code: str | None = None
    offer_id: str | None = None
    free_trial: bool | None = None

    @property
    def subject(self) -> str:
        """Whom the event is about: the buyer's account (EventBridge) or CustomerIdentifier
        (SNS, which names no account). The sidecar meters one product, where an account holds
        one license at a time."""
        return self.account_id or f"ci:{self.customer_identifier}"

    @property
    def state(self) -> str | None:
        return TRANSITION[self.kind]


def license_id(arn: str | None) -> str | None:
    """`l-...` of a license ARN, whether or not it starts with `arn:` (see the module doc)."""
    if not arn:
        return None
    match = _LICENSE_ID.search(arn.rsplit(":", 1)[-1].rsplit("/", 1)[-1])
    return match.group(0) if match else None


def _time(text: Any, field: str) -> float:
    if not isinstance(text, str) or not 10 <= len(text) <= 40:
        raise EventError(f"{field}: an ISO 8601 time is required")
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise EventError(f"{field}: {text[:40]!r} is not an ISO 8601 time") from None
    if stamp.tzinfo is None:
        raise EventError(f"{field}: {text[:40]!r} has no time zone")
    return stamp.timestamp()


def _text(value: Any, field: str, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or _TEXT.fullmatch(value) is None:
        raise EventError(f"{field}: 1-2048 printable characters required")
    return value


def _obj(doc: Any, key: str) -> dict[str, Any]:
    value = doc.get(key) if isinstance(doc, dict) else None
    return value if isinstance(value, dict) else {}


def _bool(value: Any, field: str) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise EventError(f"{field}: true or false")


def parse(body: str, received_at: float) -> Event:
    """One SQS message body -> Event, or EventError naming what is wrong. `received_at` (the
    queue's SentTimestamp) dates a raw SNS message, which carries no time of its own."""
    if len(body.encode()) > MAX_BODY:
        raise EventError(f"body over {MAX_BODY} bytes")
    doc = _json(body, "body")
    if not isinstance(doc, dict):
        raise EventError("body is not a JSON object")
    if "detail-type" in doc or doc.get("source") == SOURCE:
        return _ahead(_eventbridge(doc), received_at)
    if doc.get("Type") == "Notification" and "Message" in doc:
        message = doc.get("Message")
        if not isinstance(message, str):
            raise EventError("Message: the SNS notification's text is required")
        inner = _json(message, "Message")
        event_id = _text(doc.get("MessageId"), "MessageId", required=True)
        assert event_id is not None  # nosec B101 # narrowing: required
        return _ahead(_sns(inner, event_id, _time(doc.get("Timestamp"), "Timestamp")), received_at)
    if "action" in doc:
        # Raw message delivery: no envelope, no id, no time of AWS's own.
        digest = hashlib.sha256(body.encode()).hexdigest()[:32]
        return _sns(doc, f"raw-{digest}", received_at)
    raise EventError("neither an EventBridge event nor an SNS notification")


def _json(text: str, field: str) -> Any:
    """json.loads, every failure an EventError: deep nesting raises RecursionError, which
    would otherwise escape the consumer and stop it."""
    try:
        return json.loads(text)
    except RecursionError:
        raise EventError(f"{field}: JSON nested too deeply") from None
    except ValueError:
        raise EventError(f"{field}: not JSON" if field != "body" else "body is not JSON") from None


def _ahead(event: Event, received_at: float) -> Event:
    if event.time > received_at + MAX_AHEAD:
        raise EventError(
            f"time: {event.time - received_at:.0f} s after the message arrived (future events "
            f"are refused beyond {MAX_AHEAD:.0f} s)"
        )
    if event.time < EARLIEST:
        raise EventError(f"time: {iso_text(event.time)} is before any AWS Marketplace event (2012)")
    return event


def iso_text(t: float) -> str:
    """A time for an error message, whatever its year (datetime has none before year 1)."""
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return f"{t:.0f} s from 1970"


def _eventbridge(doc: dict[str, Any]) -> Event:
    if doc.get("source") != SOURCE:
        raise EventError(f"source: {SOURCE} expected, got {str(doc.get('source'))[:60]!r}")
    detail_type = doc.get("detail-type")
    if not isinstance(detail_type, str):
        raise EventError("detail-type: a string is required")
    name, _, role = detail_type.rpartition(" - ")
    if role not in _ROLES or name not in _EVENTBRIDGE:
        raise EventError(f"detail-type: {detail_type[:80]!r} is not a SaaS lifecycle event")
    event_id = _text(doc.get("id"), "id", required=True)
    assert event_id is not None  # nosec B101 # narrowing: required
    detail = _obj(doc, "detail")
    agreement = _obj(detail, "agreement")
    account = _text(_obj(detail, "acceptor").get("accountId"), "detail.acceptor.accountId")
    if account is None or _ACCOUNT.fullmatch(account) is None:
        raise EventError("detail.acceptor.accountId: the buyer's 12-digit account id is required")
    return Event(
        id=event_id,
        kind=_EVENTBRIDGE[name],
        time=_time(doc.get("time"), "time"),
        source="eventbridge",
        detail_type=detail_type,
        account_id=account,
        agreement_id=_text(agreement.get("id"), "detail.agreement.id"),
        license_arn=_text(_obj(detail, "license").get("arn"), "detail.license.arn"),
        product_code=_text(_obj(detail, "product").get("code"), "detail.product.code"),
        offer_id=_text(_obj(detail, "offer").get("id"), "detail.offer.id"),
    )


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _sns(doc: Any, event_id: str, at: float) -> Event:
    if not isinstance(doc, dict):
        raise EventError("Message: a JSON object is required")
    action = doc.get("action")
    if not isinstance(action, str) or action not in _SNS:
        # A value that is not text is named by its JSON type only: it may hold anything.
        got = repr(action[:60]) if isinstance(action, str) else f"a JSON {_kind(action)}"
        raise EventError(f"action: one of {', '.join(_SNS)} expected, got {got}")
    customer = _text(doc.get("customer-identifier"), "customer-identifier", required=True)
    return Event(
        id=event_id,
        kind=_SNS[str(action)],
        time=at,
        source="sns",
        detail_type=str(action),
        customer_identifier=customer,
        product_code=_text(doc.get("product-code"), "product-code"),
        offer_id=_text(doc.get("offer-identifier"), "offer-identifier"),
        free_trial=_bool(doc.get("isFreeTrialTermPresent"), "isFreeTrialTermPresent"),
    )


# Within one customer, events of the same second: the later step of the lifecycle wins.
RANK = {
    None: 0,
    "subscribed": 1,
    "subscribe_failed": 1,
    "pending_unsubscribe": 2,
    "unsubscribed": 3,
}


def newer(
    event_time: float, state: str | None, known_time: float | None, known_state: str | None
) -> bool:
    """Whether a state change at `event_time` overrides the one known (at `known_time`): events
    arrive twice and out of order, and an older one never overrides a newer state."""
    if known_time is None:
        return True
    if event_time != known_time:
        return event_time > known_time
    return RANK.get(state, 0) > RANK.get(known_state, 0)
