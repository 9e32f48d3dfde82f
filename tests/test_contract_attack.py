"""Contract mode under a hostile License Manager: answers that are valid by the model but do
not do what the sidecar assumes (an extension that does not extend, a checkout answer whose
entitlements differ from the ask). Virtual time: a manual clock drives the service and the
emulator (real HTTP, unmodified boto3), as in test_contract_service."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.aws.license import Checkout, LicenseCallError, LicenseGateway, parse_time
from sidecar.emulator.license_manager import MARKETPLACE_FINGERPRINT, LicenseBook
from sidecar.emulator.service import EmulatorServer
from sidecar.entitlement.contract import ContractService
from sidecar.entitlement.license import verify_checkout
from tests.helpers import ROOT, ManualClock, loopback_env
from tests.metadata_fake import MotoSts
from tests.test_anywhere_sidecar import ROLE, emulator_post
from tests.test_contract_service import SEAT, grant, lm, run, server

__all__ = ["lm", "server"]  # fixtures (`sts` is conftest's)
ANYWHERE_SKU = "prod-sku-anywhere-doctor"


def test_an_extension_that_does_not_move_the_expiration_is_not_retried_in_a_busy_loop(
    lm: LicenseBook,
) -> None:
    """AWS's clock steps back two hours after the checkout (or AWS caps an extension at the
    license's end): ExtendLicenseConsumption answers an Expiration earlier than the one held.
    Such an answer extends nothing; the service must not call again at once, forever."""
    grant(lm, seats=1)
    stepped: list[bool] = []
    clocks: list[ManualClock] = []

    def step_back(service: ContractService, clock: ManualClock) -> None:
        clocks[:] = [clock]
        if not stepped and service.snapshot().held is not None:
            with lm.lock:  # AWS's own clock (its answers), not the signature's check
                lm.clock = lambda: clock.t - 7200.0
            stepped.append(True)

    _, ops = run(lm, SEAT, waits=40, between=step_back)
    # Each call is followed by a wait: waits that shrink to nothing are calls back to back
    # (on a real clock, ExtendLicenseConsumption as fast as License Manager answers).
    instant = [w for w in clocks[0].waits if w < 0.1]
    assert len(instant) <= 2, (len(instant), ops.count("ExtendLicenseConsumption"))


class DripServer:
    """A loopback HTTP server that answers every request with a status line, then one header
    byte every 0.2 s, forever: each socket read succeeds within botocore's read timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.stop = threading.Event()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not self.stop.wait(0.2):
                conn.sendall(b"a")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_a_license_manager_that_drips_its_answer_fails_the_call_within_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every read returns a byte in time, so botocore's read timeout never fires: without a
    bound on the whole call the worker hangs in ExtendLicenseConsumption past the checkout's
    deadline, and the pod stays ready on a checkout AWS has let go."""
    drip = DripServer()
    monkeypatch.setenv("AWS_ENDPOINT_URL_LICENSE_MANAGER", drip.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    gateway = LicenseGateway("us-east-1", 1.0)
    outcome: list[BaseException] = []

    def extend() -> None:
        try:
            gateway.extend("t" * 32)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=extend, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(timeout=30)
    try:
        assert not worker.is_alive(), "ExtendLicenseConsumption still hanging after 30 s"
        assert time.monotonic() - started < 30
        assert len(outcome) == 1 and isinstance(outcome[0], LicenseCallError)
        info = outcome[0].info
        assert info.retryable and info.kind == "transient", info
        # The abandoned call still drips: the next one fails at once, no second thread.
        again = time.monotonic()
        with pytest.raises(LicenseCallError) as caught:
            gateway.extend("t" * 32)
        assert time.monotonic() - again < 2
        assert "still unanswered" in caught.value.info.message
    finally:
        drip.close()


def _doctor(env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    return done.returncode, done.stdout


def test_doctor_off_aws_checks_the_permission_with_the_license_token_identity(
    emulator_server: EmulatorServer, sts: MotoSts, tmp_path: Path
) -> None:
    """Off AWS the license token is the only identity (no AWS credentials in the pod, as in
    test_anywhere_sidecar): doctor must check the extension permission with the role the token
    assumes, not fail a correct install for want of credentials it was never meant to have."""
    arn = emulator_post(
        emulator_server,
        "licenses",
        {"sku": ANYWHERE_SKU, "entitlements": [{"name": "PremiumTier", "unit": "None"}]},
    )["license_arn"]
    token = emulator_post(emulator_server, "tokens", {"license_arn": arn, "role_arns": [ROLE]})
    token_file = tmp_path / "license_token"
    token_file.write_text(token["token"] + "\n")
    env = loopback_env(
        emulator_server.url,
        MARKETPLACE_MODE="contract",
        MARKETPLACE_PRODUCT_CODE="",
        MARKETPLACE_THROTTLE_SCHEDULE_SECONDS="",
        MARKETPLACE_LICENSE_PRODUCT_SKU=ANYWHERE_SKU,
        MARKETPLACE_LICENSE_ENTITLEMENTS='[{"name": "PremiumTier", "unit": "None"}]',
        MARKETPLACE_LICENSE_TOKEN_FILE=str(token_file),
        MARKETPLACE_LICENSE_ROLE_ARN=ROLE,
        AWS_ENDPOINT_URL_LICENSE_MANAGER=emulator_server.url,
        AWS_ENDPOINT_URL_STS=sts.url,
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name)
    code, out = _doctor(env)
    assert "✔ license-manager:ExtendLicenseConsumption: allowed (DryRun" in out, out
    assert code == 0, out
    assert token["token"] not in out
    [assumed] = sts.assumed()
    assert assumed.role_arn == ROLE


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.mkdir(), id="directory"),
        pytest.param(lambda p: p.write_text(" \n\t\n"), id="blank"),
        pytest.param(lambda p: p.write_bytes(b"t" * 20000), id="huge"),
        pytest.param(lambda p: p.write_text("two words"), id="not-a-token"),
    ],
)
def test_doctor_refuses_a_token_file_that_run_would_refuse(
    make: Any, emulator_server: EmulatorServer, tmp_path: Path
) -> None:
    """doctor said ✔ for a file `run` refuses (its own size/readability check, not the reader
    `run` uses): a directory, a blank file, a 20 KB file, two words."""
    token_file = tmp_path / "license_token"
    make(token_file)
    env = loopback_env(
        emulator_server.url,
        MARKETPLACE_MODE="contract",
        MARKETPLACE_PRODUCT_CODE="",
        MARKETPLACE_THROTTLE_SCHEDULE_SECONDS="",
        MARKETPLACE_LICENSE_PRODUCT_SKU=ANYWHERE_SKU,
        MARKETPLACE_LICENSE_ENTITLEMENTS='[{"name": "PremiumTier", "unit": "None"}]',
        MARKETPLACE_LICENSE_TOKEN_FILE=str(token_file),
        MARKETPLACE_LICENSE_ROLE_ARN=ROLE,
        AWS_ENDPOINT_URL_LICENSE_MANAGER=emulator_server.url,
        AWS_ENDPOINT_URL_STS="http://127.0.0.1:9",
    )
    code, out = _doctor(env)
    assert "✘ identity: license token file" in out, out
    assert code != 0


@pytest.mark.parametrize("offset", [7200.0, -7200.0])
def test_a_node_clock_hours_off_is_refused_by_sigv4_as_aws_does(
    lm: LicenseBook, offset: float
) -> None:
    """AWS denies a signed request that does not reach it within five minutes of its time stamp
    (IAM User Guide, "Signing AWS API requests"). The emulator answered a CheckoutLicense signed
    two hours off, so the docs could claim that a node clock hours off "changes nothing"."""
    grant(lm, seats=1)
    with lm.lock:
        lm.clock_offset = offset
    with pytest.raises(LicenseCallError) as caught:
        LicenseGateway("us-east-1", 5.0).checkout(
            "prod-virtual", MARKETPLACE_FINGERPRINT, SEAT, "PROVISIONAL", "skewed-token"
        )
    info = caught.value.info
    assert info.kind == "clock" and info.retryable, info
    assert "synchronise the node clock" in info.hint
    with lm.lock:
        lm.clock_offset = 240.0  # inside the tolerance: served
    checkout = LicenseGateway("us-east-1", 5.0).checkout(
        "prod-virtual", MARKETPLACE_FINGERPRINT, SEAT, "PROVISIONAL", "near-token"
    )
    assert checkout.consumption_token


def _answer(allowed: tuple[dict[str, str], ...]) -> Checkout:
    return Checkout(
        consumption_token="c" * 32,
        entitlements_allowed=allowed,
        issued_at="2026-12-07T10:00:00Z",
        expiration="2026-12-07T11:00:00Z",
        license_arn="arn:aws:license-manager::294406891311:license:l-1",
        checkout_type="PROVISIONAL",
        signed_token=None,
        node_id=None,
    )


@pytest.mark.parametrize(
    "got",
    [
        pytest.param({"Name": "Seats", "Unit": "Count"}, id="value-missing"),
        pytest.param({"Name": "Seats", "Unit": "Count", "Value": ""}, id="value-blank"),
        pytest.param({"Name": "Seats", "Unit": "Count", "Value": "0.5"}, id="value-fraction"),
        pytest.param({"Name": "Seats", "Unit": "Count", "Value": "4"}, id="value-smaller"),
    ],
)
def test_a_counted_entitlement_answered_without_its_count_is_not_a_checkout(
    got: dict[str, str],
) -> None:
    """Five seats asked; an answer that names the entitlement but not five of it (no Value, a
    blank or fractional one) passed the check, which compared counts only when both parsed."""
    asked = ({"Name": "Seats", "Unit": "Count", "Value": "5"},)
    error, _ = verify_checkout(asked, _answer((got,)), parse_time("2026-12-07T10:00:00Z") or 0)
    assert error is not None and "Seats" in error.message, error
    fine, _ = verify_checkout(
        asked, _answer(({"Name": "Seats", "Unit": "Count", "Value": "5"},)), 1796637600.0
    )
    assert fine is None
