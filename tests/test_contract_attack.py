"""Contract mode under a hostile License Manager: answers that are valid by the model but do
not do what the sidecar assumes (an extension that does not extend, a checkout answer whose
entitlements differ from the ask). Virtual time: a manual clock drives the service and the
emulator (real HTTP, unmodified boto3), as in test_contract_service."""

from __future__ import annotations

from sidecar.emulator.license_manager import LicenseBook
from sidecar.entitlement.contract import ContractService
from tests.helpers import ManualClock
from tests.test_contract_service import SEAT, grant, lm, run, server

__all__ = ["lm", "server"]  # fixtures


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
            with lm.lock:
                lm.clock_offset = -7200.0
            stepped.append(True)

    _, ops = run(lm, SEAT, waits=40, between=step_back)
    # Each call is followed by a wait: waits that shrink to nothing are calls back to back
    # (on a real clock, ExtendLicenseConsumption as fast as License Manager answers).
    instant = [w for w in clocks[0].waits if w < 0.1]
    assert len(instant) <= 2, (len(instant), ops.count("ExtendLicenseConsumption"))
