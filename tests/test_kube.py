"""The opt-in readiness gate, end to end: the real sidecar process patches its pod's condition
through the kubernetes client's real in-cluster configuration, against a local HTTPS stand-in
for the two kube-apiserver paths it uses (tests/kube_fake.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.emulator.service import Emulator
from sidecar.entitlement.state import Entitlement
from sidecar.ops.kube import desired
from tests.helpers import Launch, Sidecar
from tests.kube_fake import FakeApiServer

GATE = "aws-marketplace.amazonaws.com/entitled"


@pytest.fixture
def apiserver(tmp_path: Path) -> Iterator[FakeApiServer]:
    server = FakeApiServer(tmp_path)
    server.add_pod("shop", "product-0")
    server.project_uid("shop", "product-0")
    yield server
    server.close()


def launch_on_pod(launch: Launch, api: FakeApiServer, **env: str) -> Sidecar:
    """The sidecar as it runs in pod shop/product-0, with the in-cluster API variables."""
    return launch(
        MARKETPLACE_POD_NAME="product-0",
        MARKETPLACE_POD_NAMESPACE="shop",
        MARKETPLACE_SERVICEACCOUNT_DIR=str(api.sa_dir),
        KUBERNETES_SERVICE_HOST="127.0.0.1",
        KUBERNETES_SERVICE_PORT=str(api.port),
        **env,
    )


def launch_gated(launch: Launch, api: FakeApiServer, **env: str) -> Sidecar:
    return launch_on_pod(launch, api, MARKETPLACE_READINESS_GATE=GATE, **env)


def wait_condition(api: FakeApiServer, status: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cond = api.condition("shop", "product-0", GATE)
        if cond is not None and cond["status"] == status:
            return cond
        time.sleep(0.05)
    raise AssertionError(f"condition never became {status}: {api.requests[-3:]}")


def test_condition_goes_true_when_entitled(
    launch: Launch, emulator: Emulator, apiserver: FakeApiServer
) -> None:
    car = launch_gated(launch, apiserver)
    cond = wait_condition(apiserver, "True")
    assert cond["reason"] == "Entitled"
    patch = next(r for r in apiserver.requests if r["method"] == "PATCH")
    assert patch["path"] == "/api/v1/namespaces/shop/pods/product-0/status"
    assert patch["authorization"].lower() == "bearer sa-token"
    assert patch["content_type"] == "application/strategic-merge-patch+json"
    assert apiserver.condition("shop", "product-0", "Ready") is not None  # merged, not replaced
    gate = car.entitlement()["readiness_gate"]
    assert gate == {"applied": "True", "error": None, "consecutive_failures": 0}


def test_condition_is_false_with_reason_when_not_entitled(
    launch: Launch, emulator: Emulator, apiserver: FakeApiServer
) -> None:
    emulator.reconfigure({"entitled": False})
    launch_gated(launch, apiserver)
    cond = wait_condition(apiserver, "False")
    deadline = time.monotonic() + 10
    while cond["reason"] != "NotEntitled" and time.monotonic() < deadline:
        time.sleep(0.05)
        cond = apiserver.condition("shop", "product-0", GATE) or cond
    assert cond["reason"] == "NotEntitled"
    assert cond["message"].startswith("CustomerNotEntitledException: ")


def test_rbac_403_is_reported_retried_with_backoff_and_never_fatal(
    launch: Launch, emulator: Emulator, apiserver: FakeApiServer
) -> None:
    apiserver.forbid = True
    car = launch_gated(launch, apiserver)
    # The client now loads faster than registration completes: wait for both.
    doc = car.wait_for(
        lambda d: d["readiness_gate"]["consecutive_failures"] >= 2 and d["state"] != "registering",
        timeout=10,
    )
    assert "pods/status" in doc["readiness_gate"]["error"]
    assert doc["state"] == "entitled"  # entitlement itself is unaffected
    time.sleep(2)
    patches = [r for r in apiserver.requests if r["method"] == "PATCH"]
    assert len(patches) <= 5  # backoff, not a hot loop (1 s, 2 s, ... ceilings, jittered)
    assert car.get("/healthz").status_code == 200
    apiserver.forbid = False
    wait_condition(apiserver, "True", timeout=15)
    car.stop()
    logs = car.logs()
    assert logs.count("readiness_gate_failed") == 1  # logged once, not once per retry


def test_gate_config_errors_stop_before_binding() -> None:
    from tests.test_cli import cli

    env = {
        "PATH": "/usr/bin",
        "MARKETPLACE_PRODUCT_CODE": "p",
        "MARKETPLACE_PUBLIC_KEY": "x",
        "MARKETPLACE_READINESS_GATE": "entitled",
    }
    out = cli("run", env=env)
    assert out.returncode == 2
    assert "MARKETPLACE_READINESS_GATE: must be a domain-qualified condition type" in out.stderr
    env["MARKETPLACE_READINESS_GATE"] = GATE
    out = cli("run", env=env)
    assert "MARKETPLACE_POD_NAME and MARKETPLACE_POD_NAMESPACE are required" in out.stderr


def test_events_on_state_changes_only(
    launch: Launch, emulator: Emulator, apiserver: FakeApiServer
) -> None:
    car = launch_on_pod(
        launch,
        apiserver,
        MARKETPLACE_KUBE_EVENTS="true",
        MARKETPLACE_REGISTER_INTERVAL_SECONDS="1",
        MARKETPLACE_REGISTER_JITTER="0",
    )
    deadline = time.monotonic() + 10
    while not any(e["reason"] == "Entitled" for e in apiserver.events) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    emulator.reconfigure({"faults": [{"error": "InternalServiceErrorException", "rate": 1.0}]})
    car.wait_for(lambda d: d["state"] == "degraded", timeout=5)
    time.sleep(2.5)  # more failed re-registrations: same state, same code, no new Event
    reasons = [e["reason"] for e in apiserver.events]
    assert reasons[-2:] == ["Entitled", "Degraded"]
    assert reasons.count("Degraded") == 1
    degraded = apiserver.events[-1]
    assert degraded["type"] == "Warning"
    assert degraded["message"].startswith("InternalServiceErrorException — ")
    assert degraded["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "product-0",
        "namespace": "shop",
        "uid": FakeApiServer.uid("shop", "product-0"),  # from the downward-API file
    }
    assert degraded["source"] == {"component": "marketplace-sidecar"}
    assert car.entitlement()["events"]["error"] is None
    # The Role grants no `get pods`: the sidecar never reads its pod.
    assert [r for r in apiserver.requests if r["method"] == "GET"] == []


@pytest.mark.parametrize("content", [None, "not a uid!", "x" * 4096])
def test_events_without_a_usable_pod_uid_still_name_the_pod(
    launch: Launch, emulator: Emulator, apiserver: FakeApiServer, content: str | None
) -> None:
    uid_file = apiserver.sa_dir / "pod-uid"
    if content is None:
        uid_file.unlink()
    else:
        uid_file.write_text(content)
    car = launch_on_pod(launch, apiserver, MARKETPLACE_KUBE_EVENTS="true")
    deadline = time.monotonic() + 10
    while not apiserver.events and time.monotonic() < deadline:
        time.sleep(0.05)
    assert apiserver.events, apiserver.requests
    assert apiserver.events[0]["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "product-0",
        "namespace": "shop",
    }
    assert [r for r in apiserver.requests if r["method"] == "GET"] == []
    car.stop()
    assert car.logs().count("events_pod_uid_missing") == 1


def test_a_fifo_as_the_pod_uid_file_does_not_hang_events(
    launch: Launch, emulator: Emulator, apiserver: FakeApiServer
) -> None:
    import os

    uid_file = apiserver.sa_dir / "pod-uid"
    uid_file.unlink()
    os.mkfifo(uid_file)
    launch_on_pod(launch, apiserver, MARKETPLACE_KUBE_EVENTS="true")
    deadline = time.monotonic() + 10
    while not apiserver.events and time.monotonic() < deadline:
        time.sleep(0.05)
    assert apiserver.events and "uid" not in apiserver.events[0]["involvedObject"]


def test_events_forbidden_is_reported_not_fatal(
    launch: Launch, emulator: Emulator, apiserver: FakeApiServer
) -> None:
    apiserver.forbid = True
    emulator.reconfigure({"entitled": False})
    car = launch_on_pod(
        launch,
        apiserver,
        MARKETPLACE_KUBE_EVENTS="true",
    )
    doc = car.wait_for(
        lambda d: d["events"]["consecutive_failures"] >= 1 and d["state"] != "registering",
        timeout=10,
    )
    assert "events" in doc["events"]["error"] and doc["state"] == "not_entitled"
    assert car.get("/healthz").status_code == 200


def test_desired_condition_per_state() -> None:
    from sidecar.aws.errors import classify

    m = Entitlement()
    assert desired(m.snapshot())[:2] == ("False", "Registering")
    m.succeeded("t", {}, 1, None)
    assert desired(m.snapshot())[:2] == ("True", "Entitled")
    m.failed(classify("ThrottlingException", "x"), 2)
    assert desired(m.snapshot())[:2] == ("True", "Degraded")
