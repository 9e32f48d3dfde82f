"""Settings from environment variables, validated before anything binds a port.

Every problem is reported as one line naming the variable and what is allowed; `run` exits 2.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sidecar.entitlement.keys import UnusableKeyError, load_public_key
from sidecar.server.netaddr import parse_hostport

PRODUCT_CODE_RE = re.compile(r"^[-a-zA-Z0-9/=:_.@]{1,255}$")
# A domain-qualified condition type, e.g. aws-marketplace.amazonaws.com/entitled.
CONDITION_TYPE_RE = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
REGISTRATION_WINDOW_SECONDS = 6 * 3600
ENDPOINT_ENV = "AWS_ENDPOINT_URL_MARKETPLACE_METERING"
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


class Settings(BaseSettings):
    """Field `x` is read from `MARKETPLACE_X`."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)

    product_code: str
    public_key_version: int = Field(1, ge=1)
    public_key: str | None = None
    public_key_file: Path | None = None
    listen: str = "127.0.0.1:8787"
    probe_listen: str = "0.0.0.0:8788"
    register_interval_seconds: float = Field(3600.0, ge=1.0, le=86400.0)
    register_jitter: float = Field(0.1, ge=0.0, le=0.5)
    register_deadline_seconds: float = Field(3600.0, ge=1.0, le=REGISTRATION_WINDOW_SECONDS - 600)
    backoff_base_seconds: float = Field(1.0, gt=0.0, le=60.0)
    backoff_cap_seconds: float = Field(60.0, gt=0.0, le=900.0)
    throttle_schedule_seconds: str = ""  # empty: adaptive windows (core/backoff.py)
    aws_timeout_seconds: float = Field(10.0, gt=0.0, le=120.0)
    clock_skew_seconds: float = Field(300.0, ge=0.0, le=3600.0)
    challenge_rate_per_second: float = Field(1.0, gt=0.0, le=5.0)
    challenge_burst: int = Field(3, ge=1, le=20)
    challenge_deadline_seconds: float = Field(20.0, ge=1.0, le=300.0)
    state_dir: Path | None = None
    readiness_gate: str = ""
    kube_events: bool = False
    pod_name: str = ""
    pod_namespace: str = ""
    serviceaccount_dir: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount")
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("product_code")
    @classmethod
    def _product_code(cls, v: str) -> str:
        if not PRODUCT_CODE_RE.match(v):
            raise ValueError("must be 1-255 characters of letters, digits and -/=:_.@")
        return v

    @field_validator("readiness_gate")
    @classmethod
    def _condition_type(cls, v: str) -> str:
        if v and not CONDITION_TYPE_RE.match(v):
            raise ValueError(
                "must be a domain-qualified condition type such as "
                "aws-marketplace.amazonaws.com/entitled (or empty to turn the gate off)"
            )
        return v

    @field_validator("throttle_schedule_seconds")
    @classmethod
    def _schedule(cls, v: str) -> str:
        if v.strip():
            parse_schedule(v)
        return v

    @property
    def throttle_schedule(self) -> tuple[float, ...]:
        """() = adaptive windows; else fixed slots tuned for one fleet size."""
        text = self.throttle_schedule_seconds
        return parse_schedule(text) if text.strip() else ()

    @field_validator("listen", "probe_listen")
    @classmethod
    def _hostport(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if (self.public_key is None) == (self.public_key_file is None):
            raise ValueError(_NO_KEY)
        if (self.readiness_gate or self.kube_events) and not (self.pod_name and self.pod_namespace):
            raise ValueError(
                f"{PREFIX}POD_NAME and {PREFIX}POD_NAMESPACE are required with "
                f"{PREFIX}READINESS_GATE or {PREFIX}KUBE_EVENTS (set them from the downward API)"
            )
        if parse_hostport(self.listen) == parse_hostport(self.probe_listen):
            raise ValueError(f"{PREFIX}LISTEN and {PREFIX}PROBE_LISTEN must differ")
        return self


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


def _format(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        name = "_".join(str(p) for p in err["loc"]).upper()
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        elif err["type"] != "value_error":
            msg = f"{msg} (got {str(err.get('input'))[:60]!r})"
        lines.append(f"{PREFIX}{name}: {msg}" if name else msg)
    return lines


def load() -> tuple[Settings, dict[int, RSAPublicKey]]:
    """Validate the environment and load the key; raise `ConfigError` listing every problem."""
    try:
        settings = Settings()  # type: ignore[call-arg]  # product_code comes from the env
    except ValidationError as exc:
        found = _format(exc)
        if not any(os.environ.get(f"{PREFIX}{n}") for n in ("PUBLIC_KEY", "PUBLIC_KEY_FILE")):
            found.append(_NO_KEY)  # the model check does not run when a field failed
        raise ConfigError(list(dict.fromkeys(found))) from None
    problems: list[str] = []
    keys: dict[int, RSAPublicKey] = {}
    source = "PUBLIC_KEY_FILE" if settings.public_key_file else "PUBLIC_KEY"
    try:
        keys[settings.public_key_version] = load_public_key(_key_text(settings))
    except UnusableKeyError as exc:
        problems.append(f"{PREFIX}{source}: {exc}")
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
    if problems:
        raise ConfigError(problems)
    return settings, keys


def _key_text(settings: Settings) -> bytes:
    if settings.public_key_file is not None:
        with settings.public_key_file.open("rb") as f:
            return f.read(65536)
    assert settings.public_key is not None
    # Allow a one-line PEM with literal \n, as ECS task definitions and some CI tools pass it.
    return settings.public_key.replace("\\n", "\n").encode()


def describe(settings: Settings) -> dict[str, Any]:
    """Settings safe to log (no key material)."""
    data = settings.model_dump()
    data["public_key"] = "<set>" if settings.public_key else None
    return {f"{PREFIX}{k.upper()}": (str(v) if isinstance(v, Path) else v) for k, v in data.items()}
