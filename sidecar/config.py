"""Settings from environment variables, validated before anything binds a port.

Every problem is reported as one line naming the variable and what is allowed; `run` exits 2.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import ipaddress
import json
import math
import os
import re
import socket
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import SplitResult, unquote, unquote_plus, urlparse, urlsplit

from sidecar.aws.entitlement import ENDPOINT_ENV as ENTITLEMENT_ENDPOINT_ENV
from sidecar.aws.entitlement import endpoint_problem as entitlement_problem
from sidecar.aws.errors import SIGV4_SKEW_SECONDS
from sidecar.core.backoff import ThrottleSchedule
from sidecar.core.files import UnsafeFileError, read_small_file
from sidecar.server.netaddr import parse_hostport

TYPE_CHECKING = False  # not typing's: see sidecar/cli.py
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
PRODUCT_CODE_RE = re.compile(r"[-a-zA-Z0-9/=:_.@]{1,255}")  # fullmatch: `$` takes "x\n"
# A domain-qualified condition type, e.g. aws-marketplace.amazonaws.com/entitled.
CONDITION_TYPE_RE = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
REGISTRATION_WINDOW_SECONDS = 6 * 3600
MAX_DIMENSIONS = 24  # AWS: up to 24 custom dimensions per product
MAX_DIMENSION_CHARS = 255  # MeterUsage UsageDimension: 1-255 characters
MAX_FLEET_SIZE = 100_000  # MARKETPLACE_FLEET_SIZE; the registration deadline bounds it further
# Kubernetes' default terminationGracePeriodSeconds is 30: leave room for the product's own exit.
DEFAULT_DRAIN_SECONDS = 20.0
ENDPOINT_ENV = "AWS_ENDPOINT_URL_MARKETPLACE_METERING"
LICENSE_ENDPOINT_ENV = "AWS_ENDPOINT_URL_LICENSE_MANAGER"
# The issuer fingerprint of every license AWS Marketplace issues (seller guide, "Contract pricing
# for container products with AWS License Manager": not a placeholder).
MARKETPLACE_KEY_FINGERPRINT = "aws:294406891311:AWS/Marketplace:issuer-fingerprint"
# The same guide: "We recommend that you perform the CheckoutLicense API call every 15 minutes".
LICENSE_CHECK_SECONDS = 900.0
# botocore license-manager 2018-08-01, EntitlementDataUnit.
LICENSE_UNITS = frozenset(
    {
        "Count", "None", "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes",
        "Megabytes", "Gigabytes", "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits",
        "Terabits", "Percent", "Bytes/Second", "Kilobytes/Second", "Megabytes/Second",
        "Gigabytes/Second", "Terabytes/Second", "Bits/Second", "Kilobits/Second",
        "Megabits/Second", "Gigabits/Second", "Terabits/Second", "Count/Second",
    }
)  # fmt: skip
MAX_LICENSE_ENTITLEMENTS = 50
# The model's String has no pattern for ProductSKU, KeyFingerprint or entitlement names: these
# bounds are ours (no whitespace or control characters, as every example in the guides).
LICENSE_TEXT_RE = re.compile(r"[!-~]{1,255}")
ROLE_ARN_RE = re.compile(r"arn:aws[a-zA-Z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}")
PREFIX = "MARKETPLACE_"
_NO_KEY = (
    f"{PREFIX}PUBLIC_KEY / {PREFIX}PUBLIC_KEY_FILE: set exactly one (the product's PEM public "
    "key, or a path to it); the sidecar never runs without verification"
)


class ConfigError(Exception):
    """Configuration is unusable; `problems` holds one line per variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def setting(default: Any, *, description: str, **bounds: float) -> Any:
    """A settings field: its default, its one-line meaning for `--help`, and its bounds
    (ge, gt, le, lt), which sidecar.config_validate hands to pydantic."""
    return field(default=default, metadata={"description": description, "bounds": bounds})


@dataclass(frozen=True)
class Settings:
    """Field `x` is read from `MARKETPLACE_X`; sidecar.config_validate checks each one.

    A plain dataclass, so that the long-running `run` process never imports pydantic (~9 MiB
    resident): the validation runs in a short-lived child (see sidecar.config_validate).
    """

    # Each description is the one-line meaning `--help` prints: keep it short and exact.
    # Optional in the model, required by `_mode_problems` where a mode needs it: SaaS products
    # integrated since June 2026 meter by license and send no product code.
    product_code: str | None = setting(
        None,
        description="product code from the AWS Marketplace Management Portal "
        "(1-255 of A-Za-z0-9-/=:_.@); required except in saas mode with "
        "MARKETPLACE_SAAS_IDENTITY=license, where it pins ResolveCustomer to this product",
    )
    mode: Literal["hourly", "custom", "saas", "contract"] = setting(
        "hourly",
        description="hourly (RegisterUsage), custom (MeterUsage, custom dimensions), saas "
        "(ResolveCustomer and BatchMeterUsage for SaaS products) or contract (AWS License "
        "Manager CheckoutLicense for contract-priced container products)",
    )
    license_product_sku: str | None = setting(
        None,
        description="contract mode: the product ID from the AWS Marketplace Management Portal "
        "(CheckoutLicense ProductSKU; 1-255 non-blank characters)",
    )
    license_entitlements: str = setting(
        "",
        description='contract mode: JSON list of {"name", "unit", "value"?} to check out at '
        "start (unit from License Manager's EntitlementDataUnit; no value for unlimited or "
        "boolean features); ready when AWS allows at least one of them",
    )
    license_checkout_type: Literal["PROVISIONAL", "PERPETUAL"] = setting(
        "PROVISIONAL",
        description="contract mode: PROVISIONAL (floating: extended while the pod runs, "
        "checked in at stop) or PERPETUAL (consumed for good; counted ones are checked out "
        "once per start, never re-checked)",
    )
    license_check_seconds: float = setting(
        LICENSE_CHECK_SECONDS,
        ge=60.0,
        le=86400.0,
        description="contract mode: period of the CheckoutLicense re-check that picks up "
        "renewals, upgrades, expiry and revocation (AWS's seller guide: every 15 minutes)",
    )
    license_key_fingerprint: str = setting(
        MARKETPLACE_KEY_FINGERPRINT,
        description="contract mode: CheckoutLicense KeyFingerprint, the trusted issuer (AWS "
        "Marketplace's, unless testing with a license you issued yourself)",
    )
    license_on_loss: Literal["unready", "serve"] = setting(
        "unready",
        description="contract mode: when a running pod's license is revoked, reduced or "
        "expired: unready (readiness fails: no license, no product) or serve (stay ready; "
        "GET /v1/entitlement says entitled false, so the product can fall back to a free "
        "tier, as AWS's guide suggests for on-premises deployments)",
    )
    license_lease_timeout_seconds: float = setting(
        300.0,
        ge=5.0,
        le=3000.0,
        description="contract mode: a product lease (POST /v1/licenses/checkout) not renewed "
        "for this long is checked back in (the product died); needs MARKETPLACE_STATE_DIR",
    )
    license_token_file: Path | None = setting(  # noqa: RUF009 # a field(), not a call per instance
        None,
        description="contract mode, off AWS (EKS/ECS Anywhere, on-premises): the License "
        "Manager license token file (the buyer's secret); with MARKETPLACE_LICENSE_ROLE_ARN",
    )
    license_role_arn: str | None = setting(
        None,
        description="contract mode, off AWS: the IAM role the license token assumes "
        "(AssumeRoleWithWebIdentity); with MARKETPLACE_LICENSE_TOKEN_FILE",
    )
    dimensions: str = setting(
        "",
        description="custom and saas mode: the product's dimension names as published, "
        "comma-separated (1-24); contract mode: usage above the contract (MeterUsage)",
    )
    entitlement_check: Literal["meter_zero", "dry_run", "none"] = setting(
        "meter_zero",
        description="custom mode: how entitlement is checked at start (meter_zero: a quantity-0 "
        "record; dry_run: permissions only; none)",
    )
    entitlement_dimension: str = setting(
        "",
        description="custom mode, meter_zero: the dimension the start check meters 0 on, one of "
        "MARKETPLACE_DIMENSIONS published for this purpose and never given usage (no usage "
        "dimension loses its first hour); empty: the first dimension",
    )
    drain_seconds: float = setting(
        DEFAULT_DRAIN_SECONDS,
        ge=0.0,
        le=3600.0,
        description="custom and saas mode: on SIGTERM, how long to keep sending pending usage; "
        "contract mode: the bound on CheckInLicense at stop",
    )
    saas_identity: Literal["license", "customer_identifier"] = setting(
        "license",
        description="saas mode: how records name the customer: license (CustomerAWSAccountId "
        "+ LicenseArn, no product code: integrations since June 2026) or customer_identifier "
        "(CustomerIdentifier + MARKETPLACE_PRODUCT_CODE)",
    )
    usage_database_url: str | None = setting(
        None,
        description="saas mode: postgresql://user:password@host:port/db for a fleet of "
        "replicas sharing one store (a secret: never logged with its password); unset: "
        "SQLite in MARKETPLACE_STATE_DIR, one replica only",
    )
    accept_unresolved_customers: bool = setting(
        False,
        description="saas mode: accept usage for customers no sidecar of the fleet has "
        "resolved (default: refused with 400 naming customer)",
    )
    zero_usage_records: bool = setting(
        True,
        description="saas mode: send a quantity-0 record for each active customer's dimension "
        "with no usage in an hour (AWS's guidance: send every hour)",
    )
    saas_events_queue_url: str | None = setting(
        None,
        description="saas mode: the SQS queue URL an EventBridge rule (source "
        "aws.agreement-marketplace) and/or the SNS subscription topics deliver to; the sidecar "
        "long-polls it and keeps each buyer's subscription state (docs/saas-lifecycle.md); "
        "unset: buyers' departures are learned only from BatchMeterUsage",
    )
    saas_contract_dimensions: str = setting(
        "",
        description="saas mode, contracts with consumption: the dimensions the buyers' "
        "contract entitlements cover and how, comma-separated dimension:basis (hour: the "
        "entitlement covers that much every hour, e.g. users; term: a pool drawn down over the "
        "entitlement's term, e.g. api_calls); their records bill only usage above the "
        "contract (needs MARKETPLACE_SAAS_EVENTS_QUEUE_URL); unset: every unit is metered",
    )
    saas_calls_per_second: float = setting(
        8.0,
        gt=0.0,
        le=1000.0,
        description="saas mode: BatchMeterUsage calls per second of the fleet's one sender "
        "(AWS's quota: 10 per account and region; raise this only after AWS raised the quota)",
    )
    public_key_version: int = setting(
        1, ge=1, description="public key version sent to AWS and used to pick the key"
    )
    public_key: str | None = setting(
        None,
        description="the product's PEM public key (RSA >= 2048 bits); literal \\n sequences "
        "become newlines, so a one-line value works (set this or MARKETPLACE_PUBLIC_KEY_FILE)",
    )
    public_key_file: Path | None = setting(  # noqa: RUF009 # a field(), not a call per instance
        None,
        description="path to the product's PEM public key (set this or MARKETPLACE_PUBLIC_KEY)",
    )
    listen: str = setting(
        "127.0.0.1:8787",
        description="local API host:port (IPv6 as [::1]:8787); it serves the token, so it "
        "must be loopback unless MARKETPLACE_LISTEN_ALLOW_NON_LOOPBACK is true",
    )
    listen_allow_non_loopback: bool = setting(
        False,
        description="allow a non-loopback MARKETPLACE_LISTEN (e.g. 0.0.0.0): anyone who "
        "reaches it reads the token and sends challenges; logged and shown in "
        "/v1/entitlement warnings",
    )
    probe_listen: str = setting(
        "0.0.0.0:8788", description="probe listener host:port for kubelet/ECS health checks"
    )
    metrics_listen: str = setting(
        "probe",
        description="where /metrics is served: probe (on the probe listener), a host:port of "
        "its own, or off",
    )
    register_interval_seconds: float = setting(
        3600.0, ge=1.0, le=86400.0, description="re-registration period"
    )
    register_jitter: float = setting(
        0.1, ge=0.0, le=0.5, description="+/- fraction of the period, so a fleet does not align"
    )
    register_deadline_seconds: float = setting(
        3600.0,
        ge=1.0,
        le=REGISTRATION_WINDOW_SECONDS - 600,
        description="give up the first registration after this (inside AWS's 6 h window)",
    )
    backoff_base_seconds: float = setting(
        1.0, gt=0.0, le=60.0, description="retry backoff base for AWS 5xx and network errors"
    )
    backoff_cap_seconds: float = setting(
        60.0, gt=0.0, le=900.0, description="retry backoff cap (full jitter up to it)"
    )
    throttle_schedule_seconds: str = setting(
        "",
        description="empty: adaptive retry windows after ThrottlingException at start; or fixed "
        "seconds after start where those retries land (1-10 increasing numbers)",
    )
    fleet_size: int | None = setting(
        None,
        ge=1,
        le=MAX_FLEET_SIZE,
        description="hourly mode: how many pods registering with this account and region can "
        "start at the same moment (the replicas, or the autoscaler's maximum): after its first "
        "ThrottlingException at start a pod retries within 1.2 x this / 5 s (the first call is "
        "never delayed); a value far too large makes a pod throttled once by anything else in "
        "the account wait up to that long; empty: adaptive windows. custom mode: how many pods "
        "send MeterUsage with this account and region: each sends its hourly records in its own "
        "slot of a frame of this many slots at MARKETPLACE_METER_CALLS_PER_SECOND; empty: as "
        "many pods as fit a 600 s window",
    )
    meter_calls_per_second: float = setting(
        9.0,
        gt=0.0,
        le=1000.0,
        description="custom mode: MeterUsage calls per second the whole fleet may make for its "
        "hourly records (AWS's quota: 10 per account and region, shared with the start checks "
        "and other products); every pod of the fleet must have the same value",
    )
    aws_timeout_seconds: float = setting(
        10.0, gt=0.0, le=120.0, description="read timeout of one AWS call (connect: min(5, this))"
    )
    # The first call's answer is the only entitlement check: wait longer for it (never less
    # than MARKETPLACE_AWS_TIMEOUT_SECONDS).
    first_call_timeout_seconds: float = setting(
        30.0, gt=0.0, le=300.0, description="read timeout of the pod's first RegisterUsage call"
    )
    strict_first_answer: bool = setting(
        False,
        description="when the first call's answer may have been lost, refuse (not_entitled) "
        "instead of serving with the first_answer_lost warning",
    )
    clock_skew_seconds: float = setting(
        SIGV4_SKEW_SECONDS,
        ge=0.0,
        le=3600.0,
        description="how far in the future a token's iat may be (AWS's SigV4 tolerance)",
    )
    challenge_rate_per_second: float = setting(
        1.0, gt=0.0, le=5.0, description="challenge rate limit (each is a RegisterUsage call)"
    )
    challenge_burst: int = setting(3, ge=1, le=20, description="challenge burst size")
    challenge_deadline_seconds: float = setting(
        20.0, ge=1.0, le=300.0, description="how long a challenge retries retryable AWS errors"
    )
    aws_call_rate_per_second: float = setting(
        1.0,
        gt=0.0,
        le=5.0,
        description="all RegisterUsage calls per second (registrar and challenges)",
    )
    aws_call_burst: int = setting(3, ge=1, le=20, description="burst of that AWS call budget")
    state_dir: Path | None = setting(  # noqa: RUF009 # a field(), not a call per instance
        None,
        description="pod-lifetime writable directory (an emptyDir) that remembers AWS's "
        "first-call refusal across sidecar restarts; custom mode's usage store, and saas "
        "mode's when MARKETPLACE_USAGE_DATABASE_URL is unset",
    )
    state_volume_bytes: int | None = setting(
        None,
        description="custom mode: the state volume's size limit (the emptyDir's sizeLimit, "
        "e.g. 256Mi or 268435456); usage is refused (503) at 90% instead of the pod being "
        "evicted, with warnings from 80%. Unset: the filesystem's free space only",
    )
    readiness_gate: str = setting(
        "",
        description="pod condition type to set (opt-in readiness gate), e.g. "
        "aws-marketplace.amazonaws.com/entitled; needs MARKETPLACE_POD_NAME and _NAMESPACE",
    )
    kube_events: bool = setting(
        False, description="record Kubernetes Events on state changes (opt-in)"
    )
    pod_name: str = setting("", description="this pod's name (downward API metadata.name)")
    pod_namespace: str = setting(
        "", description="this pod's namespace (downward API metadata.namespace)"
    )
    pod_index: int | None = setting(
        None,
        ge=0,
        le=999_999_999,
        description="custom mode: this pod's StatefulSet ordinal, its own MeterUsage slot "
        "(downward API metadata.labels['apps.kubernetes.io/pod-index'], Kubernetes 1.28+); "
        "empty: a StatefulSet's ordinal from the pod's name, else a hash of the name",
    )
    serviceaccount_dir: Path = setting(  # noqa: RUF009 # a field(), not a call per instance
        Path("/var/run/secrets/kubernetes.io/serviceaccount"),
        description="service-account token, CA and namespace for the Kubernetes API",
    )
    # TEST ONLY (crash and fleet tests): hours pass `scale` times faster from `origin` (Unix
    # time), as in the emulator. Refused unless the metering endpoint is loopback.
    test_only_time_scale: float | None = setting(
        None,
        ge=1.0,
        le=100000.0,
        description="TEST ONLY, refused unless the metering endpoint is loopback: time runs this "
        "many times faster",
    )
    test_only_time_origin: float | None = setting(
        None, description="TEST ONLY: the Unix time the scaled clock starts from"
    )
    log_format: Literal["json", "text"] = setting("json", description="log line format")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = setting(
        "INFO", description="lowest level logged"
    )

    # The variables actually set (pydantic's model_fields_set): foreign-mode settings are
    # refused only when set. Not a variable itself.
    explicit: frozenset[str] = field(default=frozenset(), repr=False)

    @property
    def dimension_list(self) -> tuple[str, ...]:
        return parse_dimensions(self.dimensions) if self.dimensions else ()

    @property
    def contract_dimensions(self) -> dict[str, str]:
        """MARKETPLACE_SAAS_CONTRACT_DIMENSIONS: dimension -> basis (hour or term)."""
        text = self.saas_contract_dimensions
        return parse_contract_dimensions(text) if text.strip() else {}

    @property
    def throttle_schedule(self) -> tuple[float, ...]:
        """() = adaptive windows; else fixed slots tuned for one fleet size."""
        text = self.throttle_schedule_seconds
        return parse_schedule(text) if text.strip() else ()

    def problems(self) -> list[str]:
        """Settings valid one by one but not together (checked once every field is valid)."""
        problems = self._mode_problems()
        if (self.readiness_gate or self.kube_events) and not (self.pod_name and self.pod_namespace):
            problems.append(
                f"{PREFIX}POD_NAME and {PREFIX}POD_NAMESPACE are required with "
                f"{PREFIX}READINESS_GATE or {PREFIX}KUBE_EVENTS (set them from the downward API)"
            )
        problems += self._fleet_size_problems()
        if parse_hostport(self.listen) == parse_hostport(self.probe_listen):
            problems.append(f"{PREFIX}LISTEN and {PREFIX}PROBE_LISTEN must differ")
        elif not self.listen_allow_non_loopback and not is_loopback(parse_hostport(self.listen)[0]):
            problems.append(
                f"{PREFIX}LISTEN: {self.listen} is not a loopback address; the local API serves "
                "the entitlement token and sends challenges to AWS, so it listens on 127.0.0.1, "
                f"[::1] or localhost unless you set {PREFIX}LISTEN_ALLOW_NON_LOOPBACK=true "
                "(and restrict who can reach it)"
            )
        if self.metrics_listen not in ("probe", "off"):
            own = parse_hostport(self.metrics_listen)
            if own in (parse_hostport(self.listen), parse_hostport(self.probe_listen)):
                problems.append(
                    f"{PREFIX}METRICS_LISTEN must differ from {PREFIX}LISTEN and "
                    f"{PREFIX}PROBE_LISTEN (write probe to serve /metrics on the probe listener)"
                )
        return problems

    def _fleet_size_problems(self) -> list[str]:
        if self.fleet_size is None or self.mode != "hourly":
            return []
        name = f"{PREFIX}FLEET_SIZE"
        if self.throttle_schedule_seconds.strip():
            return [
                f"{name}: cannot be combined with {PREFIX}THROTTLE_SCHEDULE_SECONDS (fixed "
                "slots): set one of them"
            ]
        window = ThrottleSchedule(fleet=self.fleet_size).hinted_end()
        deadline = self.register_deadline_seconds
        if window > deadline / 2:  # the registrar gives up when a retry would pass the deadline
            return [
                f"{name}: {self.fleet_size} pods spread their retries over {window:g} s, more "
                f"than half of {PREFIX}REGISTER_DEADLINE_SECONDS={deadline:g} (room is left for "
                "retries after a throttle): lower it or raise the deadline"
            ]
        return []

    def _mode_problems(self) -> list[str]:
        """What each mode needs, and nothing it does not: custom and saas have no token."""
        problems = []
        if self.product_code is None and self.needs_product_code:
            problems.append(f"{PREFIX}PRODUCT_CODE: is required{_product_code_why(self)}")
        problems += self._foreign_settings()
        if self.mode == "contract":
            return problems + self._contract_problems() + self._consumption_problems()
        if self.mode == "hourly":
            if (self.public_key is None) == (self.public_key_file is None):
                problems.append(_NO_KEY)
            return problems
        if not self.dimensions:
            problems.append(
                f"{PREFIX}DIMENSIONS: is required with {PREFIX}MODE={self.mode}: the product's "
                f"dimension names as published, comma-separated (1-{MAX_DIMENSIONS})"
            )
        if self.mode == "custom":
            problems += self._check_dimension_problems()
        if self.mode == "custom" and self.state_dir is None:
            problems.append(
                f"{PREFIX}STATE_DIR: is required with {PREFIX}MODE=custom: the usage store "
                "lives there (mount an emptyDir: it survives container restarts)"
            )
        if self.mode == "saas":
            problems += self._contract_dimension_problems()
        if self.mode == "saas" and self.state_dir is None and self.usage_database_url is None:
            problems.append(
                f"{PREFIX}USAGE_DATABASE_URL or {PREFIX}STATE_DIR: saas mode needs a usage "
                "store: a PostgreSQL URL shared by every replica, or (one replica only) a "
                "writable directory for SQLite"
            )
        return problems

    def _contract_problems(self) -> list[str]:
        """What contract mode needs: the SKU, the entitlements, both or neither identity file."""
        problems = []
        if self.license_product_sku is None:
            problems.append(
                f"{PREFIX}LICENSE_PRODUCT_SKU: is required with {PREFIX}MODE=contract: the "
                "product ID from the AWS Marketplace Management Portal (Assets > Container)"
            )
        if not self.license_entitlements.strip():
            problems.append(
                f"{PREFIX}LICENSE_ENTITLEMENTS: is required with {PREFIX}MODE=contract: a JSON "
                'list such as [{"name": "PremiumTier", "unit": "None"}]'
            )
        if (self.license_token_file is None) != (self.license_role_arn is None):
            problems.append(
                f"{PREFIX}LICENSE_TOKEN_FILE and {PREFIX}LICENSE_ROLE_ARN: set both (off AWS: "
                "the buyer's license token and the role it assumes) or neither (on AWS: the "
                "ECS task role or IRSA)"
            )
        return problems

    def _consumption_problems(self) -> list[str]:
        """Contract with consumption (MARKETPLACE_DIMENSIONS in contract mode): custom mode's
        usage store must exist; without dimensions nothing changes."""
        if not self.dimensions or self.state_dir is not None:
            return []
        return [
            f"{PREFIX}STATE_DIR: is required with {PREFIX}DIMENSIONS in {PREFIX}MODE=contract: "
            "usage above the contract is kept there until MeterUsage takes it (mount an "
            "emptyDir: it survives container restarts)"
        ]

    def _contract_dimension_problems(self) -> list[str]:
        """Contract dimensions must be the product's, and their entitlements kept current."""
        if not self.saas_contract_dimensions.strip():
            return []
        var = f"{PREFIX}SAAS_CONTRACT_DIMENSIONS"
        try:
            named = parse_contract_dimensions(self.saas_contract_dimensions)
            listed = parse_dimensions(self.dimensions) if self.dimensions else ()
        except ValueError:
            return []  # the variable's own line says what is wrong
        out = []
        unknown = [d for d in named if d not in listed]
        if unknown:
            out.append(
                f"{var}: {', '.join(unknown)[:200]!s} not among {PREFIX}DIMENSIONS "
                f"({', '.join(listed)[:200]}); name dimensions of the product"
            )
        if not self.saas_events_queue_url:
            out.append(
                f"{var}: needs {PREFIX}SAAS_EVENTS_QUEUE_URL: the contracts' entitlements are "
                "read again on each agreement or license event, so a change is billed right"
            )
        return out

    def _check_dimension_problems(self) -> list[str]:
        name = self.entitlement_dimension
        if not name:
            return []
        var = f"{PREFIX}ENTITLEMENT_DIMENSION"
        if self.entitlement_check != "meter_zero":
            return [
                f"{var}: only used with {PREFIX}ENTITLEMENT_CHECK=meter_zero (it is "
                f"{self.entitlement_check}); remove it or use meter_zero"
            ]
        try:
            listed = parse_dimensions(self.dimensions) if self.dimensions else ()
        except ValueError:
            return []  # MARKETPLACE_DIMENSIONS' own line says what is wrong
        if name not in listed:
            return [
                f"{var}: {name[:80]!r} is not one of {PREFIX}DIMENSIONS "
                f"({', '.join(listed)[:200]}); name the dimension you published for the start "
                f"check and list it in {PREFIX}DIMENSIONS too"
            ]
        if len(listed) == 1:
            return [
                f"{var}: {name!r} is the only dimension of {PREFIX}DIMENSIONS; the check "
                "dimension takes no usage, so list the usage dimensions too"
            ]
        return []

    @property
    def needs_product_code(self) -> bool:
        if self.mode == "contract":
            # License Manager knows the product by its SKU; MeterUsage (contract with
            # consumption) only by its product code.
            return bool(self.dimensions)
        return self.mode != "saas" or self.saas_identity == "customer_identifier"

    def _foreign_settings(self) -> list[str]:
        """Settings of another mode, set explicitly: refused, or the seller trusts a no-op.

        Empty values are fine: templates set every variable and leave unused ones blank. In
        saas mode a value equal to the default is fine too (a shared template's defaults)."""
        out = []
        if self.mode == "hourly":  # as before saas mode existed: any non-empty value
            for name in (
                "dimensions",
                "entitlement_check",
                "entitlement_dimension",
                "state_volume_bytes",
                "meter_calls_per_second",
            ):
                if name in self.explicit and getattr(self, name):
                    out.append(
                        f"{PREFIX}{name.upper()}: only used with {PREFIX}MODE=custom "
                        f"(the mode is hourly); set {PREFIX}MODE=custom or remove it"
                    )
        refused = (
            not_contract(bool(self.dimensions))
            if self.mode == "contract"
            else {**CONTRACT_ONLY, **(SAAS_ONLY if self.mode != "saas" else NOT_SAAS)}
        )
        for name, why in refused.items():
            if name not in self.explicit:
                continue
            value = getattr(self, name)
            if value in ("", None) or value == SPECS[name].default:
                continue
            out.append(f"{PREFIX}{name.upper()}: {why} (the mode is {self.mode}); remove it")
        return out

    def ignored(self) -> list[str]:
        """Variables set but unused in this mode: logged at start, so nobody trusts them."""
        if self.mode == "saas":
            if self.saas_identity == "license" and self.product_code is None:
                return [
                    f"{PREFIX}PRODUCT_CODE is not set: a registration token of ANY product of "
                    "this seller account resolves here, and its buyer's usage would be metered "
                    "on that product's license; set it to pin this product (records still carry "
                    "only CustomerAWSAccountId and LicenseArn)"
                ]
            return []
        if self.mode != "custom":
            return []
        unused = (
            "public_key",
            "public_key_file",
            "public_key_version",
            "challenge_rate_per_second",
        )
        return [
            f"{PREFIX}{name.upper()} is ignored with {PREFIX}MODE=custom (MeterUsage returns "
            "no signed token)"
            for name in unused
            if name in self.explicit
        ]


# Checks of one field each, run by sidecar.config_validate after pydantic's type check (as
# field validators): a ValueError's message follows the variable's name in the error line.
def check_product_code(v: str | None) -> str | None:
    if not v:
        return None  # blank is unset: a shared template's saas (license) container
    if not PRODUCT_CODE_RE.fullmatch(v):
        raise ValueError("must be 1-255 characters of letters, digits and -/=:_.@")
    return v


def check_license_sku(v: str | None) -> str | None:
    if v is None or not v.strip():
        return None  # templates set every variable and leave unused ones blank
    return check_license_fingerprint(v)


def check_license_fingerprint(v: str) -> str:
    if not LICENSE_TEXT_RE.fullmatch(v):
        raise ValueError("must be 1-255 printable characters without spaces")
    return v


def check_role_arn(v: str | None) -> str | None:
    if not v:
        return None  # templates set every variable and leave unused ones blank
    if not ROLE_ARN_RE.fullmatch(v):
        raise ValueError("must be an IAM role ARN: arn:aws:iam::<12-digit account>:role/<name>")
    return v


def check_license_entitlements(v: str) -> str:
    if v.strip():
        parse_license_entitlements(v)
    return v


def parse_license_entitlements(text: str) -> tuple[dict[str, str], ...]:
    """The JSON list as CheckoutLicense's Entitlements ({"Name", "Unit", "Value"?}).

    Raise ValueError naming the item and what is allowed."""
    try:
        items = json.loads(text)
    except ValueError:
        raise ValueError(
            'must be a JSON list such as [{"name": "PremiumTier", "unit": "None"}]'
        ) from None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_LICENSE_ENTITLEMENTS:
        raise ValueError(f"must be a JSON list of 1-{MAX_LICENSE_ENTITLEMENTS} entitlements")
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(items, 1):
        where = f"item {i}"
        if not isinstance(item, dict) or not {"name", "unit"} <= set(item):
            raise ValueError(f'{where}: must be an object with "name" and "unit" (and "value"?)')
        extra = set(item) - {"name", "unit", "value"}
        if extra:
            raise ValueError(f"{where}: unknown key(s) {sorted(extra)}; allowed: name, unit, value")
        name, unit = item["name"], item["unit"]
        if not isinstance(name, str) or not LICENSE_TEXT_RE.fullmatch(name):
            raise ValueError(f"{where}: name must be 1-255 printable characters without spaces")
        if name in seen:
            raise ValueError(f"{where}: name {name!r} is listed twice")
        seen.add(name)
        if unit not in LICENSE_UNITS:
            raise ValueError(
                f"{where}: unit must be one of License Manager's units (Count, None, "
                f"Gigabytes, ...; see EntitlementDataUnit), got {str(unit)[:40]!r}"
            )
        entry = {"Name": name, "Unit": unit}
        if "value" in item:
            value = item["value"]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10**9:
                raise ValueError(
                    f"{where}: value must be a whole number from 1 to 1000000000 (omit it for "
                    "unlimited or boolean features)"
                )
            if unit == "None":
                raise ValueError(f"{where}: a feature (unit None) takes no value; omit it")
            entry["Value"] = str(value)
        out.append(entry)
    return tuple(out)


def check_database_url(v: str | None) -> str | None:
    if v is None or not v.strip():
        return None  # templates set every variable and leave unused ones blank
    database_url_problem(v)
    return v


# https://sqs.<region>.amazonaws.com/<account>/<queue> (a FIFO queue ends with .fifo); the legacy
# https://<region>.queue.amazonaws.com form too. Another host only with AWS_ENDPOINT_URL_SQS.
SQS_URL_RE = re.compile(
    r"https://(?:sqs\.[a-z0-9-]+\.amazonaws\.com(?:\.cn)?|[a-z0-9-]+\.queue\.amazonaws\.com)"
    r"/\d{12}/[A-Za-z0-9_-]{1,80}(?:\.fifo)?"
)
SQS_PATH_RE = re.compile(r"/\d{12}/[A-Za-z0-9_-]{1,80}(?:\.fifo)?")
SQS_ENDPOINT_ENV = "AWS_ENDPOINT_URL_SQS"


def check_queue_url(v: str | None) -> str | None:
    if v is None or not v.strip():
        return None  # templates set every variable and leave unused ones blank
    parsed = urlparse(v)
    if os.environ.get(SQS_ENDPOINT_ENV):
        if parsed.scheme not in ("http", "https") or SQS_PATH_RE.fullmatch(parsed.path) is None:
            raise ValueError("an SQS queue URL ending /<12-digit account>/<queue name> is required")
    elif SQS_URL_RE.fullmatch(v) is None:
        raise ValueError(
            "an SQS queue URL is required: https://sqs.<region>.amazonaws.com/<12-digit "
            "account>/<queue name> (1-80 of A-Z a-z 0-9 _ -, .fifo for a FIFO queue)"
        )
    return v


def check_dimensions(v: str) -> str:
    if v:
        parse_dimensions(v)
    return v


def check_contract_dimensions(v: str) -> str:
    if v.strip():
        parse_contract_dimensions(v)
    return v


def check_condition_type(v: str) -> str:
    if v and not CONDITION_TYPE_RE.fullmatch(v):
        raise ValueError(
            "must be a domain-qualified condition type such as "
            "aws-marketplace.amazonaws.com/entitled (or empty to turn the gate off)"
        )
    return v


def check_schedule(v: str) -> str:
    if v.strip():
        parse_schedule(v)
    return v


def parse_fleet_size(v: object) -> int | None:
    """Before type coercion: one clear line for '1.5', '1e3', 'true' or '٣' alike."""
    text = str(v).strip() if not isinstance(v, bool) and v is not None else ""
    if v is None or (isinstance(v, str) and not text):
        return None  # templates set every variable and leave unused ones blank
    if not re.fullmatch(r"[0-9]{1,6}", text) or not 1 <= int(text) <= MAX_FLEET_SIZE:
        raise ValueError(
            f"must be a whole number of pods from 1 to {MAX_FLEET_SIZE} (or empty for "
            f"adaptive retry windows), got {text[:20]!r}"
        )
    return int(text)


def check_hostport(v: str) -> str:
    parse_hostport(v)
    return v


def check_metrics_listen(v: str) -> str:
    if v not in ("probe", "off"):
        try:
            parse_hostport(v)
        except ValueError as exc:
            raise ValueError(
                f"must be probe (served on {PREFIX}PROBE_LISTEN), off, or a host:port of "
                f"its own; {exc}"
            ) from None
    return v


_UNITS = {"": 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
MIN_STATE_VOLUME = 16 * 1024**2  # room for the WAL (4 MiB after a checkpoint) and a margin


def parse_volume_bytes(v: object) -> int | None:
    """Bytes, or a Kubernetes quantity in Ki/Mi/Gi/Ti (the chart passes the sizeLimit as is)."""
    text = str(v).strip() if not isinstance(v, bool) and v is not None else ""
    if v is None or (isinstance(v, str) and not text):
        return None  # templates set every variable and leave unused ones blank
    match = re.fullmatch(r"([0-9]{1,16})(Ki|Mi|Gi|Ti)?", text)
    value = int(match[1]) * _UNITS[match[2] or ""] if match else 0
    if not MIN_STATE_VOLUME <= value <= 2**50:
        raise ValueError(
            "must be the state volume's size limit in bytes or as 64Mi / 1Gi (the emptyDir's "
            f"sizeLimit), at least 16Mi, got {text[:20]!r}"
        )
    return value


def parse_pod_index(v: object) -> int | None:
    """Before type coercion: the pod-index label's text (strconv.Itoa), blank on other pods."""
    text = str(v).strip() if not isinstance(v, bool) and v is not None else ""
    if v is None or (isinstance(v, str) and not text):
        return None  # a Deployment's pod has no pod-index label: the downward API gives ""
    if not re.fullmatch(r"0|[1-9][0-9]{0,8}", text):
        raise ValueError(
            "must be a StatefulSet pod's ordinal, 0 to 999999999 without leading zeros (the "
            f"apps.kubernetes.io/pod-index label), or empty, got {text[:20]!r}"
        )
    return int(text)


def parse_blank_as_unset(v: object) -> object:
    """Templates set every variable and leave unused ones blank: blank is unset (never ".")."""
    return None if isinstance(v, str) and not v.strip() else v


# field names -> their parser, run on the raw value before pydantic's own type coercion.
FIELD_PARSERS: tuple[tuple[tuple[str, ...], Callable[[Any], Any]], ...] = (
    (("license_token_file", "license_role_arn"), parse_blank_as_unset),
    (("fleet_size",), parse_fleet_size),
    (("pod_index",), parse_pod_index),
    (("state_volume_bytes",), parse_volume_bytes),
)
# field names -> their check, in the order pydantic runs them (field order).
FIELD_CHECKS: tuple[tuple[tuple[str, ...], Callable[[Any], Any]], ...] = (
    (("product_code",), check_product_code),
    (("license_product_sku",), check_license_sku),
    (("license_key_fingerprint",), check_license_fingerprint),
    (("license_entitlements",), check_license_entitlements),
    (("license_role_arn",), check_role_arn),
    (("usage_database_url",), check_database_url),
    (("saas_events_queue_url",), check_queue_url),
    (("dimensions",), check_dimensions),
    (("saas_contract_dimensions",), check_contract_dimensions),
    (("readiness_gate",), check_condition_type),
    (("throttle_schedule_seconds",), check_schedule),
    (("listen", "probe_listen"), check_hostport),
    (("metrics_listen",), check_metrics_listen),
)


@dataclass(frozen=True)
class Spec:
    """One setting as `--help` and the validation model see it."""

    name: str
    annotation: Any
    default: Any
    description: str
    bounds: tuple[tuple[str, float], ...]  # ("ge", 0.0), ... in the order gt, ge, lt, le

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def variable(self) -> str:
        return f"{PREFIX}{self.name.upper()}"


def _specs() -> dict[str, Spec]:
    hints = get_type_hints(Settings)
    out = {}
    for f in fields(Settings):
        if f.name == "explicit":
            continue
        bounds = f.metadata.get("bounds", {})
        out[f.name] = Spec(
            f.name,
            hints[f.name],
            f.default,
            f.metadata.get("description", ""),
            tuple((b, bounds[b]) for b in ("gt", "ge", "lt", "le") if b in bounds),
        )
    return out


SPECS = _specs()


def settings_from(values: Mapping[str, Any], explicit: Iterable[str]) -> Settings:
    """A `Settings` from validated values (possibly through JSON: paths come back as text)."""
    kwargs: dict[str, Any] = {}
    for name, spec in SPECS.items():
        value = values[name]
        if value is not None:
            if Path in (spec.annotation, *get_args(spec.annotation)):
                value = Path(value)
            elif float in (spec.annotation, *get_args(spec.annotation)):
                value = float(value)
        kwargs[name] = value
    return Settings(**kwargs, explicit=frozenset(explicit))


def settings_json(settings: Settings) -> dict[str, Any]:
    """What `settings_from` rebuilds `settings` from."""
    values = {
        name: str(v) if isinstance(v, Path) else v
        for name in SPECS
        for v in [getattr(settings, name)]
    }
    return {"values": values, "explicit": sorted(settings.explicit)}


# Settings of saas mode alone, refused by name in the other modes.
SAAS_ONLY = {
    name: f"only used with {PREFIX}MODE=saas"
    for name in (
        "saas_identity",
        "usage_database_url",
        "accept_unresolved_customers",
        "zero_usage_records",
        "saas_calls_per_second",
        "saas_events_queue_url",
        "saas_contract_dimensions",
    )
}
_WITHOUT_KEY = "saas mode verifies no token: ResolveCustomer and BatchMeterUsage return none"
_HOURLY_ONLY = "only used with MARKETPLACE_MODE=hourly (RegisterUsage), never in this mode"
_NO_STATE = "saas mode has no entitlement state to mirror (readiness is the usage store's)"
# Settings of hourly and custom mode, refused by name in saas mode.
NOT_SAAS = {
    "public_key": _WITHOUT_KEY,
    "public_key_file": _WITHOUT_KEY,
    "public_key_version": _WITHOUT_KEY,
    "challenge_rate_per_second": _WITHOUT_KEY,
    "entitlement_check": "only used with MARKETPLACE_MODE=custom; saas mode checks no "
    "entitlement at start (a customer is known once ResolveCustomer answers)",
    "entitlement_dimension": "only used with MARKETPLACE_MODE=custom; saas mode checks no "
    "entitlement at start (a customer is known once ResolveCustomer answers)",
    "register_deadline_seconds": _HOURLY_ONLY,
    "register_interval_seconds": _HOURLY_ONLY,
    "register_jitter": _HOURLY_ONLY,
    "throttle_schedule_seconds": _HOURLY_ONLY,
    "fleet_size": "only used with MARKETPLACE_MODE=hourly or custom (it paces RegisterUsage "
    "and MeterUsage), never in this mode",
    "meter_calls_per_second": "only used with MARKETPLACE_MODE=custom (MeterUsage's pace); saas "
    "mode paces with MARKETPLACE_SAAS_CALLS_PER_SECOND",
    "first_call_timeout_seconds": _HOURLY_ONLY,
    "strict_first_answer": _HOURLY_ONLY,
    "clock_skew_seconds": _HOURLY_ONLY,
    "challenge_burst": _HOURLY_ONLY,
    "challenge_deadline_seconds": _HOURLY_ONLY,
    "aws_call_rate_per_second": _HOURLY_ONLY,
    "aws_call_burst": _HOURLY_ONLY,
    "readiness_gate": _NO_STATE,
    "kube_events": _NO_STATE,
    "state_volume_bytes": "only used with MARKETPLACE_MODE=custom (its usage store's volume)",
}


# Settings of contract mode alone, refused by name in the other modes.
CONTRACT_ONLY = {
    name: f"only used with {PREFIX}MODE=contract (AWS License Manager)"
    for name in (
        "license_product_sku",
        "license_entitlements",
        "license_checkout_type",
        "license_check_seconds",
        "license_key_fingerprint",
        "license_on_loss",
        "license_lease_timeout_seconds",
        "license_token_file",
        "license_role_arn",
    )
}
_NOT_METERED = "contract mode meters nothing: License Manager's CheckoutLicense is the check"
# Settings of the other modes, refused by name in contract mode.
NOT_CONTRACT = {
    **SAAS_ONLY,
    "product_code": "contract mode names the product by MARKETPLACE_LICENSE_PRODUCT_SKU",
    **{
        name: _NOT_METERED
        for name in (
            "dimensions",
            "entitlement_check",
            "entitlement_dimension",
            "state_volume_bytes",
            "public_key",
            "public_key_file",
            "public_key_version",
        )
    },
    **{
        name: _HOURLY_ONLY
        for name in (
            "register_interval_seconds",
            "register_jitter",
            "throttle_schedule_seconds",
            "fleet_size",
            "first_call_timeout_seconds",
            "strict_first_answer",
            "clock_skew_seconds",
            "challenge_rate_per_second",
            "challenge_burst",
            "challenge_deadline_seconds",
            "aws_call_rate_per_second",
            "aws_call_burst",
        )
    },
    "readiness_gate": "contract mode does not mirror its state to the pod (yet)",
    "kube_events": "contract mode does not mirror its state to the pod (yet)",
}
# Contract with consumption: with MARKETPLACE_DIMENSIONS, custom mode's usage settings apply
# (MeterUsage needs the product code; the usage store lives in the state dir).
CONSUMPTION = ("product_code", "dimensions", "state_dir", "state_volume_bytes", "fleet_size")
_LICENSE_IS_THE_CHECK = (
    "contract mode checks the license (CheckoutLicense) before any usage is sent, never MeterUsage"
)


def not_contract(consumption: bool) -> dict[str, str]:
    """The settings refused in contract mode: as listed, less the usage settings when
    MARKETPLACE_DIMENSIONS turns on contract with consumption."""
    if not consumption:
        return NOT_CONTRACT
    out = {k: v for k, v in NOT_CONTRACT.items() if k not in CONSUMPTION}
    out["entitlement_check"] = out["entitlement_dimension"] = _LICENSE_IS_THE_CHECK
    return out


def _product_code_why(settings: Settings) -> str:
    if settings.mode == "contract":
        return (
            f" with {PREFIX}DIMENSIONS in contract mode: MeterUsage names the product by its "
            f"product code, not by {PREFIX}LICENSE_PRODUCT_SKU (the product ID)"
        )
    if settings.mode == "saas":
        return f" with {PREFIX}SAAS_IDENTITY=customer_identifier (BatchMeterUsage sends it)"
    return ""


def database_url_problem(url: str) -> None:
    """Raise ValueError for an unusable database URL; the message never repeats the URL
    (it holds the password)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(
            "must be postgresql://user:password@host:port/database (the host or port does not "
            "parse; the value is not shown: it may hold a password)"
        ) from None
    if parts.scheme not in ("postgresql", "postgres"):
        shown = parts.scheme[:20] if parts.scheme.isalnum() else "?"
        raise ValueError(
            f"must start with postgresql:// or postgres:// (got scheme {shown or 'none'!r}); "
            "the value is not shown: it may hold a password"
        )
    if not parts.hostname:
        raise ValueError(
            "must name a host: postgresql://user:password@host:port/database (a Unix socket "
            "path is not supported)"
        )
    if port == 0:
        raise ValueError("port must be 1-65535")
    if BAD_PERCENT_RE.search(url):
        # libpq refuses it with `invalid percent-encoded token: "<the whole value>"`: the
        # password, verbatim, in a message that reaches logs and doctor.
        raise ValueError(
            "has a % not followed by two hex digits: percent-encode special characters of the "
            "user and password (% as %25, @ as %40, : as %3A); the value is not shown: it may "
            "hold a password"
        )


def scrub_url_secret(text: str, url: str | None) -> str:
    """`text` without the URL's password (a driver's message may quote the URL or its parts)."""
    if not url:
        return text
    text = text.replace(url, redact_url(url))
    try:
        password = urlsplit(url.strip()).password
    except ValueError:
        password = None
    from sidecar.usage.db import url_secrets

    secrets = set(url_secrets(url.strip()))
    if password:
        secrets |= {password, unquote(password)}
    with contextlib.suppress(ValueError):  # libpq reads `+` literally; parse_qs makes it a space
        for pair in urlsplit(url.strip()).query.split("&"):
            name, _, value = pair.partition("=")
            if name == "password" and value:
                secrets |= {value, unquote(value), unquote_plus(value)}
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """postgresql://user:secret@host:5432/db?password=x -> postgresql://user@host:5432/db."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    user = f"{parts.username}@" if parts.username else ""
    netloc = f"{user}{host}" + (f":{port}" if port is not None else "")
    # The query is dropped whole: libpq reads password= (and sslkey paths) from it.
    return SplitResult(parts.scheme, netloc, parts.path, "", "").geturl()


def parse_dimensions(text: str) -> tuple[str, ...]:
    """'users, scans' -> ('users', 'scans'): 1-24 distinct names of 1-255 printable characters."""
    names = tuple(part.strip() for part in text.split(","))
    if not 1 <= len(names) <= MAX_DIMENSIONS:
        raise ValueError(f"must list 1-{MAX_DIMENSIONS} dimension names, got {len(names)}")
    for name in names:
        if not 1 <= len(name) <= MAX_DIMENSION_CHARS or not name.isprintable():
            raise ValueError(
                f"each dimension name must be 1-{MAX_DIMENSION_CHARS} printable characters "
                f"(got {name[:40]!r}); separate names with commas"
            )
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"lists {', '.join(dupes)[:80]} more than once")
    return names


CONTRACT_BASES = ("hour", "term")


def parse_contract_dimensions(text: str) -> dict[str, str]:
    """'users:hour, api_calls:term' -> {'users': 'hour', 'api_calls': 'term'}."""
    out: dict[str, str] = {}
    for part in text.split(","):
        name, sep, basis = part.strip().rpartition(":")
        name, basis = name.strip(), basis.strip()
        if not sep or not name:
            raise ValueError(
                f"each entry is dimension:basis with basis hour or term (got {part.strip()[:60]!r})"
            )
        if basis not in CONTRACT_BASES:
            raise ValueError(
                f"{name[:60]!r}: basis must be hour (covered every hour) or term (a pool over "
                f"the entitlement's term), got {basis[:20]!r}"
            )
        if name in out:
            raise ValueError(f"lists {name[:80]!r} more than once")
        out[name] = basis
    parse_dimensions(",".join(out))  # names as MARKETPLACE_DIMENSIONS takes them
    return out


def is_loopback(host: str) -> bool:
    """True if binding `host` cannot accept connections from another machine.

    IP literals are judged by value (127.0.0.0/8, ::1, ::ffff:127.x). Of names only `localhost`
    counts, and only if every address it resolves to is loopback: any other name could resolve
    anywhere when the socket binds, so it needs the explicit opt-in.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host.lower().rstrip(".") != "localhost":
            return False
        try:
            # The API binds names as IPv4 (see LocalServer); look it up the same way.
            infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            return True  # nothing to bind to: the bind itself reports it, naming the variable
        return all(is_loopback(str(info[4][0])) for info in infos)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def config_warnings(settings: Settings) -> list[str]:
    """Accepted but risky settings, for the log and `warnings` in `/v1/entitlement`."""
    out = []
    if not is_loopback(parse_hostport(settings.listen)[0]):
        out.append(
            f"{PREFIX}LISTEN={settings.listen} is not loopback (allowed by "
            f"{PREFIX}LISTEN_ALLOW_NON_LOOPBACK): anything that reaches this address can read "
            "the entitlement token and send challenges to AWS; restrict it with a NetworkPolicy "
            "or security group"
        )
    return out


def parse_schedule(text: str) -> tuple[float, ...]:
    """'25,40,43' -> (25.0, 40.0, 43.0): 1-10 increasing positive numbers of seconds."""
    try:
        edges = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError("must be comma-separated seconds, e.g. 25,40,43") from None
    if (
        not 1 <= len(edges) <= 10
        or not all(math.isfinite(e) for e in edges)
        or edges[0] <= 0
        or list(edges) != sorted(set(edges))
    ):
        raise ValueError("must be 1-10 strictly increasing positive numbers of seconds")
    return edges


# Set on the product's container by the project's own manifests; tolerated here so that one
# shared env block (a ConfigMap in envFrom) can serve both containers.
PRODUCT_SIDE_VARIABLES = frozenset({f"{PREFIX}SIDECAR_URL"})
# Kubernetes injects service links for every Service in the namespace (enableServiceLinks): a
# Service named "marketplace" or "marketplace-sidecar" yields MARKETPLACE_SERVICE_HOST,
# MARKETPLACE_SIDECAR_PORT_8788_TCP_ADDR and so on. Name and value shape must both match.
_IP = r"[0-9a-fA-F.:]+"
_LINK = r"(_[A-Z0-9_]+)?_PORT_\d{1,5}_(TCP|UDP|SCTP)"
_SERVICE_LINKS = tuple(
    (re.compile(rf"{PREFIX[:-1]}{name}"), re.compile(value))
    for name, value in (
        (r"(_[A-Z0-9_]+)?_SERVICE_HOST", _IP),
        (r"(_[A-Z0-9_]+)?_SERVICE_PORT(_[A-Z0-9_]+)?", r"\d{1,5}"),
        (r"(_[A-Z0-9_]+)?_PORT", r"(tcp|udp|sctp)://\S+:\d{1,5}"),
        (_LINK, r"(tcp|udp|sctp)://\S+:\d{1,5}"),
        (_LINK + "_PROTO", r"tcp|udp|sctp"),
        (_LINK + "_PORT", r"\d{1,5}"),
        (_LINK + "_ADDR", _IP),
    )
)


def variables() -> dict[str, str]:
    """Environment name -> field name, from the settings: new fields are known automatically."""
    return {spec.variable: name for name, spec in SPECS.items()}


def _service_link(name: str, value: str) -> bool:
    return any(n.fullmatch(name) and v.fullmatch(value) for n, v in _SERVICE_LINKS)


def unknown_variables(env: Mapping[str, str]) -> dict[str, str | None]:
    """`MARKETPLACE_*` names the sidecar does not read -> the closest known name (or None).

    They are errors, not warnings: a misspelled setting silently keeps its default, and for
    the security settings (the loopback opt-in, the key, strict modes) the default is not what
    the seller asked for. Refusing to start costs one restart; running costs a wrong guess.
    """
    known = variables()
    tails = [k.removeprefix(PREFIX) for k in known]
    found: dict[str, str | None] = {}
    for name, value in env.items():
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper in known or upper in PRODUCT_SIDE_VARIABLES:
            continue
        if _service_link(upper, value):
            continue
        close = difflib.get_close_matches(upper.removeprefix(PREFIX), tails, n=1, cutoff=0.6)
        found[name] = f"{PREFIX}{close[0]}" if close else None
    return dict(sorted(found.items()))


def _unknown_problems(env: Mapping[str, str], problems: list[str]) -> list[str]:
    """Unknown-variable lines first; drop problems that only say a likely-misspelled
    variable is missing (the misspelling is the real problem, and the fix is the same)."""
    unknown = unknown_variables(env)
    lines = [
        f"{name}: unknown variable; did you mean {close}?"
        if close
        else f"{name}: unknown variable (marketplace-sidecar run --help lists the settings)"
        for name, close in unknown.items()
    ]
    present = {k.upper() for k in env}
    missing = {close for close in unknown.values() if close and close not in present}

    def about_missing(line: str) -> bool:
        subject = line.split(": ", 1)[0]
        return any(n in missing for n in re.findall(rf"{PREFIX}[A-Z0-9_]+", subject))

    return [*lines, *(p for p in problems if not about_missing(p))]


def load() -> tuple[Settings, dict[int, RSAPublicKey]]:
    """Validate the environment and load the key; raise `ConfigError` listing every problem.

    In this process (it imports pydantic): for the short-lived commands. `run` validates in a
    child process instead (sidecar.config_validate.start) and calls `complete` itself."""
    from sidecar.config_validate import validate

    settings = validate()
    return settings, complete(settings)


def complete(settings: Settings) -> dict[int, RSAPublicKey]:
    """What the settings point at (key, directories, endpoint): checked by the process that
    uses it; raise `ConfigError` listing every problem."""
    # Here, not at the top: the validating child (sidecar.config_child) needs no cryptography.
    from sidecar.entitlement.keys import UnusableKeyError, load_public_key

    env = dict(os.environ)
    problems: list[str] = []
    keys: dict[int, RSAPublicKey] = {}
    source = "PUBLIC_KEY_FILE" if settings.public_key_file else "PUBLIC_KEY"
    try:
        if settings.mode == "hourly":  # custom mode has no token, so no key to load
            keys[settings.public_key_version] = load_public_key(_key_text(settings))
    except UnusableKeyError as exc:
        problems.append(f"{PREFIX}{source}: {exc}")
    except UnsafeFileError as exc:
        problems.append(f"{PREFIX}{source}: {settings.public_key_file} {exc}")
    except OSError as exc:
        problems.append(f"{PREFIX}{source}: cannot read {settings.public_key_file}: {exc.strerror}")
    if settings.state_dir is not None and not os.access(settings.state_dir, os.W_OK | os.X_OK):
        problems.append(
            f"{PREFIX}STATE_DIR: {settings.state_dir} must be an existing writable directory "
            "(mount an emptyDir; it must live as long as the pod)"
        )
    if (settings.readiness_gate or settings.kube_events) and importlib.util.find_spec(
        "kubernetes"
    ) is None:
        problems.append(
            f"{PREFIX}READINESS_GATE / {PREFIX}KUBE_EVENTS: need the kubernetes client, which "
            "this installation lacks: use the image built with EXTRAS=kubernetes, or install "
            "marketplace-sidecar[kubernetes]"
        )
    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            problems.append(f"{ENDPOINT_ENV}: must be an http(s) URL, got {endpoint[:80]!r}")
    license_endpoint = os.environ.get(LICENSE_ENDPOINT_ENV)
    if license_endpoint and settings.mode == "contract":
        parsed = urlparse(license_endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            problems.append(
                f"{LICENSE_ENDPOINT_ENV}: must be an http(s) URL, got {license_endpoint[:80]!r}"
            )
    sqs_endpoint = os.environ.get(SQS_ENDPOINT_ENV)
    if sqs_endpoint and settings.saas_events_queue_url:
        parsed = urlparse(sqs_endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            problems.append(
                f"{SQS_ENDPOINT_ENV}: must be an http(s) URL, got {sqs_endpoint[:80]!r}"
            )
        elif parsed.scheme == "http" and not is_loopback(parsed.hostname):
            # A test queue (moto, the emulator) on this machine only: buyer events in clear
            # text over a network are refused.
            problems.append(
                f"{SQS_ENDPOINT_ENV}: plain http only to a loopback address (a test queue); "
                f"got host {parsed.hostname[:80]!r}: use https"
            )
    entitlement_endpoint = os.environ.get(ENTITLEMENT_ENDPOINT_ENV)
    if settings.mode == "saas" and entitlement_problem(entitlement_endpoint):
        problems.append(str(entitlement_problem(entitlement_endpoint)))
    if settings.mode == "contract" and settings.test_only_time_scale is not None:
        problems.append(
            f"{PREFIX}TEST_ONLY_TIME_SCALE: not supported with {PREFIX}MODE=contract (a "
            "checkout's expiry is License Manager's, counted on this machine's monotonic clock)"
        )
    elif settings.test_only_time_scale is not None:
        host = urlparse(endpoint or "").hostname or ""
        if host not in ("127.0.0.1", "localhost", "::1"):
            problems.append(
                f"{PREFIX}TEST_ONLY_TIME_SCALE: only for tests against a loopback emulator "
                f"({ENDPOINT_ENV} must point at 127.0.0.1); never set it in production"
            )
        entitlement_host = urlparse(entitlement_endpoint or "").hostname
        if entitlement_host is not None and entitlement_host not in (
            "127.0.0.1",
            "localhost",
            "::1",
        ):
            problems.append(
                f"{PREFIX}TEST_ONLY_TIME_SCALE: only for tests against a loopback emulator "
                f"({ENTITLEMENT_ENDPOINT_ENV} must point at 127.0.0.1 or be unset)"
            )
        if settings.test_only_time_origin is None:
            problems.append(
                f"{PREFIX}TEST_ONLY_TIME_ORIGIN: is required with {PREFIX}TEST_ONLY_TIME_SCALE "
                "(the Unix time the emulator's scaled clock starts from)"
            )
    problems = _unknown_problems(env, problems)
    if problems:
        raise ConfigError(problems)
    return keys


def _key_text(settings: Settings) -> bytes:
    from sidecar.entitlement.keys import MAX_KEY_FILE_BYTES

    if settings.public_key_file is not None:
        # Never blocks (a FIFO), never reads forever (/dev/zero): refused with one line instead.
        return read_small_file(settings.public_key_file, MAX_KEY_FILE_BYTES)
    assert settings.public_key is not None  # nosec B101 # narrowing for mypy, not a check
    # Allow a one-line PEM with literal \n, as ECS task definitions and some CI tools pass it.
    return settings.public_key.replace("\\n", "\n").encode()


def variables_help(width: int = 79) -> str:
    """The settings for `--help`, generated from the model so that it cannot drift."""
    lines = []
    for env_name, name in variables().items():
        spec = SPECS[name]
        facts = ["required" if spec.required else f"default: {_shown(spec.default)}"]
        if get_origin(spec.annotation) is Literal:
            facts.append("one of " + ", ".join(str(a) for a in get_args(spec.annotation)))
        for attr, bound in spec.bounds:
            sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[attr]
            facts.append(f"{sign} {_shown(bound)}")
        lines.append(f"  {env_name}  [{'; '.join(facts)}]")
        lines += textwrap.wrap(
            spec.description or "(undocumented)",
            width,
            initial_indent=" " * 6,
            subsequent_indent=" " * 6,
            break_on_hyphens=False,
        )
    return "\n".join(lines)


def _shown(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "empty"


def describe(settings: Settings) -> dict[str, Any]:
    """Settings safe to log (no key material)."""
    data = {name: getattr(settings, name) for name in SPECS}
    data["public_key"] = "<set>" if settings.public_key else None
    if settings.usage_database_url is not None:
        data["usage_database_url"] = redact_url(settings.usage_database_url)
    return {f"{PREFIX}{k.upper()}": (str(v) if isinstance(v, Path) else v) for k, v in data.items()}
