"""The emulator's License Manager, through unmodified boto3 over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from sidecar.emulator.license_manager import MARKETPLACE_FINGERPRINT
from sidecar.emulator.service import Emulator, EmulatorServer

SKU = "prod-sku-1"


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    srv = EmulatorServer(Emulator()).start()
    yield srv
    srv.shutdown()


@pytest.fixture
def lm(server: EmulatorServer) -> Any:
    requests.post(f"{server.url}/_emulator/license/reset", json={}, timeout=5)
    return boto3.client(
        "license-manager",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=Config(retries={"total_max_attempts": 1}),
    )


def post(server: EmulatorServer, action: str, body: dict[str, Any]) -> Any:
    r = requests.post(f"{server.url}/_emulator/license/{action}", json=body, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def in_use(server: EmulatorServer) -> dict[str, int]:
    state = requests.get(f"{server.url}/_emulator/license/state", timeout=5).json()
    found: dict[str, int] = state["licenses"][SKU]["in_use"]
    return found


def checkout(lm: Any, token: str, seats: int = 1, kind: str = "PROVISIONAL") -> dict[str, Any]:
    resp: dict[str, Any] = lm.checkout_license(
        ProductSKU=SKU,
        CheckoutType=kind,
        KeyFingerprint=MARKETPLACE_FINGERPRINT,
        Entitlements=[{"Name": "Seats", "Unit": "Count", "Value": str(seats)}],
        ClientToken=token,
    )
    return resp


def seats(server: EmulatorServer, n: int) -> None:
    post(
        server,
        "licenses",
        {"sku": SKU, "entitlements": [{"name": "Seats", "unit": "Count", "max": n}]},
    )


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_floating_seats_consume_and_return(lm: Any, server: EmulatorServer) -> None:
    seats(server, 2)
    a = checkout(lm, "a")
    assert a["EntitlementsAllowed"] == [{"Name": "Seats", "Unit": "Count", "Value": "1"}]
    assert isinstance(a["Expiration"], str) and a["Expiration"].endswith("Z")
    checkout(lm, "b")
    with pytest.raises(ClientError) as exc:
        checkout(lm, "c")  # the last seat is gone
    assert code(exc) == "NoEntitlementsAllowedException"
    lm.check_in_license(LicenseConsumptionToken=a["LicenseConsumptionToken"])
    assert in_use(server) == {"Seats": 1}
    checkout(lm, "d")
    with pytest.raises(ClientError) as exc:
        lm.check_in_license(LicenseConsumptionToken=a["LicenseConsumptionToken"])
    assert code(exc) == "ResourceNotFoundException"


def test_client_token_makes_a_retry_the_same_checkout(lm: Any, server: EmulatorServer) -> None:
    seats(server, 1)
    first = checkout(lm, "same")
    again = checkout(lm, "same")
    assert again["LicenseConsumptionToken"] == first["LicenseConsumptionToken"]
    assert in_use(server) == {"Seats": 1}
    with pytest.raises(ClientError) as exc:
        checkout(lm, "same", seats=2)
    assert code(exc) == "ValidationException"


def test_unextended_provisional_checkout_returns_at_expiry(lm: Any, server: EmulatorServer) -> None:
    from sidecar.emulator.license_manager import book

    seats(server, 1)
    b = book(server.emulator)
    now = [1_000_000.0]
    b.clock = lambda: now[0]
    try:
        a = checkout(lm, "a")
        now[0] += 1800
        extended = lm.extend_license_consumption(
            LicenseConsumptionToken=a["LicenseConsumptionToken"]
        )
        assert extended["Expiration"] > a["Expiration"]
        now[0] += 3599
        assert in_use(server) == {"Seats": 1}
        now[0] += 2
        assert in_use(server) == {}
        with pytest.raises(ClientError) as exc:
            lm.extend_license_consumption(LicenseConsumptionToken=a["LicenseConsumptionToken"])
        assert code(exc) == "ResourceNotFoundException"
    finally:
        b.clock = __import__("time").time


def test_perpetual_checkout_draws_down_for_good(lm: Any, server: EmulatorServer) -> None:
    seats(server, 3)
    a = checkout(lm, "a", seats=2, kind="PERPETUAL")
    lm.check_in_license(LicenseConsumptionToken=a["LicenseConsumptionToken"])
    with pytest.raises(ClientError) as exc:
        checkout(lm, "b", seats=2, kind="PERPETUAL")
    assert code(exc) == "NoEntitlementsAllowedException"
    checkout(lm, "c", seats=1, kind="PERPETUAL")


def test_tiers_answer_the_one_bought_and_foreign_issuers_get_nothing(
    lm: Any, server: EmulatorServer
) -> None:
    post(server, "licenses", {"sku": SKU, "entitlements": [{"name": "Premium", "unit": "None"}]})
    tiers = [{"Name": n, "Unit": "None"} for n in ("Basic", "Premium")]
    resp = lm.checkout_license(
        ProductSKU=SKU,
        CheckoutType="PROVISIONAL",
        KeyFingerprint=MARKETPLACE_FINGERPRINT,
        Entitlements=tiers,
        ClientToken="t",
    )
    assert resp["EntitlementsAllowed"] == [{"Name": "Premium", "Unit": "None"}]
    with pytest.raises(ClientError) as exc:
        lm.checkout_license(
            ProductSKU=SKU,
            CheckoutType="PROVISIONAL",
            KeyFingerprint="aws:111111111111:someone:issuer-fingerprint",
            Entitlements=tiers,
            ClientToken="u",
        )
    assert code(exc) == "NoEntitlementsAllowedException"


def test_revoked_or_reduced_licenses(lm: Any, server: EmulatorServer) -> None:
    seats(server, 2)
    a = checkout(lm, "a")
    post(server, "change", {"sku": SKU, "name": "Seats", "max": 1})
    with pytest.raises(ClientError) as exc:
        checkout(lm, "b")
    assert code(exc) == "NoEntitlementsAllowedException"
    post(server, "change", {"sku": SKU, "name": "Seats", "max": 5, "expires_in": -1})
    with pytest.raises(ClientError) as exc:  # the contract ended
        checkout(lm, "c")
    assert code(exc) == "NoEntitlementsAllowedException"
    post(server, "change", {"sku": SKU, "revoke": True})
    with pytest.raises(ClientError) as exc:
        lm.extend_license_consumption(LicenseConsumptionToken=a["LicenseConsumptionToken"])
    assert code(exc) == "ResourceNotFoundException"


def test_faults_and_model_validation(lm: Any, server: EmulatorServer) -> None:
    seats(server, 1)
    post(server, "config", {"faults": [{"error": "ServerInternalException", "first": 1}]})
    with pytest.raises(ClientError) as exc:
        checkout(lm, "a")
    assert code(exc) == "ServerInternalException"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    checkout(lm, "a")
    with pytest.raises(ClientError) as exc:  # ClientToken's pattern \S+, matched whole
        checkout(lm, "has space")
    assert code(exc) == "ValidationException"


def test_get_access_token_exchanges_a_license_token(lm: Any, server: EmulatorServer) -> None:
    arn = post(server, "licenses", {"sku": SKU, "entitlements": [{"name": "P", "unit": "None"}]})[
        "license_arn"
    ]
    token = post(
        server,
        "tokens",
        {"license_arn": arn, "role_arns": ["arn:aws:iam::123456789012:role/r"]},
    )["token"]
    access = lm.get_access_token(Token=token)["AccessToken"]
    import jwt

    claims = jwt.decode(access, options={"verify_signature": False})
    assert claims["aud"] == arn and claims["exp"] - claims["iat"] == 3600
    with pytest.raises(ClientError) as exc:
        lm.get_access_token(Token="not-a-token")
    assert code(exc) == "AuthorizationException"
    with pytest.raises(ClientError) as exc:
        lm.get_access_token(Token=token, TokenProperties=["unknown"])
    assert code(exc) == "ValidationException"


def test_botocore_debug_records_never_carry_the_consumption_token(
    server: EmulatorServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon keeps botocore at WARNING; if someone lowers it, bodies are still dropped."""
    import logging

    from sidecar.aws.license import LicenseGateway

    requests.post(f"{server.url}/_emulator/license/reset", json={}, timeout=5)
    seats(server, 1)
    monkeypatch.setenv("AWS_ENDPOINT_URL_LICENSE_MANAGER", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    gateway = LicenseGateway("us-east-1", 5.0)
    # caplog.at_level restores the botocore logger's level afterwards: left at DEBUG, later
    # tests in this worker would log every request body they send.
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="botocore"):
        got = gateway.checkout(
            SKU,
            MARKETPLACE_FINGERPRINT,
            ({"Name": "Seats", "Unit": "Count", "Value": "1"},),
            "PROVISIONAL",
            "t1",
        )
        gateway.extend(got.consumption_token)
        gateway.checkin(got.consumption_token)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "botocore" in " ".join(r.name for r in caplog.records)  # it did log at DEBUG
    assert got.consumption_token not in text
