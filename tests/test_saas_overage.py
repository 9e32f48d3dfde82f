"""Contract with consumption (sidecar/usage/overage.py, pure): the quantity to meter for one
customer, dimension and hour, from the contract's entitlements valid at that hour."""

from __future__ import annotations

from decimal import Decimal

import pytest

from sidecar.usage.overage import Basis, Entitlement, billable, entitled_micros

M = 1_000_000  # micro-units per unit
HOUR = 500_000  # an hour index (Unix seconds // 3600)
START = HOUR * 3600


def test_capacity_bills_only_the_units_above_the_contract_each_hour() -> None:
    ents = [Entitlement("users", 20, None)]
    entitled = entitled_micros(ents, "users", HOUR)
    assert entitled == 20 * M
    assert billable(25 * M, entitled, Basis.HOUR).quantity_micros == 5 * M
    below = billable(12 * M, entitled, Basis.HOUR)
    assert below.quantity_micros == 0 and below.covered_micros == 12 * M
    # Each hour on its own: the next hour is covered again up to 20.
    assert billable(21 * M, entitled, Basis.HOUR).quantity_micros == 1 * M


def test_a_term_pool_is_drawn_down_across_hours() -> None:
    entitled = entitled_micros([Entitlement("api_calls", 1000, None)], "api_calls", HOUR)
    first = billable(600 * M, entitled, Basis.TERM)
    assert first.quantity_micros == 0
    second = billable(600 * M, entitled, Basis.TERM, used_before_micros=600 * M)
    assert second.quantity_micros == 200 * M and second.covered_micros == 400 * M
    spent = billable(50 * M, entitled, Basis.TERM, used_before_micros=1500 * M)
    assert spent.quantity_micros == 50 * M and spent.covered_micros == 0


def test_basis_all_and_no_contract_quantity_send_every_unit() -> None:
    assert billable(7 * M, 20 * M, Basis.ALL).quantity_micros == 7 * M
    none = billable(7 * M, None, Basis.HOUR)
    assert none.quantity_micros == 7 * M and "no contract quantity" in none.why
    assert entitled_micros([Entitlement("users", 20, None)], "scans", HOUR) is None


def test_expiry_counts_the_hour_it_falls_in_and_not_after() -> None:
    inside = [Entitlement("users", 20, START + 1)]
    assert entitled_micros(inside, "users", HOUR) == 20 * M
    at_start = [Entitlement("users", 20, START)]
    assert entitled_micros(at_start, "users", HOUR) is None
    assert entitled_micros(inside, "users", HOUR + 1) is None


def test_decimals_are_exact_and_fractions_of_a_micro_unit_favour_the_buyer() -> None:
    ents = [Entitlement("gb", Decimal("2.5"), None)]
    assert entitled_micros(ents, "gb", HOUR) == 2_500_000
    tiny = [Entitlement("gb", Decimal("0.0000001"), None)]
    assert entitled_micros(tiny, "gb", HOUR) == 1
    got = billable(3 * M, entitled_micros(ents, "gb", HOUR), Basis.HOUR)
    assert got.quantity_micros == 500_000


@pytest.mark.parametrize("value", [True, False, "100", "Enterprise", None, -1, Decimal("-2")])
def test_features_and_nonsense_are_no_quantity(value: object) -> None:
    assert entitled_micros([Entitlement("users", value, None)], "users", HOUR) is None  # type: ignore[arg-type]


def test_concurrent_agreements_add_up_and_expired_ones_do_not() -> None:
    ents = [
        Entitlement("users", 10, None),
        Entitlement("users", 5, START + 7200),
        Entitlement("users", 100, START - 1),  # ended before the hour
    ]
    assert entitled_micros(ents, "users", HOUR) == 15 * M


def test_negative_quantities_are_refused() -> None:
    with pytest.raises(ValueError):
        billable(-1, 0, Basis.HOUR)
    with pytest.raises(ValueError):
        billable(1, 0, Basis.TERM, used_before_micros=-1)


def test_an_entitlement_beyond_a_records_range_is_explained_not_refused() -> None:
    huge = entitled_micros([Entitlement("gb", Decimal("1e30"), None)], "gb", HOUR)
    assert huge == 10**36
    for basis in (Basis.HOUR, Basis.TERM):
        got = billable(5 * M, huge, basis)
        assert got.quantity_micros == 0 and "1" + "0" * 30 in got.why
