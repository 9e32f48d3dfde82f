"""Fault matrix: the real `run` process against the emulator's fault injection, at start and
during re-registration. For each fault: the state and /readyz a user sees, the process stays
up, the error surfaced is the real one, and the call rate stays bounded (backoff backs off)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import Launch, Sidecar, free_port

STORM_SECONDS = 1.5
# A hot loop would make hundreds of calls in the storm; backoff (base 0.05 s, cap 0.2 s,
# throttle slots 0.1/0.2/0.3 s in tests) allows at most a few dozen.
MAX_CALLS_IN_STORM = 40

START_FAULTS = [
    pytest.param(
        {"faults": [{"error": "ThrottlingException", "rate": 1.0}]},
        "ThrottlingException",
        {},
        id="throttling-storm",
    ),
    pytest.param(
        {"faults": [{"error": "InternalServiceErrorException", "rate": 1.0}]},
        "InternalServiceErrorException",
        {},
        id="5xx-burst",
    ),
    pytest.param(
        {"faults": [{"error": "ConnectionReset", "rate": 1.0}]},
        "ConnectionClosedError",
        {},
        id="connection-resets",
    ),
    pytest.param(
        {"latency": 1.0},
        "ReadTimeoutError",
        {"MARKETPLACE_AWS_TIMEOUT_SECONDS": "0.3", "MARKETPLACE_FIRST_CALL_TIMEOUT_SECONDS": "0.3"},
        id="slow-beyond-timeout",
    ),
]


def calls_during(emulator: Emulator, seconds: float) -> int:
    before = len(emulator.calls)
    time.sleep(seconds)
    return len(emulator.calls) - before


def healthy_and_alive(car: Sidecar) -> None:
    assert car.proc.poll() is None
    assert car.get("/healthz", probe=True).status_code == 200


@pytest.mark.parametrize(("fault", "code", "env"), START_FAULTS)
def test_fault_at_start_keeps_registering_then_recovers(
    launch: Launch, emulator: Emulator, fault: dict[str, Any], code: str, env: dict[str, str]
) -> None:
    emulator.reconfigure(fault)
    car = launch(**env)
    doc = car.wait_for(lambda d: d["consecutive_failures"] >= 1)
    assert doc["state"] == "registering"
    assert doc["error"]["code"] == code and doc["error"]["retryable"] is True
    ready = car.get("/readyz", probe=True)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == code
    assert calls_during(emulator, STORM_SECONDS) <= MAX_CALLS_IN_STORM
    healthy_and_alive(car)
    emulator.reconfigure({"faults": [], "latency": 0.0})
    car.wait_for(lambda d: d["state"] == "entitled", timeout=15)
    assert car.get("/readyz", probe=True).status_code == 200


@pytest.mark.parametrize(("fault", "code", "env"), START_FAULTS)
def test_fault_during_reregistration_is_degraded_never_revoked(
    launch: Launch, emulator: Emulator, fault: dict[str, Any], code: str, env: dict[str, str]
) -> None:
    car = launch(MARKETPLACE_REGISTER_INTERVAL_SECONDS="1", MARKETPLACE_REGISTER_JITTER="0", **env)
    car.wait_for(lambda d: d["state"] == "entitled")
    emulator.reconfigure(fault)
    doc = car.wait_for(lambda d: d["state"] == "degraded", timeout=10)
    assert doc["error"]["code"] == code and doc["entitled"] is True and doc["token"]
    assert car.get("/readyz", probe=True).status_code == 200
    assert calls_during(emulator, STORM_SECONDS) <= MAX_CALLS_IN_STORM
    healthy_and_alive(car)
    emulator.reconfigure({"faults": [], "latency": 0.0})
    car.wait_for(lambda d: d["state"] == "entitled" and d["consecutive_failures"] == 0, timeout=15)


@pytest.mark.parametrize(
    "code",
    [
        "AccessDeniedException",
        "CustomerNotEntitledException",
        "DisabledApiException",
        "InvalidRegionException",
    ],
)
def test_terminal_errors_during_reregistration_are_degraded(
    launch: Launch, emulator: Emulator, code: str
) -> None:
    car = launch(MARKETPLACE_REGISTER_INTERVAL_SECONDS="1", MARKETPLACE_REGISTER_JITTER="0")
    car.wait_for(lambda d: d["state"] == "entitled")
    emulator.reconfigure({"faults": [{"error": code, "rate": 1.0}]})
    doc = car.wait_for(lambda d: d["state"] == "degraded", timeout=10)
    assert doc["error"]["code"] == code and doc["error"]["retryable"] is False
    assert car.get("/readyz", probe=True).status_code == 200
    # Terminal errors are not retried early: one call per interval.
    assert calls_during(emulator, 2.2) <= 3
    healthy_and_alive(car)


@pytest.mark.parametrize("code", ["DisabledApiException", "ValidationException"])
def test_other_terminal_errors_at_start(launch: Launch, emulator: Emulator, code: str) -> None:
    emulator.reconfigure({"faults": [{"error": code, "first": 1}]})
    car = launch()
    doc = car.wait_for(lambda d: d["state"] == "not_entitled")
    assert doc["error"]["code"] == code
    assert car.get("/readyz", probe=True).status_code == 503
    healthy_and_alive(car)


@pytest.fixture
def own_port(emulator: Emulator) -> int:
    """A port where the test decides when the Metering endpoint is up."""
    return free_port()


def test_endpoint_down_at_start_then_up(launch: Launch, emulator: Emulator, own_port: int) -> None:
    car = launch(AWS_ENDPOINT_URL_MARKETPLACE_METERING=f"http://127.0.0.1:{own_port}")
    doc = car.wait_for(lambda d: d["consecutive_failures"] >= 2)
    assert doc["state"] == "registering" and doc["error"]["code"] == "EndpointConnectionError"
    healthy_and_alive(car)
    server = EmulatorServer(emulator, port=own_port).start()
    try:
        car.wait_for(lambda d: d["state"] == "entitled", timeout=15)
    finally:
        server.shutdown()
        server.server_close()


def test_endpoint_going_down_after_start_is_degraded(
    launch: Launch, emulator: Emulator, own_port: int
) -> None:
    server = EmulatorServer(emulator, port=own_port).start()
    car = launch(
        AWS_ENDPOINT_URL_MARKETPLACE_METERING=f"http://127.0.0.1:{own_port}",
        MARKETPLACE_REGISTER_INTERVAL_SECONDS="1",
        MARKETPLACE_REGISTER_JITTER="0",
    )
    car.wait_for(lambda d: d["state"] == "entitled")
    server.shutdown()
    server.server_close()  # no new connections; reset the kept-alive one too
    emulator.reconfigure({"faults": [{"error": "ConnectionReset", "rate": 1.0}]})
    doc = car.wait_for(lambda d: d["state"] == "degraded", timeout=10)
    assert doc["error"]["code"] in ("EndpointConnectionError", "ConnectionClosedError")
    assert car.get("/readyz", probe=True).status_code == 200
    healthy_and_alive(car)
