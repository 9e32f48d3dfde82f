"""Custom mode outside the process: `doctor`'s DryRun check, the ECS and IAM examples, and a
dry_run pod that AWS refuses at its first real send (hours pass in seconds on a scaled clock)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import ROOT, loopback_env, start_sidecar
from tests.kube_fake import FakeApiServer
from tests.test_ecs import problems
from tests.test_kube import GATE, apiserver, launch_on_pod, wait_condition

__all__ = ["apiserver"]  # the fixture, shared with the hourly-mode gate tests

ECS = ROOT / "manifests" / "ecs"


def doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def custom_env(server: EmulatorServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    return loopback_env(
        server.url,
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_MODE="custom",
        MARKETPLACE_DIMENSIONS="scans,users",
        MARKETPLACE_STATE_DIR=str(tmp_path),
        **extra,
    )


def test_doctor_checks_meter_usage_per_dimension_with_dry_run_only(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    out = doctor(custom_env(emulator_server, tmp_path))
    assert out.returncode == 0, out.stdout
    lines = out.stdout.splitlines()
    assert (
        "✔ metering: custom: 2 dimension(s) (scans, users), entitlement check meter_zero on scans"
        in lines
    )
    assert "✔ MeterUsage permission: scans: allowed (DryRun)" in lines
    assert "✔ MeterUsage permission: users: allowed (DryRun)" in lines
    assert not any("public key" in line for line in lines)
    meter_calls = [c for c in emulator.calls if c["op"] == "MeterUsage"]
    assert len(meter_calls) == 2 and all(c.get("dry_run") for c in meter_calls)
    assert emulator.ledger()["records"] == []  # the doctor never meters


@pytest.mark.parametrize(
    ("setting", "expected", "fix"),
    [
        (
            {"denied_operations": ["MeterUsage"]},
            "✘ MeterUsage permission: scans: UnauthorizedException",
            "grant aws-marketplace:MeterUsage",
        ),
        (
            {"dimensions": ["scans"]},
            "✘ MeterUsage permission: users: InvalidUsageDimensionException",
            "MARKETPLACE_DIMENSIONS must match",
        ),
        (
            {"dry_run_answer": "error"},  # AWS may report DryRun success as an error code
            "✔ MeterUsage permission: users: allowed (DryRun)",
            "",
        ),
    ],
)
def test_doctor_names_each_meter_usage_problem_with_a_fix(
    emulator_server: EmulatorServer,
    emulator: Emulator,
    tmp_path: Path,
    setting: dict[str, Any],
    expected: str,
    fix: str,
) -> None:
    emulator.reconfigure(setting)
    out = doctor(custom_env(emulator_server, tmp_path))
    assert any(line.startswith(expected) for line in out.stdout.splitlines()), out.stdout
    if fix:
        assert out.returncode == 1
        assert f"    fix: {fix}" in out.stdout
    else:
        assert out.returncode == 0, out.stdout
    assert emulator.ledger()["records"] == []


def test_custom_task_definition_is_valid_and_wired() -> None:
    task = json.loads((ECS / "task-definition-custom.json").read_text())
    assert problems(task) == []
    sidecar = task["containerDefinitions"][0]
    env = {e["name"]: e["value"] for e in sidecar["environment"]}
    assert env["MARKETPLACE_MODE"] == "custom"
    assert "MARKETPLACE_PUBLIC_KEY" not in env
    assert sidecar["mountPoints"][0]["containerPath"] == env["MARKETPLACE_STATE_DIR"]
    assert sidecar["mountPoints"][0]["sourceVolume"] in {v["name"] for v in task["volumes"]}
    # ECS sends SIGKILL after stopTimeout: it must cover the drain budget.
    assert sidecar["stopTimeout"] > float(env["MARKETPLACE_DRAIN_SECONDS"])


def test_cloudformation_custom_mode_grants_meter_usage_and_mounts_state() -> None:
    cfn = json.loads((ECS / "cloudformation.json").read_text())
    assert cfn["Conditions"]["MeterUsage"]["Fn::Or"][1] == {"Condition": "Custom"}
    sidecar = cfn["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    custom_env = [e["Fn::If"][1] for e in sidecar["Environment"] if "Fn::If" in e]
    names = {e["Name"] for e in custom_env if isinstance(e, dict) and "Name" in e}
    assert {"MARKETPLACE_MODE", "MARKETPLACE_DIMENSIONS"} <= names
    # Every mode keeps its state on the task volume (the restarted sidecar finds it there).
    assert {"Name": "MARKETPLACE_STATE_DIR", "Value": "/var/lib/marketplace-sidecar"} in sidecar[
        "Environment"
    ]
    assert sidecar["StopTimeout"] == {"Fn::If": ["Custom", 30, 5]}
    iam = json.loads((ROOT / "manifests" / "iam" / "policy-custom-metering.json").read_text())
    assert iam["Statement"] == [
        {
            "Sid": "MeterUsage",
            "Effect": "Allow",
            "Action": ["aws-marketplace:MeterUsage"],
            "Resource": "*",
        }
    ]


def test_dry_run_serves_then_a_refusal_at_the_first_real_send_is_final(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    """dry_run checks permission only: the pod is Ready until AWS refuses its first real
    MeterUsage (after the first hour ends), then not_entitled for good."""
    scale, origin = 720.0, time.time()  # an hour passes in 5 s
    emulator.reconfigure({"entitled": False, "time_scale": scale, "time_origin": origin})
    env = custom_env(
        emulator_server,
        tmp_path,
        MARKETPLACE_ENTITLEMENT_CHECK="dry_run",
        MARKETPLACE_TEST_ONLY_TIME_SCALE=str(scale),
        MARKETPLACE_TEST_ONLY_TIME_ORIGIN=str(origin),
    )
    car = start_sidecar(env)
    try:
        doc = car.wait_for(lambda d: d["state"] == "entitled", 15)
        assert doc["metering"]["subscription_checked"] is False
        r = requests.post(
            car.api + "/v1/usage", json={"dimension": "users", "quantity": 5}, timeout=5
        )
        assert r.status_code == 202
        doc = car.wait_for(lambda d: d["state"] == "not_entitled", 30)
        assert doc["error"]["code"] == "CustomerNotEntitledException"
        assert car.get("/readyz", probe=True).status_code == 503
        time.sleep(1.0)
        assert car.entitlement()["state"] == "not_entitled"  # final: no later success lifts it
    finally:
        car.stop()
    assert emulator.ledger()["records"] == []


def test_test_only_clock_is_refused_off_loopback(tmp_path: Path) -> None:
    env = loopback_env(
        "https://metering.marketplace.us-east-1.amazonaws.com",
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_MODE="custom",
        MARKETPLACE_DIMENSIONS="scans",
        MARKETPLACE_STATE_DIR=str(tmp_path),
        MARKETPLACE_TEST_ONLY_TIME_SCALE="60",
    )
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert (
        "MARKETPLACE_TEST_ONLY_TIME_SCALE: only for tests against a loopback emulator" in out.stderr
    )
    assert "MARKETPLACE_TEST_ONLY_TIME_ORIGIN: is required" in out.stderr


def test_custom_mode_refusal_drives_the_readiness_gate_and_events(
    launch: Any, emulator: Emulator, apiserver: FakeApiServer, tmp_path: Path
) -> None:
    """Same pod condition and Events as hourly mode: the machinery reads one state machine."""
    emulator.reconfigure({"entitled": False})
    car = launch_on_pod(
        launch,
        apiserver,
        MARKETPLACE_MODE="custom",
        MARKETPLACE_DIMENSIONS="scans,users",
        MARKETPLACE_STATE_DIR=str(tmp_path),
        MARKETPLACE_READINESS_GATE=GATE,
        MARKETPLACE_KUBE_EVENTS="true",
    )
    car.wait_for(lambda d: d["state"] == "not_entitled", 15)
    deadline = time.monotonic() + 10
    cond = wait_condition(apiserver, "False")
    while cond["reason"] != "NotEntitled" and time.monotonic() < deadline:
        time.sleep(0.05)
        cond = apiserver.condition("shop", "product-0", GATE) or cond
    assert cond["message"].startswith("CustomerNotEntitledException: ")
    # A "Registering" Event may come first: wait for the refusal's own Event.
    while time.monotonic() < deadline and not any(
        e["reason"] == "NotEntitled" for e in apiserver.events
    ):
        time.sleep(0.05)
    refused = [e for e in apiserver.events if e["reason"] == "NotEntitled"]
    assert len(refused) == 1, apiserver.events
    assert refused[0]["message"].startswith("CustomerNotEntitledException")
