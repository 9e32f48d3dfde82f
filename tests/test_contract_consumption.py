"""Contract with consumption end to end: a real `run` process in contract mode with
MARKETPLACE_DIMENSIONS, boto3 over real HTTP to the emulator's License Manager (the license)
and MeterUsage (usage above it). The license, not a quantity-0 MeterUsage, opens sending."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.contract_kit import SKU, TIER, LicenseApi, Pod, license_api
from tests.helpers import ROOT, free_port, loopback_env

CODE = "prod-consume"


@pytest.fixture
def lm(emulator_server: EmulatorServer, emulator: Emulator) -> LicenseApi:
    """The emulator's License Manager test API (reset), MeterUsage pinned to this product."""
    emulator.reconfigure({"product_codes": [CODE], "dimensions": ["scans", "users"]})

    return license_api(emulator_server.url)


@pytest.fixture
def pod(emulator_server: EmulatorServer, tmp_path: Path) -> Iterator[Callable[..., Pod]]:
    """Sidecars of one pod: the same state dir (emptyDir) and AWS identity across restarts."""
    pods: list[Pod] = []
    key = "pod-" + str(time.monotonic_ns())
    state_dir = tmp_path / "state"
    state_dir.mkdir()

    def start(**extra: str) -> Pod:
        env = loopback_env(
            emulator_server.url,
            AWS_ACCESS_KEY_ID=key,
            AWS_ENDPOINT_URL_LICENSE_MANAGER=emulator_server.url,
            MARKETPLACE_MODE="contract",
            MARKETPLACE_LICENSE_PRODUCT_SKU=SKU,
            MARKETPLACE_LICENSE_ENTITLEMENTS=json.dumps(TIER),
            MARKETPLACE_PRODUCT_CODE=CODE,
            MARKETPLACE_DIMENSIONS="scans,users",
            MARKETPLACE_STATE_DIR=str(state_dir),
            **extra,
        )
        p = Pod(env, tmp_path / f"pod{len(pods)}.log")
        pods.append(p)
        return p

    yield start
    for p in pods:
        p.stop()


def grant(lm: Callable[[str, dict[str, Any]], Any]) -> None:
    lm("licenses", {"sku": SKU, "entitlements": [{"name": "PremiumTier", "unit": "None"}]})


def meter_calls(emulator: Emulator) -> list[dict[str, Any]]:
    return [c for c in emulator.calls if c["op"] == "MeterUsage"]


def billed(emulator: Emulator) -> dict[str, int]:
    """Units AWS recorded per dimension (across hours)."""
    out: dict[str, int] = {}
    for r in emulator.ledger()["records"]:
        out[r["dimension"]] = out.get(r["dimension"], 0) + r["quantity"]
    return out


def lm_calls(emulator_server: EmulatorServer, op: str) -> list[dict[str, Any]]:
    state = requests.get(f"{emulator_server.url}/_emulator/license/state", timeout=5).json()
    return [c for c in state["calls"] if c["op"] == op]


def conforms(resp: requests.Response) -> None:
    """GET /v1/usage's answer against the OpenAPI document the package ships."""
    from importlib import resources

    import jsonschema
    import yaml

    spec = yaml.safe_load(resources.files("sidecar").joinpath("openapi.yaml").read_text())
    declared = spec["paths"]["/v1/usage"]["get"]["responses"][str(resp.status_code)]
    schema = {**declared["content"]["application/json"]["schema"], "components": spec["components"]}
    jsonschema.validate(resp.json(), schema, cls=jsonschema.Draft202012Validator)


def held(p: Pod) -> bool:
    return any(w.startswith("usage_held") for w in p.usage()["warnings"])


def test_licensed_pod_bills_posted_usage_once_without_meter_zero(
    lm: Any, pod: Any, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    grant(lm)
    p = pod()
    p.state("checked_out")
    p.until(lambda: not held(p))  # the license opened the usage pipeline
    assert p.post([{"dimension": "scans", "quantity": 5, "id": "s1"}]).status_code == 202
    assert p.post([{"dimension": "users", "quantity": 2}]).status_code == 202
    assert p.post([{"dimension": "scans", "quantity": 5, "id": "s1"}]).status_code == 200
    report = requests.get(p.api + "/v1/usage", timeout=5)
    conforms(report)  # the documented answer, with the new check's name
    assert report.json()["entitlement_check"] == "license"
    assert "check_dimension" not in report.json()
    assert requests.get(p.probe + "/readyz", timeout=5).status_code == 200
    assert meter_calls(emulator) == []  # no quantity-0 start check: the license is the check
    assert p.stop() == 0  # SIGTERM: the drain sends both hours, then checks the seat in
    assert billed(emulator) == {"scans": 5, "users": 2}
    assert all(c["quantity"] != 0 for c in meter_calls(emulator))
    assert len(meter_calls(emulator)) == 2  # one MeterUsage per dimension-hour
    assert len(lm_calls(emulator_server, "CheckInLicense")) == 1

    again = pod()  # a restarted container on the same state dir sends nothing twice
    again.state("checked_out")
    again.until(lambda: not held(again))
    assert again.stop() == 0
    assert billed(emulator) == {"scans": 5, "users": 2}
    assert len(meter_calls(emulator)) == 2


def test_unlicensed_pod_never_meters_and_keeps_the_usage(
    lm: Any, pod: Any, emulator: Emulator
) -> None:
    p = pod()
    p.state("not_entitled")
    assert p.post([{"dimension": "users", "quantity": 3, "id": "u1"}]).status_code == 202
    report = p.usage()
    assert held(p)  # what the seller sees: the usage, held, and why
    assert report["totals"]["users"]["accepted"] == 3
    assert requests.get(p.probe + "/readyz", timeout=5).status_code == 503
    assert p.stop() == 0
    assert meter_calls(emulator) == []  # never, not even in the drain
    logs = p.logs()
    assert "usage_held_at_exit" in logs and "usage_unsent_at_exit" in logs

    grant(lm)  # the buyer's contract arrives; the container restarts on the same emptyDir
    later = pod()
    later.state("checked_out")
    later.until(lambda: not held(later))
    assert later.stop() == 0
    assert billed(emulator) == {"users": 3}  # acknowledged once, billed once
    assert len(meter_calls(emulator)) == 1


def test_usage_posted_while_the_license_is_checked_is_held_then_billed_once(
    lm: Any, pod: Any, emulator: Emulator
) -> None:
    """License Manager throttles the start checkout: usage posted meanwhile is durable (202),
    held, and sent once the checkout succeeds; not a single MeterUsage before that."""
    grant(lm)
    lm("config", {"faults": [{"error": "RateLimitExceededException", "first": 100000}]})
    p = pod()
    p.until(lambda: p.doc()["consecutive_failures"] >= 2)
    assert p.post([{"dimension": "users", "quantity": 6, "id": "early"}]).status_code == 202
    assert p.doc()["state"] == "checking" and held(p)
    assert meter_calls(emulator) == []
    lm("config", {"faults": []})  # License Manager answers again
    p.state("checked_out")
    p.until(lambda: not held(p))
    assert p.stop() == 0
    assert billed(emulator) == {"users": 6}
    assert len(meter_calls(emulator)) == 1


def test_license_revoked_with_usage_pending_still_bills_it_once(
    lm: Any, pod: Any, emulator: Emulator
) -> None:
    """The units were acknowledged under a license: a later loss does not withhold them
    (AWS's MeterUsage answer judges them); the pod goes unready as ON_LOSS says."""
    grant(lm)
    lm("config", {"ttl_seconds": 2})
    p = pod()
    p.state("checked_out")
    p.until(lambda: not held(p))
    assert p.post([{"dimension": "scans", "quantity": 4}]).status_code == 202
    lm("change", {"sku": SKU, "revoke": True})
    p.state("not_entitled")
    assert requests.get(p.probe + "/readyz", timeout=5).status_code == 503
    assert p.post([{"dimension": "scans", "quantity": 1}]).status_code == 202
    assert not held(p)
    assert p.stop() == 0
    assert billed(emulator) == {"scans": 5}
    assert len(meter_calls(emulator)) == 1


def test_sigterm_drains_usage_while_check_in_hangs(
    lm: Any, pod: Any, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """One budget for both: a hung CheckInLicense does not cost the usage, and the process
    still ends inside MARKETPLACE_DRAIN_SECONDS."""
    grant(lm)
    p = pod(MARKETPLACE_DRAIN_SECONDS="3")
    p.state("checked_out")
    p.until(lambda: not held(p))
    assert p.post([{"dimension": "users", "quantity": 7}]).status_code == 202
    lm("config", {"latency": 8})  # License Manager hangs from now on
    started = time.monotonic()
    assert p.stop() == 0
    assert time.monotonic() - started < 6
    assert billed(emulator) == {"users": 7}
    assert "license_checkin_abandoned" in p.logs()


def _config(env: dict[str, str]) -> tuple[int, str]:
    base = {
        **loopback_env("http://127.0.0.1:9"),
        "MARKETPLACE_MODE": "contract",
        "MARKETPLACE_LISTEN": f"127.0.0.1:{free_port()}",
        "MARKETPLACE_LICENSE_PRODUCT_SKU": SKU,
        "MARKETPLACE_LICENSE_ENTITLEMENTS": json.dumps(TIER),
    }
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env={**base, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode, done.stderr


def test_dimensions_without_state_dir_or_product_code_exit_2_one_line_each() -> None:
    code, err = _config({"MARKETPLACE_DIMENSIONS": "scans"})
    assert code == 2
    lines = [x.removeprefix("config error: ") for x in err.splitlines()]
    assert any(
        x.startswith("MARKETPLACE_STATE_DIR: is required with MARKETPLACE_DIMENSIONS")
        for x in lines
    ), err
    assert any(
        x.startswith("MARKETPLACE_PRODUCT_CODE: is required") and "product ID" in x for x in lines
    ), err


def test_contract_without_dimensions_refuses_usage_settings_as_before(tmp_path: Path) -> None:
    code, err = _config(
        {"MARKETPLACE_PRODUCT_CODE": CODE, "MARKETPLACE_STATE_VOLUME_BYTES": "64Mi"}
    )
    assert code == 2
    assert "MARKETPLACE_PRODUCT_CODE: contract mode names the product by" in err
    assert "MARKETPLACE_STATE_VOLUME_BYTES: contract mode meters nothing" in err
    code, err = _config(
        {
            "MARKETPLACE_DIMENSIONS": "scans",
            "MARKETPLACE_PRODUCT_CODE": CODE,
            "MARKETPLACE_STATE_DIR": str(tmp_path),
            "MARKETPLACE_ENTITLEMENT_CHECK": "dry_run",
        }
    )
    assert code == 2
    assert "MARKETPLACE_ENTITLEMENT_CHECK: contract mode checks the license" in err


def test_ecs_note_passes_the_sidecars_own_validation(tmp_path: Path) -> None:
    """The contract task definition plus the variables docs/contract-consumption.md adds is a
    configuration the sidecar accepts as contract with consumption."""
    import re

    task = json.loads((ROOT / "manifests" / "ecs" / "task-definition-contract.json").read_text())
    env = {e["name"]: e["value"] for e in task["containerDefinitions"][0]["environment"]}
    text = (ROOT / "docs" / "contract-consumption.md").read_text()
    (block,) = re.findall(r"```json\n(.*?)```", text, re.S)
    added = {e["name"]: e["value"] for e in json.loads(block)}
    assert added["MARKETPLACE_STATE_DIR"] == "/var/lib/marketplace-sidecar"
    env.update(added)
    env["MARKETPLACE_LICENSE_ENTITLEMENTS"] = json.dumps(TIER)  # the placeholder's name
    env["MARKETPLACE_STATE_DIR"] = str(tmp_path)  # the task volume, here
    fields = "s.mode, s.product_code, s.dimensions, str(s.state_dir)"
    out = subprocess.run(
        [sys.executable, "-c", f"from sidecar.config import load; s, k = load(); print({fields})"],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "contract",
        "REPLACE_WITH_PRODUCT_CODE",
        "REPLACE_WITH_DIMENSION_A,REPLACE_WITH_DIMENSION_B",
        str(tmp_path),
    ]


def test_doctor_says_what_it_does_not_check_for_consumption(
    lm: Any, emulator: Emulator, emulator_server: EmulatorServer, tmp_path: Path
) -> None:
    grant(lm)
    env = loopback_env(
        emulator_server.url,
        AWS_ENDPOINT_URL_LICENSE_MANAGER=emulator_server.url,
        MARKETPLACE_MODE="contract",
        MARKETPLACE_LICENSE_PRODUCT_SKU=SKU,
        MARKETPLACE_LICENSE_ENTITLEMENTS=json.dumps(TIER),
        MARKETPLACE_PRODUCT_CODE=CODE,
        MARKETPLACE_DIMENSIONS="scans,users",
        MARKETPLACE_STATE_DIR=str(tmp_path),
    )
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert (
        f"! consumption: usage above the contract goes to MeterUsage as product code {CODE}" in out
    )
    assert "policy-custom-metering.json" in out
    assert not lm_calls(emulator_server, "CheckoutLicense") and meter_calls(emulator) == []
