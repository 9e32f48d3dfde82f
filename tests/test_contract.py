"""Contract mode end to end: a real `run` process, boto3 over real HTTP to the emulator's
License Manager. Each test grants (or withholds) a license and watches what the pod does."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.emulator.license_manager import book
from sidecar.emulator.service import Emulator, EmulatorServer
from tests.contract_kit import SEATS, SKU, TIER, LicenseApi, Pod, license_api
from tests.helpers import ROOT, free_port, loopback_env


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    srv = EmulatorServer(Emulator()).start()
    yield srv
    srv.shutdown()


@pytest.fixture
def lm(server: EmulatorServer) -> LicenseApi:
    """The emulator's License Manager test API, reset before each test."""
    return license_api(server.url)


def state(server: EmulatorServer) -> dict[str, Any]:
    body: dict[str, Any] = requests.get(f"{server.url}/_emulator/license/state", timeout=5).json()
    return body


def calls(server: EmulatorServer, op: str) -> list[dict[str, Any]]:
    return [c for c in state(server)["calls"] if c["op"] == op]


@pytest.fixture
def pod(server: EmulatorServer, tmp_path: Path) -> Iterator[Callable[..., Pod]]:
    pods: list[Pod] = []

    def start(entitlements: list[dict[str, Any]] = TIER, **env: str) -> Pod:
        base = loopback_env(
            server.url,
            AWS_ENDPOINT_URL_LICENSE_MANAGER=env.pop("endpoint", server.url),
            MARKETPLACE_LICENSE_ENTITLEMENTS=json.dumps(entitlements),
        )
        base.update(env)
        p = Pod(base, tmp_path / f"pod{len(pods)}.log")
        pods.append(p)
        return p

    yield start
    for p in pods:
        p.stop()


def grant(lm: Callable[[str, dict[str, Any]], Any], seats: int | None = 2) -> str:
    ents: list[dict[str, Any]] = [{"name": "PremiumTier", "unit": "None"}]
    ents.append({"name": "Seats", "unit": "Count", "max": seats})
    arn: str = lm("licenses", {"sku": SKU, "entitlements": ents})["license_arn"]
    return arn


def checked_out(doc: dict[str, Any]) -> bool:
    return bool(doc["state"] == "checked_out")


def test_entitled_start_serves_the_license(lm: Any, pod: Any, server: EmulatorServer) -> None:
    arn = grant(lm)
    p = pod(SEATS)
    doc = p.wait(checked_out)
    assert doc["entitled"] and doc["ready"] and doc["license_arn"] == arn
    assert doc["entitlements_allowed"] == [{"Name": "Seats", "Unit": "Count", "Value": "1"}]
    assert 3500 < doc["expires_in_seconds"] <= 3600
    assert doc["signed_token"]["verified"] is False and doc["signed_token"]["present"]
    assert p.get("/readyz").status_code == 200
    assert p.get("/readyz", probe=True).json() == {"ready": True, "state": "checked_out"}
    assert state(server)["licenses"][SKU]["in_use"] == {"Seats": 1}


def test_no_license_is_not_entitled_without_retry_storm(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    p = pod()
    doc = p.wait(lambda d: d["state"] == "not_entitled")
    assert not doc["ready"] and doc["error"]["code"] == "NoEntitlementsAllowedException"
    assert p.get("/readyz").status_code == 503
    assert p.get("/readyz", probe=True).json()["error"] == {
        "code": "NoEntitlementsAllowedException"
    }
    for _ in range(20):  # final for this start: no second call while we watch (1 s)
        assert len(calls(server, "CheckoutLicense")) == 1
        time.sleep(0.05)


def test_throttled_then_ok_retries_one_idempotent_request(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    grant(lm)
    lm("config", {"faults": [{"error": "RateLimitExceededException", "first": 3}]})
    p = pod(SEATS)
    p.wait(checked_out)
    tried = calls(server, "CheckoutLicense")
    assert [c["code"] for c in tried] == ["RateLimitExceededException"] * 3 + ["ok"]
    assert len({c["client_token"] for c in tried}) == 1  # every retry is the same request
    assert state(server)["licenses"][SKU]["in_use"] == {"Seats": 1}


def test_lost_answer_retried_with_the_same_token_consumes_once(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    """The answer is lost after AWS consumed the seat; the retry must not take a second."""
    grant(lm, seats=1)
    emulator = server.emulator
    b = book(emulator)
    real = b._checkout
    dropped: list[bool] = []

    def consume_then_drop(params: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        status, payload = real(params)
        if not dropped:
            dropped.append(True)
            return 0, None  # AWS has the checkout; the caller never hears of it
        return status, payload

    b._checkout = consume_then_drop  # type: ignore[method-assign,assignment]
    p = pod(SEATS)
    p.wait(checked_out)
    assert state(server)["licenses"][SKU]["in_use"] == {"Seats": 1}
    assert len({c["client_token"] for c in calls(server, "CheckoutLicense")}) == 1


def test_license_manager_down_past_the_deadline_is_unavailable(lm: Any, pod: Any) -> None:
    p = pod(endpoint=f"http://127.0.0.1:{free_port()}", MARKETPLACE_REGISTER_DEADLINE_SECONDS="1")
    doc = p.wait(lambda d: d["state"] == "unavailable")
    assert not doc["ready"] and doc["error"]["retryable"]
    assert p.get("/readyz").status_code == 503


def test_provisional_checkout_is_extended_before_it_lapses(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    grant(lm, seats=1)
    lm("config", {"ttl_seconds": 2})
    p = pod(SEATS)
    first = p.wait(checked_out)
    checked_out_at = calls(server, "CheckoutLicense")[0]["at"]
    # well past the first checkout's own expiry (2 s), on the emulator's clock
    p.wait(lambda d: time.time() - checked_out_at > 3.5, timeout=20)
    assert len(calls(server, "ExtendLicenseConsumption")) >= 2
    doc = p.doc()
    assert doc["ready"] and doc["consumption_token"] == first["consumption_token"]
    assert state(server)["licenses"][SKU]["in_use"] == {"Seats": 1}  # never back in the pool
    assert len(calls(server, "CheckoutLicense")) == 1


@pytest.mark.parametrize("on_loss", ["unready", "serve"])
def test_license_revoked_while_running(
    lm: Any, pod: Any, server: EmulatorServer, on_loss: str
) -> None:
    grant(lm)
    lm("config", {"ttl_seconds": 2})
    p = pod(SEATS, MARKETPLACE_LICENSE_ON_LOSS=on_loss)
    p.wait(checked_out)
    lm("change", {"sku": SKU, "revoke": True})
    doc = p.wait(lambda d: d["state"] == "not_entitled")
    assert not doc["entitled"]
    # the extension fails (the checkout is gone); a fresh checkout is then refused
    assert doc["error"]["code"] in ("ResourceNotFoundException", "NoEntitlementsAllowedException")
    assert doc["consumption_token"] is None
    assert p.get("/readyz").status_code == (503 if on_loss == "unready" else 200)


def test_sigterm_checks_the_seat_back_in(lm: Any, pod: Any, server: EmulatorServer) -> None:
    grant(lm, seats=1)
    p = pod(SEATS)
    p.wait(checked_out)
    assert state(server)["licenses"][SKU]["in_use"] == {"Seats": 1}
    started = time.monotonic()
    assert p.stop() == 0
    assert time.monotonic() - started < 10
    assert state(server)["licenses"][SKU]["in_use"] == {}
    assert [c["code"] for c in calls(server, "CheckInLicense")] == ["ok"]
    assert "license_checked_in" in p.logs()


def test_sigterm_with_license_manager_hanging_stops_within_the_drain(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    grant(lm, seats=1)
    p = pod(SEATS, MARKETPLACE_DRAIN_SECONDS="1", MARKETPLACE_AWS_TIMEOUT_SECONDS="30")
    p.wait(checked_out)
    lm("config", {"latency": 20})  # every call now hangs far past the drain
    started = time.monotonic()
    assert p.stop() == 0
    assert time.monotonic() - started < 6
    assert "license_checkin_abandoned" in p.logs()
    lm("config", {"latency": 0})


def test_frozen_past_expiry_then_resumed_checks_out_again(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    grant(lm, seats=1)
    lm("config", {"ttl_seconds": 2})
    p = pod(SEATS)
    first = p.wait(checked_out)
    p.proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while state(server)["licenses"][SKU]["in_use"] and time.monotonic() < deadline:
        time.sleep(0.1)  # AWS returns the unextended seat to the pool at its expiry
    assert state(server)["licenses"][SKU]["in_use"] == {}
    p.proc.send_signal(signal.SIGCONT)
    doc = p.wait(lambda d: checked_out(d) and d["consumption_token"] != first["consumption_token"])
    assert doc["ready"]
    assert state(server)["licenses"][SKU]["in_use"] == {"Seats": 1}
    assert "license_expired" in p.logs() or "license_lost" in p.logs()


@pytest.mark.parametrize("offset", [240.0, -240.0])
def test_clock_ahead_or_behind_license_manager(
    lm: Any, pod: Any, server: EmulatorServer, offset: float
) -> None:
    """Inside SigV4's five minutes a clock that disagrees with AWS's changes nothing: the
    checkout's lifetime is AWS's own, counted on the monotonic clock."""
    grant(lm)
    lm("config", {"ttl_seconds": 6, "clock_offset": offset})
    p = pod(SEATS)
    doc = p.wait(checked_out)
    assert 0 < doc["expires_in_seconds"] <= 6  # AWS's 6 s, not minutes off
    p.wait(lambda d: len(calls(server, "ExtendLicenseConsumption")) >= 2)
    assert p.doc()["ready"] and len(calls(server, "CheckoutLicense")) == 1
    lm("config", {"clock_offset": 0})


@pytest.mark.parametrize("offset", [7200.0, -7200.0])
def test_a_clock_hours_off_is_never_ready_and_says_so(
    lm: Any, pod: Any, server: EmulatorServer, offset: float
) -> None:
    """Past five minutes AWS denies every signed call (the emulator too): never ready, with
    the clock named, retried (an NTP fix heals it without a restart)."""
    grant(lm)
    lm("config", {"clock_offset": offset})
    p = pod(SEATS)
    doc = p.wait(lambda d: d["consecutive_failures"] >= 2)
    assert not doc["ready"] and doc["state"] == "checking"
    assert doc["error"]["kind"] == "clock" and "NTP" in doc["error"]["hint"]
    assert p.get("/readyz", probe=True).status_code == 503
    lm("config", {"clock_offset": 0})
    p.wait(checked_out)


def test_consumption_token_never_in_logs_or_probe(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    grant(lm)
    lm("config", {"ttl_seconds": 2})
    p = pod(SEATS, MARKETPLACE_LOG_LEVEL="DEBUG", MARKETPLACE_LOG_FORMAT="text")
    p.wait(checked_out)
    p.wait(lambda d: len(calls(server, "ExtendLicenseConsumption")) >= 1)
    tokens = list(book(server.emulator).consumptions)
    assert len(tokens) == 1
    token = tokens[0]
    seen = [
        p.get("/v1/entitlement").text,
        p.get("/readyz").text,
        p.get("/readyz", probe=True).text,
        p.get("/metrics", probe=True).text,
    ]
    assert p.stop() == 0
    assert calls(server, "CheckInLicense")  # the token was used to the end
    seen.append(p.logs())
    assert "license_extended" in p.logs() and "license_checked_in" in p.logs()
    for text in seen:
        assert token not in text


def _run_config(env: dict[str, str]) -> tuple[int, str, int]:
    port = free_port()
    env = {
        **loopback_env("http://127.0.0.1:9"),
        "MARKETPLACE_MODE": "contract",
        "MARKETPLACE_LISTEN": f"127.0.0.1:{port}",
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode, done.stderr, port


def test_contract_field_problems_exit_2_before_binding() -> None:
    code, err, port = _run_config(
        {"MARKETPLACE_LICENSE_ENTITLEMENTS": '[{"name": "Seats", "unit": "Seats"}]'}
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert any("MARKETPLACE_LICENSE_ENTITLEMENTS: item 1: unit must be one of" in x for x in lines)
    assert any("MARKETPLACE_LICENSE_PRODUCT_SKU: is required" in x for x in lines)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_contract_refuses_other_modes_settings_and_half_an_identity(tmp_path: Path) -> None:
    code, err, _ = _run_config(
        {
            "MARKETPLACE_LICENSE_PRODUCT_SKU": SKU,
            "MARKETPLACE_LICENSE_ENTITLEMENTS": json.dumps(TIER),
            "MARKETPLACE_LICENSE_TOKEN_FILE": str(tmp_path / "token"),
            # (MARKETPLACE_DIMENSIONS is contract with consumption: test_contract_consumption)
            "MARKETPLACE_ENTITLEMENT_CHECK": "dry_run",
        }
    )
    assert code == 2
    assert "MARKETPLACE_ENTITLEMENT_CHECK: contract mode meters nothing" in err
    assert "MARKETPLACE_LICENSE_TOKEN_FILE and MARKETPLACE_LICENSE_ROLE_ARN: set both" in err


def test_blank_identity_settings_are_unset_not_the_current_directory() -> None:
    from sidecar.config_validate import validated

    settings = validated(
        {
            "mode": "contract",
            "license_product_sku": SKU,
            "license_entitlements": json.dumps(TIER),
            "license_token_file": "",
            "license_role_arn": " ",
        }
    )
    assert settings.license_token_file is None and settings.license_role_arn is None


def test_contract_settings_are_refused_in_other_modes() -> None:
    code, err, _ = _run_config(
        {
            "MARKETPLACE_MODE": "custom",
            "MARKETPLACE_PRODUCT_CODE": "prod-abc",
            "MARKETPLACE_DIMENSIONS": "users",
            "MARKETPLACE_STATE_DIR": "/",
            "MARKETPLACE_LICENSE_CHECKOUT_TYPE": "PERPETUAL",
        }
    )
    assert code == 2
    assert "MARKETPLACE_LICENSE_CHECKOUT_TYPE: only used with MARKETPLACE_MODE=contract" in err


def test_anywhere_identity_checks_out_with_the_role_the_license_token_assumes(
    lm: Any, server: EmulatorServer, tmp_path: Path
) -> None:
    """Off AWS: no platform credentials; the buyer's license token and role. GetAccessToken at
    the emulator, AssumeRoleWithWebIdentity at moto's STS, then CheckoutLicense signed with the
    role's credentials."""
    from tests.metadata_fake import MotoSts

    arn = grant(lm, seats=1)
    role = "arn:aws:iam::111122223333:role/AWSLicenseManagerConsumptionRole"
    token = lm("tokens", {"license_arn": arn, "role_arns": [role]})["token"]
    token_file = tmp_path / "license_token"
    token_file.write_text(token + "\n")
    sts = MotoSts()
    try:
        env = loopback_env(
            server.url,
            AWS_ENDPOINT_URL_LICENSE_MANAGER=server.url,
            AWS_ENDPOINT_URL_STS=sts.url,
            MARKETPLACE_LICENSE_ENTITLEMENTS=json.dumps(SEATS),
            MARKETPLACE_LICENSE_TOKEN_FILE=str(token_file),
            MARKETPLACE_LICENSE_ROLE_ARN=role,
        )
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        p = Pod(env, tmp_path / "anywhere.log")
        try:
            p.wait(checked_out)
            exchanged = calls(server, "GetAccessToken")
            assert [c["code"] for c in exchanged] == ["ok"]
            assert exchanged[0]["access_key"] is None  # unsigned, as the guide's provider
            [checkout] = calls(server, "CheckoutLicense")
            assumed = {a.access_key_id for a in sts.assumed() if a.role_arn == role}
            assert checkout["access_key"] in assumed
            assert p.stop() == 0
            assert token not in p.logs()
        finally:
            p.stop()
    finally:
        sts.close()


def test_doctor_checks_contract_mode_without_consuming(
    lm: Any, server: EmulatorServer, tmp_path: Path
) -> None:
    grant(lm, seats=1)
    token = tmp_path / "license_token"
    token.write_text("a-license-token-never-printed")
    env = {
        **loopback_env(server.url, AWS_ENDPOINT_URL_LICENSE_MANAGER=server.url),
        "MARKETPLACE_MODE": "contract",
        "MARKETPLACE_LICENSE_PRODUCT_SKU": SKU,
        "MARKETPLACE_LICENSE_ENTITLEMENTS": json.dumps(SEATS),
        "MARKETPLACE_LICENSE_TOKEN_FILE": str(token),
        "MARKETPLACE_LICENSE_ROLE_ARN": "arn:aws:iam::123456789012:role/license",
    }
    platform = {k: v for k, v in env.items() if "LICENSE_TOKEN" not in k and "ROLE" not in k}
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor"],
        env=platform,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert f"✔ configuration: contract mode, product SKU {SKU}" in out
    assert "✔ license-manager:ExtendLicenseConsumption: allowed (DryRun" in out
    assert "✔ endpoint: " + server.url in out
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    # A well-formed file; License Manager refuses the token itself (the permission check goes
    # with the token's identity off AWS), and neither line shows it.
    assert "✔ identity: license token file" in out and "never-printed" not in out
    assert "✘ license-manager:ExtendLicenseConsumption: no credentials: LicenseTokenRejected" in out
    assert not calls(server, "CheckoutLicense")  # nothing consumed
    token.write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "✘ identity: license token file" in out and "empty" in out


def test_sigterm_while_the_first_checkout_is_in_flight_leaves_no_seat_out(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    """SIGTERM lands while CheckoutLicense is on its way (License Manager answers after 4 s):
    the stop waits for the answer inside the drain and checks that checkout in, rather than
    checking in nothing (no token yet) and leaving a seat out for an hour."""
    grant(lm, seats=1)
    lm("config", {"latency": 4})
    p = pod(SEATS, MARKETPLACE_DRAIN_SECONDS="15")
    time.sleep(1.5)  # the worker sends at start; License Manager holds the answer 4 s
    assert not calls(server, "CheckoutLicense")  # still unanswered when SIGTERM lands
    assert p.stop() == 0
    lm("config", {"latency": 0})
    assert [c["code"] for c in calls(server, "CheckoutLicense")] == ["ok"]  # it was in flight
    assert [c["code"] for c in calls(server, "CheckInLicense")] == ["ok"], p.logs()
    assert state(server)["licenses"][SKU]["in_use"] == {}
