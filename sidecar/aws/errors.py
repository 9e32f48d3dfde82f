"""What an AWS error means for entitlement: retry it, or report it with a hint a human can act on.

Kinds:
  transient      worth retrying (throttling, AWS 5xx, network)
  entitlement    the customer has no subscription
  platform       not running on ECS, EKS or Fargate
  configuration  product code, key version, region, IAM or credentials are wrong
  verification   AWS answered, but the token did not verify (treated as an attack)
  usage          MeterUsage refused this one record (kept for audit, never resent changed)
  aws            any other AWS refusal
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

RETRYABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "InternalServiceErrorException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "RequestTimeout",
        "RequestTimeoutException",
        "TooManyRequestsException",
    }
)

# botocore transport exceptions (class names): the request may never have reached AWS.
TRANSPORT_CODES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionError",
        "HTTPClientError",
        "ProxyConnectionError",
        "ResponseStreamingError",
        "IncompleteReadError",
    }
)

_IAM_HINT = (
    "the ECS task role or the EKS IRSA role needs aws-marketplace:RegisterUsage "
    '(Resource "*"); on EKS only IRSA works, not Pod Identity or the node role'
)

_KNOWN: dict[str, tuple[str, str]] = {
    "CustomerNotEntitledException": (
        "entitlement",
        "the AWS account running this pod or task has no active subscription to the product; "
        "subscribe in AWS Marketplace, then start a new pod or task",
    ),
    "PlatformNotSupportedException": (
        "platform",
        "RegisterUsage only works on Amazon ECS, Amazon EKS or AWS Fargate (not local docker, "
        "plain EC2 or EKS/ECS Anywhere); use the embedded emulator for local runs",
    ),
    "InvalidProductCodeException": (
        "configuration",
        "MARKETPLACE_PRODUCT_CODE does not match the published product (see the AWS "
        "Marketplace Management Portal)",
    ),
    "InvalidPublicKeyVersionException": (
        "configuration",
        "MARKETPLACE_PUBLIC_KEY_VERSION is not a valid key version for this product",
    ),
    "InvalidRegionException": (
        "configuration",
        "RegisterUsage must be called in the region the task or pod runs in; set AWS_REGION "
        "to that region (it is resolved at runtime, never hard-coded)",
    ),
    "DisabledApiException": ("aws", "the RegisterUsage API is disabled in this region"),
    "AccessDeniedException": ("configuration", _IAM_HINT),
    "AccessDenied": ("configuration", _IAM_HINT),
    "UnauthorizedException": ("configuration", _IAM_HINT),
    "UnrecognizedClientException": (
        "configuration",
        "AWS does not recognise the credentials; check the task role or IRSA setup",
    ),
    "InvalidSignatureException": (
        "configuration",
        "the request signature was rejected; check the credentials and the clock",
    ),
    "ExpiredTokenException": ("configuration", "the AWS credentials have expired"),
    "NoCredentialsError": (
        "configuration",
        "no AWS credentials found: use an ECS task role, or IRSA on EKS "
        "(serviceAccount annotation eks.amazonaws.com/role-arn)",
    ),
    "PartialCredentialsError": ("configuration", "the AWS credentials are incomplete"),
    "NoRegionError": (
        "configuration",
        "no AWS region found: set AWS_REGION (EKS IRSA and ECS normally set it)",
    ),
    "RegionNotFound": (
        "configuration",
        "no AWS region found in AWS_REGION, AWS_DEFAULT_REGION, ECS task metadata or IMDSv2; "
        "set AWS_REGION",
    ),
    # MeterUsage (custom-metered products): refusals of one record.
    "InvalidUsageDimensionException": (
        "configuration",
        "the dimension is not published for this product; MARKETPLACE_DIMENSIONS must use the "
        "API names from the AWS Marketplace Management Portal",
    ),
    "InvalidEndpointRegionException": (
        "configuration",
        "MeterUsage must be called in the region the task or pod runs in; set AWS_REGION",
    ),
    "InvalidTagException": ("usage", "an allocation tag breaks AWS's tag rules"),
    "InvalidUsageAllocationsException": (
        "usage",
        "the allocations do not sum to the quantity or repeat a tag set (a sidecar bug)",
    ),
    "TimestampOutOfBoundsException": (
        "usage",
        "AWS refused the hour's timestamp: more than six hours old, or in the future; check the "
        "pod's clock",
    ),
    "DuplicateRequestException": (
        "usage",
        "AWS already holds a different quantity for this pod, dimension and hour; the hour is "
        "kept as a conflict and never resent with another quantity",
    ),
    "IdempotencyConflictException": (
        "usage",
        "the ClientToken was used before with other parameters (a sidecar bug)",
    ),
    "ParamValidationError": (
        "configuration",
        "the request was refused before sending; check MARKETPLACE_PRODUCT_CODE and "
        "MARKETPLACE_PUBLIC_KEY_VERSION",
    ),
}

# Every code the sidecar knows by name; metric labels use these and "other", nothing else.
KNOWN_CODES = frozenset(_KNOWN) | RETRYABLE_CODES | TRANSPORT_CODES

_TRANSIENT_HINT = "temporary; retried with backoff (check network egress to the metering endpoint)"


@dataclass(frozen=True)
class ErrorInfo:
    """One failed attempt, as shown in the local API and the logs."""

    code: str
    message: str
    hint: str
    kind: str
    retryable: bool
    request_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def classify(
    code: str, message: str, *, http_status: int | None = None, request_id: str | None = None
) -> ErrorInfo:
    """Map an AWS error code (or botocore exception name) to an `ErrorInfo`."""
    message = message[:500]
    if code in RETRYABLE_CODES or code in TRANSPORT_CODES:
        return ErrorInfo(code, message, _TRANSIENT_HINT, "transient", True, request_id)
    if (
        code not in _KNOWN
        and http_status is not None
        and (http_status >= 500 or http_status == 429)
    ):
        return ErrorInfo(code, message, _TRANSIENT_HINT, "transient", True, request_id)
    kind, hint = _KNOWN.get(code, ("aws", "AWS refused the call; see the message"))
    return ErrorInfo(code, message, hint, kind, False, request_id)


def verification_failure(reason: str, message: str) -> ErrorInfo:
    """A token that does not verify is never entitlement: it is a fault or an attack."""
    return ErrorInfo(
        code=f"TokenVerificationFailed:{reason}",
        message=message,
        hint="the RegisterUsage answer was not signed by the configured product key for this "
        "request; check MARKETPLACE_PUBLIC_KEY and MARKETPLACE_PUBLIC_KEY_VERSION, or look "
        "for something answering in place of AWS",
        kind="verification",
        retryable=False,
    )
