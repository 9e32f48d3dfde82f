"""MARKETPLACE_FLEET_SIZE: validated like every setting, hourly only, exclusive with fixed slots,
and wired into the registrar (boto3 -> the emulator over loopback HTTP, injected clock)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from sidecar.app import policy_from
from sidecar.aws.metering import MeteringGateway
from sidecar.config import ConfigError, load, variables_help
from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.entitlement.registrar import Registrar
from sidecar.entitlement.state import Entitlement, State
from tests import usage_kit
from tests.helpers import ROOT, ManualClock, free_port, loopback_env, new_key, pem


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("MARKETPLACE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MARKETPLACE_PRODUCT_CODE", "prod-abc")
    monkeypatch.setenv("MARKETPLACE_PUBLIC_KEY", pem(new_key()))
    return monkeypatch


def problems() -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load()
    return caught.value.problems


@pytest.mark.parametrize(
    ("value", "size"), [("", None), ("  ", None), ("1", 1), (" 200 ", 200), ("7500", 7500)]
)
def test_good_values_and_blank_as_unset(env: pytest.MonkeyPatch, value: str, size: int) -> None:
    env.setenv("MARKETPLACE_FLEET_SIZE", value)
    settings, keys = load()
    assert settings.fleet_size == size
    assert policy_from(settings, keys).throttle.fleet == size


@pytest.mark.parametrize(
    "value", ["0", "-5", "1.5", "1e3", "1_000", "abc", "100001", "²", "٣", "true"]
)
def test_bad_values_get_one_line_naming_the_variable_and_the_range(
    env: pytest.MonkeyPatch, value: str
) -> None:
    env.setenv("MARKETPLACE_FLEET_SIZE", value)
    found = [p for p in problems() if p.startswith("MARKETPLACE_FLEET_SIZE")]
    assert found == [
        "MARKETPLACE_FLEET_SIZE: must be a whole number of pods from 1 to 100000 (or empty for "
        f"adaptive retry windows), got {value!r}"
    ]


def test_fixed_slots_and_a_fleet_size_are_refused_together_naming_both(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("MARKETPLACE_FLEET_SIZE", "200")
    env.setenv("MARKETPLACE_THROTTLE_SCHEDULE_SECONDS", "25,40,43")
    (line,) = problems()
    assert line.startswith("MARKETPLACE_FLEET_SIZE: cannot be combined with ")
    assert "MARKETPLACE_THROTTLE_SCHEDULE_SECONDS" in line
    env.setenv("MARKETPLACE_THROTTLE_SCHEDULE_SECONDS", "")  # a template's blank: fine
    assert load()[0].fleet_size == 200


def test_a_window_longer_than_half_the_deadline_is_refused(env: pytest.MonkeyPatch) -> None:
    """1.2 x 20,000 / 5 = 4,800 s: past the 1 h deadline, pods would give up instead of waiting."""
    env.setenv("MARKETPLACE_FLEET_SIZE", "20000")
    (line,) = problems()
    assert line.startswith("MARKETPLACE_FLEET_SIZE: 20000 pods spread their retries over 4800 s")
    assert "MARKETPLACE_REGISTER_DEADLINE_SECONDS=3600" in line
    env.setenv("MARKETPLACE_REGISTER_DEADLINE_SECONDS", "10000")
    assert load()[0].fleet_size == 20000


def test_saas_mode_refuses_it_by_name_and_tolerates_a_blank(env: pytest.MonkeyPatch) -> None:
    env.delenv("MARKETPLACE_PUBLIC_KEY")
    env.setenv("MARKETPLACE_MODE", "saas")
    env.setenv("MARKETPLACE_DIMENSIONS", "users")
    env.setenv("MARKETPLACE_USAGE_DATABASE_URL", "postgresql://app:pw@db.internal:5432/m")
    env.setenv("MARKETPLACE_FLEET_SIZE", "50")
    assert problems() == [
        "MARKETPLACE_FLEET_SIZE: only used with MARKETPLACE_MODE=hourly or custom (it paces "
        "RegisterUsage and MeterUsage), never in this mode (the mode is saas); remove it"
    ]
    env.setenv("MARKETPLACE_FLEET_SIZE", "")
    assert load()[0].fleet_size is None


def test_help_says_what_a_too_large_value_costs() -> None:
    text = " ".join(variables_help(width=1000).split())
    assert "MARKETPLACE_FLEET_SIZE [default: unset; >= 1; <= 100000]" in text
    assert "a value far too large makes a pod throttled once by anything else" in text


def test_a_bad_value_exits_2_before_binding_a_port() -> None:
    api, probe = free_port(), free_port()
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=loopback_env(
            "http://127.0.0.1:9",
            MARKETPLACE_PRODUCT_CODE="prod-abc",
            MARKETPLACE_PUBLIC_KEY=pem(new_key()),
            MARKETPLACE_LISTEN=f"127.0.0.1:{api}",
            MARKETPLACE_PROBE_LISTEN=f"127.0.0.1:{probe}",
            MARKETPLACE_FLEET_SIZE="lots",
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2, out.stderr
    assert "config error: MARKETPLACE_FLEET_SIZE: must be a whole number of pods" in out.stderr
    assert "Traceback" not in out.stderr
    assert "listening" not in out.stderr + out.stdout


# -- wired: the sidecar's own settings -> policy -> registrar -> boto3 -> emulator ----------


def registrar(
    env: pytest.MonkeyPatch,
    emulator: Emulator,
    server: EmulatorServer,
    fleet_size: str,
    clock: ManualClock,
    rng: float,
) -> Registrar:
    usage_kit.aws_env(env, server, "pod-" + str(id(clock)))
    env.setenv("AWS_REGION", "us-east-1")
    env.setenv("MARKETPLACE_PUBLIC_KEY", emulator.public_pem())
    env.setenv("MARKETPLACE_FLEET_SIZE", fleet_size)
    settings, keys = load()
    policy = policy_from(settings, keys)
    return Registrar(
        policy,
        lambda: MeteringGateway("us-east-1", 5.0),
        Entitlement(),
        clock,
        lambda: rng,
        threading.Event(),
    )


def test_the_first_call_is_never_delayed_by_the_hint(
    env: pytest.MonkeyPatch, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """A lone replacement pod of a 5,000-pod fleet registers at once."""
    clock = ManualClock()
    reg = registrar(env, emulator, emulator_server, "5000", clock, 0.999)
    assert reg.first_registration() is True
    assert reg.machine.snapshot().state is State.ENTITLED
    assert clock.waits == [] and clock.mono == 0.0
    assert len(emulator.calls) == 1


def test_a_throttled_pod_retries_inside_the_hinted_window_then_the_rest_of_it(
    env: pytest.MonkeyPatch, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """Another product of the account took the only token: this pod is throttled twice."""
    emulator.reconfigure({"throttle_rps": 0.001, "throttle_burst": 1})
    usage_kit.aws_env(env, emulator_server, "other-product")
    MeteringGateway("us-east-1", 5.0).register_usage("other", 1, "n" * 32)
    clock = ManualClock(stop_after_waits=2)
    reg = registrar(env, emulator, emulator_server, "500", clock, 0.999)  # window: 120 s
    assert reg.first_registration() is False  # stopped after two waits
    first, second = clock.waits
    assert 119.0 < first < 120.0  # the hint's window (adaptive would be under 5 s)
    assert first + second < 120.0 + 5.0  # the rest of it plus 5 s, not a new 120 s
    assert len(emulator.calls) == 3  # the other product's call and this pod's two, throttled
    snap = reg.machine.snapshot()
    assert snap.error is not None and snap.error.code == "ThrottlingException"
