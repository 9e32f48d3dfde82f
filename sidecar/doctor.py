"""`marketplace-sidecar doctor`: one line per check, ✔ / ! / ✘ with a fix hint. Changes nothing
and never calls RegisterUsage (that would register, and bill, this pod)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TextIO

from sidecar.aws.errors import SIGV4_SKEW_SECONDS

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
    from sidecar.config import ConfigError, load
    from sidecar.entitlement.keys import fingerprint

    try:
        settings, keys = load()
    except ConfigError as exc:
        return [Check(FAIL, "configuration", p) for p in exc.problems]
    key = keys[settings.public_key_version]
    return [
        Check(OK, "configuration", f"product code {settings.product_code}"),
        Check(
            OK,
            "public key",
            f"RSA-{key.key_size}, version {settings.public_key_version}, "
            f"sha256 {fingerprint(key)[:16]}…",
        ),
    ]


def check_region(env: Mapping[str, str]) -> tuple[Check, str | None]:
    from sidecar.aws.region import RegionNotFoundError, resolve_region

    try:
        region, source = resolve_region(env)
    except RegionNotFoundError as exc:
        return Check(FAIL, "region", str(exc), "set AWS_REGION to the region the pod runs in"), None
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
        return Check(FAIL, "credentials", "none found", "use the ECS task role, or IRSA on EKS")
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


def check_endpoint(region: str | None, now: Callable[[], float]) -> list[Check]:
    import boto3
    import requests

    if region is None:
        return [Check(FAIL, "endpoint", "skipped: no region")]
    client = boto3.client(
        "meteringmarketplace",
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


def doctor(
    out: TextIO, env: Mapping[str, str] | None = None, now: Callable[[], float] = time.time
) -> int:
    env = os.environ if env is None else env
    checks = check_config()
    region_check, region = check_region(env)
    checks += [region_check, check_credentials(env), *check_endpoint(region, now)]
    for c in checks:
        print(c.line(), file=out)
    failed = sum(c.mark == FAIL for c in checks)
    print(f"{failed} problem(s)" if failed else "no problems found", file=out)
    if any(c.mark == FAIL and c.name == "configuration" for c in checks):
        return 2  # the same code `run` exits with for a configuration error
    return 1 if failed else 0
