"""MeterUsage as AWS documents it, per pod (the access key id), for the emulator.

- Timestamp rounded down to the hour; one record per pod, dimension and hour.
- The identical request again (after rounding) is idempotent: the same MeteringRecordId.
- The same hour with another quantity or allocations: DuplicateRequestException.
- A ClientToken reused with other parameters: IdempotencyConflictException.
- More than six hours old, or further ahead than `future_limit`: TimestampOutOfBoundsException.
- Published dimensions only; allocations must sum to the quantity, 1-5 tags each, AWS's tag
  pattern and lengths, no two allocations with the same tag set.

Pure apart from the lock its owner holds: the caller passes the time.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any

HOUR = 3600
WINDOW = 6 * HOUR
MAX_QUANTITY = 2147483647
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
    quantity: int
    allocations: str  # canonical JSON, "" when none
    timestamp: float
    client_token: str | None
    metering_record_id: str
    recorded_at: float
    repeats: int = 0


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


def _allocations(params: dict[str, Any], quantity: int) -> tuple[str, Answer | None]:
    """Canonical allocations, or the error AWS gives for them."""
    allocs = params.get("UsageAllocations")
    if allocs is None:
        return "", None
    if not isinstance(allocs, list) or not 1 <= len(allocs) <= MAX_ALLOCATIONS:
        return "", error("InvalidUsageAllocationsException", "1 to 2500 allocations")
    seen: set[str] = set()
    total = 0
    canonical = []
    for a in allocs:
        tags = a.get("Tags") or []
        if not 1 <= len(tags) <= 5:
            return "", error("InvalidTagException", "each allocation needs 1 to 5 tags")
        pairs = []
        for t in tags:
            key, value = str(t.get("Key", "")), str(t.get("Value", ""))
            if not (1 <= len(key) <= 100 and 1 <= len(value) <= 256):
                return "", error("InvalidTagException", "tag key 1-100, value 1-256 characters")
            if not (TAG_RE.fullmatch(key) and TAG_RE.fullmatch(value)):
                return "", error("InvalidTagException", f"tag {key!r} breaks the tag pattern")
            pairs.append((key, value))
        tagset = json.dumps(sorted(pairs))
        if tagset in seen:
            return "", error("InvalidUsageAllocationsException", "two allocations share tags")
        seen.add(tagset)
        total += int(a.get("AllocatedUsageQuantity", 0))
        canonical.append([int(a.get("AllocatedUsageQuantity", 0)), sorted(pairs)])
    if total != quantity:
        return "", error(
            "InvalidUsageAllocationsException",
            f"allocations sum to {total}, UsageQuantity is {quantity}",
        )
    return json.dumps(sorted(canonical)), None


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
    ) -> Answer | None:
        """The request's own validity (no state): an error, or None."""
        if product_codes is not None and params.get("ProductCode") not in product_codes:
            return error("InvalidProductCodeException", "product code not found")
        if dimensions is not None and params.get("UsageDimension") not in dimensions:
            return error("InvalidUsageDimensionException", "dimension is not published")
        quantity = params.get("UsageQuantity", 0)
        if not isinstance(quantity, int) or not 0 <= quantity <= MAX_QUANTITY:
            return error("ValidationException", "UsageQuantity must be 0..2147483647")
        _, problem = _allocations(params, quantity)
        if problem is not None:
            return problem
        stamp = _timestamp(params.get("Timestamp"))
        if stamp is None or not math.isfinite(stamp):
            return error("ValidationException", "Timestamp is not a timestamp")
        if stamp < now - WINDOW or stamp > now + future_limit:
            return error(
                "TimestampOutOfBoundsException",
                "Timestamp must be within the past six hours and not in the future",
            )
        return None

    def record(self, params: dict[str, Any], pod: str, now: float) -> Answer:
        """Record a valid, entitled request (idempotency and the hour rule)."""
        quantity = int(params.get("UsageQuantity", 0))
        allocations, _ = _allocations(params, quantity)
        stamp = _timestamp(params["Timestamp"])
        if stamp is None:  # validate() runs first and refuses it; never record a bad one
            raise ValueError("record() needs a validated request")
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
            "records": [asdict(e) for e in self.entries.values()],
            "counts": dict(self.counts),
        }
