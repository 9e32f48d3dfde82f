"""The lean Metering client (botocore session, one service's data) resolves exactly what
boto3.client would: endpoint, signing name and region, in every partition. Nothing is called."""

from __future__ import annotations

import boto3
import pytest

from sidecar.aws.metering import MeteringGateway


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
