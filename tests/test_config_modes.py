"""MARKETPLACE_MODE and what each mode needs: custom needs dimensions and a state dir, not a key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import ConfigError, Settings, load
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
        ("MODE", "Custom", "MARKETPLACE_MODE: Input should be 'hourly', 'custom' or 'saas'"),
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
    fields = set(Settings.model_fields)
    assert {"mode", "dimensions", "state_dir", "entitlement_check", "drain_seconds"} <= fields


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"MARKETPLACE_MODE": "saas"}, "MARKETPLACE_MODE: saas is not yet supported"),
        ({"MARKETPLACE_MODE": "custom"}, "MARKETPLACE_DIMENSIONS: is required"),
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
