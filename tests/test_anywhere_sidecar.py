"""The whole sidecar off AWS: contract mode with a license token and a role, no AWS credentials.

`marketplace-sidecar run` as a process, its License Manager the emulator's (GetAccessToken and
CheckoutLicense over real HTTP), its STS moto's server: the pod is ready only once the token
was exchanged and the role assumed, and a token License Manager refuses keeps it unready.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests

from sidecar.emulator.service import EmulatorServer
from tests.helpers import Sidecar, loopback_env, start_sidecar
from tests.metadata_fake import MotoSts

SKU = "prod-sku-anywhere"
ROLE = "arn:aws:iam::111122223333:role/AWSLicenseManagerConsumptionRole"


def emulator_post(server: EmulatorServer, action: str, spec: dict[str, Any]) -> dict[str, Any]:
    resp = requests.post(f"{server.url}/_emulator/license/{action}", json=spec, timeout=5)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def anywhere_sidecar(server: EmulatorServer, sts: MotoSts, token_file: Path) -> Sidecar:
    env = loopback_env(
        server.url,
        MARKETPLACE_MODE="contract",
        MARKETPLACE_PRODUCT_CODE="",
        MARKETPLACE_THROTTLE_SCHEDULE_SECONDS="",
        MARKETPLACE_LICENSE_PRODUCT_SKU=SKU,
        MARKETPLACE_LICENSE_ENTITLEMENTS='[{"name": "PremiumTier", "unit": "None"}]',
        MARKETPLACE_LICENSE_TOKEN_FILE=str(token_file),
        MARKETPLACE_LICENSE_ROLE_ARN=ROLE,
        AWS_ENDPOINT_URL_LICENSE_MANAGER=server.url,
        AWS_ENDPOINT_URL_STS=sts.url,
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name)  # off AWS there are none: the license token is the only identity
    return start_sidecar(env)


def stopped_logs(car: Sidecar) -> str:
    """The sidecar's stderr, whole: read after it exits (reading before would block)."""
    car.stop()
    return car.logs()


def wait_ready(car: Sidecar, seconds: float = 30) -> requests.Response:
    deadline = time.monotonic() + seconds
    while True:
        resp = car.get("/readyz", probe=True)
        if resp.status_code == 200 or time.monotonic() > deadline:
            return resp
        time.sleep(0.1)


def test_a_license_token_and_role_make_the_pod_ready_without_aws_credentials(
    emulator_server: EmulatorServer, sts: MotoSts, tmp_path: Path
) -> None:
    license_arn = emulator_post(
        emulator_server,
        "licenses",
        {"sku": SKU, "entitlements": [{"name": "PremiumTier", "unit": "None"}]},
    )["license_arn"]
    token = emulator_post(
        emulator_server, "tokens", {"license_arn": license_arn, "role_arns": [ROLE]}
    )
    token_file = tmp_path / "license_token"
    token_file.write_text(token["token"] + "\n")
    car = anywhere_sidecar(emulator_server, sts, token_file)
    try:
        resp = wait_ready(car)
        logs = stopped_logs(car)
        assert resp.status_code == 200, (resp.text, logs)
        [assumed] = sts.assumed()
        assert assumed.role_arn == ROLE
        assert assumed.session_name.startswith("marketplace-sidecar")
        assert token["token"] not in logs
    finally:
        car.stop()


def test_a_refused_token_keeps_the_pod_unready_until_the_secret_is_rotated(
    emulator_server: EmulatorServer, sts: MotoSts, tmp_path: Path
) -> None:
    """Unready with the reason while License Manager refuses the token; the buyer's new token
    (the Secret updated, the file swapped) makes the same pod ready, without a restart."""
    license_arn = emulator_post(
        emulator_server,
        "licenses",
        {"sku": SKU, "entitlements": [{"name": "PremiumTier", "unit": "None"}]},
    )["license_arn"]
    token_file = tmp_path / "license_token"
    forged = "eyJhbGciOiJQUzI1NiJ9.eyJhdWQiOiJmb3JnZWQifQ.c2lnbmF0dXJl"
    token_file.write_text(forged)
    car = anywhere_sidecar(emulator_server, sts, token_file)
    try:
        deadline = time.monotonic() + 20
        while True:
            resp = car.get("/readyz", probe=True)
            if "LicenseTokenRejectedError" in resp.text or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert resp.status_code == 503, resp.text
        assert "LicenseTokenRejectedError" in resp.text, resp.text
        assert sts.assumed() == []
        assert forged not in resp.text
        good = emulator_post(
            emulator_server, "tokens", {"license_arn": license_arn, "role_arns": [ROLE]}
        )["token"]
        fresh = tmp_path / "license_token.new"
        fresh.write_text(good)
        fresh.replace(token_file)  # as the kubelet swaps a Secret volume: atomically
        ready = wait_ready(car)
        logs = stopped_logs(car)
        assert ready.status_code == 200, (ready.text, logs)
        assert [a.role_arn for a in sts.assumed()] == [ROLE]
        assert forged not in logs and good not in logs
    finally:
        car.stop()
