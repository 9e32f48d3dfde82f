"""POST /v1/usage bodies: what is accepted, and errors that name the field and what is allowed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.core.quantity import SCALE
from sidecar.usage.validate import (
    MAX_QUANTITY,
    Limits,
    RejectedError,
    UsageRecord,
    parse,
    parse_saas,
)
from tests.helpers import NOW

LIMITS = Limits(("scans", "users"))


def ok(doc: Any) -> list[UsageRecord]:
    return parse(json.dumps(doc).encode(), LIMITS, NOW)


def refused(doc: Any, raw: bytes | None = None) -> RejectedError:
    with pytest.raises(RejectedError) as info:
        parse(raw if raw is not None else json.dumps(doc).encode(), LIMITS, NOW)
    return info.value


def test_one_record_a_list_and_a_records_object_are_accepted() -> None:
    assert ok({"dimension": "scans", "quantity": 3})[0].micros == 3 * SCALE
    assert [r.dimension for r in ok([{"dimension": "scans", "quantity": 1}] * 2)] == ["scans"] * 2
    assert ok({"records": [{"dimension": "users", "quantity": 0}]})[0].field == "records[0]"


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ({"dimension": "gb", "quantity": 1}, "dimension", "scans, users"),
        ({"dimension": "scans", "quantity": -1}, "quantity", "an integer, or a decimal string"),
        ({"dimension": "scans", "quantity": "1.5000001"}, "quantity", "at most 6 decimal places"),
        ({"dimension": "scans", "quantity": True}, "quantity", "boolean"),
        ({"dimension": "scans", "quantity": MAX_QUANTITY + 1}, "quantity", "9999999999.999999"),
        ({"dimension": "scans"}, "quantity", "required"),
        ({"dimension": "scans", "quantity": 1, "quantiy": 2}, "quantiy", "unknown field"),
        ({"dimension": "scans", "quantity": 1, "id": ""}, "id", "printable"),
        ({"dimension": "scans", "quantity": 1, "id": "a b"}, "id", "printable"),
        ({"dimension": "scans", "quantity": 1, "timestamp": "yesterday"}, "timestamp", "RFC 3339"),
        (
            {"dimension": "scans", "quantity": 1, "timestamp": "2027-01-15T12:00:00"},
            "timestamp",
            "offset",
        ),
    ],
)
def test_each_mistake_names_its_field_and_what_is_allowed(doc: Any, field: str, words: str) -> None:
    err = refused(doc)
    assert err.status == 400
    assert err.body()["field"] == field
    assert words in err.body()["message"]


def test_timestamps_in_the_future_or_older_than_six_hours_are_refused() -> None:
    from sidecar.usage.hours import iso

    assert ok({"dimension": "scans", "quantity": 1, "timestamp": iso(NOW + 200)})
    assert (
        "future"
        in refused({"dimension": "scans", "quantity": 1, "timestamp": iso(NOW + 400)}).body()[
            "message"
        ]
    )
    assert ok({"dimension": "scans", "quantity": 1, "timestamp": iso(NOW - 5 * 3600)})
    old = refused({"dimension": "scans", "quantity": 1, "timestamp": iso(NOW - 6 * 3600 - 1)})
    assert "six hours" in old.body()["message"] or "6 hours" in old.body()["message"]
    from datetime import UTC, datetime, timedelta, timezone

    local = datetime.fromtimestamp(NOW, UTC).astimezone(timezone(timedelta(hours=2))).isoformat()
    assert ok({"dimension": "scans", "quantity": 1, "timestamp": local})[0].timestamp == NOW


def test_allocation_rules_point_at_the_exact_allocation_and_tag() -> None:
    def rec(allocs: Any, quantity: int = 3) -> list[Any]:
        return [{"dimension": "scans", "quantity": 9}] * 3 + [
            {"dimension": "scans", "quantity": quantity, "allocations": allocs}
        ]

    bad_value = refused(
        rec([{"quantity": 1, "tags": {"team": "a"}}, {"quantity": 2, "tags": {"team": "b?"}}])
    )
    assert bad_value.body()["field"] == "records[3].allocations[1].tags.team"
    too_many = refused(rec([{"quantity": 3, "tags": {f"k{i}": "v" for i in range(6)}}]))
    assert too_many.body()["field"] == "records[3].allocations[0].tags"
    assert "1 to 5" in too_many.body()["message"]
    long_key = refused(rec([{"quantity": 3, "tags": {"k" * 101: "v"}}]))
    assert "1-100" in long_key.body()["message"]
    wrong_sum = refused(rec([{"quantity": 1, "tags": {"team": "a"}}]))
    assert wrong_sum.body()["field"] == "records[3].allocations"
    assert "sum to 1" in wrong_sum.body()["message"] and "sum to 3" in wrong_sum.body()["message"]
    same = refused(
        rec(
            [
                {"quantity": 1, "tags": {"a": "1", "b": "2"}},
                {"quantity": 2, "tags": {"b": "2", "a": "1"}},
            ]
        )
    )
    assert same.body()["field"] == "records[3].allocations[1].tags"
    assert "same tag set" in same.body()["message"]
    assert "allocations" in refused(rec([])).body()["field"]
    good = ok(
        rec(
            [
                {"quantity": 1, "tags": {"team": "a"}},
                {"quantity": 2, "tags": {"team": "b", "env": "prod"}},
            ]
        )
    )
    assert good[3].allocations[1].tags == (("env", "prod"), ("team", "b"))


def test_more_than_1000_records_is_413_and_an_empty_list_400() -> None:
    assert refused([{"dimension": "scans", "quantity": 1}] * 1001).status == 413
    assert refused([]).status == 400
    assert refused(None, b"{not json").body()["field"] == "body"
    assert refused(None, b"\xff\xfe").status == 400


def test_one_id_twice_in_a_request_with_different_content_is_refused() -> None:
    same = [{"dimension": "scans", "quantity": 1, "id": "k"}] * 2
    assert len(ok(same)) == 2
    err = refused(
        [
            {"dimension": "scans", "quantity": 1, "id": "k"},
            {"dimension": "scans", "quantity": 2, "id": "k"},
        ]
    )
    assert err.body()["field"] == "records[1].id"


def test_several_problems_are_all_listed() -> None:
    err = refused(
        [
            {"dimension": "x", "quantity": -1},
            {"dimension": "scans", "quantity": 1},
            {"quantity": "a"},
        ]
    )
    fields = [p["field"] for p in err.body()["problems"]]
    assert fields == [
        "records[0].dimension",
        "records[0].quantity",
        "records[2].dimension",
        "records[2].quantity",
    ]


# -- fractional quantities (issue 21) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "micros"),
    [
        (b'{"dimension": "scans", "quantity": 2.5}', 2_500_000),
        (b'{"dimension": "scans", "quantity": "2.5"}', 2_500_000),
        (b'{"dimension": "scans", "quantity": 0.1}', 100_000),
        (b'{"dimension": "scans", "quantity": 17.0}', 17_000_000),
        (b'{"dimension": "scans", "quantity": 1e2}', 100_000_000),
        (b'{"dimension": "scans", "quantity": 9999999999.999999}', 9_999_999_999_999_999),
        (b'{"dimension": "scans", "quantity": 0.000001}', 1),
    ],
)
def test_a_json_number_with_a_fraction_is_read_from_its_text(raw: bytes, micros: int) -> None:
    """Through a float, 9999999999.999999 would be 9999999999.999998 and 0.1 not a tenth."""
    assert parse(raw, LIMITS, NOW)[0].micros == micros


@pytest.mark.parametrize(
    "raw",
    [
        b'{"dimension": "scans", "quantity": 0.0000001}',  # 7 places: refused, never rounded
        b'{"dimension": "scans", "quantity": 1.50000000}',
        b'{"dimension": "scans", "quantity": "0.0000001"}',
        b'{"dimension": "scans", "quantity": NaN}',
        b'{"dimension": "scans", "quantity": Infinity}',
        b'{"dimension": "scans", "quantity": -0.5}',
        b'{"dimension": "scans", "quantity": "-0.5"}',
        b'{"dimension": "scans", "quantity": "1e3"}',
        b'{"dimension": "scans", "quantity": 1e999999999}',
        b'{"dimension": "scans", "quantity": 10000000000.0}',
    ],
)
def test_quantities_aws_cannot_carry_are_refused_naming_the_field(raw: bytes) -> None:
    err = refused(None, raw)
    assert err.status == 400
    assert err.body()["field"] == "quantity"
    assert "decimal string" in err.body()["message"]


def test_allocations_must_sum_exactly_and_may_be_fractional() -> None:
    recs = ok(
        {
            "dimension": "scans",
            "quantity": "0.3",
            "allocations": [
                {"quantity": "0.1", "tags": {"team": "a"}},
                {"quantity": "0.2", "tags": {"team": "b"}},
            ],
        }
    )
    assert [a.micros for a in recs[0].allocations] == [100_000, 200_000]
    # 0.1 + 0.2 is 0.30000000000000004 in floats: exactness is what makes this pass.
    raw = (
        b'{"dimension": "scans", "quantity": 0.3, "allocations": [{"quantity": 0.1, '
        b'"tags": {"team": "a"}}, {"quantity": 0.2, "tags": {"team": "b"}}]}'
    )
    assert parse(raw, LIMITS, NOW)[0].micros == 300_000
    off = refused(
        {
            "dimension": "scans",
            "quantity": "0.3",
            "allocations": [
                {"quantity": "0.1", "tags": {"team": "a"}},
                {"quantity": "0.200001", "tags": {"team": "b"}},
            ],
        }
    )
    assert off.body()["field"] == "allocations"
    assert "sum to 0.300001" in off.body()["message"] and "sum to 0.3" in off.body()["message"]
    bad = refused(
        {
            "dimension": "scans",
            "quantity": 1,
            "allocations": [{"quantity": 0.5e-7, "tags": {"team": "a"}}],
        }
    )
    assert bad.body()["field"] == "allocations[0].quantity"


def test_the_same_value_spelled_differently_is_one_record_and_other_values_differ() -> None:
    """The idempotency digest compares by value: 17, "17", 17.0 and "17.000" are one record;
    a whole quantity keeps the digest it had before decimals (stored ids still match)."""
    spellings = [b"17", b'"17"', b"17.0", b'"17.000"', b"17.000000"]
    digests = {
        parse(b'{"dimension": "scans", "id": "k", "quantity": ' + q + b"}", LIMITS, NOW)[0].digest
        for q in spellings
    }
    assert len(digests) == 1
    before = UsageRecord("scans", 17 * SCALE, "k", None, (), "").digest
    import hashlib
    import json as _json

    old = {"d": "scans", "q": 17, "t": None, "a": []}  # what the integer-only sidecar hashed
    assert before == hashlib.sha256(_json.dumps(old, sort_keys=True).encode()).hexdigest()
    assert digests == {before}
    other = parse(b'{"dimension": "scans", "id": "k", "quantity": "17.000001"}', LIMITS, NOW)
    assert other[0].digest != before
    mixed = refused(
        None,
        b'[{"dimension": "scans", "id": "k", "quantity": 17.0}, '
        b'{"dimension": "scans", "id": "k", "quantity": "17.5"}]',
    )
    assert mixed.body()["field"] == "records[1].id"
    assert (
        len(
            parse(
                b'[{"dimension": "scans", "id": "k", "quantity": 17.0}, '
                b'{"dimension": "scans", "id": "k", "quantity": "17"}]',
                LIMITS,
                NOW,
            )
        )
        == 2
    )


def test_saas_records_take_fractions_too() -> None:
    body = b'{"dimension": "scans", "quantity": 0.1, "customer_identifier": "c-1", "id": "x"}'
    (rec,) = parse_saas(body, LIMITS, NOW, "customer_identifier")
    assert rec.usage.micros == 100_000 and rec.customer == "c-1"
    err = None
    with pytest.raises(RejectedError) as info:
        parse_saas(
            b'{"dimension": "scans", "quantity": 0.1234567, "customer_identifier": "c-1"}',
            LIMITS,
            NOW,
            "customer_identifier",
        )
    err = info.value
    assert err.body()["field"] == "quantity"


@pytest.mark.parametrize(
    "number",
    [
        b"0." + b"0" * 900_000 + b"1",  # a megabyte of fraction
        b"1" + b"0" * 900_000 + b".5",  # a megabyte of whole part, with a fraction
        b"1e-999999999",
        b"1e999999999",  # never scaled into a billion-digit integer
    ],
)
def test_hostile_numbers_are_refused_naming_the_field(number: bytes) -> None:
    err = refused(None, b'{"dimension": "scans", "quantity": ' + number + b"}")
    assert err.status == 400 and err.body()["field"] == "quantity"


@pytest.mark.parametrize(
    ("dimension", "micros", "timestamp"),
    [
        ("scans", 17 * SCALE, None),
        ('écran "quoted" \\ back', 1, 1765000000.5),
        ("日本", 2_147_483_647 * SCALE + 999_999, 1765000000),
        ("tab\there", 0, 1765000000.0),
        ("scans", 100_000, 1.7e9),
    ],
)
def test_the_digest_is_the_sorted_json_of_the_record_whatever_the_spelling(
    dimension: str, micros: int, timestamp: float | None
) -> None:
    """Stored idempotency digests must keep matching: the digest of a record without
    allocations is written out by hand (cheaper), byte for byte the sorted JSON it always was."""
    import hashlib

    from sidecar.core import quantity as qty

    doc: dict[str, Any] = {"d": dimension, "q": qty.to_json(micros), "t": timestamp, "a": []}
    want = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    assert UsageRecord(dimension, micros, "k", timestamp, (), "").digest == want
