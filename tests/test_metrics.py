"""/metrics on the probe listener, as Prometheus scrapes it."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

from sidecar.emulator.service import Emulator
from tests.helpers import Launch, Sidecar


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
    assert m[("marketplace_sidecar_build_info", (("version", "0.1.0"),))] == 1
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
