"""Every kind of response the API gives, checked against the shipped OpenAPI document."""

from __future__ import annotations

from importlib import resources
from typing import Any

import jsonschema
import pytest
import requests
import yaml

from sidecar.emulator.service import Emulator
from tests.helpers import Launch

SPEC: dict[str, Any] = yaml.safe_load(
    resources.files("sidecar").joinpath("openapi.yaml").read_text()
)


def check(path: str, method: str, resp: requests.Response) -> None:
    op = SPEC["paths"][path][method.lower()]
    declared = op["responses"].get(str(resp.status_code))
    assert declared is not None, f"{method} {path} answered undocumented {resp.status_code}"
    media = declared["content"]["application/json"]["schema"]
    schema = {**media, "components": SPEC["components"]}
    jsonschema.validate(resp.json(), schema, cls=jsonschema.Draft202012Validator)
    for header in declared.get("headers", {}):
        assert header in resp.headers


def test_spec_is_valid_openapi_shape() -> None:
    assert SPEC["openapi"].startswith("3.1")
    for schema in SPEC["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("setting", [{}, {"entitled": False}, {"token_fault": "tamper"}])
def test_state_endpoints_match_the_spec(
    launch: Launch, emulator: Emulator, setting: dict[str, Any]
) -> None:
    emulator.reconfigure(setting)
    car = launch()
    car.wait_for(lambda d: d["state"] != "registering")
    for path in ("/healthz", "/readyz", "/v1/entitlement"):
        check(path, "GET", car.get(path))
    probe = car.get("/readyz", probe=True)
    schema = {**SPEC["components"]["schemas"]["ProbeReady"], "components": SPEC["components"]}
    jsonschema.validate(probe.json(), schema, cls=jsonschema.Draft202012Validator)


def test_degraded_and_challenge_answers_match_the_spec(launch: Launch, emulator: Emulator) -> None:
    car = launch(MARKETPLACE_CHALLENGE_BURST="1", MARKETPLACE_CHALLENGE_DEADLINE_SECONDS="1")
    car.wait_for(lambda d: d["state"] == "entitled")
    url = car.api + "/v1/entitlement/challenge"
    first = requests.post(url, json={"nonce": "a"}, timeout=10)
    assert first.status_code == 200
    check("/v1/entitlement/challenge", "POST", first)
    limited = requests.post(url, json={"nonce": "b"}, timeout=10)
    assert limited.status_code == 429  # burst 1
    check("/v1/entitlement/challenge", "POST", limited)
    check("/v1/entitlement/challenge", "POST", requests.post(url, json={}, timeout=10))
    check("/v1/entitlement/challenge", "POST", requests.post(url, data="x" * 9000, timeout=10))
    emulator.reconfigure({"faults": [{"error": "InvalidRegionException", "rate": 1.0}]})
    import time

    time.sleep(1.1)
    failed = requests.post(url, json={"nonce": "c"}, timeout=10)
    assert failed.status_code == 502
    check("/v1/entitlement/challenge", "POST", failed)
    assert failed.json()["state"] == "degraded"
    check("/v1/entitlement", "GET", car.get("/v1/entitlement"))


def test_refused_challenge_after_a_terminal_verdict_matches_the_spec(
    launch: Launch, emulator: Emulator
) -> None:
    emulator.reconfigure({"entitled": False})
    car = launch()
    car.wait_for(lambda d: d["state"] == "not_entitled")
    resp = requests.post(car.api + "/v1/entitlement/challenge", json={"nonce": "n"}, timeout=10)
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "CustomerNotEntitledException"
    check("/v1/entitlement/challenge", "POST", resp)
    assert len(emulator.calls) == 1
