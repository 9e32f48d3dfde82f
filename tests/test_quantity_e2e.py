"""Issue 21's "done means": 0.1 posted ten times bills exactly 1, in custom mode and in SaaS mode
on SQLite and on PostgreSQL. The `run` process itself, AWS = the emulator over real HTTP, an
hour passing in 5 s on both clocks (the test-only time scale). Through floats, ten tenths are
0.9999999999999999: AWS would bill 0.999999 (or refuse a seventh decimal place)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.core import quantity as qty
from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import Sidecar, loopback_env, start_sidecar
from tests.test_usage_api import check

SCALE = 720.0  # an hour passes in 5 s


def _billed(records: list[dict[str, Any]]) -> int:
    return sum(int(r["quantity_micros"]) for r in records)


def _wait(read: Callable[[], list[dict[str, Any]]], micros: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 40
    records = read()
    while _billed(records) < micros and time.monotonic() < deadline:
        time.sleep(0.2)
        records = read()
    return records


def _post_tenths(car: Sidecar, who: dict[str, str]) -> None:
    for i in range(10):
        body = json.dumps({**who, "dimension": "scans", "id": f"tenth-{i}"})[:-1]
        body += ', "quantity": 0.1}'  # a JSON number, read from its text
        resp = requests.post(car.api + "/v1/usage", data=body.encode(), timeout=10)
        assert resp.status_code == 202, resp.text
        check("/v1/usage", "POST", resp)
        assert resp.json()["records"][0]["quantity"] == "0.1"
    again = requests.post(
        car.api + "/v1/usage",
        json={**who, "dimension": "scans", "id": "tenth-3", "quantity": "0.10"},
        timeout=10,
    )
    assert again.status_code == 200  # the same id, the same value: counted once


def test_ten_tenths_bill_exactly_one_in_custom_mode(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    origin = time.time()
    emulator.reconfigure({"time_scale": SCALE, "time_origin": origin})
    car = start_sidecar(
        loopback_env(
            emulator_server.url,
            MARKETPLACE_PRODUCT_CODE="prod-abc",
            MARKETPLACE_MODE="custom",
            MARKETPLACE_DIMENSIONS="scans",
            MARKETPLACE_STATE_DIR=str(tmp_path),
            MARKETPLACE_ENTITLEMENT_CHECK="none",
            MARKETPLACE_TEST_ONLY_TIME_SCALE=str(SCALE),
            MARKETPLACE_TEST_ONLY_TIME_ORIGIN=str(origin),
        )
    )
    try:
        _post_tenths(car, {})
        records = _wait(lambda: emulator.ledger()["records"], qty.SCALE)
        report = car.get("/v1/usage")
        check("/v1/usage", "GET", report)
    finally:
        assert car.stop() == 0
    assert _billed(records) == qty.SCALE  # exactly 1 unit, whatever hours it fell in
    assert all(r["dimension"] == "scans" for r in records)
    assert report.json()["totals"]["scans"]["accepted"] == 1
    assert emulator.ledger()["counts"].get("DuplicateRequestException", 0) == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_ten_tenths_bill_exactly_one_in_saas_mode(
    emulator_server: EmulatorServer,
    emulator: Emulator,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    origin = time.time()
    emulator.reconfigure({"time_scale": SCALE, "time_origin": origin})
    store = (
        {"MARKETPLACE_USAGE_DATABASE_URL": request.getfixturevalue("pg_url")}
        if backend == "postgresql"
        else {"MARKETPLACE_STATE_DIR": str(tmp_path)}
    )
    car = start_sidecar(
        loopback_env(
            emulator_server.url,
            MARKETPLACE_MODE="saas",
            MARKETPLACE_DIMENSIONS="scans",
            MARKETPLACE_PRODUCT_CODE="",
            MARKETPLACE_THROTTLE_SCHEDULE_SECONDS="",
            MARKETPLACE_ZERO_USAGE_RECORDS="false",
            MARKETPLACE_TEST_ONLY_TIME_SCALE=str(SCALE),
            MARKETPLACE_TEST_ONLY_TIME_ORIGIN=str(origin),
            **store,
        )
    )
    try:
        buyer = emulator.saas_customer(
            {"token_ttl_seconds": 10_000_000, "agreement_id": "agmt-e2e-0123456789"}
        )
        resolved = requests.post(
            car.api + "/v1/customers/resolve",
            json={"registration_token": buyer["registration_token"]},
            timeout=20,
        )
        assert resolved.status_code == 200, resolved.text
        check("/v1/customers/resolve", "POST", resolved)
        customer = resolved.json()
        assert customer["agreement_id"] == "agmt-e2e-0123456789"
        listed = car.get("/v1/customers")
        check("/v1/customers", "GET", listed)
        assert [c["agreement_id"] for c in listed.json()["customers"]] == ["agmt-e2e-0123456789"]
        one = car.get(f"/v1/customers/{customer['customer_aws_account_id']}")
        check("/v1/customers/{id}", "GET", one)
        assert one.json()["agreement_id"] == "agmt-e2e-0123456789"
        who = {
            "customer_aws_account_id": customer["customer_aws_account_id"],
            "license_arn": customer["license_arn"],
        }
        _post_tenths(car, who)
        records = _wait(lambda: emulator.saas_ledger()["records"], qty.SCALE)
        report = car.get("/v1/usage")
        check("/v1/usage", "GET", report)
    finally:
        assert car.stop() == 0
    assert _billed(records) == qty.SCALE
    assert {r["customer"] for r in records} == {customer["customer"]}
    assert report.json()["totals"]["scans"]["accepted"] == 1
    assert emulator.saas_ledger()["counts"]["duplicate_record"] == 0
