from __future__ import annotations

import pytest

from sidecar.aws.errors import SIGV4_SKEW_SECONDS, classify, may_have_reached_aws, surely_unsent


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


@pytest.mark.parametrize(
    "message",
    [
        "Signature expired: 20261127T030000Z is now earlier than 20261127T030100Z "
        "(20261127T031600Z - 15 min.)",
        "Signature not yet current: 20261127T040000Z is still later than 20261127T031600Z",
    ],
)
def test_sigv4_clock_skew_is_a_retried_clock_error(message: str) -> None:
    info = classify("InvalidSignatureException", message)
    assert (info.kind, info.retryable) == ("clock", True)
    assert "synchronise the node clock" in info.hint
    # A wrong signing scope is a configuration error, not a clock problem.
    scope = classify("InvalidSignatureException", "Credential should be scoped to correct service")
    assert (scope.kind, scope.retryable) == ("configuration", False)


@pytest.mark.parametrize(
    ("code", "unsent", "maybe_sent"),
    [
        ("EndpointConnectionError", True, False),
        ("ConnectTimeoutError", True, False),
        ("ProxyConnectionError", True, False),
        ("ReadTimeoutError", False, True),
        ("ConnectionClosedError", False, True),
        ("ResponseStreamingError", False, True),
        ("InternalServiceErrorException", False, False),  # AWS answered: nothing was lost
    ],
)
def test_transport_errors_say_whether_aws_may_have_seen_the_call(
    code: str, unsent: bool, maybe_sent: bool
) -> None:
    info = classify(code, "x")
    assert (surely_unsent(info), may_have_reached_aws(info)) == (unsent, maybe_sent)
    assert info.retryable


def test_the_default_skew_allowance_is_awss_documented_sigv4_tolerance() -> None:
    from sidecar.config import Settings
    from sidecar.doctor import SKEW_FAIL_SECONDS

    allowance = Settings.model_fields["clock_skew_seconds"].default
    assert allowance == SKEW_FAIL_SECONDS == SIGV4_SKEW_SECONDS == 300.0
