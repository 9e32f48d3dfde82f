"""The emulator, driven by unmodified boto3 over HTTP (awsJson1.1)."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from sidecar.emulator.service import Emulator, EmulatorServer


def client(server: EmulatorServer, akid: str = "pod-a", region: str = "us-east-1") -> Any:
    return boto3.client(
        "meteringmarketplace",
        region_name=region,
        endpoint_url=server.url,
        aws_access_key_id=akid,
        aws_secret_access_key="x",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )


def code_of(call: Any) -> str:
    with pytest.raises(ClientError) as info:
        call()
    return str(info.value.response["Error"]["Code"])


def test_register_usage_returns_a_ps256_token_echoing_the_nonce(
    emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    import jwt

    resp = client(emulator_server).register_usage(
        ProductCode="prod-abc", PublicKeyVersion=1, Nonce="n-42"
    )
    assert jwt.get_unverified_header(resp["Signature"])["alg"] == "PS256"
    got = jwt.decode(resp["Signature"], emulator.key.public_key(), algorithms=["PS256"])
    assert (got["productCode"], got["publicKeyVersion"], got["nonce"]) == ("prod-abc", 1, "n-42")
    assert emulator.calls[-1]["nonce"] == "n-42"


def test_entitlement_errors_only_on_a_pods_first_call(
    emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    emulator.reconfigure({"entitled": False})
    c = client(emulator_server, "pod-b")

    def call() -> Any:
        return c.register_usage(ProductCode="prod-abc", PublicKeyVersion=1)

    assert code_of(call) == "CustomerNotEntitledException"
    assert "Signature" in call()  # AWS only refuses the first call from a pod
    other = client(emulator_server, "pod-c")
    assert (
        code_of(lambda: other.register_usage(ProductCode="prod-abc", PublicKeyVersion=1))
        == "CustomerNotEntitledException"
    )


def test_modelled_validation_region_product_and_key_version(
    emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    emulator.reconfigure(
        {"region": "eu-west-1", "product_codes": ["prod-abc"], "key_versions": [1]}
    )
    wrong_region = client(emulator_server, region="us-east-1")
    assert (
        code_of(lambda: wrong_region.register_usage(ProductCode="prod-abc", PublicKeyVersion=1))
        == "InvalidRegionException"
    )
    c = client(emulator_server, region="eu-west-1")
    assert (
        code_of(lambda: c.register_usage(ProductCode="free", PublicKeyVersion=1))
        == "InvalidProductCodeException"
    )
    assert (
        code_of(lambda: c.register_usage(ProductCode="prod-abc", PublicKeyVersion=2))
        == "InvalidPublicKeyVersionException"
    )
    # A request boto3 would never send is still checked against the service model.
    raw = requests.post(
        emulator_server.url,
        data=b'{"ProductCode": "prod-abc", "PublicKeyVersion": 0}',
        headers={
            "X-Amz-Target": "AWSMPMeteringService.RegisterUsage",
            "X-Amz-Date": "20270115T080000Z",
            "Authorization": "AWS4-HMAC-SHA256 Credential=raw/20270115/us-east-1/aws-marketplace/"
            "aws4_request, SignedHeaders=host;x-amz-date, Signature=0",
        },
        timeout=5,
    )
    assert raw.status_code == 400 and raw.json()["__type"] == "ValidationException"


def test_faults_throttle_and_status_codes(
    emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    emulator.reconfigure(
        {
            "faults": [
                {"error": "InternalServiceErrorException", "first": 1},
                {"error": "ThrottlingException", "first": 1, "after": 1},
            ]
        }
    )
    c = client(emulator_server)

    def call() -> Any:
        return c.register_usage(ProductCode="prod-abc", PublicKeyVersion=1)

    with pytest.raises(ClientError) as info:
        call()
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert code_of(call) == "ThrottlingException"
    assert "Signature" in call()
    emulator.reconfigure({"faults": [], "throttle_rps": 1.0, "throttle_burst": 1})
    assert "Signature" in call()
    assert code_of(call) == "ThrottlingException"


def test_unknown_settings_are_refused(emulator_server: EmulatorServer) -> None:
    resp = requests.post(
        emulator_server.url + "/_emulator/config", json={"entitld": False}, timeout=5
    )
    assert resp.status_code == 400 and "entitld" in resp.json()["error"]
