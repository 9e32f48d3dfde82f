"""MARKETPLACE_MODE and what each mode needs: custom needs dimensions and a state dir, not a key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import SPECS, ConfigError, load
from tests.helpers import ROOT, free_port, loopback_env, new_key, pem


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("MARKETPLACE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MARKETPLACE_PRODUCT_CODE", "prod-abc")
    return monkeypatch


def custom(env: pytest.MonkeyPatch, tmp_path: Path, **extra: str) -> None:
    env.setenv("MARKETPLACE_MODE", "custom")
    env.setenv("MARKETPLACE_DIMENSIONS", "users, scans")
    env.setenv("MARKETPLACE_STATE_DIR", str(tmp_path))
    for name, value in extra.items():
        env.setenv(f"MARKETPLACE_{name}", value)


def problems() -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load()
    return caught.value.problems


def test_hourly_is_the_default_and_still_needs_a_key(env: pytest.MonkeyPatch) -> None:
    assert any("MARKETPLACE_PUBLIC_KEY / MARKETPLACE_PUBLIC_KEY_FILE" in p for p in problems())
    env.setenv("MARKETPLACE_PUBLIC_KEY", pem(new_key()))
    settings, keys = load()
    assert settings.mode == "hourly" and list(keys) == [1]


def test_custom_mode_needs_no_key_and_parses_dimensions(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    custom(env, tmp_path)
    settings, keys = load()
    assert settings.mode == "custom"
    assert settings.dimension_list == ("users", "scans")
    assert settings.entitlement_check == "meter_zero"
    assert 0 < settings.drain_seconds <= 20  # fits Kubernetes' default 30 s grace period
    assert keys == {}
    assert settings.ignored() == []


def test_custom_mode_names_exactly_what_it_lacks(env: pytest.MonkeyPatch) -> None:
    env.setenv("MARKETPLACE_MODE", "custom")
    found = problems()
    assert len(found) == 2, found
    assert found[0].startswith("MARKETPLACE_DIMENSIONS: is required with MARKETPLACE_MODE=custom")
    assert found[1].startswith("MARKETPLACE_STATE_DIR: is required with MARKETPLACE_MODE=custom")
    assert not any("PUBLIC_KEY" in p for p in found)  # this mode has no token to verify


def test_custom_mode_with_a_key_says_the_key_is_ignored(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    custom(env, tmp_path, PUBLIC_KEY="not even a PEM")
    settings, keys = load()  # an unused key is not validated, and not a reason to refuse
    assert keys == {}
    assert settings.ignored() == [
        "MARKETPLACE_PUBLIC_KEY is ignored with MARKETPLACE_MODE=custom "
        "(MeterUsage returns no signed token)"
    ]


@pytest.mark.parametrize("value", ["50", " 7 "])
def test_custom_mode_paces_its_hourly_sends_with_the_fleet_size(
    env: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    """Custom mode uses the hint: each pod sends its hourly records in its own slot of a frame
    of that many slots (sidecar.usage.pacing); the fleet's rate is its own setting."""
    from sidecar.app import usage_policy

    custom(env, tmp_path, FLEET_SIZE=value, METER_CALLS_PER_SECOND="4.5", POD_NAME="web-3")
    settings, _ = load()
    assert settings.ignored() == []
    policy = usage_policy(settings)
    assert (policy.fleet_size, policy.calls_per_second, policy.pod_name) == (
        int(value),
        4.5,
        "web-3",
    )
    env.delenv("MARKETPLACE_METER_CALLS_PER_SECOND")
    custom(env, tmp_path, FLEET_SIZE="")
    policy = usage_policy(load()[0])  # a blank fleet size is unset; the default rate
    assert (policy.fleet_size, policy.calls_per_second) == (None, 9.0)


@pytest.mark.parametrize("value", ["0", "-1", "1001", "fast", "nan"])
def test_a_meter_rate_out_of_range_is_one_line_naming_it(
    env: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    custom(env, tmp_path, METER_CALLS_PER_SECOND=value)
    found = problems()
    assert len(found) == 1 and found[0].startswith("MARKETPLACE_METER_CALLS_PER_SECOND"), found


def test_the_meter_rate_is_refused_outside_custom_mode(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env.setenv("MARKETPLACE_PUBLIC_KEY", pem(new_key()))
    env.setenv("MARKETPLACE_METER_CALLS_PER_SECOND", "5")
    found = problems()
    assert found == [
        "MARKETPLACE_METER_CALLS_PER_SECOND: only used with MARKETPLACE_MODE=custom "
        "(the mode is hourly); set MARKETPLACE_MODE=custom or remove it"
    ]


@pytest.mark.parametrize(
    ("dimensions", "expected"),
    [
        ("", "MARKETPLACE_DIMENSIONS: is required"),
        (",".join(f"d{i}" for i in range(25)), "must list 1-24 dimension names, got 25"),
        ("users,,scans", "each dimension name must be 1-255 printable characters (got '')"),
        ("users," + "x" * 256, "each dimension name must be 1-255 printable characters"),
        ("users,sc\tans", "each dimension name must be 1-255 printable characters"),
        ("users,scans,users", "MARKETPLACE_DIMENSIONS: lists users more than once"),
    ],
)
def test_bad_dimensions_are_named(
    env: pytest.MonkeyPatch, tmp_path: Path, dimensions: str, expected: str
) -> None:
    custom(env, tmp_path, DIMENSIONS=dimensions)
    found = problems()
    assert any(expected in p for p in found), found
    assert all(p.startswith("MARKETPLACE_") for p in found)


def test_twenty_four_long_dimensions_are_accepted(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    names = [f"{i:02d}" + "x" * 253 for i in range(24)]
    custom(env, tmp_path, DIMENSIONS=",".join(names))
    settings, _ = load()
    assert settings.dimension_list == tuple(names)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "MODE",
            "Custom",
            "MARKETPLACE_MODE: Input should be 'hourly', 'custom', 'saas' or 'contract'",
        ),
        (
            "ENTITLEMENT_CHECK",
            "always",
            "MARKETPLACE_ENTITLEMENT_CHECK: Input should be 'meter_zero', 'dry_run' or 'none'",
        ),
        ("DRAIN_SECONDS", "-1", "MARKETPLACE_DRAIN_SECONDS: Input should be greater than"),
        ("DRAIN_SECONDS", "soon", "MARKETPLACE_DRAIN_SECONDS: Input should be a valid number"),
    ],
)
def test_bad_mode_values_are_named(
    env: pytest.MonkeyPatch, tmp_path: Path, name: str, value: str, expected: str
) -> None:
    custom(env, tmp_path, **{name: value})
    found = problems()
    assert any(p.startswith(expected) for p in found), found
    assert not any("PUBLIC_KEY" in p for p in found)


def test_custom_settings_in_hourly_mode_are_refused(env: pytest.MonkeyPatch) -> None:
    """Dimensions without MODE=custom would silently run RegisterUsage instead of MeterUsage."""
    env.setenv("MARKETPLACE_PUBLIC_KEY", pem(new_key()))
    env.setenv("MARKETPLACE_DIMENSIONS", "users")
    env.setenv("MARKETPLACE_ENTITLEMENT_CHECK", "dry_run")
    found = problems()
    assert found == [
        "MARKETPLACE_DIMENSIONS: only used with MARKETPLACE_MODE=custom (the mode is hourly); "
        "set MARKETPLACE_MODE=custom or remove it",
        "MARKETPLACE_ENTITLEMENT_CHECK: only used with MARKETPLACE_MODE=custom (the mode is "
        "hourly); set MARKETPLACE_MODE=custom or remove it",
    ]


def test_settings_fields_use_the_documented_names() -> None:
    fields = set(SPECS)
    assert {"mode", "dimensions", "state_dir", "entitlement_check", "drain_seconds"} <= fields


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"MARKETPLACE_MODE": "saas"}, "MARKETPLACE_USAGE_DATABASE_URL or MARKETPLACE_STATE_DIR"),
        (
            {
                "MARKETPLACE_MODE": "saas",
                "MARKETPLACE_DIMENSIONS": "a",
                "MARKETPLACE_USAGE_DATABASE_URL": "mysql://app:hunter2@db/x",
            },
            "MARKETPLACE_USAGE_DATABASE_URL: must start with postgresql:// or postgres://",
        ),
        ({"MARKETPLACE_MODE": "custom"}, "MARKETPLACE_DIMENSIONS: is required"),
        (
            {
                "MARKETPLACE_MODE": "saas",
                "MARKETPLACE_DIMENSIONS": "users",
                "MARKETPLACE_USAGE_DATABASE_URL": "postgresql://app:hunter2@db/x",
                "MARKETPLACE_SAAS_CONTRACT_DIMENSIONS": "users:seat",
            },
            "MARKETPLACE_SAAS_CONTRACT_DIMENSIONS: 'users': basis must be hour",
        ),
        (
            {
                "MARKETPLACE_MODE": "custom",
                "MARKETPLACE_DIMENSIONS": "a",
                "MARKETPLACE_STATE_DIR": "/nonexistent-dir",
            },
            "MARKETPLACE_STATE_DIR: /nonexistent-dir must be an existing writable directory",
        ),
    ],
)
def test_mode_errors_exit_2_before_binding(extra: dict[str, str], expected: str) -> None:
    api, probe = free_port(), free_port()
    full = loopback_env(
        "http://127.0.0.1:9",
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_LISTEN=f"127.0.0.1:{api}",
        MARKETPLACE_PROBE_LISTEN=f"127.0.0.1:{probe}",
        **extra,
    )
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert any(expected in line for line in lines), lines
    assert all(line.startswith("config error: ") for line in lines)
    assert "Traceback" not in out.stderr
    assert "hunter2" not in out.stderr + out.stdout


# -- saas mode ---------------------------------------------------------------------------


def saas(env: pytest.MonkeyPatch, **extra: str) -> None:
    env.delenv("MARKETPLACE_PRODUCT_CODE")
    env.setenv("MARKETPLACE_MODE", "saas")
    env.setenv("MARKETPLACE_DIMENSIONS", "users, scans")
    env.setenv("MARKETPLACE_USAGE_DATABASE_URL", "postgresql://app:s3cret-pw@db.internal:5432/m")
    for name, value in extra.items():
        env.setenv(f"MARKETPLACE_{name}", value)


def test_saas_mode_needs_no_key_no_product_code_and_defaults_to_license_identity(
    env: pytest.MonkeyPatch,
) -> None:
    saas(env)
    settings, keys = load()
    assert settings.mode == "saas" and keys == {}
    assert settings.saas_identity == "license" and settings.product_code is None
    assert settings.dimension_list == ("users", "scans")
    assert settings.accept_unresolved_customers is False
    assert settings.zero_usage_records is True
    assert len(settings.ignored()) == 1  # the unpinned product: a warning, not an error


def test_saas_mode_names_exactly_what_it_lacks(env: pytest.MonkeyPatch) -> None:
    env.delenv("MARKETPLACE_PRODUCT_CODE")
    env.setenv("MARKETPLACE_MODE", "saas")
    assert problems() == [
        "MARKETPLACE_DIMENSIONS: is required with MARKETPLACE_MODE=saas: the product's dimension "
        "names as published, comma-separated (1-24)",
        "MARKETPLACE_USAGE_DATABASE_URL or MARKETPLACE_STATE_DIR: saas mode needs a usage store: "
        "a PostgreSQL URL shared by every replica, or (one replica only) a writable directory "
        "for SQLite",
    ]


def test_saas_mode_on_sqlite_for_one_replica(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    saas(env, STATE_DIR=str(tmp_path))
    env.delenv("MARKETPLACE_USAGE_DATABASE_URL")
    settings, _ = load()
    assert settings.usage_database_url is None and settings.state_dir == tmp_path


def test_customer_identifier_identity_needs_the_product_code(env: pytest.MonkeyPatch) -> None:
    saas(env, SAAS_IDENTITY="customer_identifier")
    assert problems() == [
        "MARKETPLACE_PRODUCT_CODE: is required with MARKETPLACE_SAAS_IDENTITY=customer_identifier "
        "(BatchMeterUsage sends it)"
    ]
    env.setenv("MARKETPLACE_PRODUCT_CODE", "prod-abc")
    settings, _ = load()
    assert settings.product_code == "prod-abc"


def test_license_identity_without_a_product_code_warns_that_any_product_resolves(
    env: pytest.MonkeyPatch,
) -> None:
    saas(env, PRODUCT_CODE="prod-abc")
    assert load()[0].ignored() == []
    saas(env, PRODUCT_CODE="")  # blank, as a shared template leaves it: not pinned
    (warning,) = load()[0].ignored()
    assert "ANY product of this seller account resolves" in warning
    assert "MARKETPLACE_PRODUCT_CODE" in warning


def test_hourly_and_custom_settings_in_saas_mode_are_refused_by_name(
    env: pytest.MonkeyPatch,
) -> None:
    saas(
        env,
        PUBLIC_KEY=pem(new_key()),
        ENTITLEMENT_CHECK="dry_run",
        REGISTER_INTERVAL_SECONDS="600",
        READINESS_GATE="aws-marketplace.amazonaws.com/entitled",
        POD_NAME="p",
        POD_NAMESPACE="n",
    )
    found = problems()
    subjects = [p.split(":", 1)[0] for p in found]
    assert subjects == [
        "MARKETPLACE_PUBLIC_KEY",
        "MARKETPLACE_ENTITLEMENT_CHECK",
        "MARKETPLACE_REGISTER_INTERVAL_SECONDS",
        "MARKETPLACE_READINESS_GATE",
    ], found
    assert all("(the mode is saas); remove it" in p for p in found)
    assert "verifies no token" in found[0]


def test_template_defaults_of_other_modes_are_tolerated_in_saas_mode(
    env: pytest.MonkeyPatch,
) -> None:
    """A shared template sets every variable: blank or default values refuse nothing."""
    saas(env, PUBLIC_KEY="", REGISTER_INTERVAL_SECONDS="3600", ENTITLEMENT_CHECK="meter_zero")
    settings, _ = load()
    assert settings.mode == "saas"


@pytest.mark.parametrize("mode", ["hourly", "custom"])
def test_saas_settings_in_other_modes_are_refused(
    env: pytest.MonkeyPatch, tmp_path: Path, mode: str
) -> None:
    if mode == "custom":
        custom(env, tmp_path)
    else:
        env.setenv("MARKETPLACE_PUBLIC_KEY", pem(new_key()))
    env.setenv("MARKETPLACE_USAGE_DATABASE_URL", "postgresql://app:pw-xyz@db/m")
    env.setenv("MARKETPLACE_SAAS_IDENTITY", "customer_identifier")
    env.setenv("MARKETPLACE_ACCEPT_UNRESOLVED_CUSTOMERS", "true")
    found = problems()
    assert found == [
        f"MARKETPLACE_{name}: only used with MARKETPLACE_MODE=saas (the mode is {mode}); remove it"
        for name in ("SAAS_IDENTITY", "USAGE_DATABASE_URL", "ACCEPT_UNRESOLVED_CUSTOMERS")
    ]
    assert not any("pw-xyz" in p for p in found)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://app:pw-xyz@db/m", "must start with postgresql:// or postgres://"),
        ("pw-xyz", "must start with postgresql:// or postgres://"),
        ("postgresql:///m?password=pw-xyz", "must name a host"),
        ("postgresql://app:pw-xyz@/m", "must name a host"),
        ("postgresql://app:pw-xyz@db:port/m", "the host or port does not parse"),
        ("postgresql://app:pw-xyz@db:99999/m", "the host or port does not parse"),
        ("postgresql://app:pw-xyz@db:0/m", "port must be 1-65535"),
    ],
)
def test_a_bad_database_url_is_named_without_its_password(
    env: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    saas(env, USAGE_DATABASE_URL=url)
    found = problems()
    assert len(found) == 1 and found[0].startswith("MARKETPLACE_USAGE_DATABASE_URL: "), found
    assert expected in found[0]
    assert "pw-xyz" not in found[0]


@pytest.mark.parametrize(
    "url", ["postgresql://app:pw@db.internal:5432/m", "postgres://db/m", "postgresql://[::1]/m"]
)
def test_good_database_urls_are_accepted(env: pytest.MonkeyPatch, url: str) -> None:
    saas(env, USAGE_DATABASE_URL=url)
    assert load()[0].usage_database_url == url


def test_the_database_password_never_reaches_the_logged_settings_or_help(
    env: pytest.MonkeyPatch,
) -> None:
    from sidecar.config import describe, redact_url, variables_help

    saas(env, USAGE_DATABASE_URL="postgresql://app:s3cret-pw@db.internal:5432/m?password=s3cret-pw")
    settings, _ = load()
    shown = describe(settings)
    assert shown["MARKETPLACE_USAGE_DATABASE_URL"] == "postgresql://app@db.internal:5432/m"
    assert "s3cret-pw" not in repr(shown)
    assert redact_url("postgresql://[::1]:5433/m") == "postgresql://[::1]:5433/m"
    text = variables_help()
    for name in ("SAAS_IDENTITY", "USAGE_DATABASE_URL", "ACCEPT_UNRESOLVED_CUSTOMERS"):
        assert f"MARKETPLACE_{name}" in text
    assert "MARKETPLACE_ZERO_USAGE_RECORDS  [default: true]" in text


def test_saas_bad_identity_is_named(env: pytest.MonkeyPatch) -> None:
    saas(env, SAAS_IDENTITY="account")
    found = problems()
    assert found[0].startswith(
        "MARKETPLACE_SAAS_IDENTITY: Input should be 'license' or 'customer_identifier'"
    ), found


def test_license_identity_still_pins_a_set_product_code(env: pytest.MonkeyPatch) -> None:
    """The wiring hands the product code to the service in license identity too (it checks
    ResolveCustomer's answer against it); only the requests leave it out."""
    from sidecar.app import saas_policy

    saas(env, PRODUCT_CODE="prod-abc")
    policy = saas_policy(load()[0])
    assert policy.identity == "license" and policy.product_code == "prod-abc"


@pytest.mark.parametrize(
    ("url", "endpoint", "expected"),
    [
        ("http://sqs.us-east-1.amazonaws.com/123456789012/q", None, "an SQS queue URL is required"),
        ("https://sqs.us-east-1.amazonaws.com/1234/q", None, "an SQS queue URL is required"),
        ("https://evil.example/123456789012/q", None, "an SQS queue URL is required"),
        ("https://sqs.us-east-1.amazonaws.com/123456789012/q q", None, "SQS queue URL"),
        ("http://127.0.0.1:9/123456789012", "http://127.0.0.1:9", "ending /<12-digit account>"),
        (
            "http://10.0.0.5:9324/123456789012/q",
            "http://10.0.0.5:9324",
            "AWS_ENDPOINT_URL_SQS: plain http only to a loopback address",
        ),
    ],
)
def test_a_bad_events_queue_is_named(
    env: pytest.MonkeyPatch, url: str, endpoint: str | None, expected: str
) -> None:
    saas(env, SAAS_EVENTS_QUEUE_URL=url)
    if endpoint:
        env.setenv("AWS_ENDPOINT_URL_SQS", endpoint)
    else:
        env.delenv("AWS_ENDPOINT_URL_SQS", raising=False)
    found = problems()
    assert len(found) == 1 and expected in found[0], found
    name = (
        "AWS_ENDPOINT_URL_SQS" if "plain http" in expected else "MARKETPLACE_SAAS_EVENTS_QUEUE_URL"
    )
    assert found[0].startswith(name), found


def test_the_events_queue_is_saas_only_and_a_good_one_is_accepted(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env.delenv("AWS_ENDPOINT_URL_SQS", raising=False)
    good = "https://sqs.eu-west-1.amazonaws.com/123456789012/marketplace-events"
    saas(env, SAAS_EVENTS_QUEUE_URL=good)
    assert load()[0].saas_events_queue_url == good
    custom(env, tmp_path, SAAS_EVENTS_QUEUE_URL=good)
    assert any(p.startswith("MARKETPLACE_SAAS_EVENTS_QUEUE_URL") for p in problems())


QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/marketplace-events"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("users", "each entry is dimension:basis"),
        ("users:seat", "basis must be hour"),
        ("users:hour,users:term", "more than once"),
        (":hour", "each entry is dimension:basis"),
        ("photos:hour", "photos not among MARKETPLACE_DIMENSIONS (users, scans)"),
    ],
)
def test_a_bad_contract_dimension_setting_is_named(
    env: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    env.delenv("AWS_ENDPOINT_URL_SQS", raising=False)
    saas(env, SAAS_EVENTS_QUEUE_URL=QUEUE, SAAS_CONTRACT_DIMENSIONS=value)
    found = problems()
    assert len(found) == 1 and expected in found[0], found
    assert found[0].startswith("MARKETPLACE_SAAS_CONTRACT_DIMENSIONS"), found


def test_contract_dimensions_are_saas_only_and_need_the_events_queue(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env.delenv("AWS_ENDPOINT_URL_SQS", raising=False)
    saas(env, SAAS_EVENTS_QUEUE_URL=QUEUE, SAAS_CONTRACT_DIMENSIONS="users:hour, scans:term")
    assert load()[0].contract_dimensions == {"users": "hour", "scans": "term"}
    env.delenv("MARKETPLACE_SAAS_EVENTS_QUEUE_URL")
    found = problems()
    assert len(found) == 1 and "needs MARKETPLACE_SAAS_EVENTS_QUEUE_URL" in found[0], found
    env.setenv("MARKETPLACE_SAAS_CONTRACT_DIMENSIONS", "")  # a template's blank: today's default
    assert load()[0].contract_dimensions == {}
    custom(env, tmp_path, SAAS_CONTRACT_DIMENSIONS="users:hour")
    assert any(
        p.startswith("MARKETPLACE_SAAS_CONTRACT_DIMENSIONS") and "MODE=saas" in p
        for p in problems()
    )
