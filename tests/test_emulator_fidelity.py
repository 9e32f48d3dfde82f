"""The emulator behaves like AWS where the pinned model says how: exact decimal quantities
compared by value, ResolveCustomer's Metadata.AgreementId, and each API's own time window.
Driven by unmodified boto3 over HTTP, as a seller's tests would drive AWS."""

from __future__ import annotations

import calendar
import json
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.test_emulator import client, code_of

HOUR = 3600
H0 = (1_800_000_000 // HOUR) * HOUR  # 2027-01-15 08:00 UTC, mid-month


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(emulator: Emulator) -> Clock:
    c = Clock(H0 + 2 * HOUR + 100)
    emulator.meter_clock = c
    return c


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def meter(c: Any, quantity: Any = None, **over: Any) -> Any:
    params: dict[str, Any] = {
        "ProductCode": "prod-abc",
        "Timestamp": at(H0 + 10),
        "UsageDimension": "gb_hours",
    }
    if isinstance(quantity, str):
        params["UsageQuantityAsDecimal"] = quantity
    elif quantity is not None:
        params["UsageQuantity"] = quantity
    params.update(over)
    return c.meter_usage(**params)


def customer(server: EmulatorServer, **spec: Any) -> dict[str, Any]:
    resp = requests.post(server.url + "/_emulator/saas/customers", json=spec, timeout=5)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def saas_ledger(server: EmulatorServer) -> dict[str, Any]:
    return dict(requests.get(server.url + "/_emulator/saas/ledger", timeout=5).json())


def meter_ledger(server: EmulatorServer) -> dict[str, Any]:
    return dict(requests.get(server.url + "/_emulator/ledger", timeout=5).json())


def record(cust: dict[str, Any], quantity: Any = None, **over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "CustomerAWSAccountId": cust["customer_aws_account_id"],
        "LicenseArn": cust["license_arn"],
        "Dimension": "gb_hours",
        "Timestamp": at(H0 + 10),
    }
    if isinstance(quantity, str):
        rec["QuantityAsDecimal"] = quantity
    elif quantity is not None:
        rec["Quantity"] = quantity
    rec.update(over)
    return rec


def statuses(answer: dict[str, Any]) -> list[str]:
    return [r["Status"] for r in answer["Results"]]


def alloc(quantity: Any, **tags: str) -> dict[str, Any]:
    field = "AllocatedUsageQuantity" + ("AsDecimal" if isinstance(quantity, str) else "")
    doc: dict[str, Any] = {field: quantity}
    if tags:
        doc["Tags"] = [{"Key": k, "Value": v} for k, v in tags.items()]
    return doc


# -- decimals, MeterUsage -----------------------------------------------------------------


def test_meter_usage_decimals_are_billed_exactly_and_compared_by_value(
    emulator_server: EmulatorServer, clock: Clock
) -> None:
    """Today's main ignores UsageQuantityAsDecimal: `2.5` then `4` both answer 200, ledger 0."""
    c = client(emulator_server, "pod-d1")
    rid = meter(c, "2.5")["MeteringRecordId"]
    assert code_of(lambda: meter(c, "4")) == "DuplicateRequestException"
    assert meter(c, "2.50", Timestamp=at(H0 + 1800))["MeteringRecordId"] == rid  # by value
    # 17, "17.0", "17.00": one quantity in either field, the same record, never a duplicate
    nxt = at(H0 + HOUR)
    rid17 = meter(c, 17, Timestamp=nxt)["MeteringRecordId"]
    assert meter(c, "17.0", Timestamp=nxt)["MeteringRecordId"] == rid17
    assert meter(c, "17.00", Timestamp=nxt)["MeteringRecordId"] == rid17
    # a ClientToken retried with the same value written another way is the same request
    tok = at(H0 + 2 * HOUR)
    rid_t = meter(c, "3.000", Timestamp=tok, ClientToken="t-1")["MeteringRecordId"]
    assert meter(c, 3, Timestamp=tok, ClientToken="t-1")["MeteringRecordId"] == rid_t
    book = meter_ledger(emulator_server)
    got = sorted((r["hour"], r["quantity"], r["quantity_micros"]) for r in book["records"])
    h = H0 // HOUR
    assert got == [(h, "2.5", 2_500_000), (h + 1, 17, 17_000_000), (h + 2, 3, 3_000_000)]
    assert book["counts"]["DuplicateRequestException"] == 1
    log = requests.get(emulator_server.url + "/_emulator/calls", timeout=5).json()
    calls = [x["quantity"] for x in log]
    assert calls[:3] == ["2.5", 4, "2.5"]  # the calls log shows quantities by value too


@pytest.mark.parametrize(
    "bad",
    ["1.2345678", "01", "1.", ".5", "-1", "1e3", "17\n", " 17", "10000000000", "1,5"],
)
def test_the_decimal_pattern_is_full_matched(
    emulator_server: EmulatorServer, clock: Clock, bad: str
) -> None:
    c = client(emulator_server, "pod-d2")
    assert code_of(lambda: meter(c, bad)) == "ValidationException"
    assert meter_ledger(emulator_server)["records"] == []
    assert meter(c, "9999999999.999999")["MeteringRecordId"]  # the largest value the pattern takes


def test_both_quantity_fields_or_mixed_allocation_kinds_are_refused(
    emulator_server: EmulatorServer, clock: Clock
) -> None:
    c = client(emulator_server, "pod-d3")
    assert code_of(lambda: meter(c, 2, UsageQuantityAsDecimal="2")) == "ValidationException"
    # allocations of the other kind than their record
    assert (
        code_of(lambda: meter(c, 2, UsageAllocations=[alloc("2", team="a")]))
        == "ValidationException"
    )
    assert (
        code_of(lambda: meter(c, "2", UsageAllocations=[alloc(2, team="a")]))
        == "ValidationException"
    )
    both = {"AllocatedUsageQuantity": 1, "AllocatedUsageQuantityAsDecimal": "1"}
    assert code_of(lambda: meter(c, 1, UsageAllocations=[both])) == "ValidationException"
    assert meter_ledger(emulator_server)["records"] == []
    # decimal allocations sum exactly: 0.1 + 0.2 is 0.3 here, as in AWS's decimal arithmetic
    ok = meter(c, "0.3", UsageAllocations=[alloc("0.1", team="a"), alloc("0.2", team="b")])
    assert ok["MeteringRecordId"]
    (entry,) = meter_ledger(emulator_server)["records"]
    assert json.loads(entry["allocations"]) == [["0.1", [["team", "a"]]], ["0.2", [["team", "b"]]]]
    assert (
        code_of(
            lambda: meter(
                c,
                "0.3",
                Timestamp=at(H0 + HOUR),
                UsageAllocations=[alloc("0.1", team="a"), alloc("0.19", team="b")],
            )
        )
        == "InvalidUsageAllocationsException"
    )


# -- decimals, BatchMeterUsage ------------------------------------------------------------


def test_batch_decimals_by_value_and_tenths_sum_to_exactly_one(
    emulator_server: EmulatorServer, clock: Clock
) -> None:
    c = client(emulator_server)
    cust = customer(emulator_server)
    first = c.batch_meter_usage(UsageRecords=[record(cust, "0.1")])
    rid = first["Results"][0]["MeteringRecordId"]
    for same in ("0.10", "0.100000"):
        again = c.batch_meter_usage(UsageRecords=[record(cust, same)])
        assert (statuses(again), again["Results"][0]["MeteringRecordId"]) == (["Success"], rid)
    assert statuses(c.batch_meter_usage(UsageRecords=[record(cust, "0.2")])) == ["DuplicateRecord"]
    # 17 as Quantity, then as QuantityAsDecimal "17.00": the same record
    nxt = at(H0 + HOUR)
    r17 = c.batch_meter_usage(UsageRecords=[record(cust, 17, Timestamp=nxt)])["Results"][0]
    d17 = c.batch_meter_usage(UsageRecords=[record(cust, "17.00", Timestamp=nxt)])["Results"][0]
    assert (d17["Status"], d17["MeteringRecordId"]) == ("Success", r17["MeteringRecordId"])
    # 0.1 for ten customers: exactly 1 billed, no float anywhere
    others = [customer(emulator_server) for _ in range(9)]
    answer = c.batch_meter_usage(UsageRecords=[record(o, "0.1") for o in others])
    assert statuses(answer) == ["Success"] * 9
    book = saas_ledger(emulator_server)
    tenths = [r for r in book["records"] if r["hour"] == H0 // HOUR]
    assert [r["quantity"] for r in tenths] == ["0.1"] * 10
    assert sum(r["quantity_micros"] for r in tenths) == 1_000_000
    assert [r["quantity"] for r in book["records"] if r["hour"] == H0 // HOUR + 1] == [17]
    assert book["counts"]["duplicate_record"] == 1


def test_one_bad_quantity_refuses_the_whole_batch(
    emulator_server: EmulatorServer, clock: Clock
) -> None:
    """The model: "If any usage record fails these checks, the entire BatchMeterUsage request
    fails and no records are processed"."""
    c = client(emulator_server)
    cust, other = customer(emulator_server), customer(emulator_server)
    good = record(other, "1.5")
    for bad in (
        record(cust, 2, QuantityAsDecimal="2"),
        record(cust, "2.1234567"),
        record(cust, 2, UsageAllocations=[alloc("2", team="a")]),
        record(cust, "2", UsageAllocations=[alloc(2, team="a")]),
    ):
        assert (
            code_of(lambda bad=bad: c.batch_meter_usage(UsageRecords=[good, bad]))
            == "ValidationException"
        )
    assert saas_ledger(emulator_server)["records"] == []
    tagged = record(cust, "2", UsageAllocations=[alloc("1.25", team="a"), alloc("0.75")])
    assert statuses(c.batch_meter_usage(UsageRecords=[good, tagged])) == ["Success", "Success"]


# -- ResolveCustomer: Metadata.AgreementId ------------------------------------------------


def test_resolve_customer_answers_the_agreement_id(
    emulator_server: EmulatorServer, clock: Clock
) -> None:
    """Today's main answers no Metadata at all."""
    from sidecar.emulator.saas import default_agreement_id

    c = client(emulator_server)
    lic = customer(emulator_server, customer_aws_account_id="111122223333")
    chosen = customer(emulator_server, agreement_id="agmt-chosen-by-the-test")
    legacy = customer(emulator_server, customer_identifier="cust-9", product_code="prod-9")

    got = c.resolve_customer(RegistrationToken=lic["registration_token"])
    key = f"111122223333/{lic['license_arn']}"
    assert got["Metadata"] == {"AgreementId": default_agreement_id(key)}
    assert got["Metadata"]["AgreementId"] == lic["agreement_id"]
    assert set(got) - {"ResponseMetadata"} == {
        "CustomerAWSAccountId",
        "LicenseArn",
        "ProductCode",
        "Metadata",
    }
    answer = c.resolve_customer(RegistrationToken=chosen["registration_token"])
    assert answer["Metadata"]["AgreementId"] == "agmt-chosen-by-the-test"
    old = c.resolve_customer(RegistrationToken=legacy["registration_token"])
    assert (old["CustomerIdentifier"], old["ProductCode"]) == ("cust-9", "prod-9")
    assert old["Metadata"]["AgreementId"] == default_agreement_id("cust-9")
    # deterministic: the same customer after a reset has the same default agreement id
    requests.post(emulator_server.url + "/_emulator/reset", timeout=5).raise_for_status()
    again = customer(
        emulator_server, customer_aws_account_id="111122223333", license_arn=lic["license_arn"]
    )
    assert again["agreement_id"] == lic["agreement_id"]
    shown = saas_ledger(emulator_server)["customers"]
    assert [x["agreement_id"] for x in shown] == [lic["agreement_id"]]


@pytest.mark.parametrize("bad", ["", "a b", "x" * 65, 7, "agmt-ü"])
def test_a_bad_agreement_id_is_refused_by_name(emulator_server: EmulatorServer, bad: Any) -> None:
    resp = requests.post(
        emulator_server.url + "/_emulator/saas/customers", json={"agreement_id": bad}, timeout=5
    )
    assert resp.status_code == 400 and "agreement_id" in resp.json()["error"]


# -- windows per API ----------------------------------------------------------------------


def test_a_record_7_to_23_hours_old_is_batch_only(
    emulator_server: EmulatorServer, clock: Clock
) -> None:
    """Today's main refuses BatchMeterUsage records six hours old or more."""
    c = client(emulator_server, "pod-w1")
    cust = customer(emulator_server)
    for age in (7 * HOUR, 23 * HOUR + 3599):
        stamp = at(clock.t - age)
        assert code_of(lambda s=stamp: meter(c, 1, Timestamp=s)) == "TimestampOutOfBoundsException"
        ok = c.batch_meter_usage(UsageRecords=[record(cust, 1, Timestamp=stamp)])
        assert statuses(ok) == ["Success"]
    day = at(clock.t - 24 * HOUR)
    assert (
        code_of(lambda: c.batch_meter_usage(UsageRecords=[record(cust, 1, Timestamp=day)]))
        == "TimestampOutOfBoundsException"
    )
    assert meter_ledger(emulator_server)["records"] == []


def test_windows_are_configurable_over_http(emulator_server: EmulatorServer, clock: Clock) -> None:
    c = client(emulator_server, "pod-w2")
    cust = customer(emulator_server)
    resp = requests.post(
        emulator_server.url + "/_emulator/config",
        json={"meter_window_seconds": 8 * HOUR, "batch_window_seconds": 6 * HOUR},
        timeout=5,
    )
    assert resp.status_code == 200, resp.text
    seven = at(clock.t - 7 * HOUR)
    assert meter(c, 1, Timestamp=seven)["MeteringRecordId"]
    assert (
        code_of(lambda: c.batch_meter_usage(UsageRecords=[record(cust, 1, Timestamp=seven)]))
        == "TimestampOutOfBoundsException"
    )


def test_the_previous_month_closes_at_0600_utc_on_the_first(
    emulator_server: EmulatorServer, clock: Clock
) -> None:
    """The model's example: "On April 1 at 05:00 UTC, you can still submit records for March
    31 ... After 06:00 UTC on April 1, March records are rejected regardless of the normal
    24-hour submission window"."""
    april = calendar.timegm((2027, 4, 1, 0, 0, 0))
    c = client(emulator_server)
    cust = customer(emulator_server)
    march = record(cust, "1", Timestamp=at(april - 1800))  # March 31, 23:30
    morning = record(cust, "2", Timestamp=at(april - 14 * HOUR))  # March 31, 10:00: 19 h old
    clock.t = april + 5 * HOUR
    assert statuses(c.batch_meter_usage(UsageRecords=[march, morning])) == ["Success"] * 2
    clock.t = april + 6 * HOUR
    late = record(cust, "1", Dimension="other", Timestamp=at(april - 1800))  # 6.5 h old
    assert (
        code_of(lambda: c.batch_meter_usage(UsageRecords=[late])) == "TimestampOutOfBoundsException"
    )
    april_first = record(cust, "1", Timestamp=at(april + 600))
    assert statuses(c.batch_meter_usage(UsageRecords=[april_first])) == ["Success"]
    # MeterUsage has no month rule documented: its six hours apply across the month end
    pod = client(emulator_server, "pod-w3")
    clock.t = april + 5 * HOUR + 1200
    assert meter(pod, 1, Timestamp=at(april - 600))["MeteringRecordId"]
