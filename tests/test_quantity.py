"""sidecar.core.quantity: AWS's decimal quantities as exact integer micro-units."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest

from sidecar.core import quantity as qty


def _model() -> dict[str, Any]:
    from botocore.loaders import Loader

    return dict(Loader().load_service_model("meteringmarketplace", "service-2"))


@pytest.mark.parametrize(
    "shape", ["UsageQuantityAsDecimalString", "AllocatedUsageQuantityAsDecimalString"]
)
def test_the_pattern_is_the_pinned_models_own(shape: str) -> None:
    """The next botocore bump that changes the field's pattern fails here, not at AWS."""
    spec = _model()["shapes"][shape]
    assert spec["pattern"] == "^" + qty.DECIMAL_PATTERN + "$"
    assert len(qty.MAX_TEXT) == spec["max"]


@pytest.mark.parametrize(
    ("structure", "member"),
    [
        ("MeterUsageRequest", "UsageQuantity"),
        ("UsageRecord", "Quantity"),
        ("UsageAllocation", "AllocatedUsageQuantity"),
    ],
)
def test_the_model_deprecates_the_integer_fields_the_sidecar_no_longer_sends(
    structure: str, member: str
) -> None:
    spec = _model()["shapes"][structure]["members"][member]
    assert spec["deprecated"] is True
    assert spec["deprecatedMessage"] == f"Use {member}AsDecimal instead."


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        (0, 0),
        (17, 17_000_000),
        ("17", 17_000_000),
        ("17.0", 17_000_000),
        ("17.000000", 17_000_000),
        (Decimal("17.00"), 17_000_000),
        ("0.1", 100_000),
        (Decimal("0.1"), 100_000),
        ("0.000001", 1),
        (Decimal("1E+2"), 100_000_000),
        (qty.MAX_TEXT, qty.MAX_MICROS),
        (Decimal(qty.MAX_TEXT), qty.MAX_MICROS),
        (9_999_999_999, 9_999_999_999_000_000),
    ],
)
def test_every_spelling_of_a_value_is_one_number_of_micro_units(value: object, micros: int) -> None:
    assert qty.parse(value) == micros


@pytest.mark.parametrize(
    "value",
    [
        -1,
        True,
        1.5,  # a float is never trusted: it may already be rounded
        float("nan"),
        "",
        " 1",
        "1 ",
        "1\n",  # `$` would accept it; AWS's full match does not
        "01",
        "-0",
        "+1",
        "1.",
        ".5",
        "1e3",
        "1.0000001",
        "10000000000",
        "NaN",
        Decimal("NaN"),
        Decimal("Infinity"),
        Decimal("-0.1"),
        Decimal("1.0000001"),
        Decimal("1E+99999999"),  # refused before scaling: no hundred-million-digit int
        Decimal("10000000000"),
        10_000_000_000,
        None,
        [1],
        {"q": 1},
    ],
)
def test_what_aws_would_refuse_is_refused_here(value: object) -> None:
    with pytest.raises(qty.QuantityError, match="decimal string"):
        qty.parse(value)


def test_text_is_canonical_and_parses_back() -> None:
    assert qty.text(0) == "0"
    assert qty.text(17_000_000) == "17"
    assert qty.text(2_500_000) == "2.5"
    assert qty.text(1) == "0.000001"
    assert qty.text(qty.MAX_MICROS) == qty.MAX_TEXT
    pattern = re.compile(qty.DECIMAL_PATTERN)
    for micros in (0, 1, 10, 100_000, 999_999, 1_000_000, 1_234_567, qty.MAX_MICROS):
        assert pattern.fullmatch(qty.text(micros))
        assert qty.parse(qty.text(micros)) == micros
    for bad in (-1, qty.MAX_MICROS + 1):
        with pytest.raises(qty.QuantityError):
            qty.text(bad)


def test_json_shows_whole_values_as_integers_and_fractions_as_exact_strings() -> None:
    assert qty.to_json(17_000_000) == 17
    assert isinstance(qty.to_json(17_000_000), int)
    assert qty.to_json(100_000) == "0.1"
    assert qty.to_json(0) == 0
    # Totals (many hours, many records) go past one record's range and are still exact.
    assert qty.to_json(qty.MAX_MICROS + 3_000_000) == "10000000002.999999"
    assert qty.to_json(10 * qty.MAX_MICROS) == "99999999999.99999"
    assert qty.to_json(2 * qty.SCALE * 10**12) == 2 * 10**12


def test_ten_tenths_are_exactly_one() -> None:
    """The issue's example: floats make 0.1 * 10 = 0.9999999999999999."""
    assert sum(qty.parse("0.1") for _ in range(10)) == qty.parse(1)
    assert sum(qty.parse(Decimal("0.1")) for _ in range(10)) == qty.SCALE
