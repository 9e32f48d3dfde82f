"""AWS Marketplace Entitlement Service: a SaaS contract's entitlements through GetEntitlements.

The service lives in us-east-1 only (botocore's endpoint rules for `marketplace-entitlement`),
whatever region the sidecar runs in. Its endpoint can be moved with botocore's own variable,
derived from the model's serviceId "Marketplace Entitlement Service":
AWS_ENDPOINT_URL_MARKETPLACE_ENTITLEMENT_SERVICE (tests point it at the emulator).

The pinned botocore model (`marketplace-entitlement` 2017-01-11, GetEntitlementsRequest.Filter)
says CustomerIdentifier and CustomerAWSAccountId "are mutually exclusive parameters. You must use
one or the other, but not both in the same request"; new SaaS integrations have no
CustomerIdentifier at all, so this module filters by CUSTOMER_AWS_ACCOUNT_ID only. The model
also says "If the result contains an empty set of entitlements, NextToken might still be present
and should be used": pages are followed to the end, at most MAX_PAGES of them and never the same
token twice, so a service that answers with a NextToken loop cannot hold the caller forever.

Values: the model's EntitlementValue has one of IntegerValue, DoubleValue, BooleanValue and
StringValue. A double is returned as the exact decimal string of the double AWS sent (shortest
round-trip form, never in exponent notation), never as a float: quantities are compared
against usage in exact decimals elsewhere.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlparse

from sidecar.aws.errors import ErrorInfo, classify_known, for_endpoint

SERVICE = "marketplace-entitlement"
# botocore: AWS_ENDPOINT_URL_ + serviceId upper-cased with spaces as underscores.
ENDPOINT_ENV = "AWS_ENDPOINT_URL_MARKETPLACE_ENTITLEMENT_SERVICE"
HOME_REGION = "us-east-1"
OPERATION = "GetEntitlements"
# Model: PageSizeInteger 1..25.
PAGE_SIZE = 25
# 25 entitlements a page: 400 pages is 10,000 entitlements for one buyer, far beyond any product's
# dimensions; more means the service is looping.
MAX_PAGES = 400
PAGINATION_LOOP = "EntitlementPaginationLoop"
# One buyer's read, all pages, at most this long (a buyer has a few entitlements: one page).
READ_BUDGET = 60.0
INVALID_ENDPOINT = "InvalidEntitlementEndpoint"

_IAM_HINT = (
    "the ECS task role or the EKS IRSA role needs aws-marketplace:GetEntitlements "
    '(Resource "*"), granted in the seller account that published the product'
)
_TRANSIENT_HINT = "temporary; retried with backoff (check network egress to us-east-1)"
_KNOWN: dict[str, tuple[str, str, bool]] = {
    "InvalidParameterException": (
        "configuration",
        "GetEntitlements refused the request's parameters: check MARKETPLACE_PRODUCT_CODE "
        "(the SaaS product's code) and the buyer's AWS account id (12 digits)",
        False,
    ),
    "ThrottlingException": ("transient", _TRANSIENT_HINT, True),
    "InternalServiceErrorException": ("transient", _TRANSIENT_HINT, True),
    "AccessDeniedException": ("configuration", _IAM_HINT, False),
    "AccessDenied": ("configuration", _IAM_HINT, False),
    "UnauthorizedException": ("configuration", _IAM_HINT, False),
}


def classify_entitlement(
    code: str, message: str, *, http_status: int | None = None, request_id: str | None = None
) -> ErrorInfo:
    """A GetEntitlements error as the sidecar reports it: retryable or not, and what to do."""
    return classify_known(
        _KNOWN, _TRANSIENT_HINT, code, message, http_status=http_status, request_id=request_id
    )


class EntitlementCallError(Exception):
    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(f"{info.code}: {info.message}")
        self.info = info


@dataclass(frozen=True)
class Entitlement:
    """One entitlement of a buyer's contract.

    `value`: int (IntegerValue), exact decimal string (DoubleValue), bool (BooleanValue), str
    (StringValue), or None when AWS sent none of them. `expiration`: Unix seconds, or None.
    """

    dimension: str
    value: object
    expiration: float | None
    customer_aws_account_id: str
    # Which EntitlementValue member was set ("integer", "double", "boolean", "string"), or None:
    # a DoubleValue's exact text and a StringValue look alike once stored.
    kind: str | None = None


def endpoint_problem(value: str | None) -> str | None:
    """Why an AWS_ENDPOINT_URL_MARKETPLACE_ENTITLEMENT_SERVICE value is refused, or None.

    The same rule config.py applies to the metering endpoint: an http(s) URL with a host.
    """
    if not value:
        return None
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"{ENDPOINT_ENV}: must be an http(s) URL, got {value[:80]!r}"
    return None


def entitlement_client(region: str = HOME_REGION, *, timeout: float = 10.0) -> Any:
    """A botocore client for the Entitlement Service, one attempt per call (the caller retries).

    `region` defaults to us-east-1, the only region the service answers in.
    """
    import botocore.session
    from botocore.config import Config

    problem = endpoint_problem(os.environ.get(ENDPOINT_ENV))
    if problem is not None:
        raise EntitlementCallError(
            ErrorInfo(INVALID_ENDPOINT, problem, problem, "configuration", False)
        )
    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=min(timeout, 5.0),
        read_timeout=timeout,
        user_agent_extra="marketplace-sidecar",
    )
    return botocore.session.get_session().create_client(SERVICE, region_name=region, config=config)


def exact_value(raw: Any) -> object:
    """The EntitlementValue member that is set, as an exact Python value (never a float)."""
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("IntegerValue"), int) and not isinstance(raw["IntegerValue"], bool):
        return int(raw["IntegerValue"])
    if isinstance(raw.get("DoubleValue"), (int, float)) and not isinstance(
        raw["DoubleValue"], bool
    ):
        number = float(raw["DoubleValue"])
        if not math.isfinite(number):
            return repr(number)
        text = format(Decimal(repr(number)), "f")
        return text[:-2] if text.endswith(".0") else text
    if isinstance(raw.get("BooleanValue"), bool):
        return bool(raw["BooleanValue"])
    if isinstance(raw.get("StringValue"), str):
        return str(raw["StringValue"])
    return None


def value_kind(raw: Any) -> str | None:
    """Which member `exact_value` read: integer, double, boolean, string; None for none."""
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("IntegerValue"), int) and not isinstance(raw["IntegerValue"], bool):
        return "integer"
    if isinstance(raw.get("DoubleValue"), (int, float)) and not isinstance(
        raw["DoubleValue"], bool
    ):
        return "double" if math.isfinite(float(raw["DoubleValue"])) else None
    if isinstance(raw.get("BooleanValue"), bool):
        return "boolean"
    if isinstance(raw.get("StringValue"), str):
        return "string"
    return None


def _epoch(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _entitlement(raw: Any, account: str) -> Entitlement | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("Dimension"), str):
        return None
    return Entitlement(
        dimension=raw["Dimension"],
        value=exact_value(raw.get("Value")),
        expiration=_epoch(raw.get("ExpirationDate")),
        customer_aws_account_id=str(raw.get("CustomerAWSAccountId") or account),
        kind=value_kind(raw.get("Value")),
    )


def _page(client: Any, params: dict[str, Any]) -> dict[str, Any]:
    from botocore.exceptions import BotoCoreError, ClientError

    endpoint = str(client.meta.endpoint_url)
    try:
        resp: dict[str, Any] = client.get_entitlements(**params)
    except ClientError as exc:
        err = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        info = classify_entitlement(
            str(err.get("Code", "Unknown")),
            str(err.get("Message", "")),
            http_status=meta.get("HTTPStatusCode"),
            request_id=meta.get("RequestId"),
        )
        raise EntitlementCallError(for_endpoint(info, endpoint)) from None
    except BotoCoreError as exc:
        info = classify_entitlement(type(exc).__name__, str(exc))
        raise EntitlementCallError(for_endpoint(info, endpoint)) from None
    return resp


def get_entitlements(
    client: Any,
    product_code: str,
    customer_aws_account_id: str,
    *,
    budget: float = READ_BUDGET,
    monotonic: Callable[[], float] = time.monotonic,
) -> list[Entitlement]:
    """Every entitlement of one buyer (by AWS account id) for one product, all pages.

    Raises EntitlementCallError (with an ErrorInfo) on an AWS error, a NextToken loop or pages
    still coming after `budget` seconds (each page may take the client's read timeout: 400 of
    them would hold the caller, the lifecycle consumer, for an hour); a partial list is never
    returned, so a caller cannot mistake a cut answer for a downgrade.
    """
    deadline = monotonic() + budget
    params: dict[str, Any] = {
        "ProductCode": product_code,
        "Filter": {"CUSTOMER_AWS_ACCOUNT_ID": [customer_aws_account_id]},
        "MaxResults": PAGE_SIZE,
    }
    found: list[Entitlement] = []
    seen: set[str] = set()
    message = f"GetEntitlements answered a NextToken on each of {MAX_PAGES} pages"
    for page in range(MAX_PAGES):
        if page and monotonic() > deadline:
            message = f"GetEntitlements still paging after {budget:.0f} s ({page} pages)"
            break
        resp = _page(client, params)
        for raw in resp.get("Entitlements") or []:
            item = _entitlement(raw, customer_aws_account_id)
            if item is not None:
                found.append(item)
        token = resp.get("NextToken")
        if not token:
            return found
        if token in seen:
            message = f"GetEntitlements repeated a NextToken after {len(seen) + 1} pages"
            break
        seen.add(token)
        params["NextToken"] = token
    message += "; the list was not used"
    raise EntitlementCallError(
        ErrorInfo(
            PAGINATION_LOOP,
            message,
            "the Entitlement Service (or whatever answers at its endpoint) is looping or too "
            "slow; retried with backoff",
            "transient",
            True,
        )
    )
