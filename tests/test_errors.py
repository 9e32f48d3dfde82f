from __future__ import annotations

import pytest

from sidecar.aws.errors import classify


@pytest.mark.parametrize(
    "code",
    [
        "ThrottlingException",
        "InternalServiceErrorException",
        "EndpointConnectionError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
    ],
)
def test_retryable(code: str) -> None:
    info = classify(code, "x")
    assert (info.retryable, info.kind) == (True, "transient")


@pytest.mark.parametrize(
    ("code", "kind", "hint_part"),
    [
        ("CustomerNotEntitledException", "entitlement", "no active subscription"),
        ("PlatformNotSupportedException", "platform", "ECS, Amazon EKS or AWS Fargate"),
        ("AccessDeniedException", "configuration", "aws-marketplace:RegisterUsage"),
        ("InvalidRegionException", "configuration", "AWS_REGION"),
        ("InvalidProductCodeException", "configuration", "MARKETPLACE_PRODUCT_CODE"),
        ("InvalidPublicKeyVersionException", "configuration", "MARKETPLACE_PUBLIC_KEY_VERSION"),
        ("NoCredentialsError", "configuration", "IRSA"),
        ("SomethingNew", "aws", "AWS refused"),
    ],
)
def test_terminal_with_actionable_hint(code: str, kind: str, hint_part: str) -> None:
    info = classify(code, "msg", request_id="r-1")
    assert (info.retryable, info.kind, info.request_id) == (False, kind, "r-1")
    assert hint_part in info.hint


def test_untyped_5xx_and_429_are_retryable_but_4xx_is_not() -> None:
    assert classify("502", "bad gateway", http_status=502).retryable
    assert classify("SlowDown", "x", http_status=429).retryable
    assert not classify("SomethingNew", "x", http_status=400).retryable
    # A modelled terminal code stays terminal whatever the status.
    assert not classify("CustomerNotEntitledException", "x", http_status=500).retryable
