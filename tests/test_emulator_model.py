"""The emulator validates every request against the pinned botocore model itself, and refuses
unsigned requests as AWS's front end does. Driven by boto3 (the pinned botocore) over real HTTP:
what botocore lets through (it checks required members and minimums only) reaches the emulator,
which must answer what AWS answers, naming the member."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
import requests
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.test_emulator import client

HOUR = 3600
H0 = (1_800_000_000 // HOUR) * HOUR


@pytest.fixture
def now(emulator: Emulator) -> float:
    t = H0 + 2 * HOUR + 100
    emulator.meter_clock = lambda: t
    return t


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def refusal(call: Any) -> tuple[str, str]:
    with pytest.raises(ClientError) as info:
        call()
    err = info.value.response["Error"]
    return str(err["Code"]), str(err["Message"])


def customer(server: EmulatorServer, **spec: Any) -> dict[str, Any]:
    resp = requests.post(server.url + "/_emulator/saas/customers", json=spec, timeout=5)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def record(cust: dict[str, Any], **over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "CustomerAWSAccountId": cust["customer_aws_account_id"],
        "LicenseArn": cust["license_arn"],
        "Dimension": "seats",
        "Quantity": 1,
        "Timestamp": at(H0 + 10),
    }
    rec.update(over)
    return rec


def meter(c: Any, **over: Any) -> Any:
    params: dict[str, Any] = {
        "ProductCode": "prod-abc",
        "Timestamp": at(H0 + 10),
        "UsageDimension": "scans",
        "UsageQuantity": 2,
    }
    params.update(over)
    return c.meter_usage(**params)


# -- one valid and one model-violating call per operation ---------------------------------


def test_register_usage_valid_and_a_nonce_over_255(
    emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    c = client(emulator_server, "pod-r1")
    assert c.register_usage(ProductCode="prod-abc", PublicKeyVersion=1, Nonce="n" * 255)
    code, message = refusal(
        lambda: c.register_usage(ProductCode="prod-abc", PublicKeyVersion=1, Nonce="n" * 256)
    )
    assert code == "ValidationException"
    assert "at 'nonce'" in message and "length less than or equal to 255" in message
    code, message = refusal(lambda: c.register_usage(ProductCode="prod abc", PublicKeyVersion=1))
    assert (code, "at 'productCode'" in message) == ("ValidationException", True)
    assert "^[-a-zA-Z0-9/=:_.@]*$" in message


def test_meter_usage_valid_and_a_client_token_of_65(
    emulator_server: EmulatorServer, now: float
) -> None:
    c = client(emulator_server, "pod-m1")
    assert meter(c, ClientToken="t" * 64)["MeteringRecordId"]
    code, message = refusal(lambda: meter(c, UsageDimension="users", ClientToken="t" * 65))
    assert code == "ValidationException" and "at 'clientToken'" in message
    code, message = refusal(lambda: meter(c, UsageDimension="d" * 256))
    assert code == "ValidationException" and "at 'usageDimension'" in message
    assert meter(c, UsageDimension="d" * 255)["MeteringRecordId"]
    code, message = refusal(lambda: meter(c, ProductCode="p" * 256))
    assert code == "ValidationException" and "at 'productCode'" in message


def test_batch_meter_usage_valid_and_a_quantity_over_the_integer_range(
    emulator_server: EmulatorServer, now: float
) -> None:
    """Today's main accepts `Quantity` 2147483648 in a batch (botocore checks no maximum)."""
    c = client(emulator_server)
    cust = customer(emulator_server)
    ok = c.batch_meter_usage(UsageRecords=[record(cust, Quantity=2147483647)])
    assert [r["Status"] for r in ok["Results"]] == ["Success"]
    code, message = refusal(
        lambda: c.batch_meter_usage(
            UsageRecords=[record(cust, Dimension="other", Quantity=2147483648)]
        )
    )
    assert code == "ValidationException"
    assert "Value '2147483648' at 'usageRecords.1.member.quantity'" in message
    assert "value less than or equal to 2147483647" in message
    big = [{"AllocatedUsageQuantity": 2147483648, "Tags": [{"Key": "k", "Value": "v"}]}]
    code, message = refusal(
        lambda: c.batch_meter_usage(
            UsageRecords=[record(cust, Dimension="o2", Quantity=5, UsageAllocations=big)]
        )
    )
    assert "usageRecords.1.member.usageAllocations.1.member.allocatedUsageQuantity" in message
    book = requests.get(emulator_server.url + "/_emulator/saas/ledger", timeout=5).json()
    assert [r["quantity"] for r in book["records"]] == [2147483647]


def test_resolve_customer_valid_and_an_empty_token(
    emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    c = client(emulator_server)
    cust = customer(emulator_server)
    assert c.resolve_customer(RegistrationToken=cust["registration_token"])["LicenseArn"]
    code, message = refusal(lambda: c.resolve_customer(RegistrationToken=""))
    assert code == "ValidationException" and "at 'registrationToken'" in message


# -- the gaps the issue lists --------------------------------------------------------------


def test_an_allocation_without_tags_is_the_untagged_bucket(
    emulator_server: EmulatorServer, now: float
) -> None:
    """The model: "For the bucket of items with no tags, this parameter can be left out".
    Today's main answers InvalidTagException."""
    c = client(emulator_server, "pod-a1")
    allocations = [
        {"AllocatedUsageQuantity": 2, "Tags": [{"Key": "team", "Value": "a"}]},
        {"AllocatedUsageQuantity": 3},
    ]
    assert meter(c, UsageQuantity=5, UsageAllocations=allocations)["MeteringRecordId"]
    twice = [{"AllocatedUsageQuantity": 2}, {"AllocatedUsageQuantity": 3}]
    code, _ = refusal(lambda: meter(c, UsageDimension="x", UsageQuantity=5, UsageAllocations=twice))
    assert code == "InvalidUsageAllocationsException"  # two untagged buckets: one tag set


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("CustomerAWSAccountId", "12ab", "customerAWSAccountId"),
        ("CustomerAWSAccountId", "123456789012\n", "customerAWSAccountId"),
        ("LicenseArn", "not-an-arn", "licenseArn"),
        ("LicenseArn", "arn:aws:license-manager::1:license:l-1 ", "licenseArn"),
    ],
)
def test_a_malformed_customer_is_a_validation_error_for_the_call(
    emulator_server: EmulatorServer, now: float, field: str, value: str, path: str
) -> None:
    c = client(emulator_server)
    good = customer(emulator_server)
    bad = record(good, **{field: value})
    code, message = refusal(lambda: c.batch_meter_usage(UsageRecords=[record(good), bad]))
    assert code == "ValidationException" and f"at 'usageRecords.2.member.{path}'" in message
    book = requests.get(emulator_server.url + "/_emulator/saas/ledger", timeout=5).json()
    assert book["records"] == []  # the whole call, not CustomerNotSubscribed for one record


def test_every_violation_is_named_in_one_answer(
    emulator_server: EmulatorServer, now: float
) -> None:
    c = client(emulator_server, "pod-v1")
    code, message = refusal(
        lambda: meter(c, ProductCode="p q", UsageDimension="d" * 256, ClientToken="t" * 65)
    )
    assert code == "ValidationException" and message.startswith("3 validation errors detected: ")
    for path in ("productCode", "usageDimension", "clientToken"):
        assert f"at '{path}'" in message


def test_a_wrong_json_type_is_a_serialization_error(
    emulator_server: EmulatorServer, now: float
) -> None:
    """What awsJson services answer a value of the wrong JSON type (boto3 never sends one)."""
    body = {"ProductCode": "p", "Timestamp": H0, "UsageDimension": "d", "UsageQuantity": "5"}
    resp = signed_post(emulator_server, "MeterUsage", body)
    assert resp.status_code == 400
    assert resp.json()["__type"] == "SerializationException"
    assert "'usageQuantity'" in resp.json()["message"]
    body["UsageQuantity"] = True
    assert signed_post(emulator_server, "MeterUsage", body).json()["__type"] == (
        "SerializationException"
    )


def test_validation_follows_the_model_it_is_given(now: float) -> None:
    """Every constraint is read from the service model, none is a constant of the emulator's:
    a model that changes a pattern, a maximum and a required member (as the next botocore
    version may) changes what the emulator refuses, with no code change."""
    from botocore.loaders import Loader
    from botocore.model import ServiceModel

    doc = copy.deepcopy(Loader().load_service_model("meteringmarketplace", "service-2"))
    shapes = doc["shapes"]
    shapes["ProductCode"]["pattern"] = "^prod-[a-z]+$"
    shapes["UsageQuantity"]["max"] = 100
    shapes["RegisterUsageRequest"]["required"].append("Nonce")
    emulator = Emulator(seed=1)
    emulator._model = ServiceModel(doc, "meteringmarketplace")
    emulator.meter_clock = lambda: now
    server = EmulatorServer(emulator).start()
    try:
        c = client(server, "pod-x1")
        code, message = refusal(
            lambda: c.register_usage(ProductCode="prod-abc", PublicKeyVersion=1)
        )
        assert code == "ValidationException" and "Value null at 'nonce'" in message
        assert c.register_usage(ProductCode="prod-abc", PublicKeyVersion=1, Nonce="n")
        code, message = refusal(
            lambda: c.register_usage(ProductCode="prod-1", PublicKeyVersion=1, Nonce="n")
        )
        assert "^prod-[a-z]+$" in message
        code, message = refusal(lambda: meter(c, UsageQuantity=101))
        assert "at 'usageQuantity'" in message and "less than or equal to 100" in message
        assert meter(c, UsageQuantity=100)["MeteringRecordId"]
    finally:
        server.shutdown()


# -- unsigned requests ---------------------------------------------------------------------


def signed_post(
    server: EmulatorServer, op: str, body: dict[str, Any], **headers: str
) -> requests.Response:
    """A raw awsJson call carrying well-formed (unchecked) SigV4 material unless overridden."""
    sent = {
        "X-Amz-Target": f"AWSMPMeteringService.{op}",
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Date": "20270115T080000Z",
        "Authorization": "AWS4-HMAC-SHA256 Credential=raw/20270115/us-east-1/aws-marketplace/"
        "aws4_request, SignedHeaders=host;x-amz-date, Signature=00",
    }
    sent.update(headers)
    return requests.post(server.url, data=json.dumps(body), headers=sent, timeout=5)


@pytest.fixture
def unsigned(emulator_server: EmulatorServer) -> Iterator[Any]:
    yield boto3.client(
        "meteringmarketplace",
        region_name="us-east-1",
        endpoint_url=emulator_server.url,
        config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}),
    )


def test_an_unsigned_request_is_refused_before_it_runs(
    emulator_server: EmulatorServer, emulator: Emulator, unsigned: Any, now: float
) -> None:
    """`--no-sign-request` (botocore UNSIGNED: no Authorization header). Today's main bills it."""
    code, message = refusal(lambda: meter(unsigned))
    assert (code, message) == (
        "MissingAuthenticationTokenException",
        "Request is missing Authentication Token",
    )
    code, _ = refusal(lambda: unsigned.register_usage(ProductCode="p", PublicKeyVersion=1))
    assert code == "MissingAuthenticationTokenException"
    cust = customer(emulator_server)
    code, _ = refusal(
        lambda: unsigned.resolve_customer(RegistrationToken=cust["registration_token"])
    )
    assert code == "MissingAuthenticationTokenException"
    code, _ = refusal(lambda: unsigned.batch_meter_usage(UsageRecords=[record(cust)]))
    assert code == "MissingAuthenticationTokenException"
    assert emulator.ledger()["records"] == [] and emulator.saas_ledger()["records"] == []
    assert {c["code"] for c in emulator.calls} == {"MissingAuthenticationTokenException"}
    # the same calls signed (what the sidecar's botocore sends) go through
    signed = client(emulator_server, "pod-s1")
    assert meter(signed)["MeteringRecordId"]
    assert signed.resolve_customer(RegistrationToken=cust["registration_token"])


@pytest.mark.parametrize(
    ("headers", "code", "named"),
    [
        ({"Authorization": "Basic dXNlcjpwdw=="}, "MissingAuthenticationTokenException", ""),
        (
            {"Authorization": "AWS4-HMAC-SHA256 Credential=raw/20270115/us-east-1/x/aws4_request"},
            "IncompleteSignatureException",
            "'Signature'",
        ),
        ({"X-Amz-Date": ""}, "IncompleteSignatureException", "'X-Amz-Date'"),
    ],
)
def test_incomplete_signing_material_is_named(
    emulator_server: EmulatorServer,
    emulator: Emulator,
    headers: dict[str, str],
    code: str,
    named: str,
) -> None:
    body = {"ProductCode": "prod-abc", "PublicKeyVersion": 1}
    resp = signed_post(emulator_server, "RegisterUsage", body, **headers)
    assert (resp.status_code, resp.json()["__type"]) == (400, code)
    assert named in resp.json()["message"]
    assert signed_post(emulator_server, "RegisterUsage", body).status_code == 200
