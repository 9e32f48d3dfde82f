"""AWS License Manager for contract-priced container products: CheckoutLicense,
ExtendLicenseConsumption and CheckInLicense through a botocore client.

botocore's own retries are off (one attempt per call), as for metering: the contract service is
the single retry layer, so every attempt shows in the state and the logs. The consumption token
is a bearer credential for the checkout (it extends and checks it in): it never appears in full
in a log line, an error message or an answer of the local API (`redact`).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sidecar.aws.errors import ErrorInfo, classify_known, for_endpoint

SERVICE = "license-manager"
ENDPOINT_ENV = "AWS_ENDPOINT_URL_LICENSE_MANAGER"
# botocore license-manager 2018-08-01, shape ISO8601DateTime (IssuedAt, Expiration are strings).
ISO8601_RE = re.compile(
    r"^(-?(?:[1-9][0-9]*)?[0-9]{4})-(1[0-2]|0[1-9])-(3[0-1]|0[1-9]|[1-2][0-9])T(2[0-3]|[0-1][0-9])"
    r":([0-5][0-9]):([0-5][0-9])(\.[0-9]+)?(Z|[+-](?:2[ 0-3]|[0-1][0-9]):[0-5][0-9])+$"
)

_IAM_HINT = (
    "the ECS task role or IRSA role (or, off AWS, the role named by MARKETPLACE_LICENSE_ROLE_ARN) "
    "needs license-manager:CheckoutLicense, license-manager:ExtendLicenseConsumption and "
    'license-manager:CheckInLicense (Resource "*"); AWS\'s managed policy '
    "AWSLicenseManagerConsumptionPolicy grants them"
)
_TRANSIENT_HINT = "temporary; retried with backoff (check network egress to License Manager)"
_KNOWN: dict[str, tuple[str, str, bool]] = {
    "NoEntitlementsAllowedException": (
        "entitlement",
        "License Manager found no license of this product for this AWS account, or not enough "
        "of the requested entitlements left (AWS answers both the same way); the buyer needs a "
        "contract in AWS Marketplace (or more units); start a new pod once it has one",
        False,
    ),
    "ResourceNotFoundException": (
        "entitlement",
        "License Manager has no such license or checkout: check MARKETPLACE_LICENSE_PRODUCT_SKU; "
        "for a running pod the checkout lapsed or the license was withdrawn",
        False,
    ),
    "AccessDeniedException": ("configuration", _IAM_HINT, False),
    "AuthorizationException": ("configuration", _IAM_HINT, False),
    "RedirectException": (
        "configuration",
        "License Manager answered from another region: set AWS_REGION to the license's home "
        "region (the seller guide's default for off-AWS installs is us-east-1)",
        False,
    ),
    "ValidationException": (
        "configuration",
        "License Manager refused the request's parameters; check MARKETPLACE_LICENSE_* "
        "(the message names the field)",
        False,
    ),
    "InvalidParameterValueException": (
        "configuration",
        "License Manager refused a parameter value; check MARKETPLACE_LICENSE_ENTITLEMENTS and "
        "MARKETPLACE_LICENSE_KEY_FINGERPRINT",
        False,
    ),
    "UnsupportedDigitalSignatureMethodException": (
        "configuration",
        "the license's issuer signs with a method License Manager cannot use for this "
        "checkout; check MARKETPLACE_LICENSE_KEY_FINGERPRINT",
        False,
    ),
    "ConflictException": ("aws", "License Manager reports a conflicting change; retried", True),
    "RateLimitExceededException": ("transient", _TRANSIENT_HINT, True),
    "ServerInternalException": ("transient", _TRANSIENT_HINT, True),
}
# A whole call (credential refresh included) gets this many read timeouts, plus the anywhere
# identity's worst case when it refreshes inside the call: botocore's timeouts bound each
# socket read, not the call, and a server that drips one byte at a time never trips them.
CALL_TIMEOUTS = 3
ANYWHERE_EXTRA_SECONDS = 60.0
# Codes that say this checkout (or the license behind it) no longer exists.
GONE_CODES = frozenset({"NoEntitlementsAllowedException", "ResourceNotFoundException"})


def classify_license(
    code: str, message: str, *, http_status: int | None = None, request_id: str | None = None
) -> ErrorInfo:
    """A License Manager error as the sidecar reports it: retryable or not, and what to do."""
    return classify_known(
        _KNOWN, _TRANSIENT_HINT, code, message, http_status=http_status, request_id=request_id
    )


def redact(token: str | None) -> str | None:
    """The first 4 characters and the length: enough to tell checkouts apart in logs."""
    if not token:
        return None
    return f"{token[:4]}...({len(token)} chars)"


class LicenseCallError(Exception):
    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(f"{info.code}: {info.message}")
        self.info = info


@dataclass(frozen=True)
class Checkout:
    """CheckoutLicense's answer, times as AWS wrote them (ISO 8601 strings)."""

    consumption_token: str
    entitlements_allowed: tuple[dict[str, str], ...]
    issued_at: str | None
    expiration: str | None
    license_arn: str | None
    checkout_type: str | None
    signed_token: str | None
    node_id: str | None


def parse_time(text: str | None) -> float | None:
    """Epoch seconds from the model's ISO8601DateTime (full match), or None if absent/invalid."""
    if not isinstance(text, str) or not ISO8601_RE.fullmatch(text):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _token_filter() -> None:
    """botocore logs request bodies at DEBUG: keep consumption tokens out of them."""
    for name in ("botocore.endpoint", "botocore.parsers", "botocore.hooks"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoBodies) for f in logger.filters):
            logger.addFilter(_NoBodies())


class _NoBodies(logging.Filter):
    """Drop records that carry a License Manager body (the daemon keeps botocore at WARNING;
    this holds if anyone lowers it). Only License Manager's: the loggers are process-wide, and
    the Metering client's own redaction keeps its bodies useful for debugging."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a record that cannot format is dropped, never half-shown
            return False
        if "LicenseConsumptionToken" in text:
            return False
        ours = "AWSLicenseManager" in text or "license-manager" in text
        return not (ours and "body" in text.lower())


class LicenseGateway:
    """One License Manager client; each method makes one attempt."""

    def __init__(
        self,
        region: str,
        timeout: float,
        *,
        token_file: Path | None = None,
        role_arn: str | None = None,
    ) -> None:
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=min(timeout, 5.0),
            read_timeout=timeout,
            user_agent_extra="marketplace-sidecar",
        )
        _token_filter()
        self._budget = CALL_TIMEOUTS * timeout + 5.0
        self._hung: threading.Thread | None = None  # a call abandoned at its bound, still running
        if token_file is not None and role_arn is not None:
            self._budget += ANYWHERE_EXTRA_SECONDS
            # Off AWS: credentials from the buyer's license token (GetAccessToken, then STS
            # AssumeRoleWithWebIdentity), refreshed by the session itself.
            from sidecar.aws.anywhere import license_session

            session = license_session(token_file, role_arn, region)
            self._client: Any = session.client("license-manager", region_name=region, config=config)
        else:
            import botocore.session

            self._client = botocore.session.get_session().create_client(
                SERVICE, region_name=region, config=config
            )

    @property
    def endpoint(self) -> str:
        return str(self._client.meta.endpoint_url)

    def _call(self, op: str, **params: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self._bounded(op, params)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            meta = exc.response.get("ResponseMetadata", {})
            info = classify_license(
                str(err.get("Code", "Unknown")),
                str(err.get("Message", "")),
                http_status=meta.get("HTTPStatusCode"),
                request_id=meta.get("RequestId"),
            )
            raise LicenseCallError(_scrub(info, params)) from None
        except BotoCoreError as exc:
            # The anywhere identity's own errors carry what to do (token file, role, token).
            own = getattr(exc, "info", None)
            info = (
                own
                if isinstance(own, ErrorInfo)
                else classify_license(type(exc).__name__, str(exc))
            )
            info = for_endpoint(info, self.endpoint)
            raise LicenseCallError(_scrub(info, params)) from None
        return resp

    def _bounded(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        """The call, given up after `_budget` seconds (a transient error). The abandoned call runs
        on until the server lets go; while it does, further calls (but a check-in) fail at once
        instead of piling up threads on a server that drips forever."""
        # CheckInLicense is still tried (at stop, a seat back beats an hour held); it runs once
        # per re-check or stop, so it cannot pile up.
        if op != "check_in_license" and self._hung is not None and self._hung.is_alive():
            raise LicenseCallError(self._timed_out(op, "an earlier call is still unanswered"))
        box: list[Any] = []

        def work() -> None:
            try:
                box.append(getattr(self._client, op)(**params))
            except BaseException as exc:  # handed to the caller's thread
                box.append(exc)

        worker = threading.Thread(target=work, name=f"license-{op}", daemon=True)
        worker.start()
        worker.join(self._budget)
        if worker.is_alive():
            self._hung = worker
            raise LicenseCallError(self._timed_out(op, f"no whole answer in {self._budget:.0f} s"))
        if isinstance(box[0], BaseException):
            raise box[0]
        result: dict[str, Any] = box[0]
        return result

    def _timed_out(self, op: str, why: str) -> ErrorInfo:
        return for_endpoint(
            ErrorInfo("CallTimeout", f"{op}: {why}", _TRANSIENT_HINT, "transient", True),
            self.endpoint,
        )

    def checkout(
        self,
        product_sku: str,
        key_fingerprint: str,
        entitlements: tuple[dict[str, str], ...],
        checkout_type: str,
        client_token: str,
        node_id: str | None = None,
    ) -> Checkout:
        params: dict[str, Any] = {
            "ProductSKU": product_sku,
            "KeyFingerprint": key_fingerprint,
            "Entitlements": [dict(e) for e in entitlements],
            "CheckoutType": checkout_type,
            "ClientToken": client_token,
        }
        if node_id:
            params["NodeId"] = node_id
        resp = self._call("checkout_license", **params)
        allowed = tuple(
            {k: str(v) for k, v in e.items() if k in ("Name", "Unit", "Value")}
            for e in resp.get("EntitlementsAllowed") or []
            if isinstance(e, dict)
        )
        return Checkout(
            consumption_token=str(resp.get("LicenseConsumptionToken") or ""),
            entitlements_allowed=allowed,
            issued_at=resp.get("IssuedAt"),
            expiration=resp.get("Expiration"),
            license_arn=resp.get("LicenseArn"),
            checkout_type=resp.get("CheckoutType"),
            signed_token=resp.get("SignedToken"),
            node_id=resp.get("NodeId"),
        )

    def extend(self, consumption_token: str) -> str | None:
        """ExtendLicenseConsumption: the new Expiration (ISO 8601), as AWS wrote it."""
        resp = self._call("extend_license_consumption", LicenseConsumptionToken=consumption_token)
        value = resp.get("Expiration")
        return str(value) if value is not None else None

    def checkin(self, consumption_token: str) -> None:
        self._call("check_in_license", LicenseConsumptionToken=consumption_token)


def _scrub(info: ErrorInfo, params: dict[str, Any]) -> ErrorInfo:
    token = params.get("LicenseConsumptionToken")
    if not token or token not in info.message:
        return info
    return replace(info, message=info.message.replace(token, redact(token) or ""))
