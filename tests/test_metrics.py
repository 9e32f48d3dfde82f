"""/metrics as Prometheus scrapes it: on the probe listener by default, or on a listener of its
own, or nowhere (MARKETPLACE_METRICS_LISTEN)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from sidecar import __version__
from sidecar.emulator.service import Emulator
from tests.helpers import ROOT, Launch, Sidecar, free_port, loopback_env


def scrape(car: Sidecar) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = car.get("/metrics", probe=True)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_after_an_entitled_start(launch: Launch, emulator: Emulator) -> None:
    emulator.reconfigure({"faults": [{"error": "ThrottlingException", "first": 2}]})
    car = launch()
    car.wait_for(lambda d: d["state"] == "entitled")
    requests.get(car.api + "/no/such/path", timeout=5)
    requests.post(car.api + "/v1/entitlement/challenge", json={"nonce": "n"}, timeout=10)
    m = scrape(car)
    assert m[("marketplace_entitlement_state", (("state", "entitled"),))] == 1
    assert m[("marketplace_entitlement_state", (("state", "registering"),))] == 0
    assert m[("marketplace_entitled", ())] == 1
    attempts = "marketplace_register_attempts_total"
    assert m[(attempts, (("code", "ThrottlingException"), ("result", "retryable_error")))] == 2
    assert m[(attempts, (("code", ""), ("result", "ok")))] == 2  # start + challenge
    assert m[("marketplace_challenges_total", (("result", "ok"),))] == 1
    requests_total = "marketplace_api_requests_total"
    assert m[(requests_total, (("listener", "api"), ("path", "other"), ("status", "404")))] == 1
    assert m[("marketplace_sidecar_build_info", (("version", __version__),))] == 1
    assert 0 <= m[("marketplace_last_registration_success_age_seconds", ())] < 60
    assert m[("marketplace_next_registration_timestamp_seconds", ())] > 1.7e9
    assert m[("process_resident_memory_bytes", ())] > 10e6


def test_verification_failures_by_reason(launch: Launch, emulator: Emulator) -> None:
    emulator.reconfigure({"token_fault": "wrong_nonce"})
    car = launch()
    car.wait_for(lambda d: d["state"] == "not_entitled")
    m = scrape(car)
    reason = (("reason", "nonce_mismatch"),)
    assert m[("marketplace_token_verification_failures_total", reason)] == 1
    assert m[("marketplace_entitlement_state", (("state", "not_entitled"),))] == 1


def test_unknown_error_codes_are_bounded(launch: Launch, emulator: Emulator) -> None:
    emulator.reconfigure({"faults": [{"error": "WeirdNewException", "first": 1}]})
    car = launch()
    car.wait_for(lambda d: d["state"] == "not_entitled")
    m = scrape(car)
    key = ("marketplace_register_attempts_total", (("code", "other"), ("result", "terminal_error")))
    assert m[key] == 1
    assert not any("WeirdNewException" in str(k) for k in m)


def test_metrics_are_only_on_the_probe_listener(launch: Launch) -> None:
    car = launch()
    assert requests.get(car.api + "/metrics", timeout=5).status_code == 404


def test_metrics_listen_off_serves_metrics_nowhere(launch: Launch) -> None:
    car = launch(MARKETPLACE_METRICS_LISTEN="off")
    car.wait_for(lambda d: d["state"] == "entitled")
    assert car.get("/metrics", probe=True).status_code == 404
    assert car.get("/metrics").status_code == 404
    assert car.get("/readyz", probe=True).status_code == 200  # the probes stay


def test_metrics_on_a_listener_of_their_own(launch: Launch) -> None:
    port = free_port()
    car = launch(MARKETPLACE_METRICS_LISTEN=f"127.0.0.1:{port}")
    car.wait_for(lambda d: d["state"] == "entitled")
    own = f"http://127.0.0.1:{port}"
    resp = requests.get(own + "/metrics", timeout=5)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    assert "marketplace_entitled 1.0" in resp.text
    assert requests.get(own + "/readyz", timeout=5).status_code == 404  # metrics only
    assert car.get("/metrics", probe=True).status_code == 404  # moved, not copied
    assert car.get("/readyz", probe=True).status_code == 200


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("everywhere", "must be probe (served on MARKETPLACE_PROBE_LISTEN), off, or a host:port"),
        ("[::1]", "must be probe"),
        ("SAME", "MARKETPLACE_METRICS_LISTEN must differ from MARKETPLACE_LISTEN"),
    ],
)
def test_a_bad_metrics_listen_exits_2_before_binding(value: str, expected: str) -> None:
    port = free_port()
    probe = f"127.0.0.1:{port}"
    env = loopback_env(
        "http://127.0.0.1:9",
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_PUBLIC_KEY="unused: the settings fail first",
        MARKETPLACE_PROBE_LISTEN=probe,
        MARKETPLACE_METRICS_LISTEN=probe if value == "SAME" else value,
    )
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr
    assert all(line.startswith("config error: ") for line in out.stderr.strip().splitlines())
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing was bound
