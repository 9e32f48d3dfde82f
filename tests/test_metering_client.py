"""The lean Metering client (botocore session, one service's data) resolves exactly what
boto3.client would: endpoint, signing name and region, in every partition. The SaaS calls
(ResolveCustomer, BatchMeterUsage) go over real HTTP to the emulator on loopback."""

from __future__ import annotations

import logging
from typing import Any

import boto3
import pytest
import requests

from sidecar.aws.metering import (
    MAX_BATCH_BYTES,
    AwsCallError,
    MeteringGateway,
    batch_request_bytes,
)
from sidecar.emulator.service import Emulator, EmulatorServer


@pytest.fixture(autouse=True)
def _no_credential_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients resolve credentials when made: dummy keys, IMDS off (loopback only)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")


@pytest.mark.parametrize(
    "region", ["us-east-1", "eu-west-1", "ap-southeast-2", "cn-north-1", "us-gov-west-1"]
)
def test_same_endpoint_and_signing_as_boto3(region: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_MARKETPLACE_METERING", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    ours = MeteringGateway(region, 5.0)._client
    reference = boto3.client("meteringmarketplace", region_name=region)
    assert ours.meta.endpoint_url == reference.meta.endpoint_url
    assert ours.meta.region_name == reference.meta.region_name == region
    assert ours.meta.service_model.signing_name == reference.meta.service_model.signing_name
    assert ours.meta.service_model.operation_names == reference.meta.service_model.operation_names


def test_endpoint_override_still_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_MARKETPLACE_METERING", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    assert MeteringGateway("us-east-1", 5.0).endpoint == "http://127.0.0.1:9"


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1"])
@pytest.mark.parametrize("service", ["sts", "sso", "sso-oidc"])
def test_clients_of_the_credential_chain_resolve_as_with_boto3(
    service: str, region: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IRSA and assumed roles make an STS client from the same session (a regression: the lean
    loader once refused 'sts' as an unknown service, so IRSA failed)."""
    from sidecar.aws.metering import _session

    monkeypatch.delenv("AWS_ENDPOINT_URL_STS", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    ours = _session().create_client(service, region_name=region)
    reference = boto3.client(service, region_name=region)  # type: ignore[call-overload]
    assert ours.meta.endpoint_url == reference.meta.endpoint_url


def test_an_unknown_service_is_still_refused() -> None:
    from botocore.exceptions import UnknownServiceError

    from sidecar.aws.metering import _session

    with pytest.raises(UnknownServiceError):
        _session().create_client("no-such-service", region_name="us-east-1")


# -- SaaS: ResolveCustomer and BatchMeterUsage against the emulator -----------------------

NOW = 1_800_000_000.0
HOUR0 = (int(NOW) // 3600) * 3600


@pytest.fixture
def saas(
    emulator_server: EmulatorServer, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> MeteringGateway:
    monkeypatch.setenv("AWS_ENDPOINT_URL_MARKETPLACE_METERING", emulator_server.url)
    emulator.meter_clock = lambda: HOUR0 + 2 * 3600 + 100
    return MeteringGateway("us-east-1", 5.0)


def new_customer(server: EmulatorServer, **spec: Any) -> dict[str, Any]:
    resp = requests.post(server.url + "/_emulator/saas/customers", json=spec, timeout=5)
    resp.raise_for_status()
    return dict(resp.json())


def record(cust: dict[str, Any], **over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "CustomerAWSAccountId": cust["customer_aws_account_id"],
        "LicenseArn": cust["license_arn"],
        "Dimension": "seats",
        "Quantity": 3,
        "Timestamp": HOUR0 + 60,
    }
    rec.update(over)
    return rec


def batch_calls(emulator: Emulator) -> int:
    return sum(1 for c in emulator.calls if c["op"] == "BatchMeterUsage")


def test_resolve_customer_answers_without_response_metadata(
    saas: MeteringGateway, emulator_server: EmulatorServer
) -> None:
    cust = new_customer(emulator_server, customer_aws_account_id="123456789012")
    answer = saas.resolve_customer(cust["registration_token"])
    assert answer == {
        "CustomerAWSAccountId": "123456789012",
        "LicenseArn": cust["license_arn"],
        "ProductCode": cust["product_code"],
        "Metadata": {"AgreementId": cust["agreement_id"]},
    }
    legacy = new_customer(emulator_server, customer_identifier="cust-9", product_code="p-1")
    assert saas.resolve_customer(legacy["registration_token"])["CustomerIdentifier"] == "cust-9"


def test_token_errors_are_classified_and_never_quote_the_token(
    saas: MeteringGateway, emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    token = "t0kenAAAA" + "x" * 60
    with pytest.raises(AwsCallError) as invalid:
        saas.resolve_customer(token)
    info = invalid.value.info
    assert (info.code, info.kind, info.retryable) == ("InvalidTokenException", "token", False)
    assert "x-amzn-marketplace-token" in info.hint

    clock = [HOUR0 + 100.0]
    emulator.meter_clock = lambda: clock[0]
    cust = new_customer(emulator_server, token_ttl_seconds=30)
    clock[0] += 31
    with pytest.raises(AwsCallError) as expired:
        saas.resolve_customer(cust["registration_token"])
    info = expired.value.info
    assert (info.code, info.kind, info.retryable) == ("ExpiredTokenException", "token", False)
    assert "redeem the token as soon as the buyer's browser posts it" in info.hint
    # an answer echoing the token (a hostile or verbose endpoint) is cut down before it
    # reaches a log line or the local API
    from sidecar.aws.errors import classify
    from sidecar.aws.metering import _scrubbed

    echoed = _scrubbed(classify("InvalidTokenException", f"token {token} is invalid"), token)
    assert token not in echoed.message and token[:6] in echoed.message


def test_the_registration_token_never_reaches_botocores_debug_log(
    saas: MeteringGateway, emulator_server: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A seller debugging with botocore at DEBUG would otherwise log every request body."""
    token = new_customer(emulator_server)["registration_token"]
    caplog.set_level(logging.DEBUG, logger="botocore")
    saas.resolve_customer(token)
    assert "RegistrationToken" in caplog.text  # the body was logged...
    assert token not in caplog.text  # ...without the token
    assert token[:6] in caplog.text  # enough to tell two apart


def test_a_license_manager_client_in_the_process_leaves_metering_bodies_debuggable(
    saas: MeteringGateway, emulator_server: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """License Manager's log filter sits on botocore's process-wide loggers: it once dropped
    every record mentioning a body, so a Metering request could no longer be debugged."""
    from sidecar.aws.license import LicenseGateway

    LicenseGateway("us-east-1", 1.0)
    token = new_customer(emulator_server)["registration_token"]
    caplog.set_level(logging.DEBUG, logger="botocore")
    saas.resolve_customer(token)
    assert "RegistrationToken" in caplog.text and token[:6] in caplog.text
    assert token not in caplog.text


def test_batch_meter_usage_round_trip_with_epoch_timestamps(
    saas: MeteringGateway, emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    alice = new_customer(emulator_server)
    stranger = {"customer_aws_account_id": "999", "license_arn": "arn:aws:x::999:l/none"}
    request = {"UsageRecords": [record(alice), record(stranger)]}
    answer = saas.batch_meter_usage(request)
    assert [r["Status"] for r in answer["Results"]] == ["Success", "CustomerNotSubscribed"]
    assert answer["Results"][0]["UsageRecord"] == request["UsageRecords"][0]  # ints, as sent
    assert answer["UnprocessedRecords"] == []
    emulator.reconfigure({"unprocessed_rate": 1.0})
    again = saas.batch_meter_usage(request)
    assert again["UnprocessedRecords"] == request["UsageRecords"]
    assert isinstance(again["UnprocessedRecords"][0]["Timestamp"], int)


def test_more_than_25_records_are_refused_before_sending(
    saas: MeteringGateway, emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    cust = new_customer(emulator_server)
    records = [record(cust, Dimension=f"d{i}") for i in range(26)]
    with pytest.raises(ValueError, match="at most 25 records; got 26"):
        saas.batch_meter_usage({"UsageRecords": records})
    assert batch_calls(emulator) == 0
    assert len(saas.batch_meter_usage({"UsageRecords": records[:25]})["Results"]) == 25


def padded(cust: dict[str, Any], target: int) -> dict[str, Any]:
    """A one-record request of exactly `target` bytes on the wire (allocation tags pad it)."""

    def build(n: int, extra: int) -> dict[str, Any]:
        allocs = []
        for i in range(n):
            width = 200 + min(max(extra - 56 * i, 0), 56)
            tags = [{"Key": "k", "Value": f"{i}v".ljust(width, "x")}]
            tags += [{"Key": f"k{j}", "Value": "y" * 200} for j in range(1, 5)]
            allocs.append({"AllocatedUsageQuantity": 1, "Tags": tags})
        return {"UsageRecords": [record(cust, Quantity=n, UsageAllocations=allocs)]}

    one = batch_request_bytes(build(1, 0))
    n = (target - 3000 - one) // (batch_request_bytes(build(2, 0)) - one)
    request = build(n, target - batch_request_bytes(build(n, 0)))
    assert batch_request_bytes(request) == target
    return request


def test_a_request_of_1_mb_is_refused_before_sending(
    saas: MeteringGateway, emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    cust = new_customer(emulator_server)
    with pytest.raises(ValueError, match=f"under {MAX_BATCH_BYTES} bytes"):
        saas.batch_meter_usage(padded(cust, MAX_BATCH_BYTES))
    assert batch_calls(emulator) == 0
    # one byte less is sent, and the emulator (measuring what arrived) accepts it
    answer = saas.batch_meter_usage(padded(cust, MAX_BATCH_BYTES - 1))
    assert [r["Status"] for r in answer["Results"]] == ["Success"]


@pytest.mark.parametrize(
    ("setup", "code", "kind", "retryable"),
    [
        ({"faults": [{"error": "ThrottlingException", "first": 1}]}, "ThrottlingException",
         "transient", True),
        ({"batch_throttle_rps": 0.01, "batch_throttle_burst": 1}, "ThrottlingException",
         "transient", True),
        ({"faults": [{"error": "InternalServiceErrorException", "first": 1}]},
         "InternalServiceErrorException", "transient", True),
        ({"faults": [{"error": "ConnectionReset", "first": 1}]}, "ConnectionClosedError",
         "transient", True),
        ({"denied_operations": ["BatchMeterUsage"]}, "AccessDeniedException",
         "configuration", False),
        ({"faults": [{"error": "DisabledApiException", "first": 1}]}, "DisabledApiException",
         "aws", False),
        ({"dimensions": ["users"]}, "InvalidUsageDimensionException", "configuration", False),
    ],
)  # fmt: skip
def test_batch_errors_are_classified(
    saas: MeteringGateway,
    emulator_server: EmulatorServer,
    emulator: Emulator,
    setup: dict[str, Any],
    code: str,
    kind: str,
    retryable: bool,
) -> None:
    cust = new_customer(emulator_server)
    request = {"UsageRecords": [record(cust)]}
    if "batch_throttle_rps" in setup:
        emulator.reconfigure(setup)
        saas.batch_meter_usage(request)  # the one token of the bucket
    else:
        emulator.reconfigure(setup)
    with pytest.raises(AwsCallError) as failed:
        saas.batch_meter_usage(request)
    info = failed.value.info
    assert (info.code, info.kind, info.retryable) == (code, kind, retryable)
    if code == "AccessDeniedException":
        assert "aws-marketplace:BatchMeterUsage" in info.hint


def test_one_out_of_range_timestamp_fails_the_call_as_usage(
    saas: MeteringGateway, emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    cust = new_customer(emulator_server)
    now = HOUR0 + 2 * 3600 + 100
    request = {
        "UsageRecords": [record(cust), record(cust, Dimension="old", Timestamp=now - 24 * 3600)]
    }
    with pytest.raises(AwsCallError) as failed:
        saas.batch_meter_usage(request)
    info = failed.value.info
    assert (info.code, info.kind, info.retryable) == (
        "TimestampOutOfBoundsException",
        "usage",
        False,
    )
    assert "whole call" in info.hint
    assert emulator.saas_ledger()["records"] == []


def test_an_answer_lost_after_recording_is_safe_to_resend_identically(
    saas: MeteringGateway, emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    """AWS recorded the batch but the answer never came: the identical resend is idempotent."""
    from sidecar.aws.errors import may_have_reached_aws

    custs = [new_customer(emulator_server) for _ in range(3)]
    request = {"UsageRecords": [record(c, Quantity=i) for i, c in enumerate(custs)]}
    emulator.reconfigure({"faults": [{"error": "RecordedThenReset", "first": 1}]})
    with pytest.raises(AwsCallError) as lost:
        saas.batch_meter_usage(request)
    assert lost.value.info.retryable and may_have_reached_aws(lost.value.info)
    recorded = {r["customer"]: r["metering_record_id"] for r in emulator.saas_ledger()["records"]}
    assert len(recorded) == 3
    again = saas.batch_meter_usage(request)
    assert [r["Status"] for r in again["Results"]] == ["Success"] * 3
    assert {r["MeteringRecordId"] for r in again["Results"]} == set(recorded.values())
    assert emulator.saas_ledger()["counts"]["duplicate_record"] == 0
