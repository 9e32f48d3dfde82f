"""ContractService over hours of virtual time: a manual clock drives both the service and the
emulator's License Manager (real HTTP, unmodified boto3), so the periodic re-check, extensions
and a license's end are crossed without sleeping."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.aws.license import LicenseGateway
from sidecar.core.backoff import Backoff
from sidecar.emulator.license_manager import (
    LOST,
    MARKETPLACE_FINGERPRINT,
    Fault,
    LicenseBook,
    book,
)
from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.entitlement.contract import ContractService
from sidecar.entitlement.contract_store import ContractStore
from sidecar.entitlement.license import Asked, LicenseState
from tests.helpers import ManualClock

SKU = "prod-virtual"
SEAT = ({"Name": "Seats", "Unit": "Count", "Value": "1"},)
TIER = ({"Name": "Premium", "Unit": "None"},)


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    srv = EmulatorServer(Emulator()).start()
    yield srv
    srv.shutdown()


@pytest.fixture
def lm(server: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[LicenseBook]:
    monkeypatch.setenv("AWS_ENDPOINT_URL_LICENSE_MANAGER", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    b = book(server.emulator)
    with b.lock:
        b.__init__()  # type: ignore[misc]  # a fresh book per test (the key is regenerated)
    yield b


def run(
    b: LicenseBook,
    asked: tuple[dict[str, str], ...],
    waits: int,
    kind: str = "PROVISIONAL",
    between: Any = None,
    store: ContractStore | None = None,
) -> tuple[ContractService, list[str]]:
    """Run the service until it has waited `waits` times; `between(service, clock)` runs at
    each wait. Returns the service and the License Manager operations called, in order."""
    clock = ManualClock()
    b.clock = lambda: clock.t
    stop = threading.Event()
    service = ContractService(
        Asked(SKU, MARKETPLACE_FINGERPRINT, asked, kind),
        lambda: LicenseGateway("us-east-1", 5.0),
        clock,
        stop,
        check_seconds=900.0,
        deadline=60.0,
        backoff=Backoff(1.0, 60.0),
        on_loss="unready",
        rng=lambda: 0.5,
        store=store,
    )
    real_wait = clock.wait

    def wait(event: threading.Event, seconds: float) -> bool:
        if between is not None:
            between(service, clock)
        if len(clock.waits) + 1 >= waits:
            event.set()
        return real_wait(event, seconds)

    clock.wait = wait  # type: ignore[method-assign,assignment]
    worker = threading.Thread(target=service.run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the service never waited: a busy loop"
    return service, [c["op"] for c in b.calls]


def grant(b: LicenseBook, seats: int | None) -> None:
    with b.lock:
        b.grant(
            {
                "sku": SKU,
                "entitlements": [
                    {"name": "Seats", "unit": "Count", "max": seats},
                    {"name": "Premium", "unit": "None"},
                ],
            }
        )


def in_use(b: LicenseBook) -> dict[str, int]:
    with b.lock:
        b._expire()
        return b.in_use(SKU)


def test_the_periodic_recheck_swaps_the_checkout_and_checks_the_old_one_in(
    lm: LicenseBook,
) -> None:
    grant(lm, seats=2)
    service, ops = run(lm, SEAT, waits=4)
    assert ops.count("CheckoutLicense") >= 2 and ops.count("CheckInLicense") >= 1
    assert service.snapshot().state is LicenseState.CHECKED_OUT
    assert in_use(lm) == {"Seats": 1}  # the old checkout went back: never two for long


def test_a_full_pool_refuses_the_recheck_and_the_live_checkout_stands(lm: LicenseBook) -> None:
    grant(lm, seats=1)
    service, ops = run(lm, SEAT, waits=6)
    snap = service.snapshot()
    assert snap.state is LicenseState.CHECKED_OUT
    assert any(w.startswith("recheck_refused") for w in snap.warnings)
    assert "ExtendLicenseConsumption" in ops and "CheckInLicense" not in ops
    assert in_use(lm) == {"Seats": 1}


def test_a_feature_license_cancelled_while_running_is_found_at_the_recheck(
    lm: LicenseBook,
) -> None:
    grant(lm, seats=None)

    def cancel(service: ContractService, clock: ManualClock) -> None:
        if service.snapshot().state is LicenseState.CHECKED_OUT:
            with lm.lock:
                lm.grants[SKU].revoked = True

    service, _ = run(lm, TIER, waits=3, between=cancel)
    snap = service.snapshot()
    assert snap.state is LicenseState.NOT_ENTITLED and snap.had_license
    assert service.readiness() == (False, snap.error.code if snap.error else None)


def test_a_counted_perpetual_checkout_is_drawn_once_per_start(lm: LicenseBook) -> None:
    grant(lm, seats=3)
    service, ops = run(lm, SEAT, waits=10, kind="PERPETUAL")
    assert ops == ["CheckoutLicense"]  # no re-check draws it down again, no extension
    assert service.snapshot().state is LicenseState.CHECKED_OUT
    with lm.lock:
        assert lm.grants[SKU].entitlements["Seats"]["max"] == 2


def test_extensions_keep_a_provisional_checkout_for_hours(lm: LicenseBook) -> None:
    grant(lm, seats=1)
    service, ops = run(lm, TIER + SEAT, waits=20)
    assert ops.count("ExtendLicenseConsumption") >= 4
    snap = service.snapshot()
    assert snap.state is LicenseState.CHECKED_OUT
    assert in_use(lm) == {"Seats": 1}
    # the re-check answered Premium alone (our own seat fills the pool): the seat was kept
    assert snap.held is not None
    assert {e["Name"] for e in snap.held.checkout.entitlements_allowed} == {"Premium", "Seats"}


def lose_the_recheck_answer(b: LicenseBook) -> Any:
    """A `between`: at the first wait (the start's checkout is held) the next CheckoutLicense,
    the re-check, is made by AWS but its answer never arrives (the connection drops)."""
    armed: list[bool] = []

    def between(service: ContractService, clock: Any) -> None:
        if not armed:
            armed.append(True)
            with b.lock:
                b.faults = [Fault(LOST, 1, "CheckoutLicense")]

    return between


def _checkout_tokens(b: LicenseBook) -> list[str]:
    with b.lock:
        return [c["client_token"] for c in b.calls if c["op"] == "CheckoutLicense"]


def test_a_recheck_whose_answer_was_lost_is_resent_with_its_token_not_a_new_one(
    lm: LicenseBook,
) -> None:
    """The re-check's checkout was made but its answer lost; the next re-check asks again. A
    new token would draw a third seat and leave the lost one out for an hour; the same token
    gets AWS's checkout back, and the old one is checked in: one seat."""
    grant(lm, seats=3)
    service, _ = run(lm, SEAT, waits=4, between=lose_the_recheck_answer(lm))
    tokens = _checkout_tokens(lm)
    assert len(tokens) >= 3 and tokens[1] == tokens[2] != tokens[0], tokens
    assert service.snapshot().state is LicenseState.CHECKED_OUT
    assert in_use(lm) == {"Seats": 1}


def test_a_restart_finishes_the_recheck_that_was_in_flight(lm: LicenseBook, tmp_path: Any) -> None:
    """The sidecar dies with a re-check's answer lost (AWS made that checkout). The restart
    extends the checkout it held, resends the re-check with its kept token (AWS answers the
    checkout it made) and checks the old one in: one seat, not two for an hour."""
    grant(lm, seats=3)
    run(lm, SEAT, waits=2, between=lose_the_recheck_answer(lm), store=ContractStore(tmp_path))
    lost = _checkout_tokens(lm)[1]
    assert in_use(lm) == {"Seats": 2}  # the held seat and the one whose answer was lost
    with lm.lock:
        lm.faults = []
    again, _ = run(lm, SEAT, waits=1, store=ContractStore(tmp_path))
    assert again.resumed and again.snapshot().state is LicenseState.CHECKED_OUT
    assert _checkout_tokens(lm)[-1] == lost
    assert in_use(lm) == {"Seats": 1}
