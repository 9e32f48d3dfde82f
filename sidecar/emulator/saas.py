"""ResolveCustomer and BatchMeterUsage as AWS documents them, for the emulator.

Customers and their registration tokens exist only because a test asked for them
(`issue`). ResolveCustomer answers the tokens issued here: the same customer for as long as
the token lives, ExpiredTokenException after its ttl, InvalidTokenException for anything else.

BatchMeterUsage (seller guide and API reference):
- at most 25 records, a body under 1 MB (1,000,000 bytes, the stricter reading of the unit);
- never CustomerIdentifier and CustomerAWSAccountId in one request; ProductCode is required
  with CustomerIdentifier records. With license records the model only advises against it
  ("do NOT include ProductCode ... Sending metering records with both ProductCode and
  LicenseArn for the same customer within the same hour will result in duplicate billing"):
  accepted, and such a record is metered in the product's scope, apart from the same
  customer's license-scoped record of that hour, so the ledger shows the duplicate billing
  (counted as `product_code_with_license`);
- one record per product, customer, dimension and hour. The same record again (same
  quantity, after rounding the time to the hour) is Success with the same MeteringRecordId,
  in any grouping; another quantity is DuplicateRecord and the original quantity stays;
- an unknown or unsubscribed customer is CustomerNotSubscribed; a deprovisioned one (License
  Deprovisioned or unsubscribe-success through `POST /_emulator/saas/events`) keeps being
  metered for FINAL_WINDOW after the event (the guide: one hour to send the remaining usage),
  then is CustomerNotSubscribed;
- quantities are exact and compared by value (`Quantity` 17 = `QuantityAsDecimal` "17.00");
  a record naming both is refused, and so is the whole request ("If any usage record fails
  these checks, the entire BatchMeterUsage request fails and no records are processed");
- one timestamp 24 hours old or more (`window`), or of the previous month once the month's
  grace (`month_grace`, 06:00 UTC on the 1st) has passed, or ahead of `future_limit`, rejects
  the whole call with TimestampOutOfBoundsException;
- `unprocessed` picks records answered as UnprocessedRecords (not recorded; resend them).

Pure apart from the lock its owner holds: the caller passes the time and the dice.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import math
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sidecar.core import quantity as qty
from sidecar.emulator.meter import (
    HOUR,
    RECORD_FIELDS,
    Answer,
    _allocations,
    _timestamp,
    error,
    quantity_of,
)

# BatchMeterUsage: "Usage records aren't accepted 24 hours or more after an event" and "We
# accept usage records for the previous billing month until 06:00 UTC on the first day of the
# next month" (the pinned model's operation documentation).
BATCH_WINDOW = 24 * HOUR
MONTH_GRACE = 6 * HOUR
AGREEMENT_RE = re.compile(r"[A-Za-z0-9_/-]{1,64}")  # the model's AgreementId shape

# Seller Guide ("Managing SaaS subscription events with Amazon EventBridge"): after License
# Deprovisioned the seller has one hour to meter the remaining usage.
FINAL_WINDOW = HOUR
MAX_RECORDS = 25
MAX_BODY_BYTES = 1_000_000
DEFAULT_TTL = 3600.0
DEFAULT_PRODUCT = "prod-saas-emulated"
COUNTS = (
    "calls",
    "records",
    "duplicate_record",
    "customer_not_subscribed",
    "unprocessed",
    "throttled",
    "out_of_bounds_batches",
)


@dataclass
class Customer:
    style: str  # "license" | "customer_identifier"
    account_id: str
    product_code: str
    license_arn: str | None = None
    customer_identifier: str | None = None
    subscribed: bool = True
    agreement_id: str = ""
    deprovisioned_at: float | None = None  # emulator time of License Deprovisioned

    def __post_init__(self) -> None:
        if not self.agreement_id:
            self.agreement_id = default_agreement_id(self.key)

    @property
    def key(self) -> str:
        if self.style == "license":
            return f"{self.account_id}/{self.license_arn}"
        return str(self.customer_identifier)

    def resolved(self) -> dict[str, Any]:
        """ResolveCustomer's answer: new integrations get no CustomerIdentifier."""
        answer: dict[str, Any] = {
            "CustomerAWSAccountId": self.account_id,
            "ProductCode": self.product_code,
            "Metadata": {"AgreementId": self.agreement_id},
        }
        if self.license_arn is not None:
            answer["LicenseArn"] = self.license_arn
        if self.customer_identifier is not None:
            answer["CustomerIdentifier"] = self.customer_identifier
        return answer

    def fields(self) -> dict[str, Any]:
        return {
            "customer": self.key,
            "identity": self.style,
            "customer_aws_account_id": self.account_id,
            "license_arn": self.license_arn,
            "customer_identifier": self.customer_identifier,
            "product_code": self.product_code,
            "subscribed": self.subscribed,
            "agreement_id": self.agreement_id,
            "deprovisioned_at": self.deprovisioned_at,
        }


def default_agreement_id(key: str) -> str:
    """A stable agreement id per customer (the same customer key, the same id on every run),
    shaped like AWS's `agmt-…` ids and inside the model's AgreementId pattern."""
    return "agmt-" + hashlib.sha256(key.encode()).hexdigest()[:25]


def batch_out_of_bounds(stamp: float, now: float, window: float, month_grace: float) -> bool:
    """BatchMeterUsage's window: `window` or more old, or of an earlier month than `now`'s once
    `month_grace` has passed since `now`'s month began (06:00 UTC on the 1st for AWS)."""
    if now - stamp >= window:
        return True
    then, current = datetime.fromtimestamp(stamp, UTC), datetime.fromtimestamp(now, UTC)
    if (then.year, then.month) == (current.year, current.month):
        return False
    month_start = calendar.timegm((current.year, current.month, 1, 0, 0, 0))
    return stamp < month_start and now >= month_start + month_grace


def _kept_allocations(value: str) -> list[Any]:
    """An entry's allocations (Entry.value: [quantity, canonical allocations or ""])."""
    kept = json.loads(value)[1]
    return list(json.loads(kept)) if kept else []


@dataclass
class Entry:
    customer: str
    product_code: str
    dimension: str
    hour: int
    quantity: int  # micro-units
    value: str  # canonical quantity and allocations, by value
    metering_record_id: str
    recorded_at: float
    repeats: int = 0
    scope: str = "license"  # "product" when the request named ProductCode


class SaasBook:
    """Customers, registration tokens and every BatchMeterUsage record accepted."""

    def __init__(self) -> None:
        self.customers: dict[str, Customer] = {}
        self.licenses: dict[str, Customer] = {}  # LicenseArn -> its customer
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (customer key, expires at)
        self.entries: dict[tuple[str, str, str, str, int], Entry] = {}
        self.counts: dict[str, int] = dict.fromkeys(COUNTS, 0)
        self.final_window = FINAL_WINDOW

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    # -- test set-up ----------------------------------------------------------------------

    def issue(self, spec: dict[str, Any], now: float) -> dict[str, Any]:
        """Create (or update) a customer and issue a registration token for it.

        ValueError names the field when the spec is malformed.
        """
        known = {
            "customer_aws_account_id",
            "license_arn",
            "customer_identifier",
            "product_code",
            "subscribed",
            "token_ttl_seconds",
            "identity",
            "agreement_id",
        }
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        identity = spec.get("identity")
        if identity is None:
            identity = "customer_identifier" if spec.get("customer_identifier") else "license"
        if identity not in ("license", "customer_identifier"):
            raise ValueError("identity must be 'license' or 'customer_identifier'")
        ttl = spec.get("token_ttl_seconds", DEFAULT_TTL)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not ttl > 0:
            raise ValueError("token_ttl_seconds must be a number > 0")
        subscribed = spec.get("subscribed", True)
        if not isinstance(subscribed, bool):
            raise ValueError("subscribed must be true or false")
        for name in ("customer_aws_account_id", "license_arn", "customer_identifier"):
            if name in spec and (not isinstance(spec[name], str) or not spec[name]):
                raise ValueError(f"{name} must be a non-empty string")
        account = spec.get("customer_aws_account_id") or "".join(
            str(secrets.randbelow(10)) for _ in range(12)
        )
        if not account.isdigit():
            raise ValueError("customer_aws_account_id must be digits")
        agreement = spec.get("agreement_id")
        if agreement is not None and (
            not isinstance(agreement, str) or not AGREEMENT_RE.fullmatch(agreement)
        ):
            raise ValueError("agreement_id must be 1-64 characters of A-Z a-z 0-9 _ / -")
        product = spec.get("product_code") or DEFAULT_PRODUCT
        if identity == "license":
            license_arn = spec.get("license_arn") or (
                f"arn:aws:license-manager::{account}:license:l-{secrets.token_hex(16)}"
            )
            customer = Customer("license", account, product, license_arn=license_arn)
        else:
            ident = spec.get("customer_identifier") or f"cust-{secrets.token_hex(8)}"
            customer = Customer(
                "customer_identifier",
                account,
                product,
                license_arn=spec.get("license_arn"),
                customer_identifier=ident,
            )
        owner = self._license_owner(customer.license_arn or "")
        if owner is not None and owner.account_id != account:
            raise ValueError("license_arn belongs to another customer_aws_account_id")
        existing = self.customers.get(customer.key)
        if existing is not None:
            customer = existing
        if agreement is not None:
            customer.agreement_id = agreement
        customer.subscribed = subscribed
        self.customers[customer.key] = customer
        if customer.license_arn is not None:
            self.licenses[customer.license_arn] = customer
        token = secrets.token_urlsafe(48)
        self.tokens[token] = (customer.key, now + float(ttl))
        return {"registration_token": token, "expires_at": now + float(ttl), **customer.fields()}

    def agreement_of(self, account: str, product: str) -> str:
        """The agreement a buyer's events name: the one ResolveCustomer answers for that
        account and product (a stable id when the buyer was never issued a token)."""
        for customer in self.customers.values():
            if customer.account_id == account and customer.product_code == product:
                return customer.agreement_id
        return default_agreement_id(f"{account}/{product}")

    def unsubscribe(self, spec: dict[str, Any]) -> list[str]:
        """Mark customers unsubscribed; their keys. ValueError when nothing matches."""
        account = spec.get("customer_aws_account_id")
        ident = spec.get("customer_identifier")
        license_arn = spec.get("license_arn")
        if not any((account, ident, license_arn)):
            raise ValueError("name customer_aws_account_id, license_arn or customer_identifier")
        hit = [
            c
            for c in self.customers.values()
            if (account is None or c.account_id == account)
            and (ident is None or c.customer_identifier == ident)
            and (license_arn is None or c.license_arn == license_arn)
        ]
        if not hit:
            raise ValueError("no such customer")
        for c in hit:
            c.subscribed = False
        return [c.key for c in hit]

    def lifecycle(
        self,
        *,
        deprovision: bool,
        account: str | None,
        customer_identifier: str | None,
        product: str,
        now: float,
    ) -> list[str]:
        """Apply a lifecycle event to the matching customers: deprovision (the final window
        starts now) or subscribe again. Their keys (none: the event names no known customer)."""
        hit = [
            c
            for c in self.customers.values()
            if c.product_code == product
            and (account is None or c.account_id == account)
            and (customer_identifier is None or c.customer_identifier == customer_identifier)
        ]
        for c in hit:
            if deprovision:
                if c.deprovisioned_at is None:
                    c.deprovisioned_at = now
            else:
                c.deprovisioned_at = None
                c.subscribed = True
        return [c.key for c in hit]

    def _license_owner(self, license_arn: str) -> Customer | None:
        return self.licenses.get(license_arn)

    # -- ResolveCustomer ------------------------------------------------------------------

    def resolve(self, params: dict[str, Any], now: float) -> Answer:
        token = params.get("RegistrationToken")
        seen = self.tokens.get(token) if isinstance(token, str) else None
        if seen is None:
            return error("InvalidTokenException", "Registration token is invalid")
        key, expires_at = seen
        if now >= expires_at:
            return error("ExpiredTokenException", "Registration token has expired")
        return 200, self.customers[key].resolved()

    # -- BatchMeterUsage ------------------------------------------------------------------

    def batch(
        self,
        params: dict[str, Any],
        now: float,
        *,
        dimensions: list[str] | None,
        product_codes: list[str] | None,
        future_limit: float,
        unprocessed: Callable[[], bool],
        window: float = BATCH_WINDOW,
        month_grace: float = MONTH_GRACE,
    ) -> Answer:
        """One validated BatchMeterUsage call (model checks done by the caller)."""
        records = params.get("UsageRecords") or []
        if len(records) > MAX_RECORDS:
            return error(
                "ValidationException",
                f"1 validation error detected: Value at 'usageRecords' failed to satisfy "
                f"constraint: Member must have length less than or equal to {MAX_RECORDS} "
                f"(got {len(records)})",
            )
        problem = self._check(
            params, records, now, dimensions, product_codes, future_limit, window, month_grace
        )
        if problem is not None:
            if problem[1].get("__type") == "TimestampOutOfBoundsException":
                self.count("out_of_bounds_batches")
            return problem
        results: list[dict[str, Any]] = []
        unprocessed_records: list[dict[str, Any]] = []
        for record in records:
            if unprocessed():
                self.count("unprocessed")
                unprocessed_records.append(record)
                continue
            results.append(self._one(params.get("ProductCode"), record, now))
        return 200, {"Results": results, "UnprocessedRecords": unprocessed_records}

    def _check(
        self,
        params: dict[str, Any],
        records: list[dict[str, Any]],
        now: float,
        dimensions: list[str] | None,
        product_codes: list[str] | None,
        future_limit: float,
        window: float = BATCH_WINDOW,
        month_grace: float = MONTH_GRACE,
    ) -> Answer | None:
        """The request's own validity, all or nothing: an error, or None."""
        by_identifier = [i for i, r in enumerate(records) if "CustomerIdentifier" in r]
        by_account = [
            i for i, r in enumerate(records) if "CustomerAWSAccountId" in r or "LicenseArn" in r
        ]
        if by_identifier and by_account:
            return error(
                "ValidationException",
                "CustomerIdentifier and CustomerAWSAccountId/LicenseArn cannot be used in the "
                f"same request (records {by_identifier[:3]} and {by_account[:3]})",
            )
        product = params.get("ProductCode")
        if by_identifier and product is None:
            return error(
                "ValidationException", "ProductCode is required with CustomerIdentifier records"
            )
        if product is not None and product_codes is not None and product not in product_codes:
            return error("InvalidProductCodeException", "product code not found")
        for i, r in enumerate(records):
            if "CustomerIdentifier" not in r and not (
                "CustomerAWSAccountId" in r and "LicenseArn" in r
            ):
                return error(
                    "ValidationException",
                    f"record {i} needs CustomerIdentifier, or CustomerAWSAccountId and LicenseArn",
                )
            if "LicenseArn" in r:
                owner = self._license_owner(str(r["LicenseArn"]))
                if owner is not None and owner.account_id != r.get("CustomerAWSAccountId"):
                    return error(
                        "InvalidLicenseException",
                        f"record {i}: the LicenseArn belongs to another customer",
                    )
            if dimensions is not None and r.get("Dimension") not in dimensions:
                return error(
                    "InvalidUsageDimensionException", f"record {i}: dimension is not published"
                )
            where = f"usageRecords.{i + 1}.member"
            micros, kind, problem = quantity_of(r, RECORD_FIELDS, where)
            if problem is None:
                _, problem = _allocations(r, micros, kind, f"{where}.usageAllocations")
            if problem is not None:
                return problem
        for i, r in enumerate(records):
            stamp = _timestamp(r.get("Timestamp"))
            if stamp is None or not math.isfinite(stamp):
                return error("ValidationException", f"record {i}: Timestamp is not a timestamp")
            if stamp > now + future_limit or batch_out_of_bounds(stamp, now, window, month_grace):
                return error(
                    "TimestampOutOfBoundsException",
                    f"record {i}: Timestamp must be less than {window / HOUR:g} hours old, of "
                    "this billing month (or the previous one until the grace ends) and not in "
                    "the future; the whole request is rejected",
                )
        return None

    def _one(self, product: str | None, record: dict[str, Any], now: float) -> dict[str, Any]:
        if "CustomerIdentifier" in record:
            key = str(record["CustomerIdentifier"])
        else:
            key = f"{record['CustomerAWSAccountId']}/{record['LicenseArn']}"
        customer = self.customers.get(key)
        if (
            customer is None
            or not customer.subscribed
            or (product is not None and customer.product_code != product)
            or (
                customer.deprovisioned_at is not None
                and now >= customer.deprovisioned_at + self.final_window
            )
        ):
            self.count("customer_not_subscribed")
            return {"UsageRecord": record, "Status": "CustomerNotSubscribed"}
        quantity, kind, _ = quantity_of(record, RECORD_FIELDS, "record")
        allocations, _ = _allocations(record, quantity, kind)
        value = json.dumps([quantity, allocations])  # by value, whichever field carried it
        stamp = _timestamp(record["Timestamp"])
        assert stamp is not None  # nosec B101 # _check refused it otherwise
        # The scope AWS deduplicates in: (ProductCode, customer) for requests naming the
        # product, (account, LicenseArn) for license records sent without it.
        scope = "product" if product is not None else "license"
        hour = math.floor(stamp / HOUR)
        dedup = (scope, customer.product_code, key, str(record["Dimension"]), hour)
        entry = self.entries.get(dedup)
        if entry is None:
            entry = Entry(
                customer=key,
                product_code=customer.product_code,
                dimension=dedup[3],
                hour=hour,
                quantity=quantity,
                value=value,
                metering_record_id=str(uuid.uuid4()),
                recorded_at=now,
                scope=scope,
            )
            self.entries[dedup] = entry
            self.count("records")
            if scope == "product" and customer.license_arn is not None and "LicenseArn" in record:
                self.count("product_code_with_license")
        elif entry.value != value:
            self.count("duplicate_record")
            return {"UsageRecord": record, "Status": "DuplicateRecord"}
        else:
            entry.repeats += 1
            self.count("idempotent_repeat")
        self.count("success")
        return {
            "UsageRecord": record,
            "MeteringRecordId": entry.metering_record_id,
            "Status": "Success",
        }

    def ledger(self) -> dict[str, Any]:
        return {
            "records": [
                {
                    "customer": e.customer,
                    "product_code": e.product_code,
                    "dimension": e.dimension,
                    "hour": e.hour,
                    "quantity": qty.to_json(e.quantity),
                    "quantity_micros": e.quantity,
                    # [[quantity, [[key, value], ...]], ...] as AWS keeps them, by value
                    "allocations": _kept_allocations(e.value),
                    "metering_record_id": e.metering_record_id,
                    "repeats": e.repeats,
                    "scope": e.scope,
                    "recorded_at": e.recorded_at,  # emulator time: billed inside a window?
                }
                for e in self.entries.values()
            ],
            "counts": dict(self.counts),
            "customers": [c.fields() for c in self.customers.values()],
        }
