"""Exact usage quantities: integer micro-units inside, AWS's decimal strings at the edges.

The pinned botocore model (meteringmarketplace) deprecates the integer `Quantity`/`UsageQuantity`
for `QuantityAsDecimal`/`UsageQuantityAsDecimal`: strings that fully match DECIMAL_PATTERN, at most
six decimal places, compared by value (`17`, `17.0` and `17.00` are one quantity). Six places make
one unit exactly 1,000,000 micro-units, so every quantity AWS can carry is an `int` here: sums are
exact, comparisons are by value for free, and no float ever touches a billed number.
"""

from __future__ import annotations

import re
from decimal import Decimal

SCALE = 1_000_000
DECIMAL_PATTERN = r"(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?"
_DECIMAL_RE = re.compile(DECIMAL_PATTERN)
MAX_MICROS = 9_999_999_999_999_999  # 9999999999.999999, the pattern's largest value
MAX_TEXT = "9999999999.999999"
_MAX_DECIMAL = Decimal(MAX_TEXT)
_MAX_WHOLE = MAX_MICROS // SCALE  # the largest whole quantity
ALLOWED = (
    'an integer, or a decimal string such as "2.5" (at most 6 decimal places), '
    f"from 0 to {MAX_TEXT}"
)


class QuantityError(ValueError):
    """The value is not a quantity AWS's decimal fields can carry; the message says what is."""


def parse(value: object) -> int:
    """A posted quantity to micro-units.

    Accepted: a JSON integer; a string fully matching AWS's decimal pattern; a `Decimal` (what a
    JSON number with a fraction becomes when the body is parsed with `parse_float=Decimal`, so
    `2.5` is read from its text, never through a binary float). Refused: floats, booleans, NaN,
    negative values, more than six decimal places, values above the pattern's range.
    """
    if type(value) is int and 0 <= value <= _MAX_WHOLE:  # the common case, checked first
        return value * SCALE
    if isinstance(value, bool):
        raise QuantityError(f"must be {ALLOWED}; got a boolean")
    if isinstance(value, int):
        micros = value * SCALE
    elif isinstance(value, str):
        if not _DECIMAL_RE.fullmatch(value):
            raise QuantityError(f"must be {ALLOWED}; got {value[:40]!r}")
        whole, _, frac = value.partition(".")
        micros = int(whole) * SCALE + int(frac.ljust(6, "0") or "0")
    elif isinstance(value, Decimal):
        if not value.is_finite() or not 0 <= value <= _MAX_DECIMAL:
            # Checked before scaling: `1E+99999999` must not become a hundred-million-digit int.
            raise QuantityError(f"must be {ALLOWED}")
        exponent = value.as_tuple().exponent
        if not isinstance(exponent, int) or exponent < -6:
            # As written, like the string rule: `2.5000000` is refused, never rounded.
            raise QuantityError(f"must be {ALLOWED}; {value:.12} has more than 6 decimal places")
        micros = int(value.scaleb(6))  # exact: at most 16 digits once the range is checked
    else:
        raise QuantityError(f"must be {ALLOWED}")
    if not 0 <= micros <= MAX_MICROS:
        raise QuantityError(f"must be {ALLOWED}")
    return micros


def text(micros: int) -> str:
    """The canonical decimal string AWS's `…AsDecimal` fields take: `17`, `2.5`, `0.000001`."""
    if not 0 <= micros <= MAX_MICROS:
        raise QuantityError(f"{micros} micro-units is outside 0..{MAX_TEXT}")
    whole, frac = divmod(micros, SCALE)
    return f"{whole}.{frac:06d}".rstrip("0") if frac else str(whole)


def to_json(micros: int) -> int | str:
    """How responses show a quantity: whole values stay JSON integers (today's clients keep
    working); fractional ones are decimal strings, exact, as AWS's own decimal fields are.
    Any integer: totals over many hours may exceed what one record can carry."""
    sign, magnitude = ("-", -micros) if micros < 0 else ("", micros)
    whole, frac = divmod(magnitude, SCALE)
    if not frac:
        return -whole if sign else whole
    return sign + f"{whole}.{frac:06d}".rstrip("0")
