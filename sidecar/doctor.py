"""`marketplace-sidecar doctor`: one line per check, ✔ / ! / ✘ with a fix hint. Changes nothing
and never calls RegisterUsage (that would register, and bill, this pod), nor a MeterUsage that
meters: custom mode is checked with DryRun only. SaaS mode reads the usage store without
creating or migrating it, and calls ResolveCustomer with a token AWS cannot know and
BatchMeterUsage with no records: neither resolves, stores nor bills anything. Contract mode never
calls CheckoutLicense (it would consume the buyer's units): it checks the settings, the license
token file off AWS, License Manager's endpoint and clock, and the extension permission (DryRun)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from sidecar.config import Settings
    from sidecar.usage import saas_ledger

from sidecar.aws.errors import LOCAL_SETUP_HINT, SIGV4_SKEW_SECONDS, is_local_endpoint

OK, WARN, FAIL = "✔", "!", "✘"
POD_IDENTITY_HOST = "169.254.170.23"
SKEW_WARN_SECONDS = 30.0
# AWS documents that a signed request "must reach AWS within five minutes of the time stamp in
# the request" (IAM User Guide, "Signing AWS API requests"; see errors.SIGV4_SKEW_SECONDS). The
# sidecar's default token `iat` allowance (MARKETPLACE_CLOCK_SKEW_SECONDS) is the same figure.
SKEW_FAIL_SECONDS = SIGV4_SKEW_SECONDS


@dataclass(frozen=True)
class Check:
    mark: str
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.mark} {self.name}: {self.detail}" + (
            f"\n    fix: {self.fix}" if self.fix else ""
        )


def check_config() -> list[Check]:
    return load_config()[0]


def load_config() -> tuple[list[Check], Settings | None]:
    from sidecar.config import ConfigError, load
    from sidecar.entitlement.keys import fingerprint

    try:
        settings, keys = load()
    except ConfigError as exc:
        return [Check(FAIL, "configuration", p) for p in exc.problems], None
    if settings.mode == "contract":
        return contract_config(settings), settings
    if settings.mode == "saas":
        from sidecar.config import redact_url

        names = ", ".join(settings.dimension_list)
        where = (
            f"PostgreSQL {redact_url(settings.usage_database_url)} (a fleet)"
            if settings.usage_database_url
            else f"SQLite in {settings.state_dir} (one replica)"
        )
        return [
            Check(OK, "configuration", f"saas mode, identity {settings.saas_identity}"),
            Check(
                OK,
                "metering",
                f"saas: {len(settings.dimension_list)} dimension(s) ({names[:200]}), store {where}",
            ),
        ], settings
    if settings.mode == "custom":
        names = ", ".join(settings.dimension_list)
        check: str = settings.entitlement_check
        if check == "meter_zero":
            on = settings.entitlement_dimension
            check += f" on {on} (check only)" if on else f" on {settings.dimension_list[0]}"
        return [
            Check(OK, "configuration", f"product code {settings.product_code}"),
            Check(
                OK,
                "metering",
                f"custom: {len(settings.dimension_list)} dimension(s) ({names[:200]}), "
                f"entitlement check {check}",
            ),
        ], settings
    key = keys[settings.public_key_version]
    return [
        Check(OK, "configuration", f"product code {settings.product_code}"),
        Check(
            OK,
            "public key",
            f"RSA-{key.key_size}, version {settings.public_key_version}, "
            f"sha256 {fingerprint(key)[:16]}…",
        ),
    ], settings


def check_region(env: Mapping[str, str]) -> tuple[Check, str | None]:
    from sidecar.aws.region import RegionNotFoundError, resolve_region

    try:
        region, source = resolve_region(env)
    except RegionNotFoundError as exc:
        # The message names what was tried; the fix says what to set (once each, not the
        # exception's text, which repeats the sources in its hint).
        fix = _local_fix(env) or "set AWS_REGION to the region the pod runs in"
        if exc.info.retryable:
            fix += " (metadata lookups are retried with backoff at start)"
        return Check(FAIL, "region", exc.info.message, fix), None
    return Check(OK, "region", f"{region} (from {source})"), region


def check_credentials(env: Mapping[str, str]) -> Check:
    full_uri = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI", "")
    irsa = env.get("AWS_ROLE_ARN") and env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
    if not irsa and (
        POD_IDENTITY_HOST in full_uri or env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    ):
        # Decided from the environment alone: no need to contact the Pod Identity agent.
        return Check(
            FAIL,
            "credentials",
            "EKS Pod Identity: AWS Marketplace metering does not accept it",
            "use IRSA: annotate the service account with eks.amazonaws.com/role-arn",
        )
    import botocore.session

    try:
        creds = botocore.session.get_session().get_credentials()
    except Exception as exc:  # a failing provider is a finding, not a crash
        return Check(
            FAIL,
            "credentials",
            f"{type(exc).__name__}: {exc}",
            "check the IRSA role trust policy or the ECS task role",
        )
    if creds is None:
        fix = _local_fix(env) or "use the ECS task role, or IRSA on EKS"
        return Check(FAIL, "credentials", "none found", fix)
    method = creds.method
    try:
        creds.get_frozen_credentials()  # IRSA: performs AssumeRoleWithWebIdentity now
    except Exception as exc:
        return Check(
            FAIL,
            "credentials",
            f"{method}: {type(exc).__name__}: {exc}",
            "check the IAM role's trust policy (OIDC provider, service account)",
        )
    if method == "assume-role-with-web-identity":
        return Check(OK, "credentials", f"IRSA ({env.get('AWS_ROLE_ARN')})")
    if method == "container-role":
        return Check(OK, "credentials", "ECS task role")
    if method in ("env", "shared-credentials-file", "config-file"):
        return Check(
            WARN,
            "credentials",
            f"static access keys ({method}): discouraged by AWS for containers",
            "use the ECS task role, or IRSA on EKS",
        )
    if method == "iam-role":
        return Check(
            FAIL,
            "credentials",
            "the EC2 instance (node) role: not accepted for "
            "metering on EKS, and not the task role on ECS",
            "use IRSA on EKS, or set taskRoleArn on ECS",
        )
    return Check(WARN, "credentials", f"from {method}", "")


def contract_config(settings: Settings) -> list[Check]:
    """Contract mode: what the pod will check out, and (off AWS) the license token file."""
    from sidecar.config import parse_license_entitlements

    asked = parse_license_entitlements(settings.license_entitlements)
    names = ", ".join(e["Name"] + (f"={e['Value']}" if "Value" in e else "") for e in asked)
    checks = [
        Check(OK, "configuration", f"contract mode, product SKU {settings.license_product_sku}"),
        Check(
            OK,
            "license",
            f"{settings.license_checkout_type} checkout of {len(asked)} entitlement(s) "
            f"({names[:200]}), re-checked every {settings.license_check_seconds:g} s, on loss: "
            f"{settings.license_on_loss}",
        ),
    ]
    if settings.dimensions:
        # Contract with consumption: doctor reaches License Manager only; say what it leaves.
        checks.append(
            Check(
                WARN,
                "consumption",
                f"usage above the contract goes to MeterUsage as product code "
                f"{settings.product_code} on {', '.join(settings.dimension_list)[:200]}, once the "
                "license is checked out; doctor checks neither the Metering endpoint nor the "
                "role's aws-marketplace:MeterUsage",
                "attach manifests/iam/policy-custom-metering.json too; run doctor with "
                "MARKETPLACE_MODE=custom and the same product code to check MeterUsage",
            )
        )
    path = settings.license_token_file
    if path is None:
        checks.append(Check(OK, "identity", "platform credentials (ECS task role or IRSA)"))
        return checks
    # The reader `run` uses (bounded, no FIFO or directory, one token line), so doctor
    # passes exactly the files the sidecar accepts; the token itself is never shown.
    from sidecar.aws.anywhere import LicenseTokenFileError, read_token

    try:
        size = len(read_token(path))
    except LicenseTokenFileError as exc:
        checks.append(
            Check(
                FAIL,
                "identity",
                exc.info.message,
                "mount the buyer's license secret (key license_token) at that path",
            )
        )
        return checks
    checks.append(
        Check(
            OK,
            "identity",
            f"license token file {path} ({size} characters, not shown), role "
            f"{settings.license_role_arn}",
        )
    )
    return checks


def check_license_permission(region: str | None, settings: Settings | None = None) -> list[Check]:
    """ExtendLicenseConsumption with DryRun: a permission check that consumes nothing. Off AWS
    it goes with the credentials the license token's role gives (GetAccessToken, then STS),
    as `run` does: there are no others there."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    if region is None:
        return [Check(FAIL, "license-manager:ExtendLicenseConsumption", "skipped: no region")]
    name = "license-manager:ExtendLicenseConsumption"
    config = Config(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=10)
    session: Any = boto3
    if settings is not None and settings.license_token_file and settings.license_role_arn:
        from sidecar.aws.anywhere import license_session

        session = license_session(settings.license_token_file, settings.license_role_arn, region)
    client = session.client("license-manager", region_name=region, config=config)
    try:
        client.extend_license_consumption(
            LicenseConsumptionToken="doctor-permission-check", DryRun=True
        )
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "DryRunOperation":
            return [Check(OK, name, "allowed (DryRun: nothing extended)")]
        if code in ("AccessDeniedException", "AuthorizationException"):
            return [
                Check(
                    FAIL,
                    name,
                    f"refused ({code})",
                    "grant license-manager:CheckoutLicense, ExtendLicenseConsumption and "
                    "CheckInLicense (AWSLicenseManagerConsumptionPolicy) to the pod's role",
                )
            ]
        return [Check(WARN, name, f"not confirmed: License Manager answered {code}")]
    except BotoCoreError as exc:
        own = getattr(exc, "info", None)  # the anywhere identity's errors say what to do
        if own is not None:
            return [Check(FAIL, name, f"no credentials: {own.code}: {own.message}", own.hint)]
        return [Check(FAIL, name, f"no answer: {type(exc).__name__}")]
    return [Check(OK, name, "allowed")]


def _local_fix(env: Mapping[str, str]) -> str:
    """What to set for a local run, when the metering endpoint is the emulator on loopback."""
    endpoint = env.get("AWS_ENDPOINT_URL_MARKETPLACE_METERING")
    return LOCAL_SETUP_HINT.format(endpoint=endpoint) if is_local_endpoint(endpoint) else ""


def check_endpoint(
    region: str | None, now: Callable[[], float], service: str = "meteringmarketplace"
) -> list[Check]:
    import boto3
    import requests

    if region is None:
        return [Check(FAIL, "endpoint", "skipped: no region")]
    client = boto3.client(
        service,  # type: ignore[call-overload]
        region_name=region,
        aws_access_key_id="doctor",
        aws_secret_access_key="doctor",  # noqa: S106  # nosec B106 # placeholder: only the URL is read
    )
    url = str(client.meta.endpoint_url)
    started = time.perf_counter()
    try:
        resp = requests.get(url, timeout=(3.0, 5.0))
    except requests.RequestException as exc:
        return [
            Check(
                FAIL,
                "endpoint",
                f"{url} unreachable: {type(exc).__name__}",
                "allow egress to the metering endpoint (HTTPS 443), or set "
                "HTTPS_PROXY / use a VPC endpoint",
            )
        ]
    elapsed_ms = (time.perf_counter() - started) * 1000
    checks = [
        Check(OK, "endpoint", f"{url} reachable (HTTP {resp.status_code}, {elapsed_ms:.0f} ms)")
    ]
    date = resp.headers.get("Date")
    if not date:
        checks.append(Check(WARN, "clock", "the endpoint sent no Date header; skew unknown"))
        return checks
    skew = now() - parsedate_to_datetime(date).timestamp()
    mark = (
        OK if abs(skew) <= SKEW_WARN_SECONDS else WARN if abs(skew) <= SKEW_FAIL_SECONDS else FAIL
    )
    fix = (
        ""
        if mark == OK
        else "synchronise the node clock (NTP / Amazon Time Sync); AWS documents a "
        f"{SKEW_FAIL_SECONDS:.0f} s tolerance for signed requests, and the sidecar accepts "
        "token times up to MARKETPLACE_CLOCK_SKEW_SECONDS ahead (same default)"
    )
    checks.append(Check(mark, "clock", f"{skew:+.0f} s against the endpoint", fix))
    return checks


def check_meter_usage_permission(
    settings: Settings, region: str | None, now: Callable[[], float]
) -> list[Check]:
    """Custom mode: MeterUsage with DryRun=True per dimension. A permission check only: AWS
    documents nothing about DryRun and the subscription, and it records no usage."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    if region is None:
        return [Check(FAIL, "MeterUsage permission", "skipped: no region")]
    client = boto3.client(
        "meteringmarketplace",
        region_name=region,
        config=Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=3.0,
            read_timeout=5.0,
        ),
    )
    checks = []
    for dimension in settings.dimension_list:
        try:
            client.meter_usage(
                ProductCode=settings.product_code or "",  # custom mode requires it
                Timestamp=datetime.fromtimestamp(now(), UTC),
                UsageDimension=dimension,
                UsageQuantity=0,
                DryRun=True,
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code") or "Unknown")
            if code == "DryRunOperation":  # AWS may report DryRun success as an error code
                checks.append(Check(OK, "MeterUsage permission", f"{dimension}: allowed (DryRun)"))
                continue
            checks.append(_meter_refusal(dimension, code, str(exc)))
            continue
        except BotoCoreError as exc:
            checks.append(
                Check(
                    FAIL,
                    "MeterUsage permission",
                    f"{dimension}: {type(exc).__name__}: {exc}",
                    "check credentials and egress to the metering endpoint",
                )
            )
            continue
        checks.append(Check(OK, "MeterUsage permission", f"{dimension}: allowed (DryRun)"))
    return checks


def _meter_refusal(dimension: str, code: str, message: str) -> Check:
    if code == "TimestampOutOfBoundsException":  # the time sent is this machine's clock
        return Check(
            FAIL,
            "clock",
            f"MeterUsage ({dimension}) refused this machine's time: {code}: {message[:200]}",
            "sync the clock (NTP, chrony; on EKS/ECS the host's); AWS accepts a timestamp up to "
            "six hours old and not in the future. This says nothing about IAM permissions",
        )
    if code in ("AccessDeniedException", "AccessDenied", "UnauthorizedException"):
        fix = (
            'grant aws-marketplace:MeterUsage (Resource "*") to the ECS task role or the IRSA '
            "role (manifests/iam/policy-custom-metering.json)"
        )
    elif code == "InvalidUsageDimensionException":
        fix = "MARKETPLACE_DIMENSIONS must match the dimension names published in AMMP exactly"
    elif code == "InvalidProductCodeException":
        fix = "MARKETPLACE_PRODUCT_CODE must be the product code from AMMP"
    else:
        fix = "see the AWS error message"
    return Check(FAIL, "MeterUsage permission", f"{dimension}: {code}: {message[:200]}", fix)


# -- saas mode ---------------------------------------------------------------------------

# Read by name, never created here: sidecar.usage.pgstore's version table and the saas ledger's
# customer table. A store that lacks them was not opened by a sidecar yet.
_VERSION_SQL = "SELECT version FROM sidecar_schema WHERE name = %s"
_CUSTOMERS_SQL = "SELECT COUNT(*) FROM saas_customers"
_DOCTOR_TOKEN = "marketplace-sidecar-doctor-not-a-registration-token"  # noqa: S105  # nosec B105


def check_saas_store(settings: Settings) -> list[Check]:
    """Database reachable, schema version, customers resolved; reads only."""
    from sidecar.usage.saas import SAAS_SCHEMA

    try:
        if settings.usage_database_url:
            found = _read_postgresql(settings.usage_database_url, SAAS_SCHEMA.name)
        else:
            assert settings.state_dir is not None  # nosec B101 # config requires one of two
            found = _read_sqlite(settings.state_dir / SAAS_SCHEMA.name)
    except _UnreachableError as exc:
        return [
            Check(
                FAIL,
                "database",
                str(exc),
                "check the host, port, credentials and the network path from this pod "
                "(a NetworkPolicy or security group); the sidecar answers /readyz 503 and "
                "POST /v1/usage 503 while the database is down",
            )
        ]
    if found is None:
        return [
            Check(OK, "database", "reachable"),
            Check(
                WARN,
                "schema",
                "not created yet: the first sidecar to start creates it",
                "start the sidecar once; doctor never creates or migrates it",
            ),
        ]
    version, customers = found
    checks = [Check(OK, "database", "reachable")]
    target = SAAS_SCHEMA.version
    if version > target:
        checks.append(
            Check(
                FAIL,
                "schema",
                f"version {version}, newer than this sidecar's {target}: it refuses to start",
                "run the sidecar release that created it (or a newer one)",
            )
        )
    elif version < target:
        checks.append(
            Check(OK, "schema", f"version {version}; this sidecar migrates it to {target} on start")
        )
    else:
        checks.append(Check(OK, "schema", f"version {version}"))
    if customers == 0:
        checks.append(
            Check(
                WARN,
                "customers",
                "none resolved yet: usage for unresolved customers is refused unless "
                "MARKETPLACE_ACCEPT_UNRESOLVED_CUSTOMERS=true",
                "point the product's registration URL at a handler that passes the "
                "x-amzn-marketplace-token form field to POST /v1/customers/resolve "
                "(examples/saas-registration)",
            )
        )
    elif customers is not None:
        checks.append(Check(OK, "customers", f"{customers} resolved"))
    return checks


class _UnreachableError(Exception):
    """The store cannot be read; the message names it without its password."""


def _read_postgresql(url: str, name: str) -> tuple[int, int | None] | None:
    from sidecar.config import redact_url, scrub_url_secret

    try:
        import psycopg
        from psycopg import errors as pg_errors
    except ImportError as exc:
        raise _UnreachableError(f"PostgreSQL support is not installed (psycopg): {exc}") from None

    try:
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = on")
            try:
                row = conn.execute(_VERSION_SQL, (name,)).fetchone()
            except pg_errors.UndefinedTable:
                return None
            if row is None:
                return None
            try:
                count = conn.execute(_CUSTOMERS_SQL).fetchone()
            except pg_errors.UndefinedTable:
                count = None
    except psycopg.Error as exc:
        detail = scrub_url_secret(str(exc).strip().splitlines()[0][:300], url)
        raise _UnreachableError(f"{redact_url(url)}: {detail}") from None
    return int(row[0]), (int(count[0]) if count is not None else None)


def _read_sqlite(path: Path) -> tuple[int, int | None] | None:
    import sqlite3

    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise _UnreachableError(f"{path}: {exc}") from None
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            return None
        try:
            count = conn.execute(_CUSTOMERS_SQL).fetchone()
        except sqlite3.OperationalError:
            count = None
        return int(row[0]), (int(count[0]) if count is not None else None)
    except sqlite3.Error as exc:
        raise _UnreachableError(f"{path}: {exc}") from None
    finally:
        conn.close()


HEADROOM_FIX = (
    "past the paced ceiling the backlog grows and records expire unsent: ask AWS for a "
    "higher BatchMeterUsage quota for this account and region (then raise "
    "MARKETPLACE_SAAS_CALLS_PER_SECOND under it), or set "
    "MARKETPLACE_ZERO_USAGE_RECORDS=false (quantity-0 records are most of the load when most "
    "customers are idle); see docs/saas-capacity.md"
)


def check_saas_headroom(settings: Settings, now: float) -> list[Check]:
    """The sending headroom from the store's own per-hour facts; reads only."""
    from sidecar.usage.headroom import headroom
    from sidecar.usage.saas import SAAS_SCHEMA

    name = "sending headroom"
    try:
        if settings.usage_database_url:
            facts = _facts_postgresql(settings.usage_database_url, now)
        else:
            assert settings.state_dir is not None  # nosec B101 # config requires one of two
            facts = _facts_sqlite(settings.state_dir / SAAS_SCHEMA.name, now)
    except _UnreachableError:
        return []  # the database check above already says so
    if facts is None:
        return [Check(OK, name, "no sending history yet (the store is new or not migrated)")]
    hours, backlog, oldest = facts
    pace = settings.saas_calls_per_second
    room = headroom(now, hours, backlog, pace, oldest_unsent_hour=oldest)
    took = "-" if room.send_seconds is None else f"{room.send_seconds:.0f} s"
    detail = (
        f"last sealed hour {room.hour_records} records = {room.load_ratio:.0%} of the "
        f"{room.capacity_per_hour} an hour sent at {pace:g} calls/s (AWS's quota: "
        f"{room.ceiling_per_hour}); last hour sent in {took}; backlog {room.backlog_records} "
        f"records ({room.backlog_seconds:.0f} s at the paced rate, trend "
        f"{room.trend_per_hour:+.0f}/h)"
    )
    if not room.reasons:
        return [Check(OK, name, detail)]
    return [Check(WARN, name, "; ".join(room.reasons) + f". {detail}", HEADROOM_FIX)]


def _facts_sqlite(path: Path, now: float) -> saas_ledger.SendingFacts | None:
    import sqlite3

    from sidecar.usage import saas_ledger
    from sidecar.usage.store import SqliteDb

    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise _UnreachableError(f"{path}: {exc}") from None
    try:
        return saas_ledger.sending_facts(SqliteDb(conn), now)
    except sqlite3.OperationalError:  # an older schema: no per-hour facts yet
        return None
    except sqlite3.Error as exc:
        raise _UnreachableError(f"{path}: {exc}") from None
    finally:
        conn.close()


def _facts_postgresql(url: str, now: float) -> saas_ledger.SendingFacts | None:
    from sidecar.usage import saas_ledger

    try:
        import psycopg

        from sidecar.usage.pgstore import PgDb
    except ImportError as exc:
        raise _UnreachableError(str(exc)) from None
    try:
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = on")
            try:
                return saas_ledger.sending_facts(PgDb(conn), now)
            except psycopg.errors.UndefinedTable:
                return None
    except psycopg.Error as exc:
        raise _UnreachableError(str(exc).splitlines()[0][:300] if str(exc) else "") from None


def check_saas_permissions(settings: Settings, region: str | None) -> list[Check]:
    """ResolveCustomer with a token AWS cannot know (InvalidTokenException = allowed), and
    BatchMeterUsage with no records (the model allows 0-25; nothing can be billed)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    if region is None:
        return [Check(FAIL, "IAM permissions", "skipped: no region")]
    client = boto3.client(
        "meteringmarketplace",
        region_name=region,
        config=Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=3.0,
            read_timeout=5.0,
        ),
    )
    fix_for = {
        "ResolveCustomer": "grant aws-marketplace:ResolveCustomer to the task role / IRSA role "
        "(manifests/iam/), in the seller account that published the product",
        "BatchMeterUsage": "grant aws-marketplace:BatchMeterUsage to the task role / IRSA role "
        "(manifests/iam/)",
    }
    product = settings.product_code if settings.saas_identity == "customer_identifier" else None
    checks = []
    for op, call, allowed_codes in (
        (
            "ResolveCustomer",
            lambda: client.resolve_customer(RegistrationToken=_DOCTOR_TOKEN),
            ("InvalidTokenException",),
        ),
        (
            "BatchMeterUsage",
            lambda: (
                client.batch_meter_usage(UsageRecords=[], ProductCode=product)
                if product
                else client.batch_meter_usage(UsageRecords=[])
            ),
            (),
        ),
    ):
        name = f"{op} permission"
        try:
            call()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code") or "Unknown")
            if code in allowed_codes:
                checks.append(Check(OK, name, f"allowed ({code} for a made-up token)"))
            elif code in ("AccessDeniedException", "AccessDenied", "UnauthorizedException"):
                checks.append(Check(FAIL, name, f"{code}: {str(exc)[:200]}", fix_for[op]))
            else:
                checks.append(
                    Check(
                        WARN,
                        name,
                        f"not verified: AWS answered {code} to the harmless call, which says "
                        "nothing certain about the permission",
                        f"the first real call will tell; {fix_for[op]}",
                    )
                )
            continue
        except BotoCoreError as exc:
            checks.append(
                Check(
                    FAIL,
                    name,
                    f"{type(exc).__name__}: {exc}",
                    "check credentials and egress to the metering endpoint",
                )
            )
            continue
        if op == "ResolveCustomer":  # a made-up token resolved: not AWS's semantics
            checks.append(Check(WARN, name, "a made-up token resolved; is this AWS?"))
        else:
            checks.append(Check(OK, name, "allowed (an empty batch: nothing metered)"))
    return checks


# An account id no buyer has: GetEntitlements for it returns nothing, whatever the product.
_NOBODY_ACCOUNT = "000000000000"
_QUEUE_FIX = (
    "grant sqs:ReceiveMessage, sqs:DeleteMessage, sqs:ChangeMessageVisibility and "
    "sqs:GetQueueAttributes on the queue to the task role / IRSA role "
    "(manifests/iam/policy-saas-events.json, or the events stack's ConsumerPolicyArn)"
)


def check_saas_events(queue_url: str, product_code: str | None) -> list[Check]:
    """The lifecycle queue and GetEntitlements, without taking or billing anything.

    Reachable: GetQueueAttributes (also reads the depth and the redrive policy). ReceiveMessage
    permission: a receive that cannot take a message from the sidecars. It runs only when the
    queue reports no message waiting, with WaitTimeSeconds=0 (returns at once) and
    VisibilityTimeout=0: should a message arrive in between and be returned, it stays visible
    to every consumer at once and is never deleted here; only its receive count rises by one
    (what counts toward the queue's maxReceiveCount), which the line says. With messages
    waiting the receive is skipped (a warning): each receive would count toward their
    dead-letter limit. GetEntitlements: for an account no buyer has (nothing to read).
    """
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=3.0,
        read_timeout=5.0,
    )
    # The queue's own region (from its URL), else us-east-1 where AWS Marketplace sends events.
    host = queue_url.split("/")[2] if queue_url.count("/") >= 3 else ""
    parts = host.split(".")
    region = parts[1] if len(parts) > 2 and parts[0] == "sqs" else "us-east-1"
    checks: list[Check] = []
    sqs: Any = botocore.session.get_session().create_client(
        "sqs", region_name=region, config=config
    )
    denied = ("AccessDenied", "AccessDeniedException", "UnauthorizedException")
    try:
        attrs = sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "RedrivePolicy", "VisibilityTimeout"],
        )["Attributes"]
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code") or "Unknown")
        fix = (
            _QUEUE_FIX
            if code in denied
            else (
                "check MARKETPLACE_SAAS_EVENTS_QUEUE_URL (the stack's QueueUrl output) and "
                "that the queue exists"
            )
        )
        return [Check(FAIL, "events queue", f"{code}: {str(exc)[:200]}", fix)]
    except BotoCoreError as exc:
        return [
            Check(
                FAIL,
                "events queue",
                f"unreachable: {type(exc).__name__}: {str(exc)[:200]}",
                "check egress to SQS in the queue's region (us-east-1) and the credentials",
            )
        ]
    waiting = int(attrs.get("ApproximateNumberOfMessages") or 0)
    checks.append(Check(OK, "events queue", f"reachable, {waiting} message(s) waiting"))
    if "RedrivePolicy" not in attrs:
        checks.append(
            Check(
                WARN,
                "events dead-letter queue",
                "the queue has no redrive policy: a message no sidecar can delete is received "
                "again forever",
                "give it a dead-letter queue (manifests/saas-events/cloudformation.json does)",
            )
        )
    if waiting:
        checks.append(
            Check(
                WARN,
                "ReceiveMessage permission",
                f"not verified: {waiting} message(s) waiting, and a receive would count toward "
                "their dead-letter limit; the sidecars' own receives tell (their metrics, logs)",
            )
        )
    else:
        try:
            got = sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=1,
                WaitTimeSeconds=0,
                VisibilityTimeout=0,
            ).get("Messages", [])
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code") or "Unknown")
            mark = FAIL if code in denied else WARN
            checks.append(
                Check(mark, "ReceiveMessage permission", f"{code}: {str(exc)[:200]}", _QUEUE_FIX)
            )
        except BotoCoreError as exc:
            checks.append(Check(FAIL, "ReceiveMessage permission", f"{type(exc).__name__}: {exc}"))
        else:
            note = (
                " (a message arrived meanwhile: left visible, not deleted; its receive count "
                "rose by one)"
                if got
                else ""
            )
            checks.append(Check(OK, "ReceiveMessage permission", "allowed" + note))
    checks.append(_entitlements_permission(product_code))
    return checks


def _entitlements_permission(product_code: str | None) -> Check:
    from sidecar.aws.entitlement import EntitlementCallError, entitlement_client, get_entitlements

    name = "GetEntitlements permission"
    if not product_code:
        return Check(
            WARN,
            name,
            "not checked: GetEntitlements needs the product code",
            "set MARKETPLACE_PRODUCT_CODE for contract entitlements",
        )
    try:
        get_entitlements(entitlement_client(timeout=5.0), product_code, _NOBODY_ACCOUNT)
    except EntitlementCallError as exc:
        info = exc.info
        mark = FAIL if info.kind == "configuration" else WARN
        return Check(mark, name, f"{info.code}: {info.message[:200]}", info.hint)
    return Check(OK, name, "allowed (an account with no entitlements: nothing read)")


def doctor(
    out: TextIO, env: Mapping[str, str] | None = None, now: Callable[[], float] = time.time
) -> int:
    env = os.environ if env is None else env
    checks, settings = load_config()
    region_check, region = check_region(env)
    contract = settings is not None and settings.mode == "contract"
    service = "license-manager" if contract else "meteringmarketplace"
    anywhere = contract and settings is not None and settings.license_token_file is not None
    checks.append(region_check)
    if not anywhere:  # off AWS the license token is the identity (checked with the settings)
        checks.append(check_credentials(env))
    checks += check_endpoint(region, now, service)
    if contract:
        checks += check_license_permission(region, settings)
    if settings is not None and settings.mode == "custom":
        checks += check_meter_usage_permission(settings, region, now)
    if settings is not None and settings.mode == "saas":
        checks += check_saas_store(settings)
        checks += check_saas_headroom(settings, now())
        checks += check_saas_permissions(settings, region)
        queue_url = getattr(settings, "saas_events_queue_url", None)
        if queue_url:
            checks += check_saas_events(queue_url, settings.product_code)
    for c in checks:
        print(c.line(), file=out)
    failed = sum(c.mark == FAIL for c in checks)
    print(f"{failed} problem(s)" if failed else "no problems found", file=out)
    if any(c.mark == FAIL and c.name == "configuration" for c in checks):
        return 2  # the same code `run` exits with for a configuration error
    return 1 if failed else 0
