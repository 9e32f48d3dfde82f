"""Finding the AWS region at runtime (botocore alone ignores AWS_REGION; AWS forbids hard-coding).

Order: AWS_REGION, AWS_DEFAULT_REGION, ECS task metadata v4, IMDSv2. Metadata endpoints honour
ECS_CONTAINER_METADATA_URI_V4, AWS_EC2_METADATA_SERVICE_ENDPOINT and AWS_EC2_METADATA_DISABLED,
so tests point them at loopback. A failed metadata lookup can be transient at pod start, so the
error says whether one was tried (the registrar then retries it with backoff).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

from sidecar.aws.errors import ErrorInfo, region_not_found

log = logging.getLogger(__name__)

IMDS_DEFAULT = "http://169.254.169.254"
_REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]+")  # fullmatch: `$` takes "x\n"
_TIMEOUT = (1.0, 2.0)


class RegionNotFoundError(Exception):
    def __init__(self, tried: list[str]) -> None:
        self.tried = tried
        # Only metadata lookups can heal by themselves; unset variables cannot.
        self.info: ErrorInfo = region_not_found(
            tried, retryable=any(t in ("ECS task metadata", "IMDSv2") for t in tried)
        )
        super().__init__(f"{self.info.message}; {self.info.hint}")


def resolve_region(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Return (region, where it came from) or raise `RegionNotFoundError` naming what was tried."""
    env = os.environ if environ is None else environ
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        value = env.get(name, "").strip()
        if value:
            return value, name
    tried = ["AWS_REGION", "AWS_DEFAULT_REGION"]
    ecs_uri = env.get("ECS_CONTAINER_METADATA_URI_V4")
    if ecs_uri:
        tried.append("ECS task metadata")
        region = _from_ecs(ecs_uri)
        if region:
            return region, "ECS task metadata"
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        tried.append("IMDSv2")
        region = _from_imds(env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or IMDS_DEFAULT)
        if region:
            return region, "IMDSv2"
    raise RegionNotFoundError(tried)


def region_from_task(task: Mapping[str, object]) -> str | None:
    """Region from an ECS `/task` document: the TaskARN, else the availability zone."""
    arn = task.get("TaskARN")
    if isinstance(arn, str) and arn.count(":") >= 5:
        candidate = arn.split(":")[3]
        if _REGION_RE.fullmatch(candidate):
            return candidate
    zone = task.get("AvailabilityZone")
    if isinstance(zone, str) and zone:
        candidate = zone.rstrip("abcdefghijklmnopqrstuvwxyz")
        if _REGION_RE.fullmatch(candidate):
            return candidate
    return None


def _from_ecs(base: str) -> str | None:
    import requests

    try:
        resp = requests.get(base.rstrip("/") + "/task", timeout=_TIMEOUT)
        resp.raise_for_status()
        doc = resp.json()
    except (requests.RequestException, ValueError) as exc:
        log.warning("ECS task metadata unavailable: %s", type(exc).__name__)
        return None
    return region_from_task(doc) if isinstance(doc, dict) else None


def _from_imds(base: str) -> str | None:
    import requests

    base = base.rstrip("/")
    try:
        token = requests.put(
            base + "/latest/api/token",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
            timeout=_TIMEOUT,
        )
        token.raise_for_status()
        resp = requests.get(
            base + "/latest/meta-data/placement/region",
            headers={"X-aws-ec2-metadata-token": token.text},
            timeout=_TIMEOUT,
        )
        resp.raise_for_status()
    except requests.RequestException as exc:
        log.warning("IMDSv2 unavailable: %s", type(exc).__name__)
        return None
    region = resp.text.strip()
    return region if _REGION_RE.fullmatch(region) else None
