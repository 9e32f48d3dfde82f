"""SaaS contract with consumption: how much of one customer's hour to meter, given what the
contract already covers. Pure (no I/O, no clock: the entitlements and the hour are passed in);
sealing calls it through sidecar.usage.saas_contract (docs/saas-lifecycle.md, "Contracts with
consumption").

A contract's entitlement for a dimension (GetEntitlements: `Value`, `ExpirationDate`) is what the
buyer paid for up front. AWS: "For SaaS contracts, you only meter for usage beyond a customer's
contract entitlements" (Seller Guide, "Configuring metering for usage with SaaS subscriptions").
How an entitlement covers usage is the seller's to say (`Basis`), and this module computes the
quantity for each:

- `ALL`: every unit, the entitlement ignored (the dimension is not in the contract).
- `HOUR`: a capacity dimension (users, seats): the entitlement covers that much in every hour;
  the hour's units above it are billed.
- `TERM`: a pool (API calls per contract term): the entitlement is drawn down across the hours of
  the term; only what the pool no longer covers is billed. The caller passes what the pool
  covered of earlier hours of the same term (`used_before_micros`), so the answer stays a pure
  function.

All quantities are micro-units (sidecar.core.quantity): no float touches a billed number.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

from sidecar.core import quantity as qty

HOUR = 3600


class Basis(enum.Enum):
    ALL = "all"
    HOUR = "hour"
    TERM = "term"


@dataclass(frozen=True)
class Entitlement:
    """One of GetEntitlements' answers, as the store keeps it (sidecar.aws.entitlement)."""

    dimension: str
    # IntegerValue: int; DoubleValue: Decimal (exact); BooleanValue: bool; StringValue: str.
    value: int | Decimal | bool | str | None
    expiration: float | None  # Unix seconds; None: no expiry given


@dataclass(frozen=True)
class Billable:
    quantity_micros: int  # what to send for the hour
    covered_micros: int  # what the contract covered of the hour's total
    entitled_micros: int | None  # the entitlement found valid at the hour (None: none)
    why: str  # one line for logs and GET /v1/usage


def entitled_micros(entitlements: Iterable[Entitlement], dimension: str, hour: int) -> int | None:
    """The contract's quantity for `dimension` valid during hour `hour` (an hour index: Unix
    seconds // 3600), in micro-units; None when there is none that counts.

    Valid: no expiration, or one after the hour's start (an entitlement that ends inside the hour
    still covers that hour: the buyer is never billed for an hour their contract reached).
    Counted: whole and Decimal values (a fraction of a micro-unit rounds up, in the buyer's
    favour); booleans and strings are features, not quantities, even "100" (None). Several
    valid entries for one dimension (concurrent agreements): their sum."""
    start = hour * HOUR
    found: int | None = None
    for e in entitlements:
        if e.dimension != dimension or (e.expiration is not None and e.expiration <= start):
            continue
        micros = _micros(e.value)
        if micros is None:
            continue
        found = (found or 0) + micros
    return found


def billable(
    total_micros: int,
    entitled: int | None,
    basis: Basis,
    *,
    used_before_micros: int = 0,
) -> Billable:
    """The quantity to send for one customer, dimension and hour whose usage totals
    `total_micros`, with `entitled` from `entitled_micros`."""
    if total_micros < 0 or used_before_micros < 0:
        raise ValueError("quantities are never negative")
    if basis is Basis.ALL or entitled is None:
        why = "every unit (basis all)" if basis is Basis.ALL else "no contract quantity"
        return Billable(total_micros, 0, entitled, why)
    if basis is Basis.HOUR:
        covered = min(total_micros, entitled)
        why = f"above {_shown(entitled)} an hour"
    else:
        left = max(0, entitled - used_before_micros)
        covered = min(total_micros, left)
        why = f"above the term's {_shown(entitled)} ({_shown(left)} left before this hour)"
    return Billable(total_micros - covered, covered, entitled, why)


def _shown(micros: int) -> str:
    """Micro-units as exact decimal text, of any size (an entitlement may exceed what a record
    can carry, qty.text's range: the hour must still seal)."""
    whole, frac = divmod(micros, qty.SCALE)
    return f"{whole}.{frac:06d}".rstrip("0").rstrip(".")


def _micros(value: object) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value * qty.SCALE if value >= 0 else None
    if isinstance(value, Decimal) and value.is_finite() and value >= 0:
        return int((value * qty.SCALE).to_integral_value(rounding=ROUND_CEILING))
    return None
