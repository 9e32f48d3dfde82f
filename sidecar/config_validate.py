"""The settings checked by pydantic-settings: the model is built from `sidecar.config.Settings`.

Only this module imports pydantic (~9 MiB resident with pydantic-settings and asyncio). `run`
imports it in a short-lived child process (sidecar.config_child); the other commands, which
exit soon, import it in their own process through `sidecar.config.load`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, Field, ValidationError, create_model, field_validator
from pydantic import model_validator as _model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sidecar.config import (
    _NO_KEY,
    FIELD_CHECKS,
    FIELD_PARSERS,
    PREFIX,
    SPECS,
    ConfigError,
    Settings,
    _unknown_problems,
    settings_from,
)


class _Base(BaseSettings):
    """Field `x` is read from `MARKETPLACE_X`."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)


def _check(check: Callable[[Any], Any]) -> Any:
    def run(cls: type, value: Any) -> Any:
        return check(value)

    return classmethod(run)


def _settings(model: BaseModel) -> Settings:
    return settings_from(
        {name: getattr(model, name) for name in SPECS}, explicit=model.model_fields_set
    )


def _consistent(self: BaseModel) -> BaseModel:
    """After every field is valid, as a model validator, so pydantic reports the lines."""
    problems = _settings(self).problems()
    if problems:
        raise ValueError("\n".join(problems))
    return self


def _model() -> type[BaseSettings]:
    validators: dict[str, Any] = {
        f"_check_{i}": field_validator(*names)(_check(check))
        for i, (names, check) in enumerate(FIELD_CHECKS)
    }
    validators.update(
        (f"_parse_{i}", field_validator(*names, mode="before")(_check(parse)))
        for i, (names, parse) in enumerate(FIELD_PARSERS)
    )
    validators["_consistent"] = _model_validator(mode="after")(_consistent)
    definitions: dict[str, Any] = {}
    for name, spec in SPECS.items():
        bounds: dict[str, Any] = dict(spec.bounds)
        definitions[name] = (
            spec.annotation,
            Field(spec.default, description=spec.description, **bounds),
        )
    return create_model("Settings", __base__=_Base, __validators__=validators, **definitions)


Model = _model()


def validated(values: Mapping[str, Any]) -> Settings:
    """Settings from field values (not the environment); raise pydantic's ValidationError."""
    return _settings(Model.model_validate(values))


def validate() -> Settings:
    """Settings from `os.environ`; raise `ConfigError` with one line per problem."""
    env = dict(os.environ)
    try:
        return _settings(Model())
    except ValidationError as exc:
        found = _format(exc)
    mode = env.get(f"{PREFIX}MODE", "hourly")
    identity = env.get(f"{PREFIX}SAAS_IDENTITY", "license")
    if (
        not env.get(f"{PREFIX}PRODUCT_CODE")
        and (mode in ("hourly", "custom") or identity == "customer_identifier")
        and not any(line.startswith(f"{PREFIX}PRODUCT_CODE:") for line in found)
    ):
        # the model check does not run when a field failed
        found.insert(0, f"{PREFIX}PRODUCT_CODE: is required")
    if mode == "contract":  # the model check does not run when a field failed
        for name, line in (
            ("LICENSE_PRODUCT_SKU", "is required with MARKETPLACE_MODE=contract"),
            ("LICENSE_ENTITLEMENTS", "is required with MARKETPLACE_MODE=contract"),
        ):
            if not env.get(f"{PREFIX}{name}", "").strip() and not any(
                f.startswith(f"{PREFIX}{name}:") for f in found
            ):
                found.append(f"{PREFIX}{name}: {line}")
    hourly = mode == "hourly"
    if hourly and not any(env.get(f"{PREFIX}{n}") for n in ("PUBLIC_KEY", "PUBLIC_KEY_FILE")):
        found.append(_NO_KEY)  # the model check does not run when a field failed
    raise ConfigError(_unknown_problems(env, list(dict.fromkeys(found))))


def _format(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for err in exc.errors():
        name = "_".join(str(p) for p in err["loc"]).upper()
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        elif err["type"] != "value_error":
            msg = f"{msg} (got {str(err.get('input'))[:60]!r})"
        lines.extend(f"{PREFIX}{name}: {m}" if name else m for m in msg.splitlines())
    return lines
