"""POST /v1/usage bodies: what is accepted, and errors that name the field and what is allowed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.usage.validate import MAX_QUANTITY, Limits, RejectedError, UsageRecord, parse
from tests.helpers import NOW

LIMITS = Limits(("scans", "users"))


def ok(doc: Any) -> list[UsageRecord]:
    return parse(json.dumps(doc).encode(), LIMITS, NOW)


def refused(doc: Any, raw: bytes | None = None) -> RejectedError:
    with pytest.raises(RejectedError) as info:
        parse(raw if raw is not None else json.dumps(doc).encode(), LIMITS, NOW)
    return info.value


def test_one_record_a_list_and_a_records_object_are_accepted() -> None:
    assert ok({"dimension": "scans", "quantity": 3})[0].quantity == 3
    assert [r.dimension for r in ok([{"dimension": "scans", "quantity": 1}] * 2)] == ["scans"] * 2
    assert ok({"records": [{"dimension": "users", "quantity": 0}]})[0].field == "records[0]"


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ({"dimension": "gb", "quantity": 1}, "dimension", "scans, users"),
        ({"dimension": "scans", "quantity": -1}, "quantity", "integer from 0"),
        ({"dimension": "scans", "quantity": 1.5}, "quantity", "integer"),
        ({"dimension": "scans", "quantity": True}, "quantity", "integer"),
        ({"dimension": "scans", "quantity": MAX_QUANTITY + 1}, "quantity", str(MAX_QUANTITY)),
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
