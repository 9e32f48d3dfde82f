"""The lean Metering client (botocore session, one service's data) resolves exactly what
boto3.client would: endpoint, signing name and region, in every partition. Nothing is called."""

from __future__ import annotations

import boto3
import pytest

from sidecar.aws.metering import MeteringGateway


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
