"""The emulator's ResolveCustomer and BatchMeterUsage, driven by unmodified boto3 over HTTP."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError

from sidecar.aws.metering import MAX_BATCH_BYTES, batch_request_bytes
from sidecar.emulator.service import Emulator, EmulatorServer
from tests.test_emulator import client, code_of

NOW = 1_800_000_000.0
HOUR0 = (int(NOW) // 3600) * 3600


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(emulator: Emulator) -> Clock:
    c = Clock(HOUR0 + 2 * 3600 + 100)
    emulator.meter_clock = c
    return c


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def customer(server: EmulatorServer, **spec: Any) -> dict[str, Any]:
    resp = requests.post(server.url + "/_emulator/saas/customers", json=spec, timeout=5)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def ledger(server: EmulatorServer) -> dict[str, Any]:
    return dict(requests.get(server.url + "/_emulator/saas/ledger", timeout=5).json())


def license_record(cust: dict[str, Any], **over: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "CustomerAWSAccountId": cust["customer_aws_account_id"],
        "LicenseArn": cust["license_arn"],
        "Dimension": "seats",
        "Quantity": 5,
        "Timestamp": at(HOUR0 + 10),
    }
    record.update(over)
    return record


def statuses(answer: dict[str, Any]) -> list[str]:
    return [r["Status"] for r in answer["Results"]]


# -- ResolveCustomer ----------------------------------------------------------------------


def test_resolve_answers_only_issued_tokens_with_the_fields_of_each_identity(
    emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    c = client(emulator_server)
    lic = customer(emulator_server, customer_aws_account_id="111122223333")
    old = customer(emulator_server, customer_identifier="cust-old", product_code="prod-1")

    first = c.resolve_customer(RegistrationToken=lic["registration_token"])
    assert first["CustomerAWSAccountId"] == "111122223333"
    assert first["LicenseArn"] == lic["license_arn"]
    assert lic["license_arn"].startswith("arn:aws:license-manager::111122223333:license:")
    assert "CustomerIdentifier" not in first  # new integrations: not populated
    legacy = c.resolve_customer(RegistrationToken=old["registration_token"])
    assert (legacy["CustomerIdentifier"], legacy["ProductCode"]) == ("cust-old", "prod-1")

    # the same token within its lifetime keeps answering the same customer
    again = c.resolve_customer(RegistrationToken=lic["registration_token"])
    assert {k: v for k, v in again.items() if k != "ResponseMetadata"} == {
        k: v for k, v in first.items() if k != "ResponseMetadata"
    }
    forged = lic["registration_token"][:-1] + ("A" if lic["registration_token"][-1] != "A" else "B")
    assert code_of(lambda: c.resolve_customer(RegistrationToken=forged)) == "InvalidTokenException"


def test_a_token_expires_on_the_emulators_clock(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    c = client(emulator_server)
    cust = customer(emulator_server, token_ttl_seconds=60)
    token = cust["registration_token"]
    clock.t += 59
    assert c.resolve_customer(RegistrationToken=token)["LicenseArn"] == cust["license_arn"]
    clock.t += 1
    assert code_of(lambda: c.resolve_customer(RegistrationToken=token)) == "ExpiredTokenException"
    # the buyer opens the setup link again: a new token for the same customer
    fresh = customer(
        emulator_server,
        customer_aws_account_id=cust["customer_aws_account_id"],
        license_arn=cust["license_arn"],
    )
    assert fresh["registration_token"] != token
    assert (
        c.resolve_customer(RegistrationToken=fresh["registration_token"])["LicenseArn"]
        == (cust["license_arn"])
    )


def test_token_expiry_follows_the_scaled_clock_set_over_http(
    emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    """time_scale/time_origin (what process-level tests use) drive token lifetimes too."""
    origin = time.time()
    c = client(emulator_server)  # made first: creating a client can take a while under load
    requests.post(
        emulator_server.url + "/_emulator/config",
        json={"time_scale": 3600.0, "time_origin": origin},
        timeout=5,
    ).raise_for_status()
    issued = customer(emulator_server, token_ttl_seconds=2 * 3600)  # two real seconds
    assert c.resolve_customer(RegistrationToken=issued["registration_token"])
    emulated_now = origin + (time.time() - origin) * 3600.0
    time.sleep(max(0.0, (issued["expires_at"] - emulated_now) / 3600.0) + 0.2)
    assert (
        code_of(lambda: c.resolve_customer(RegistrationToken=issued["registration_token"]))
        == "ExpiredTokenException"
    )


def test_customer_setup_refuses_bad_fields_by_name(emulator_server: EmulatorServer) -> None:
    for spec, field in [
        ({"token_ttl_seconds": 0}, "token_ttl_seconds"),
        ({"customer_aws_account_id": "12ab"}, "customer_aws_account_id"),
        ({"identity": "both"}, "identity"),
        ({"tll": 5}, "tll"),
    ]:
        resp = requests.post(
            emulator_server.url + "/_emulator/saas/customers", json=spec, timeout=5
        )
        assert resp.status_code == 400 and field in resp.json()["error"]


# -- BatchMeterUsage: per-record statuses and the ledger ---------------------------------


def test_every_per_record_status_and_the_original_quantity_stays(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    c = client(emulator_server)
    alice = customer(emulator_server)
    bob = customer(emulator_server)
    stranger = {"customer_aws_account_id": "999999999999", "license_arn": alice["license_arn"][:-1]}
    requests.post(
        emulator_server.url + "/_emulator/saas/unsubscribe",
        json={"customer_aws_account_id": bob["customer_aws_account_id"]},
        timeout=5,
    ).raise_for_status()

    answer = c.batch_meter_usage(
        UsageRecords=[license_record(alice), license_record(bob), license_record(stranger)]
    )
    assert statuses(answer) == ["Success", "CustomerNotSubscribed", "CustomerNotSubscribed"]
    rid = answer["Results"][0]["MeteringRecordId"]
    assert "MeteringRecordId" not in answer["Results"][1]
    # the same customer, dimension and hour (another minute) with another quantity
    dup = c.batch_meter_usage(
        UsageRecords=[license_record(alice, Quantity=6, Timestamp=at(HOUR0 + 1800))]
    )
    assert statuses(dup) == ["DuplicateRecord"]
    # the identical record again: Success, the same record id
    same = c.batch_meter_usage(UsageRecords=[license_record(alice)])
    assert (statuses(same), same["Results"][0]["MeteringRecordId"]) == (["Success"], rid)

    book = ledger(emulator_server)
    assert [(r["customer"], r["dimension"], r["hour"], r["quantity"]) for r in book["records"]] == [
        (f"{alice['customer_aws_account_id']}/{alice['license_arn']}", "seats", HOUR0 // 3600, 5)
    ]
    counts = book["counts"]
    assert (counts["calls"], counts["records"]) == (3, 1)
    assert (counts["duplicate_record"], counts["customer_not_subscribed"]) == (1, 2)


def test_customer_identifier_records_need_the_product_code_they_were_issued_for(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    c = client(emulator_server)
    customer(emulator_server, customer_identifier="cust-7", product_code="prod-1")
    record = {"CustomerIdentifier": "cust-7", "Dimension": "seats", "Quantity": 1}
    record["Timestamp"] = at(HOUR0 + 10)
    ok = c.batch_meter_usage(ProductCode="prod-1", UsageRecords=[record])
    assert statuses(ok) == ["Success"]
    other = c.batch_meter_usage(ProductCode="prod-2", UsageRecords=[record])
    assert statuses(other) == ["CustomerNotSubscribed"]
    assert code_of(lambda: c.batch_meter_usage(UsageRecords=[record])) == "ValidationException"


def test_identical_records_regrouped_in_subsets_stay_idempotent(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    c = client(emulator_server)
    custs = [customer(emulator_server) for _ in range(3)]
    records = [license_record(cu, Quantity=i + 1) for i, cu in enumerate(custs)]
    first = c.batch_meter_usage(UsageRecords=records)
    ids = [r["MeteringRecordId"] for r in first["Results"]]
    assert statuses(first) == ["Success"] * 3

    subset = c.batch_meter_usage(UsageRecords=[records[1]])
    assert subset["Results"][0]["MeteringRecordId"] == ids[1]
    new = license_record(custs[0], Dimension="storage", Quantity=9)
    regrouped = c.batch_meter_usage(UsageRecords=[records[2], new, records[0]])
    assert statuses(regrouped) == ["Success"] * 3
    got = [r["MeteringRecordId"] for r in regrouped["Results"]]
    assert (got[0], got[2]) == (ids[2], ids[0]) and got[1] not in ids

    counts = ledger(emulator_server)["counts"]
    assert (counts["records"], counts["duplicate_record"]) == (4, 0)


def test_concurrent_senders_of_the_same_records_record_each_once(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    """The server is threaded: racing identical calls must all get the same record ids."""
    custs = [customer(emulator_server) for _ in range(5)]
    records = [license_record(cu, Quantity=7) for cu in custs]
    answers: list[list[str]] = []
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            c = client(emulator_server, f"pod-{i}")
            rotated = records[i % 5 :] + records[: i % 5]
            got = c.batch_meter_usage(UsageRecords=rotated)["Results"]
            answers.append(sorted(r["MeteringRecordId"] for r in got))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(answers) == 12
    assert all(a == answers[0] for a in answers) and len(set(answers[0])) == 5
    book = ledger(emulator_server)
    assert len(book["records"]) == 5 and book["counts"]["duplicate_record"] == 0


# -- BatchMeterUsage: whole-request refusals ---------------------------------------------


def test_more_than_25_records_are_refused_whole(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    """botocore lets 26 through (it checks minimums only); the emulator refuses as AWS does."""
    c = client(emulator_server)
    cust = customer(emulator_server)
    records = [license_record(cust, Dimension=f"d{i}") for i in range(26)]
    assert code_of(lambda: c.batch_meter_usage(UsageRecords=records)) == "ValidationException"
    assert ledger(emulator_server)["records"] == []
    assert statuses(c.batch_meter_usage(UsageRecords=records[:25])) == ["Success"] * 25


def sized_request(cust: dict[str, Any], target: int) -> dict[str, Any]:
    """A one-record request whose body is exactly `target` bytes (allocations pad it)."""

    def alloc(i: int, width: int) -> dict[str, Any]:
        tags = [{"Key": "k0", "Value": f"{i}v".ljust(width, "x")}]
        tags += [{"Key": f"k{j}", "Value": "y" * 200} for j in range(1, 5)]
        return {"AllocatedUsageQuantity": 1, "Tags": tags}

    def build(n: int, widths: list[int]) -> dict[str, Any]:
        allocs = [alloc(i, widths[i] if i < len(widths) else 200) for i in range(n)]
        record = license_record(cust, Quantity=n, UsageAllocations=allocs)
        return {"UsageRecords": [record]}

    one = batch_request_bytes(build(1, []))
    n = max(1, (target - 2000 - one) // (batch_request_bytes(build(2, [])) - one))
    while n > 1 and batch_request_bytes(build(n, [])) > target - 300:
        n -= 1
    widths = [200] * n
    missing = target - batch_request_bytes(build(n, widths))  # one more character, one byte
    for i in range(n):
        grow = min(missing, 256 - widths[i])
        widths[i] += grow
        missing -= grow
    request = build(n, widths)
    assert batch_request_bytes(request) == target
    return request


def test_the_1_mb_limit_is_enforced_on_the_body_botocore_sends(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    c = client(emulator_server)
    cust = customer(emulator_server)
    at_limit = sized_request(cust, MAX_BATCH_BYTES)
    assert code_of(lambda: c.batch_meter_usage(**at_limit)) == "ValidationException"
    assert emulator.calls[-1]["code"] == "ValidationException"
    assert ledger(emulator_server)["records"] == []
    under = sized_request(cust, MAX_BATCH_BYTES - 1)
    assert statuses(c.batch_meter_usage(**under)) == ["Success"]
    # far beyond: still a clear 400, and the server keeps answering
    huge = sized_request(cust, 5_000_000)
    assert code_of(lambda: c.batch_meter_usage(**huge)) == "ValidationException"
    assert ledger(emulator_server)["counts"]["records"] == 1


def test_never_both_identifier_kinds_in_one_request(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    c = client(emulator_server)
    lic = customer(emulator_server)
    customer(emulator_server, customer_identifier="cust-1", product_code="prod-1")
    by_id = {"CustomerIdentifier": "cust-1", "Dimension": "seats", "Timestamp": at(HOUR0)}
    mixed = [license_record(lic), by_id]
    assert (
        code_of(lambda: c.batch_meter_usage(ProductCode="prod-1", UsageRecords=mixed))
        == "ValidationException"
    )
    # one record naming both kinds is refused too
    both = license_record(lic, CustomerIdentifier="cust-1")
    assert code_of(lambda: c.batch_meter_usage(UsageRecords=[both])) == "ValidationException"
    assert ledger(emulator_server)["records"] == []


def test_a_product_code_with_license_records_is_accepted_and_bills_twice(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    """The model only advises against it: "For new integrations using LicenseArn ..., do NOT
    include ProductCode at the request level ... Sending metering records with both ProductCode
    and LicenseArn for the same customer within the same hour will result in duplicate
    billing." Accepted (today's main refuses it), and the ledger shows the double billing."""
    c = client(emulator_server)
    lic = customer(emulator_server, product_code="prod-1")
    plain = c.batch_meter_usage(UsageRecords=[license_record(lic)])
    named = c.batch_meter_usage(ProductCode="prod-1", UsageRecords=[license_record(lic)])
    assert statuses(plain) == statuses(named) == ["Success"]
    assert plain["Results"][0]["MeteringRecordId"] != named["Results"][0]["MeteringRecordId"]
    again = c.batch_meter_usage(ProductCode="prod-1", UsageRecords=[license_record(lic)])
    assert again["Results"][0]["MeteringRecordId"] == named["Results"][0]["MeteringRecordId"]
    book = ledger(emulator_server)
    assert sorted((r["scope"], r["quantity"]) for r in book["records"]) == [
        ("license", 5),
        ("product", 5),
    ]
    assert book["counts"]["product_code_with_license"] == 1
    # another product's code is not this customer's subscription
    other = c.batch_meter_usage(ProductCode="prod-2", UsageRecords=[license_record(lic)])
    assert statuses(other) == ["CustomerNotSubscribed"]


@pytest.mark.parametrize(
    "bad_offset",
    [-24 * 3600, 301],  # 24 hours old (the limit is "24 h or more"), past the future limit
)
def test_one_out_of_range_timestamp_rejects_the_whole_batch(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock, bad_offset: float
) -> None:
    c = client(emulator_server)
    cust = customer(emulator_server)
    good = [license_record(cust, Dimension=d, Timestamp=at(clock.t - 23 * 3600)) for d in "ab"]
    bad = license_record(cust, Dimension="c", Timestamp=at(clock.t + bad_offset))
    assert (
        code_of(lambda: c.batch_meter_usage(UsageRecords=[good[0], bad, good[1]]))
        == "TimestampOutOfBoundsException"
    )
    book = ledger(emulator_server)
    assert book["records"] == [] and book["counts"]["out_of_bounds_batches"] == 1
    assert statuses(c.batch_meter_usage(UsageRecords=good)) == ["Success", "Success"]


def test_a_license_arn_of_another_account_is_invalid_license(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    c = client(emulator_server)
    alice, bob = customer(emulator_server), customer(emulator_server)
    stolen = license_record(bob, LicenseArn=alice["license_arn"])
    assert code_of(lambda: c.batch_meter_usage(UsageRecords=[stolen])) == "InvalidLicenseException"


# -- throttling, unprocessed records, faults, IAM, reset ---------------------------------


def test_batch_throttling_when_configured(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    c = client(emulator_server)
    cust = customer(emulator_server)
    records = [license_record(cust)]
    for _ in range(3):  # off by default
        c.batch_meter_usage(UsageRecords=records)
    emulator.reconfigure({"batch_throttle_rps": 0.01, "batch_throttle_burst": 2})
    codes = []
    for _ in range(4):
        try:
            c.batch_meter_usage(UsageRecords=records)
            codes.append("ok")
        except ClientError as exc:
            codes.append(str(exc.response["Error"]["Code"]))
    assert codes == ["ok", "ok", "ThrottlingException", "ThrottlingException"]
    counts = ledger(emulator_server)["counts"]
    assert (counts["throttled"], counts["calls"]) == (2, 7)
    # other operations have their own quotas
    assert c.resolve_customer(RegistrationToken=cust["registration_token"])


def test_unprocessed_records_on_demand_are_not_recorded_until_resent(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    c = client(emulator_server)
    custs = [customer(emulator_server) for _ in range(10)]
    records = [license_record(cu) for cu in custs]
    emulator.reconfigure({"unprocessed_rate": 1.0})
    answer = c.batch_meter_usage(UsageRecords=records)
    assert answer["Results"] == [] and len(answer["UnprocessedRecords"]) == 10
    assert ledger(emulator_server)["records"] == []

    emulator.reconfigure({"unprocessed_rate": 0.5})
    pending, rounds, done = records, 0, 0
    while pending and rounds < 40:
        answer = c.batch_meter_usage(UsageRecords=pending)
        done += len(answer["Results"])
        pending = answer["UnprocessedRecords"]  # resent as they came back
        rounds += 1
    assert not pending and done == 10 and rounds > 1
    book = ledger(emulator_server)
    assert len(book["records"]) == 10 and book["counts"]["unprocessed"] >= 10
    with pytest.raises(ValueError, match="unprocessed_rate"):
        emulator.reconfigure({"unprocessed_rate": 1.5})


def test_faults_and_denied_operations_apply_to_the_saas_operations(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    c = client(emulator_server)
    cust = customer(emulator_server)
    emulator.reconfigure(
        {
            "faults": [
                {"error": "InternalServiceErrorException", "first": 1, "op": "BatchMeterUsage"}
            ]
        }
    )
    assert (
        code_of(lambda: c.batch_meter_usage(UsageRecords=[license_record(cust)]))
        == "InternalServiceErrorException"
    )
    assert statuses(c.batch_meter_usage(UsageRecords=[license_record(cust)])) == ["Success"]
    emulator.reconfigure(
        {"faults": [{"error": "DisabledApiException", "first": 1, "op": "ResolveCustomer"}]}
    )
    token = cust["registration_token"]
    assert code_of(lambda: c.resolve_customer(RegistrationToken=token)) == "DisabledApiException"
    emulator.reconfigure({"denied_operations": ["ResolveCustomer"]})
    assert code_of(lambda: c.resolve_customer(RegistrationToken=token)) == "AccessDeniedException"


def test_reset_forgets_customers_tokens_and_records(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    c = client(emulator_server)
    cust = customer(emulator_server)
    c.batch_meter_usage(UsageRecords=[license_record(cust)])
    assert ledger(emulator_server)["counts"]["records"] == 1
    requests.post(emulator_server.url + "/_emulator/reset", timeout=5).raise_for_status()
    book = ledger(emulator_server)
    assert book["records"] == [] and book["counts"]["calls"] == 0 and book["customers"] == []
    token = cust["registration_token"]
    assert code_of(lambda: c.resolve_customer(RegistrationToken=token)) == "InvalidTokenException"


def test_clock_offset_set_over_http_moves_aws_clock_against_the_senders(
    emulator_server: EmulatorServer, emulator: Emulator, clock: Clock
) -> None:
    """AWS's clock 400 s behind the sender's, 300 s of future tolerance: a record stamped at
    the sender's "now - 60 s" is in AWS's future; the same record is accepted without it."""
    c = client(emulator_server)
    cust = customer(emulator_server)
    record = license_record(cust, Timestamp=at(clock.t - 60))
    config = emulator_server.url + "/_emulator/config"
    resp = requests.post(
        config, json={"clock_offset": -400.0, "meter_future_seconds": 300.0}, timeout=5
    )
    assert resp.status_code == 200, resp.text
    assert (
        code_of(lambda: c.batch_meter_usage(UsageRecords=[record]))
        == "TimestampOutOfBoundsException"
    )
    assert requests.post(config, json={"clock_offset": 0.0}, timeout=5).status_code == 200
    assert statuses(c.batch_meter_usage(UsageRecords=[record])) == ["Success"]
