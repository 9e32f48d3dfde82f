"""What an AWS error means for entitlement: retry it, or report it with a hint a human can act on.

Kinds:
  transient      worth retrying (throttling, AWS 5xx, network)
  entitlement    the customer has no subscription
  platform       not running on ECS, EKS or Fargate
  configuration  product code, key version, region, IAM or credentials are wrong
  clock          this machine's clock disagrees with AWS's (retried: a synced clock heals it)
  verification   AWS answered, but the token did not verify (treated as an attack)
  usage          MeterUsage or BatchMeterUsage refused the record(s) (kept for audit, never
                 resent changed)
  token          ResolveCustomer refused a buyer's registration token (invalid or expired)
  aws            any other AWS refusal

The same code can mean different things per operation: ExpiredTokenException is the AWS
credentials' expiry everywhere except ResolveCustomer, where it is the buyer's registration
token (unless the message names the request's security token). `classify(..., operation=)`
picks the meaning; SaaS operations get their own IAM and disabled-API hints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
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
        "AnywhereIdentityUnavailableError",  # sidecar.aws.anywhere: License Manager or STS silent
    }
)
# The anywhere identity's refusals (sidecar.aws.anywhere, contract mode off AWS). The buyer fixes
# the Secret or the role and the next attempt heals it without a restart (the token file is read
# again at every attempt): configuration, yet retried with backoff.
ANYWHERE_CODES: dict[str, str] = {
    "LicenseTokenFileError": "mount the buyer's license token (the chart's metering.contract."
    "anywhere Secret) at MARKETPLACE_LICENSE_TOKEN_FILE; see docs/contract-anywhere.md",
    "LicenseTokenRejectedError": "License Manager refused the license token (expired, revoked or "
    "not a token): the buyer creates a new one and updates the Secret; see "
    "docs/contract-anywhere.md",
    "RoleNotAssumableError": "STS refused MARKETPLACE_LICENSE_ROLE_ARN for this token: check the "
    "role's trust policy and that the token names the role; see docs/contract-anywhere.md",
}

# botocore transport exceptions (class names) raised before the request was written: DNS,
# refused or timed-out connects, a proxy that would not connect. AWS surely never saw the call.
UNSENT_CODES = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ProxyConnectionError"})
# Raised after the request may have been written: a read timeout, a reset or a cut answer.
# AWS may have received (and answered) the call; only the answer is lost.
MAYBE_SENT_CODES = frozenset(
    {
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectionError",
        "HTTPClientError",
        "SSLError",
        "ResponseStreamingError",
        "IncompleteReadError",
    }
)
TRANSPORT_CODES = UNSENT_CODES | MAYBE_SENT_CODES

# AWS's documented SigV4 clock tolerance: "In most cases, a request must reach AWS within five
# minutes of the time stamp in the request. Otherwise, AWS denies the request." (IAM User Guide,
# "Signing AWS API requests", docs.aws.amazon.com/IAM/latest/UserGuide/reference_aws-signing.html).
# Some services' error messages show 15 minutes; the documented figure is the one we rely on.
SIGV4_SKEW_SECONDS = 300.0
# AWS's answers to a request signed with a clock outside that tolerance.
CLOCK_CODES = frozenset({"RequestTimeTooSkewed", "SignatureExpired", "RequestExpired"})
_CLOCK_MESSAGES = ("signature expired", "signature not yet current", "too skewed")
CLOCK_SKEW = "ClockSkew"
FIRST_ANSWER_LOST = "FirstAnswerLost"
STATE_DIR_UNWRITABLE = "StateDirUnwritable"
REGION_NOT_FOUND = "RegionNotFound"
_CLOCK_HINT = (
    "this machine's clock disagrees with AWS's; synchronise the node clock (NTP, Amazon Time "
    "Sync Service); retried with backoff, a synced clock heals it ('doctor' shows the skew)"
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
    "DisabledApiException": (
        "aws",
        "AWS reports this Metering API as disabled in this region; run it in a region where "
        "AWS Marketplace metering is available, or ask AWS Marketplace seller support",
    ),
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
    # BatchMeterUsage (SaaS): the whole call is refused.
    "InvalidCustomerIdentifierException": (
        "usage",
        "AWS does not know this CustomerIdentifier for the product; send the identifier "
        "ResolveCustomer returned for the buyer (MARKETPLACE_SAAS_IDENTITY=customer_identifier "
        "with MARKETPLACE_PRODUCT_CODE), never one from another product",
    ),
    "InvalidLicenseException": (
        "usage",
        "the LicenseArn is invalid, belongs to another customer, or is outside its activation "
        "period; send the CustomerAWSAccountId and LicenseArn ResolveCustomer returned for "
        "this buyer",
    ),
    # ResolveCustomer: the buyer's registration token.
    "InvalidTokenException": (
        "token",
        "the registration token is not one AWS Marketplace issued for this product: pass the "
        "x-amzn-marketplace-token form field exactly as the buyer's browser posted it, to a "
        "sidecar running with the seller account that published the product",
    ),
    "ParamValidationError": (
        "configuration",
        "the request was refused before sending; check MARKETPLACE_PRODUCT_CODE and "
        "MARKETPLACE_PUBLIC_KEY_VERSION",
    ),
}

# Every code the sidecar knows by name; metric labels use these and "other", nothing else.
KNOWN_CODES = (
    frozenset(_KNOWN)
    | RETRYABLE_CODES
    | TRANSPORT_CODES
    | CLOCK_CODES
    | {CLOCK_SKEW, FIRST_ANSWER_LOST, STATE_DIR_UNWRITABLE}
    | frozenset(ANYWHERE_CODES)
)

_TRANSIENT_HINT = "temporary; retried with backoff (check network egress to the metering endpoint)"

SAAS_OPERATIONS = frozenset({"ResolveCustomer", "BatchMeterUsage"})
_SAAS_IAM_HINT = (
    "the seller's role (ECS task role or EKS IRSA role) needs aws-marketplace:ResolveCustomer "
    'and aws-marketplace:BatchMeterUsage (Resource "*"), in the account that published the '
    "product"
)
EXPIRED_REGISTRATION_TOKEN = (
    "token",
    "the buyer's registration token has expired: redeem the token as soon as the buyer's "
    "browser posts it (AWS's guides give one to four hours); the buyer gets a new one by "
    "opening the product's setup link in AWS Marketplace again",
)
# STS's wording when the request's own credentials (session token) have expired.
_CREDENTIAL_MESSAGES = ("security token", "credentials")
_SAAS_OVERRIDES: dict[str, tuple[str, str]] = {
    "AccessDeniedException": ("configuration", _SAAS_IAM_HINT),
    "AccessDenied": ("configuration", _SAAS_IAM_HINT),
    "UnauthorizedException": ("configuration", _SAAS_IAM_HINT),
    "TimestampOutOfBoundsException": (
        "usage",
        "a record's timestamp is six hours old or more, or in the future; BatchMeterUsage then "
        "rejects the whole call. A record the sidecar still counts inside AWS's window means the "
        "clocks disagree: the call is resent as stored, with backoff, until the hour's deadline; "
        "synchronise the node clock (NTP, Amazon Time Sync Service)",
    ),
    "InvalidProductCodeException": (
        "configuration",
        "MARKETPLACE_PRODUCT_CODE does not match the published SaaS product (identity "
        "customer_identifier only; license-based records carry no product code)",
    ),
    "ParamValidationError": (
        "configuration",
        "botocore refused the request before sending (a malformed record or registration "
        "token); the message names the field",
    ),
    "InvalidUsageDimensionException": (
        "configuration",
        "a dimension is not published for this product; MARKETPLACE_DIMENSIONS must use the "
        "API names from the AWS Marketplace Management Portal. The sidecar quarantines that "
        "dimension (its records are held unsent) and keeps billing the others; restart the "
        "sending sidecar once it is fixed",
    ),
}


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
    code: str,
    message: str,
    *,
    http_status: int | None = None,
    request_id: str | None = None,
    operation: str | None = None,
) -> ErrorInfo:
    """Map an AWS error code (or botocore exception name) to an `ErrorInfo`.

    `operation` (the Metering operation called) picks the meaning of codes AWS reuses.
    """
    message = message[:500]
    if code in CLOCK_CODES or (
        code == "InvalidSignatureException" and any(m in message.lower() for m in _CLOCK_MESSAGES)
    ):
        return ErrorInfo(code, message, _CLOCK_HINT, "clock", True, request_id)
    if code in ANYWHERE_CODES:
        return ErrorInfo(code, message, ANYWHERE_CODES[code], "configuration", True, request_id)
    if code in RETRYABLE_CODES or code in TRANSPORT_CODES:
        return ErrorInfo(code, message, _TRANSIENT_HINT, "transient", True, request_id)
    if (
        code not in _KNOWN
        and http_status is not None
        and (http_status >= 500 or http_status == 429)
    ):
        return ErrorInfo(code, message, _TRANSIENT_HINT, "transient", True, request_id)
    if (
        operation == "ResolveCustomer"
        and code == "ExpiredTokenException"
        and not any(m in message.lower() for m in _CREDENTIAL_MESSAGES)
    ):
        kind, hint = EXPIRED_REGISTRATION_TOKEN
        return ErrorInfo(code, message, hint, kind, False, request_id)
    default = ("aws", "AWS refused the call; see the message")
    if operation in SAAS_OPERATIONS and code in _SAAS_OVERRIDES:
        kind, hint = _SAAS_OVERRIDES[code]
    else:
        kind, hint = _KNOWN.get(code, default)
    return ErrorInfo(code, message, hint, kind, False, request_id)


# Another service's own codes: (kind, hint, retryable) by error code.
KnownCodes = dict[str, tuple[str, str, bool]]


def classify_known(
    known: KnownCodes,
    transient_hint: str,
    code: str,
    message: str,
    *,
    http_status: int | None = None,
    request_id: str | None = None,
) -> ErrorInfo:
    """An error of a service with codes of its own (License Manager, the Entitlement Service):
    its table first, then the shared classification with that service's transient hint."""
    entry = known.get(code)
    if entry is None:
        info = classify(code, message, http_status=http_status, request_id=request_id)
        return replace(info, hint=transient_hint) if info.kind == "transient" else info
    kind, hint, retryable = entry
    return ErrorInfo(code, message[:500], hint, kind, retryable, request_id)


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


def may_have_reached_aws(error: ErrorInfo) -> bool:
    """True when the call may have reached AWS although no answer came back."""
    return error.code in MAYBE_SENT_CODES


def surely_unsent(error: ErrorInfo) -> bool:
    """True when the request never left this machine (AWS cannot have counted it)."""
    return error.code in UNSENT_CODES


def clock_skew(message: str) -> ErrorInfo:
    """A genuine token whose `iat` is ahead of our clock: our clock is behind, not a forgery."""
    return ErrorInfo(CLOCK_SKEW, message, _CLOCK_HINT, "clock", True)


def region_not_found(tried: list[str], retryable: bool) -> ErrorInfo:
    """Message and hint name the same sources; metadata failures are retried (pod start)."""
    sources = ", ".join(tried)
    hint = f"set AWS_REGION to the region the pod runs in (tried: {sources})"
    if retryable:
        hint += "; metadata lookups are retried with backoff until the registration deadline"
    return ErrorInfo(
        REGION_NOT_FOUND, f"no AWS region found (tried {sources})", hint, "configuration", retryable
    )


def first_answer_lost(strict: bool) -> ErrorInfo:
    """The pod's first RegisterUsage call may have reached AWS, but its answer never arrived."""
    return ErrorInfo(
        FIRST_ANSWER_LOST,
        "the answer to this pod's first RegisterUsage call was lost (read timeout, reset, or the "
        "sidecar was killed while it was in flight); only the first call can carry AWS's "
        "entitlement refusal",
        "MARKETPLACE_STRICT_FIRST_ANSWER is on, so this pod is refused; start a new pod or task "
        "(its first call is checked again)"
        if strict
        else "the pod is served, but AWS's entitlement check may have been missed",
        "entitlement",
        False,
    )


def state_dir_unwritable(detail: str) -> ErrorInfo:
    return ErrorInfo(
        STATE_DIR_UNWRITABLE,
        f"cannot record the first-call marker before calling AWS: {detail}"[:500],
        "MARKETPLACE_STATE_DIR must stay writable (an emptyDir); no call is made until it is",
        "configuration",
        True,
    )


# Codes whose production hint (task role, IRSA, metadata) is wrong advice against a local emulator.
LOCAL_SETUP_CODES = frozenset(
    {REGION_NOT_FOUND, "NoRegionError", "NoCredentialsError", "PartialCredentialsError"}
)
LOCAL_SETUP_HINT = (
    "{endpoint} is a local endpoint (the emulator), which needs no AWS account: set "
    "AWS_REGION=us-east-1 and dummy keys AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local "
    "(the emulator checks no signature); `marketplace-sidecar demo --mode hourly|custom|saas` "
    "sets all of this"
)


def is_local_endpoint(endpoint: str | None) -> bool:
    """True for an http(s) URL whose host is a loopback literal or `localhost` (no DNS)."""
    import ipaddress
    from urllib.parse import urlsplit

    if not endpoint:
        return False
    try:
        host = urlsplit(endpoint).hostname or ""
    except ValueError:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def for_endpoint(info: ErrorInfo, endpoint: str | None) -> ErrorInfo:
    """The error with a local-run hint when the endpoint is the emulator on this machine."""
    if info.code not in LOCAL_SETUP_CODES or not is_local_endpoint(endpoint):
        return info
    local = LOCAL_SETUP_HINT.format(endpoint=endpoint)
    if info.code in (REGION_NOT_FOUND, "NoRegionError"):  # still true locally: keep it
        return replace(info, hint=f"{info.hint}; {local}")
    return replace(info, hint=local)  # the task role / IRSA advice is wrong for a local run
