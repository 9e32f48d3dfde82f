"""examples/saas-registration: AWS's form POST -> the example handler -> the sidecar ->
ResolveCustomer on the emulator, with a real browser-shaped form POST over loopback."""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import ROOT, Sidecar, loopback_env, start_sidecar

EXAMPLE = ROOT / "examples" / "saas-registration" / "register.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("saas_registration_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def saas_sidecar(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> Iterator[Sidecar]:
    env = loopback_env(
        emulator_server.url,
        MARKETPLACE_MODE="saas",
        MARKETPLACE_DIMENSIONS="users",
        MARKETPLACE_STATE_DIR=str(tmp_path),
        MARKETPLACE_THROTTLE_SCHEDULE_SECONDS="",
        MARKETPLACE_PRODUCT_CODE="",
    )
    car = start_sidecar(env)
    yield car
    car.stop()


@pytest.fixture
def handler(saas_sidecar: Sidecar) -> Iterator[tuple[str, list[Any]]]:
    """The example's server, in this process, pointed at the sidecar; its `registered` hook
    records what it was given."""
    example = load_example()
    seen: list[Any] = []

    def registered(customer: dict[str, Any], free_trial: bool) -> str | None:
        seen.append((customer, free_trial))
        return None

    server = example.RegistrationServer(("127.0.0.1", 0), saas_sidecar.api, registered)
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", seen
    server.shutdown()
    server.server_close()


def test_a_buyer_form_post_registers_the_customer_through_the_sidecar(
    handler: tuple[str, list[Any]], saas_sidecar: Sidecar, emulator: Emulator
) -> None:
    url, seen = handler
    buyer = emulator.saas_customer({"customer_aws_account_id": "444455556666"})
    r = requests.post(
        url,
        data={
            "x-amzn-marketplace-token": buyer["registration_token"],
            "x-amzn-marketplace-offer-type": "free-trial",
        },
        allow_redirects=False,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert "444455556666 is registered" in r.text and "free trial" in r.text
    assert seen[0][1] is True and seen[0][0]["license_arn"] == buyer["license_arn"]
    customers = saas_sidecar.get("/v1/customers").json()["customers"]
    assert [c["customer_aws_account_id"] for c in customers] == ["444455556666"]
    # The browser posts again (back button, double click): answered from the store.
    again = requests.post(
        url, data={"x-amzn-marketplace-token": buyer["registration_token"]}, timeout=30
    )
    assert again.status_code == 200 and "free trial" not in again.text
    assert seen[1][0]["from_store"] is True


def test_the_handler_redirects_when_the_product_says_where(
    saas_sidecar: Sidecar, emulator: Emulator
) -> None:
    example = load_example()
    server = example.RegistrationServer(
        ("127.0.0.1", 0), saas_sidecar.api, lambda customer, trial: "/welcome?session=s1"
    )
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    try:
        buyer = emulator.saas_customer({})
        r = requests.post(
            f"http://127.0.0.1:{server.server_address[1]}/",
            data={"x-amzn-marketplace-token": buyer["registration_token"]},
            allow_redirects=False,
            timeout=30,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert r.status_code == 303 and r.headers["Location"] == "/welcome?session=s1"


@pytest.mark.parametrize(
    ("form", "status", "words"),
    [
        ({"x-amzn-marketplace-token": "forged-token"}, 400, "not valid"),
        ({"x-amzn-marketplace-offer-type": "free-trial"}, 400, "incomplete"),
        ({"x-amzn-marketplace-token": ["a", "b"]}, 400, "incomplete"),
        ({"x-amzn-marketplace-token": "<script>alert(1)</script>"}, 400, "not valid"),
    ],
)
def test_bad_forms_get_a_page_for_the_buyer_and_register_nobody(
    handler: tuple[str, list[Any]],
    saas_sidecar: Sidecar,
    form: dict[str, Any],
    status: int,
    words: str,
) -> None:
    url, seen = handler
    r = requests.post(url, data=form, timeout=30)
    assert r.status_code == status and words in r.text
    assert "<script>" not in r.text
    assert seen == [] and saas_sidecar.get("/v1/customers").json()["customers"] == []


def test_an_expired_token_tells_the_buyer_to_start_again(
    handler: tuple[str, list[Any]], emulator: Emulator
) -> None:
    url, _ = handler
    late = emulator.saas_customer({"token_ttl_seconds": 0.001})
    time.sleep(0.05)
    r = requests.post(
        url, data={"x-amzn-marketplace-token": late["registration_token"]}, timeout=30
    )
    assert r.status_code == 410 and "expired" in r.text


def test_not_a_form_and_get_are_refused(handler: tuple[str, list[Any]]) -> None:
    url, seen = handler
    r = requests.post(url, json={"x-amzn-marketplace-token": "t"}, timeout=10)
    assert r.status_code == 415
    r = requests.get(url, timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    r = requests.post(
        url,
        data="x" * 20000,
        timeout=10,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 413
    assert seen == []
