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
    from sidecar.config import SPECS
    from sidecar.doctor import SKEW_FAIL_SECONDS

    allowance = SPECS["clock_skew_seconds"].default
    assert allowance == SKEW_FAIL_SECONDS == SIGV4_SKEW_SECONDS == 300.0


@pytest.mark.parametrize(
    ("code", "operation", "kind", "hint_part"),
    [
        ("InvalidTokenException", "ResolveCustomer", "token", "x-amzn-marketplace-token"),
        ("ExpiredTokenException", "ResolveCustomer", "token", "redeem the token as soon as"),
        ("InvalidCustomerIdentifierException", "BatchMeterUsage", "usage", "ResolveCustomer"),
        ("InvalidLicenseException", "BatchMeterUsage", "usage", "LicenseArn"),
        ("TimestampOutOfBoundsException", "BatchMeterUsage", "usage", "whole call"),
        ("InvalidUsageDimensionException", "BatchMeterUsage", "configuration", "DIMENSIONS"),
        ("InvalidProductCodeException", "BatchMeterUsage", "configuration", "customer_identifier"),
        ("DisabledApiException", "BatchMeterUsage", "aws", "region"),
        ("DisabledApiException", "ResolveCustomer", "aws", "region"),
        ("AccessDeniedException", "ResolveCustomer", "configuration", "ResolveCustomer"),
        ("AccessDeniedException", "BatchMeterUsage", "configuration", "BatchMeterUsage"),
        ("ParamValidationError", "ResolveCustomer", "configuration", "names the field"),
    ],
)
def test_saas_codes_are_terminal_with_a_hint_for_the_seller(
    code: str, operation: str, kind: str, hint_part: str
) -> None:
    info = classify(code, "msg", http_status=400, operation=operation)
    assert (info.kind, info.retryable) == (kind, False)
    assert hint_part in info.hint
    assert "RegisterUsage" not in info.hint  # never a container product's advice


@pytest.mark.parametrize("operation", ["ResolveCustomer", "BatchMeterUsage"])
@pytest.mark.parametrize(
    ("code", "status"),
    [("ThrottlingException", 400), ("InternalServiceErrorException", 500), ("Weird", 503)],
)
def test_saas_throttling_and_5xx_are_retryable(operation: str, code: str, status: int) -> None:
    info = classify(code, "x", http_status=status, operation=operation)
    assert (info.kind, info.retryable) == ("transient", True)


def test_expired_aws_credentials_are_not_an_expired_registration_token() -> None:
    """STS and AWS reuse ExpiredTokenException for the request's own credentials."""
    sts = "The security token included in the request is expired"
    for operation in (None, "RegisterUsage", "BatchMeterUsage", "ResolveCustomer"):
        info = classify("ExpiredTokenException", sts, operation=operation)
        assert (info.kind, info.hint) == ("configuration", "the AWS credentials have expired")
    # outside ResolveCustomer there is no registration token to expire
    assert classify("ExpiredTokenException", "expired", operation="MeterUsage").kind == (
        "configuration"
    )
    assert classify("ExpiredTokenException", "expired", operation="ResolveCustomer").kind == (
        "token"
    )
