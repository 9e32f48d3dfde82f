"""The local API under hostile clients: schema-driven fuzzing (schemathesis, from the shipped
OpenAPI document), and many idle or slow connections while kubelet-style probes keep answering.
Bounded in count and time; loopback only."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import requests

from tests.helpers import Launch, Sidecar

SPEC = Path(str(resources.files("sidecar").joinpath("openapi.yaml")))


def test_schemathesis_finds_no_5xx_and_no_schema_violation(launch: Launch) -> None:
    car = launch(MARKETPLACE_CHALLENGE_BURST="20", MARKETPLACE_CHALLENGE_RATE_PER_SECOND="5")
    car.wait_for(lambda d: d["state"] == "entitled")
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is a dev dependency"
    out = subprocess.run(
        [
            st,
            "run",
            str(SPEC),
            "--url",
            car.api,
            "--checks",
            "all",
            "--max-examples",
            "60",
            "--seed",
            "20261126",
            "--request-timeout",
            "10",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-4000:]
    # Hourly mode answers /v1/usage with a 404 (usage needs custom mode); schemathesis warns.
    assert "Failures:" not in out.stdout
    assert car.get("/healthz").status_code == 200  # and the sidecar is still fine


def _probe_latency(car: Sidecar) -> float:
    started = time.monotonic()
    assert requests.get(car.probe + "/readyz", timeout=1).status_code == 200
    return time.monotonic() - started


def test_slowloris_on_both_listeners_does_not_starve_probes(launch: Launch) -> None:
    car = launch()
    car.wait_for(lambda d: d["state"] == "entitled")
    held: list[socket.socket] = []
    try:
        for url, count in ((car.api, 60), (car.probe, 25)):
            host, port = url.removeprefix("http://").split(":")
            for _ in range(count):
                s = socket.create_connection((host, int(port)))
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never ends
                held.append(s)
        for _ in range(10):  # kubelet: one connection per probe, 1 s timeout
            assert _probe_latency(car) < 1.0
            time.sleep(0.1)
    finally:
        for s in held:
            s.close()


def test_huge_header_and_body_are_refused_cleanly(launch: Launch) -> None:
    car = launch()
    r = requests.get(car.api + "/healthz", headers={"X-Big": "a" * 70_000}, timeout=5)
    assert r.status_code in (400, 431)
    r = requests.post(car.api + "/v1/entitlement/challenge", data=b"{" * 1_000_000, timeout=10)
    assert r.status_code == 413
    assert car.get("/healthz").status_code == 200
