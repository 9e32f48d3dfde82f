"""What a product may POST to /v1/usage, checked before anything is stored. Pure.

The rules are MeterUsage's own (a quantity AWS's `…AsDecimal` fields can carry: 0 to
9999999999.999999, at most six decimal places; 1..2500 allocations summing EXACTLY to the
quantity, 1..5 tags per allocation, AWS's key/value lengths and pattern, no two allocations with
the same tag set), so a record the sidecar accepts can always be sent. Every problem names its
field (`records[3].allocations[1].tags.team`) and what is allowed.

Quantities become integer micro-units (`sidecar.core.quantity`): bodies are decoded with
`parse_float=Decimal`, so a JSON number such as `2.5` is read from its text, never through a
binary float, and `17`, `"17"` and `"17.0"` are one value.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sidecar.core import quantity as qty

MAX_RECORDS = 1000
# The largest whole number of units a record (and an hour's total) may hold: the decimal
# field's 9999999999.999999, in whole units. Limits are checked in micro-units (qty.MAX_MICROS).
MAX_QUANTITY = qty.MAX_MICROS // qty.SCALE
MAX_ALLOCATIONS = 2500
MAX_TAGS = 5
MAX_ID = 128
# Always `fullmatch`: `$` (and `match`) also accept a trailing "\n", which AWS refuses (its
# patterns match the whole value), losing the whole dimension-hour.
TAG_RE = re.compile(r"[a-zA-Z0-9+ -=._:\/@]+")
ID_RE = re.compile(r"[\x21-\x7e]+")
# C0 controls and DEL: NUL cannot be stored in PostgreSQL text, and none is in a real value.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
RECORD_FIELDS = frozenset({"dimension", "quantity", "id", "timestamp", "allocations"})
ALLOCATION_FIELDS = frozenset({"quantity", "tags"})
MAX_ERRORS = 20

Tags = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Allocation:
    micros: int  # the quantity in micro-units (sidecar.core.quantity)
    tags: Tags  # sorted by key: one canonical form per tag set


_json_str = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str


def _json_scalar(value: int | float | str | None) -> str:
    """`json.dumps(value)` for the scalars a digest holds, without its per-call setup."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return _json_str(value)
    if isinstance(value, float | bool):
        return json.dumps(value)  # NaN / Infinity and true / false spelled as json spells them
    return int.__repr__(value)


@dataclass(frozen=True)
class UsageRecord:
    dimension: str
    micros: int  # the quantity in micro-units (sidecar.core.quantity)
    id: str | None
    timestamp: float | None
    allocations: tuple[Allocation, ...]
    field: str  # where it was in the request: "records[3]" or "" for a single record

    @property
    def digest(self) -> str:
        """Content fingerprint for the idempotency key: same id + same digest = a repeat.

        Quantities enter by value, as `qty.to_json` shows them: `17`, `"17"` and `"17.0"` hash
        alike, and a whole quantity hashes as the integer it was before decimals, so a digest
        stored by an older sidecar still matches the same record posted again."""
        if self.allocations:
            doc = {
                "d": self.dimension,
                "q": qty.to_json(self.micros),
                "t": self.timestamp,
                # By tag set: allocations are a set (AWS and the emulator compare them by
                # value), so a retry listing them in another order (built from a map) repeats.
                # A digest stored for allocations posted in tag-set order is unchanged.
                "a": [
                    [qty.to_json(a.micros), list(a.tags)]
                    for a in sorted(self.allocations, key=lambda a: a.tags)
                ],
            }
            text = json.dumps(doc, sort_keys=True)
        else:
            # The same text as above (keys sorted, json's default separators), written out: a
            # third of the cost, and most records have no allocations.
            text = (
                f'{{"a": [], "d": {_json_str(self.dimension)}, '
                f'"q": {_json_scalar(qty.to_json(self.micros))}, '
                f'"t": {_json_scalar(self.timestamp)}}}'
            )
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Problem:
    field: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class RejectedError(Exception):
    """The request is refused as a whole; nothing of it is stored."""

    def __init__(self, status: int, problems: list[Problem]) -> None:
        super().__init__(problems[0].message if problems else "rejected")
        self.status = status
        self.problems = problems

    def body(self) -> dict[str, Any]:
        first = self.problems[0]
        return {
            "error": "invalid_usage" if self.status == 400 else "too_many_records",
            "field": first.field,
            "message": first.message,
            "problems": [p.to_json() for p in self.problems[:MAX_ERRORS]],
        }


@dataclass(frozen=True)
class Limits:
    dimensions: tuple[str, ...]
    future_skew: float = 300.0  # a product clock this far ahead is tolerated
    max_age: float = 6 * 3600.0  # MeterUsage refuses timestamps more than six hours old
    api: str = "MeterUsage"  # whose window `max_age` is (SaaS: BatchMeterUsage, 24 hours)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_STAMP_RE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def parse_timestamp(value: Any) -> float:
    """RFC 3339 with an explicit offset (`Z` or `+hh:mm`) to epoch seconds; ValueError otherwise."""
    if not isinstance(value, str) or not _STAMP_RE.match(value):
        raise ValueError("must be an RFC 3339 string such as 2026-01-31T13:05:00Z")
    text = value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("must be an RFC 3339 string such as 2026-01-31T13:05:00Z") from None
    if parsed.tzinfo is None:
        raise ValueError("needs a UTC offset (Z or +hh:mm)")
    return parsed.timestamp()


def _quantity(value: Any, field: str, problems: list[Problem]) -> int:
    """Micro-units, or 0 with a problem naming the field."""
    try:
        return qty.parse(value)
    except qty.QuantityError as exc:
        problems.append(Problem(field, str(exc)))
        return 0


def _int(text: str) -> int | Decimal:
    """A JSON integer: an `int`, or (more digits than any quantity has) an exact `Decimal`,
    which the quantity check refuses naming its field. `int()` itself refuses more than 4,300
    digits, which made a valid JSON body "not JSON"."""
    return int(text) if len(text) <= 20 else Decimal(text)


# One decoder for every body: `json.loads` with hooks builds a new one (and its scanner) per call.
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_int=_int)


def _loads(body: bytes) -> Any:
    """JSON with every number that has a fraction or exponent read as an exact `Decimal`.

    Decoded as `json.loads` decodes bytes (its encoding detection, surrogatepass), then by the
    shared decoder."""
    # A body opening with `{` or `[` and no NUL after it is UTF-8 to `detect_encoding` (no BOM,
    # not UTF-16 or UTF-32): the common case, without its checks.
    utf8 = body[:1] in (b"{", b"[") and body[1:2] != b"\x00"
    try:
        encoding = "utf-8" if utf8 else json.detect_encoding(body)
        return _DECODER.decode(body.decode(encoding, "surrogatepass"))
    except (ValueError, UnicodeDecodeError):
        raise RejectedError(
            400, [Problem("body", "must be JSON: one usage record or a list")]
        ) from None


def _tags(value: Any, field: str, problems: list[Problem]) -> Tags:
    if not isinstance(value, dict) or not 1 <= len(value) <= MAX_TAGS:
        problems.append(
            Problem(field, f"must be an object of 1 to {MAX_TAGS} tags, key to string value")
        )
        return ()
    out = []
    for key, val in value.items():
        where = f"{field}.{key}"
        if not 1 <= len(key) <= 100 or not TAG_RE.fullmatch(key):
            problems.append(
                Problem(
                    where,
                    "tag keys are 1-100 characters matching AWS's pattern [a-zA-Z0-9+ -=._:/@]",
                )
            )
        if not isinstance(val, str) or not 1 <= len(val) <= 256 or not TAG_RE.fullmatch(val):
            problems.append(
                Problem(
                    where,
                    "tag values are strings of 1-256 characters matching [a-zA-Z0-9+ -=._:/@]",
                )
            )
            continue
        out.append((key, val))
    return tuple(sorted(out))


def _allocations(
    value: Any, quantity: int, field: str, problems: list[Problem]
) -> tuple[Allocation, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_ALLOCATIONS:
        problems.append(Problem(field, f"must be a list of 1 to {MAX_ALLOCATIONS} allocations"))
        return ()
    out: list[Allocation] = []
    seen: dict[Tags, int] = {}
    before = len(problems)
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            problems.append(Problem(where, 'must be an object {"quantity": q, "tags": {...}}'))
            continue
        for extra in sorted(set(item) - ALLOCATION_FIELDS):
            problems.append(Problem(f"{where}.{extra}", "unknown field; allowed: quantity, tags"))
        if "quantity" not in item:
            problems.append(Problem(f"{where}.quantity", "is required"))
        if "tags" not in item:
            problems.append(Problem(f"{where}.tags", "is required"))
            continue
        q = _quantity(item.get("quantity"), f"{where}.quantity", problems)
        tags = _tags(item["tags"], f"{where}.tags", problems)
        if tags and tags in seen:
            problems.append(
                Problem(f"{where}.tags", f"same tag set as {field}[{seen[tags]}]; merge them")
            )
        seen.setdefault(tags, i)
        out.append(Allocation(q, tags))
    total = sum(a.micros for a in out)  # exact: integers
    if len(problems) == before and total != quantity:
        problems.append(
            Problem(
                field,
                f"allocated quantities sum to {qty.text(min(total, qty.MAX_MICROS))}"
                f"{'+' if total > qty.MAX_MICROS else ''}; they must sum to {qty.text(quantity)}",
            )
        )
    return tuple(out)


_UNKNOWN_RECORD_FIELD = f"unknown field; allowed: {', '.join(sorted(RECORD_FIELDS))}"
# What SaaS mode reads off a record before the record rules see it (`parse_saas`).
SAAS_FIELDS = frozenset({"customer_aws_account_id", "license_arn", "customer_identifier"})


def _record(
    doc: Any,
    field: str,
    limits: Limits,
    now: float,
    problems: list[Problem],
    saas: bool = False,
) -> UsageRecord | None:
    """One record, or None with its problems added. `saas`: the customer fields are the
    caller's (`parse_saas` checks them)."""
    if not isinstance(doc, dict):
        problems.append(Problem(field or "body", "must be a usage record object"))
        return None
    before = len(problems)
    extras = doc.keys() - RECORD_FIELDS
    if saas and extras:
        extras -= SAAS_FIELDS
    if extras:
        for extra in sorted(extras):
            problems.append(Problem(_join(field, extra), _UNKNOWN_RECORD_FIELD))
    dimension = doc.get("dimension")
    if dimension not in limits.dimensions:
        problems.append(
            Problem(
                _join(field, "dimension"),
                f"must be one of the configured dimensions: {', '.join(limits.dimensions)}",
            )
        )
    given = doc.get("quantity")
    if type(given) is int and 0 <= given <= MAX_QUANTITY:  # the common case: a whole number
        quantity = given * qty.SCALE
    else:
        if "quantity" not in doc:
            problems.append(Problem(_join(field, "quantity"), "is required"))
        quantity = _quantity(given, _join(field, "quantity"), problems)
    key = doc.get("id")
    if key is not None and (
        not isinstance(key, str) or not 1 <= len(key) <= MAX_ID or not ID_RE.fullmatch(key)
    ):
        problems.append(
            Problem(_join(field, "id"), f"must be 1-{MAX_ID} printable ASCII characters, no spaces")
        )
    stamp: float | None = None
    if doc.get("timestamp") is not None:
        where = _join(field, "timestamp")
        try:
            stamp = parse_timestamp(doc["timestamp"])
        except ValueError as exc:
            problems.append(Problem(where, str(exc)))
        else:
            if not math.isfinite(stamp) or stamp > now + limits.future_skew:
                problems.append(
                    Problem(
                        where,
                        f"is in the future; at most {limits.future_skew:.0f} s ahead of the "
                        "sidecar's clock is allowed",
                    )
                )
            elif stamp < now - limits.max_age:
                problems.append(
                    Problem(
                        where,
                        f"is older than AWS accepts ({limits.api} takes at most "
                        f"{limits.max_age / 3600:.0f} hours in the past)",
                    )
                )
    allocations: tuple[Allocation, ...] = ()
    if doc.get("allocations") is not None:
        allocations = _allocations(
            doc["allocations"], quantity, _join(field, "allocations"), problems
        )
    if len(problems) != before:
        return None
    return UsageRecord(str(dimension), quantity, key, stamp, allocations, field)


def parse(body: bytes, limits: Limits, now: float) -> list[UsageRecord]:
    """Body -> records, or `RejectedError` (400, or 413 for more than MAX_RECORDS records)."""
    return _parse_doc(_loads(body), limits, now)


def _parse_doc(doc: Any, limits: Limits, now: float, saas: bool = False) -> list[UsageRecord]:
    if isinstance(doc, dict) and "records" in doc and "dimension" not in doc:
        if set(doc) != {"records"}:
            raise RejectedError(
                400, [Problem("body", 'an object with "records" has no other field')]
            )
        doc = doc["records"]
        if not isinstance(doc, list):
            raise RejectedError(400, [Problem("records", "must be a list of usage records")])
    problems: list[Problem] = []
    records: list[UsageRecord] = []
    if isinstance(doc, list):
        if not doc:
            raise RejectedError(400, [Problem("records", "must hold at least one record")])
        if len(doc) > MAX_RECORDS:
            raise RejectedError(
                413,
                [Problem("records", f"at most {MAX_RECORDS} records per request; got {len(doc)}")],
            )
        for i, item in enumerate(doc):
            rec = _record(item, f"records[{i}]", limits, now, problems, saas)
            if rec is not None:
                records.append(rec)
    else:
        rec = _record(doc, "", limits, now, problems, saas)
        if rec is not None:
            records.append(rec)
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        if rec.id is None:
            continue
        if rec.id in seen and records[seen[rec.id]].digest != rec.digest:
            problems.append(
                Problem(_join(rec.field, "id"), "the same id appears with different content")
            )
        seen.setdefault(rec.id, i)
    if problems:
        raise RejectedError(400, problems)
    return records


# -- SaaS mode (issue 13): the same record, plus the customer it is for ------------------------

ACCOUNT_RE = re.compile(r"[0-9]{1,255}")
# botocore's LicenseArn pattern (service model 2016-01-14).
LICENSE_ARN_RE = re.compile(
    r"arn:aws[a-zA-Z-]*:[A-Za-z0-9][A-Za-z0-9_/.-]{0,62}:[A-Za-z0-9_/.-]{0,63}:"
    r"[A-Za-z0-9_/.-]{0,63}:[A-Za-z0-9][A-Za-z0-9:_/+=,@.-]{0,1023}"
)
LICENSE_FIELDS = ("customer_aws_account_id", "license_arn")
IDENTIFIER_FIELD = "customer_identifier"
IDENTITIES = ("license", "customer_identifier")


@dataclass(frozen=True)
class SaasRecord:
    """A usage record for one SaaS customer. `customer` is the ledger's key: the account id and
    license ARN joined by '/', or the customer identifier (the identity the sidecar sends)."""

    customer: str
    usage: UsageRecord

    @functools.cached_property  # computed once per record (the POST's checks, then the ledger)
    def digest(self) -> str:
        return hashlib.sha256(f"{self.customer}\n{self.usage.digest}".encode()).hexdigest()


def customer_key(
    identity: str, account_id: str | None, license_arn: str | None, identifier: str | None
) -> str | None:
    """The ledger key of a customer under `identity`, or None when AWS's answer lacks it."""
    if identity == "license":
        return f"{account_id}/{license_arn}" if account_id and license_arn else None
    return identifier or None


def record_identity(identity: str, customer: str) -> dict[str, str]:
    """The identifying members of a BatchMeterUsage UsageRecord for a ledger key."""
    if identity == "license":
        account, _, arn = customer.partition("/")
        return {"CustomerAWSAccountId": account, "LicenseArn": arn}
    return {"CustomerIdentifier": customer}


def _customer(
    doc: dict[str, Any], field: str, identity: str, problems: list[Problem]
) -> str | None:
    """The customer fields of `doc`, checked against the identity."""
    account = doc.get("customer_aws_account_id")
    arn = doc.get("license_arn")
    ident = doc.get(IDENTIFIER_FIELD)
    before = len(problems)
    if identity == "license":
        if ident is not None:
            problems.append(
                Problem(
                    _join(field, IDENTIFIER_FIELD),
                    "not allowed: MARKETPLACE_SAAS_IDENTITY is license; name the "
                    "customer with customer_aws_account_id and license_arn",
                )
            )
        if not isinstance(account, str) or not ACCOUNT_RE.fullmatch(account):
            problems.append(
                Problem(
                    _join(field, "customer_aws_account_id"),
                    "is required: the buyer's AWS account id (digits), as "
                    "ResolveCustomer returned it",
                )
            )
        if not isinstance(arn, str) or not LICENSE_ARN_RE.fullmatch(arn):
            problems.append(
                Problem(
                    _join(field, "license_arn"),
                    "is required: the license ARN (arn:aws:license-manager:...) "
                    "ResolveCustomer returned",
                )
            )
    else:
        for name, value in (("customer_aws_account_id", account), ("license_arn", arn)):
            if value is not None:
                problems.append(
                    Problem(
                        _join(field, name),
                        "not allowed: MARKETPLACE_SAAS_IDENTITY is "
                        "customer_identifier; name the customer with "
                        "customer_identifier",
                    )
                )
        if (
            not isinstance(ident, str)
            or not 1 <= len(ident) <= 255
            or CONTROL_RE.search(ident) is not None
        ):
            problems.append(
                Problem(
                    _join(field, IDENTIFIER_FIELD),
                    "is required: the CustomerIdentifier ResolveCustomer "
                    "returned (1-255 characters, no control characters)",
                )
            )
    if len(problems) != before:
        return None
    return customer_key(identity, account, arn, ident)


def parse_saas(body: bytes, limits: Limits, now: float, identity: str) -> list[SaasRecord]:
    """Body -> SaaS records, or `RejectedError`. The record rules are custom mode's (`parse`),
    allocations included, plus the customer named as `identity` wants."""
    doc = _loads(body)
    single = not (
        isinstance(doc, list)
        or (isinstance(doc, dict) and "records" in doc and "dimension" not in doc)
    )
    items: list[Any] = [doc] if single else (doc if isinstance(doc, list) else doc.get("records"))
    problems: list[Problem] = []
    customers: list[str | None] = []
    if isinstance(items, list) and len(items) <= MAX_RECORDS:
        for i, item in enumerate(items):
            field = "" if single else f"records[{i}]"
            if not isinstance(item, dict):
                customers.append(None)
                continue
            customers.append(_customer(item, field, identity, problems))
    try:
        # The record rules on the same document: `saas` leaves the customer fields (checked
        # above) to this function.
        records = _parse_doc(doc, limits, now, saas=True)
    except RejectedError as exc:
        if exc.status != 400:
            raise
        problems.extend(exc.problems)
    if problems:
        raise RejectedError(400, problems)
    out: list[SaasRecord] = []
    for rec in records:
        index = int(rec.field[8:-1]) if rec.field else 0
        key = customers[index]
        assert key is not None  # nosec B101 # narrowing: a record without a customer raised above
        out.append(SaasRecord(key, rec))
    seen: dict[str, SaasRecord] = {}
    for srec in out:
        if srec.usage.id is None:
            continue
        first = seen.setdefault(srec.usage.id, srec)
        if first is not srec and first.digest != srec.digest:
            raise RejectedError(
                400,
                [
                    Problem(
                        _join(srec.usage.field, "id"), "the same id appears with different content"
                    )
                ],
            )
    return out
