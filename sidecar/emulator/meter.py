"""MeterUsage as AWS documents it, per pod (the access key id), for the emulator.

- Timestamp rounded down to the hour; one record per pod, dimension and hour.
- The identical request again (after rounding) is idempotent: the same MeteringRecordId.
- The same hour with another quantity or allocations: DuplicateRequestException.
- A ClientToken reused with other parameters: IdempotencyConflictException.
- More than `window` old (AWS: six hours), or further ahead than `future_limit`:
  TimestampOutOfBoundsException.
- Quantities are exact (integer micro-units, `sidecar.core.quantity`) and compared by value:
  `UsageQuantity` 17 and `UsageQuantityAsDecimal` "17.00" are one quantity; a request naming
  both fields is a ValidationException, and allocations must use the record's kind.
- Published dimensions only; allocations must sum to the quantity, 0-5 tags each (the model:
  "For the bucket of items with no tags, this parameter can be left out"), AWS's tag pattern
  and lengths, no two allocations with the same tag set.

Pure apart from the lock its owner holds: the caller passes the time.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, fields
from typing import Any

from sidecar.core import quantity as qty

HOUR = 3600
WINDOW = 6 * HOUR  # MeterUsage: "up to six hours in the past"
MAX_QUANTITY = 2147483647
# (integer field, decimal field) of a MeterUsage request, a usage record, an allocation
METER_FIELDS = ("UsageQuantity", "UsageQuantityAsDecimal")
RECORD_FIELDS = ("Quantity", "QuantityAsDecimal")
ALLOCATION_FIELDS = ("AllocatedUsageQuantity", "AllocatedUsageQuantityAsDecimal")
MAX_ALLOCATIONS = 2500
TAG_RE = re.compile(r"[a-zA-Z0-9+ -=._:\/@]+")  # fullmatch, as AWS: not `$`

Answer = tuple[int, dict[str, Any]]


def error(code: str, message: str) -> Answer:
    return (500 if code == "InternalServiceErrorException" else 400), {
        "__type": code,
        "message": message,
    }


@dataclass
class LedgerEntry:
    pod: str
    dimension: str
    hour: int
    quantity: int  # micro-units (`sidecar.core.quantity`); the ledger shows it as AWS bills it
    allocations: str  # canonical JSON [[quantity, [[key, value], ...]], ...], "" when none
    timestamp: float
    client_token: str | None
    metering_record_id: str
    recorded_at: float
    repeats: int = 0

    def shown(self) -> dict[str, Any]:
        """The entry as `/_emulator/ledger` shows it: `quantity` a JSON integer when whole (as
        before decimals), else the exact decimal string; `quantity_micros` always an int."""
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["quantity"] = qty.to_json(self.quantity)
        doc["quantity_micros"] = self.quantity
        return doc


def _timestamp(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        from datetime import datetime

        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def validation(message: str) -> Answer:
    return error("ValidationException", f"1 validation error detected: {message}")


def quantity_of(
    obj: dict[str, Any], names: tuple[str, str], where: str
) -> tuple[int, str | None, Answer | None]:
    """(micro-units, kind, error) of one record: kind "integer", "decimal", or None when the
    record names neither field (AWS: "Defaults to 0"). Both fields at once is refused."""
    whole, decimal = names
    if whole in obj and decimal in obj:
        return 0, None, validation(f"{where}: specify {whole} or {decimal}, not both")
    if decimal in obj:
        try:
            return qty.parse(str(obj[decimal])), "decimal", None
        except qty.QuantityError:
            return (
                0,
                None,
                validation(
                    f"Value at '{where}.{decimal}' failed to satisfy constraint: Member must "
                    f"satisfy regular expression pattern: ^{qty.DECIMAL_PATTERN}$"
                ),
            )
    value = obj.get(whole, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_QUANTITY:
        return 0, None, validation(f"{where}.{whole} must be 0..{MAX_QUANTITY}")
    return value * qty.SCALE, ("integer" if whole in obj else None), None


def _allocations(
    params: dict[str, Any], micros: int, kind: str | None, where: str = "usageAllocations"
) -> tuple[str, Answer | None]:
    """Canonical allocations (by value), or the error AWS gives for them."""
    allocs = params.get("UsageAllocations")
    if allocs is None:
        return "", None
    if not isinstance(allocs, list) or not 1 <= len(allocs) <= MAX_ALLOCATIONS:
        return "", error("InvalidUsageAllocationsException", "1 to 2500 allocations")
    seen: set[str] = set()
    total = 0
    canonical: list[tuple[int, list[tuple[str, str]]]] = []
    kinds: set[str] = set()
    for i, a in enumerate(allocs, 1):
        if not isinstance(a, dict):
            return "", validation(f"{where}.{i} is not an allocation")
        value, akind, problem = quantity_of(a, ALLOCATION_FIELDS, f"{where}.{i}.member")
        if problem is not None:
            return "", problem
        if akind is None:
            return "", validation(
                f"{where}.{i}.member: each allocation must specify exactly one of "
                f"{ALLOCATION_FIELDS[0]} or {ALLOCATION_FIELDS[1]}"
            )
        kinds.add(akind)
        if (kind is not None and akind != kind) or len(kinds) > 1:
            # The model: "Allocations must use the same type of quantity as the request".
            return "", validation(
                f"{where}.{i}.member: allocations must use the same kind of quantity as their "
                f"record ({ALLOCATION_FIELDS[0]} with an integer quantity, "
                f"{ALLOCATION_FIELDS[1]} with a decimal one)"
            )
        tags = a.get("Tags") or []  # the model: "can be left out" for the untagged bucket
        if len(tags) > 5:
            return "", error("InvalidTagException", "each allocation takes at most 5 tags")
        pairs = []
        for t in tags:
            key, value_ = str(t.get("Key", "")), str(t.get("Value", ""))
            if not (1 <= len(key) <= 100 and 1 <= len(value_) <= 256):
                return "", error("InvalidTagException", "tag key 1-100, value 1-256 characters")
            if not (TAG_RE.fullmatch(key) and TAG_RE.fullmatch(value_)):
                return "", error("InvalidTagException", f"tag {key!r} breaks the tag pattern")
            pairs.append((key, value_))
        tagset = json.dumps(sorted(pairs))
        if tagset in seen:
            return "", error("InvalidUsageAllocationsException", "two allocations share tags")
        seen.add(tagset)
        total += value
        canonical.append((value, sorted(pairs)))
    if total != micros:
        return "", error(
            "InvalidUsageAllocationsException",
            f"allocations sum to {qty.text(total) if total <= qty.MAX_MICROS else total}, "
            f"the usage quantity is {qty.text(micros)}",
        )
    # By value and as the ledger shows quantities: whole ones as integers (as before decimals),
    # fractional ones as exact decimal strings.
    return json.dumps([[qty.to_json(q), tags] for q, tags in sorted(canonical)]), None


class MeterBook:
    """Every MeterUsage record accepted, per pod; the emulator's ledger."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str, int], LedgerEntry] = {}
        self.tokens: dict[tuple[str, str], tuple[str, Answer]] = {}
        self.counts: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def check(
        self,
        params: dict[str, Any],
        now: float,
        *,
        dimensions: list[str] | None,
        product_codes: list[str] | None,
        future_limit: float,
        window: float = WINDOW,
    ) -> Answer | None:
        """The request's own validity (no state): an error, or None."""
        if product_codes is not None and params.get("ProductCode") not in product_codes:
            return error("InvalidProductCodeException", "product code not found")
        if dimensions is not None and params.get("UsageDimension") not in dimensions:
            return error("InvalidUsageDimensionException", "dimension is not published")
        micros, kind, problem = quantity_of(params, METER_FIELDS, "meterUsage")
        if problem is not None:
            return problem
        _, problem = _allocations(params, micros, kind)
        if problem is not None:
            return problem
        stamp = _timestamp(params.get("Timestamp"))
        if stamp is None or not math.isfinite(stamp):
            return error("ValidationException", "Timestamp is not a timestamp")
        if stamp < now - window or stamp > now + future_limit:
            return error(
                "TimestampOutOfBoundsException",
                f"Timestamp must be within the past {window / HOUR:g} hours and not in the future",
            )
        return None

    def record(self, params: dict[str, Any], pod: str, now: float) -> Answer:
        """Record a valid, entitled request (idempotency and the hour rule)."""
        quantity, kind, _ = quantity_of(params, METER_FIELDS, "meterUsage")
        allocations, _ = _allocations(params, quantity, kind)
        stamp = _timestamp(params["Timestamp"])
        if stamp is None:  # validate() runs first and refuses it; never record a bad one
            raise ValueError("record() needs a validated request")
        # by value: 17, "17.0" and "17.00" are one quantity, in either field
        fingerprint = json.dumps(
            [params.get("ProductCode"), stamp, params["UsageDimension"], quantity, allocations]
        )
        token = params.get("ClientToken")
        if token is not None:
            seen = self.tokens.get((pod, token))
            if seen is not None:
                if seen[0] != fingerprint:
                    self._count("IdempotencyConflictException")
                    return error(
                        "IdempotencyConflictException", "ClientToken reused with other parameters"
                    )
                self._count("token_repeat")
                return seen[1]
        key = (pod, str(params["UsageDimension"]), math.floor(stamp / HOUR))
        entry = self.entries.get(key)
        if entry is not None:
            if (entry.quantity, entry.allocations) != (quantity, allocations):
                self._count("DuplicateRequestException")
                return error(
                    "DuplicateRequestException",
                    "a record with another value exists for this dimension and hour",
                )
            entry.repeats += 1
            self._count("idempotent_repeat")
            answer: Answer = (200, {"MeteringRecordId": entry.metering_record_id})
        else:
            entry = LedgerEntry(
                pod=pod,
                dimension=key[1],
                hour=key[2],
                quantity=quantity,
                allocations=allocations,
                timestamp=stamp,
                client_token=token,
                metering_record_id=str(uuid.uuid4()),
                recorded_at=now,
            )
            self.entries[key] = entry
            self._count("recorded")
            answer = (200, {"MeteringRecordId": entry.metering_record_id})
        if token is not None:
            self.tokens[(pod, token)] = (fingerprint, answer)
        return answer

    def ledger(self) -> dict[str, Any]:
        return {
            "records": [e.shown() for e in self.entries.values()],
            "counts": dict(self.counts),
        }
