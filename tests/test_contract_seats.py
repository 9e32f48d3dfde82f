"""Contract mode's seats at the edges: every checkout AWS made is either held (and extended) or
given back. A leaked checkout holds a buyer's seat at License Manager until it expires (the
buyer's other pods are refused); a seat believed held that AWS does not hold lets the product
run unlicensed. Virtual time drives the service and the emulator's License Manager (real HTTP,
unmodified boto3); the stop path runs in a real `run` process."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.aws.license import LicenseGateway
from sidecar.core.backoff import Backoff
from sidecar.emulator.license_manager import (
    DELAYED,
    HELD,
    LOST,
    MARKETPLACE_FINGERPRINT,
    ODD,
    RESET,
    Fault,
    LicenseBook,
)
from sidecar.emulator.service import EmulatorServer
from sidecar.entitlement.contract import ContractService
from sidecar.entitlement.contract_store import ContractStore
from sidecar.entitlement.leases import LeaseBook
from sidecar.entitlement.license import Asked, LicenseState
from tests.contract_kit import SKU as POD_SKU
from tests.contract_kit import Pod, license_api
from tests.helpers import ManualClock, loopback_env
from tests.test_contract_service import SEAT, SKU, grant, in_use, lm, server

__all__ = ["lm", "server"]  # fixtures


class Harness:
    """One ContractService on its own thread over a manual clock; `at_wait(service, clock)`
    runs before each wait of the worker (the test's hook into the service's timeline)."""

    def __init__(
        self,
        b: LicenseBook,
        *,
        store: ContractStore | None = None,
        at_wait: Callable[[ContractService, ManualClock], None] | None = None,
        kind: str = "PROVISIONAL",
        asked: tuple[dict[str, str], ...] = SEAT,
        max_waits: int = 200,
    ) -> None:
        self.clock = ManualClock()
        b.clock = lambda: self.clock.t
        self.stop = threading.Event()
        self.service = ContractService(
            Asked(SKU, MARKETPLACE_FINGERPRINT, asked, kind),
            lambda: LicenseGateway("us-east-1", 5.0),
            self.clock,
            self.stop,
            check_seconds=900.0,
            deadline=60.0,
            backoff=Backoff(1.0, 60.0),
            on_loss="unready",
            rng=lambda: 0.5,
            store=store,
        )
        real_wait = self.clock.wait

        def wait(event: threading.Event, seconds: float) -> bool:
            if at_wait is not None:
                at_wait(self.service, self.clock)
            if len(self.clock.waits) + 1 >= max_waits:
                event.set()
            return real_wait(event, seconds)

        self.clock.wait = wait  # type: ignore[method-assign,assignment]
        self.worker = threading.Thread(target=self.service.run, daemon=True)
        self.worker.start()

    def join(self) -> None:
        self.worker.join(timeout=60)
        assert not self.worker.is_alive(), "the service never ended: a busy loop or a hang"


def until(what: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        time.sleep(0.02)
    raise AssertionError(f"not met in {timeout} s")


def ops(b: LicenseBook, op: str) -> list[dict[str, Any]]:
    with b.lock:
        return [c for c in b.calls if c["op"] == op]


def arm(b: LicenseBook, *faults: Fault) -> Callable[[ContractService, ManualClock], None]:
    """An `at_wait`: once the start's checkout is held, the faults are set (once)."""
    armed: list[bool] = []

    def at_wait(service: ContractService, clock: ManualClock) -> None:
        if not armed and service.snapshot().held is not None:
            armed.append(True)
            with b.lock:
                b.faults = list(faults)

    return at_wait


# -- 1. a re-check answered after the stop's check-in ----------------------------------------


def test_a_recheck_answered_after_the_stop_check_in_is_checked_in_not_adopted(
    lm: LicenseBook,
) -> None:
    """SIGTERM lands while the periodic re-check's CheckoutLicense is out; AWS made that
    checkout but its answer arrives after the stop checked the live seat in. Adopted, it was
    never checked in: a buyer's seat held for an hour by a pod that is gone."""
    grant(lm, seats=3)
    h = Harness(lm, at_wait=arm(lm, Fault(HELD, 1, "CheckoutLicense")))
    until(lambda: len(ops(lm, "CheckoutLicense")) == 2)  # the re-check made, its answer held
    assert in_use(lm) == {"Seats": 2}
    h.stop.set()
    h.service.checkin_at_stop()  # what the stop path does, the re-check still unanswered
    assert in_use(lm) == {"Seats": 1}  # the live seat went back; the re-check's is out
    lm.gate.set()  # the late answer arrives
    h.join()
    assert in_use(lm) == {}, ops(lm, "CheckInLicense")
    assert h.service.snapshot().held is None or h.service.checked_in


def test_a_late_answer_with_the_state_dir_leaves_nothing_for_a_restart_to_extend(
    lm: LicenseBook, tmp_path: Path
) -> None:
    """The same race with a state directory: the late checkout, checked in, is not kept for a
    restart either (a restart extending a checked-in checkout is refused, then checks out)."""
    grant(lm, seats=3)
    h = Harness(
        lm, store=ContractStore(tmp_path), at_wait=arm(lm, Fault(HELD, 1, "CheckoutLicense"))
    )
    until(lambda: len(ops(lm, "CheckoutLicense")) == 2)
    h.stop.set()
    h.service.checkin_at_stop()
    lm.gate.set()
    h.join()
    assert in_use(lm) == {}
    assert ContractStore(tmp_path).get("checkout") is None


# -- 2. a re-check (or a start) answered with a checkout that does not verify --------------


def test_an_unverified_start_checkout_is_checked_in_at_once(lm: LicenseBook) -> None:
    """The start's CheckoutLicense is made at AWS but its answer does not verify (an
    entitlement nobody asked for). The pod is not entitled; the checkout AWS made goes back
    now rather than holding a seat for an hour."""
    grant(lm, seats=1)
    with lm.lock:
        lm.faults = [Fault(ODD, 1, "CheckoutLicense")]
    h = Harness(lm, max_waits=1)
    h.join()
    snap = h.service.snapshot()
    assert snap.state is LicenseState.NOT_ENTITLED
    assert snap.error is not None and snap.error.code == "CheckoutNotVerified"
    assert [c["code"] for c in ops(lm, "CheckInLicense")] == ["ok"]
    assert in_use(lm) == {}


def test_an_unverified_recheck_is_checked_in_and_the_live_seat_stands(lm: LicenseBook) -> None:
    """The re-check's answer does not verify. It is given back at once (never retried with its
    ClientToken: AWS would answer the same checkout again) and the live, verified checkout
    stands, extended as before: one seat at AWS, one seat here."""
    grant(lm, seats=2)
    armed = arm(lm, Fault(ODD, 1, "CheckoutLicense"))
    seen: list[tuple[str, ...]] = []

    def at_wait(service: ContractService, clock: ManualClock) -> None:
        seen.append(service.snapshot().warnings)
        armed(service, clock)

    h = Harness(lm, at_wait=at_wait, max_waits=4)
    h.join()
    assert any(w.startswith("recheck_unverified") for w in seen[1]), seen  # after that re-check
    snap = h.service.snapshot()
    assert snap.state is LicenseState.CHECKED_OUT
    tokens = [c["client_token"] for c in ops(lm, "CheckoutLicense")]
    assert len(tokens) >= 3 and len(set(tokens)) == len(tokens), tokens  # never resent
    assert in_use(lm) == {"Seats": 1}
    live = snap.held
    assert live is not None
    with lm.lock:
        assert set(lm.consumptions) == {live.checkout.consumption_token}  # AWS holds ours


# -- 3. the old checkout's check-in after a re-check fails -----------------------------------


def test_a_failed_check_in_of_the_swapped_out_checkout_is_retried(lm: LicenseBook) -> None:
    """The re-check swapped checkouts; CheckInLicense of the old one was throttled. It was
    never tried again: two seats at AWS for an hour, one of them nobody's. Stopped long
    before that hour (virtual time), AWS must hold exactly the live checkout."""
    grant(lm, seats=3)
    h = Harness(
        lm, at_wait=arm(lm, Fault("RateLimitExceededException", 1, "CheckInLicense")), max_waits=4
    )
    h.join()
    codes = [c["code"] for c in ops(lm, "CheckInLicense")]
    assert codes[:2] == ["RateLimitExceededException", "ok"], codes
    live = h.service.snapshot().held
    assert live is not None and h.clock.mono < 3600
    with lm.lock:
        lm._expire()
        assert set(lm.consumptions) == {live.checkout.consumption_token}


def test_a_check_in_still_owed_at_stop_is_tried_at_stop(lm: LicenseBook) -> None:
    """The old checkout's check-in failed (network down) and the pod stops before the retry:
    the stop returns it with the live one."""
    grant(lm, seats=3)
    h = Harness(lm, at_wait=arm(lm, Fault(RESET, 100, "CheckInLicense")), max_waits=2)
    h.join()  # stopped at the wait after the re-check
    assert len(ops(lm, "CheckInLicense")) == 1
    with lm.lock:
        lm.faults = []
    assert in_use(lm) == {"Seats": 2}
    h.service.checkin_at_stop()
    assert in_use(lm) == {}


def test_a_restart_returns_the_check_in_a_killed_sidecar_owed(
    lm: LicenseBook, tmp_path: Path
) -> None:
    """SIGKILL after the re-check was adopted but before the old checkout went back (its
    check-in failed): the restart finds it in the state directory and checks it in, instead
    of leaving it out for an hour unknown to anyone."""
    grant(lm, seats=3)
    h = Harness(
        lm,
        store=ContractStore(tmp_path),
        at_wait=arm(lm, Fault(RESET, 100, "CheckInLicense")),
        max_waits=2,
    )
    h.join()  # killed at the wait after the re-check: no checkin_at_stop
    assert len(ops(lm, "CheckInLicense")) == 1
    assert in_use(lm) == {"Seats": 2}
    with lm.lock:
        lm.faults = []
    again = Harness(lm, store=ContractStore(tmp_path), max_waits=1)
    again.join()
    assert again.service.resumed
    assert in_use(lm) == {"Seats": 1}


def test_a_kill_while_the_old_checkout_goes_back_leaves_it_owed_on_disk(
    lm: LicenseBook, tmp_path: Path
) -> None:
    """The re-check's new checkout is kept, the old one's CheckInLicense is on its way: what is
    on disk at that instant is what a SIGKILL leaves a restart. Before, the old checkout was
    named nowhere (held for an hour, unknown); it must be owed there."""
    grant(lm, seats=3)
    h = Harness(
        lm, store=ContractStore(tmp_path), at_wait=arm(lm, Fault(HELD, 1, "CheckInLicense"))
    )
    until(lambda: len(ops(lm, "CheckInLicense")) == 1)  # the old one's check-in, answer held
    on_disk = ContractStore(tmp_path).get("checkout")  # what a SIGKILL now would leave
    first, second = (c["client_token"] for c in ops(lm, "CheckoutLicense")[:2])
    with lm.lock:
        old = lm.consumptions.get(lm.client_tokens[first][1])
        new_token = lm.client_tokens[second][1]
        old_token = lm.client_tokens[first][1]
    assert old is None  # AWS has taken it back (the call was processed)...
    assert on_disk["held"]["consumption_token"] == new_token
    assert old_token in on_disk.get("returning", []), on_disk  # ...and the restart would know
    h.stop.set()
    lm.gate.set()
    h.join()


# -- 4. a SIGKILL between a checkout and keeping its answer ----------------------------------


def test_a_start_killed_before_its_answer_was_kept_resends_the_token_once(
    lm: LicenseBook, tmp_path: Path
) -> None:
    """The ClientToken is kept before the request leaves; the process dies with the answer in
    the air. The restart resends that token (AWS answers the same checkout) and never sends
    another: one seat, and the restart holds it."""
    grant(lm, seats=1)  # a second checkout would be refused: the pool has one seat
    with lm.lock:
        lm.faults = [Fault(LOST, 1, "CheckoutLicense")]
    first = Harness(lm, store=ContractStore(tmp_path), max_waits=1)
    first.join()
    sent = [c["client_token"] for c in ops(lm, "CheckoutLicense")]
    assert in_use(lm) == {"Seats": 1}
    again = Harness(lm, store=ContractStore(tmp_path), max_waits=1)
    again.join()
    tokens = [c["client_token"] for c in ops(lm, "CheckoutLicense")]
    assert tokens[len(sent) :] == [sent[0]], tokens
    assert again.service.snapshot().state is LicenseState.CHECKED_OUT
    assert in_use(lm) == {"Seats": 1}


# -- 5. the stop path in a real process ------------------------------------------------------


@pytest.fixture
def api(server: EmulatorServer) -> Callable[[str, dict[str, Any]], Any]:
    return license_api(server.url)


@pytest.fixture
def pods(server: EmulatorServer, tmp_path: Path) -> Iterator[Callable[..., Pod]]:
    made: list[Pod] = []

    def start(**env: str) -> Pod:
        base = loopback_env(
            server.url,
            AWS_ENDPOINT_URL_LICENSE_MANAGER=server.url,
            MARKETPLACE_LICENSE_ENTITLEMENTS=json.dumps(
                [{"name": "Seats", "unit": "Count", "value": 1}]
            ),
        )
        base.update(env)
        p = Pod(base, tmp_path / f"pod{len(made)}.log")
        made.append(p)
        return p

    yield start
    for p in made:
        p.stop()


def _lm_state(server: EmulatorServer) -> dict[str, Any]:
    body: dict[str, Any] = requests.get(f"{server.url}/_emulator/license/state", timeout=5).json()
    return body


def test_sigterm_during_a_hung_extension_still_checks_the_seat_in_within_the_drain(
    api: Any, pods: Any, server: EmulatorServer
) -> None:
    """SIGTERM while ExtendLicenseConsumption hangs (its answer held): the stop waited the
    whole drain for the worker, then gave CheckInLicense no time at all; the seat stayed out
    for an hour. The check-in runs beside the stuck call, and the pod stops within the drain."""
    api(
        "licenses", {"sku": POD_SKU, "entitlements": [{"name": "Seats", "unit": "Count", "max": 1}]}
    )
    api("config", {"ttl_seconds": 4})  # extended 2 s after the checkout
    p = pods(MARKETPLACE_DRAIN_SECONDS="3", MARKETPLACE_AWS_TIMEOUT_SECONDS="30")
    p.wait(lambda d: d["state"] == "checked_out")
    api("config", {"faults": [{"error": HELD, "first": 100, "op": "ExtendLicenseConsumption"}]})
    p.until(lambda: any(c["op"] == "ExtendLicenseConsumption" for c in _lm_state(server)["calls"]))
    api("config", {"latency": 1})  # the check-in itself takes a second
    started = time.monotonic()
    assert p.stop() == 0
    took = time.monotonic() - started
    codes = [c["code"] for c in _lm_state(server)["calls"] if c["op"] == "CheckInLicense"]
    api("release", {})
    api("config", {"latency": 0})
    assert codes == ["ok"], p.logs()
    logs = p.logs()
    assert "license_checked_in" in logs and "license_checkin_abandoned" not in logs, logs
    assert took < 3 + 3, took
    assert _lm_state(server)["licenses"][POD_SKU]["in_use"] == {}


def test_a_throttled_check_in_at_stop_is_retried_within_the_drain(
    api: Any, pods: Any, server: EmulatorServer
) -> None:
    """CheckInLicense at SIGTERM answered RateLimitExceededException: one attempt, and the
    seat stayed out for an hour. It is retried with backoff inside the drain."""
    api(
        "licenses", {"sku": POD_SKU, "entitlements": [{"name": "Seats", "unit": "Count", "max": 1}]}
    )
    p = pods(MARKETPLACE_DRAIN_SECONDS="5")
    p.wait(lambda d: d["state"] == "checked_out")
    api(
        "config",
        {"faults": [{"error": "RateLimitExceededException", "first": 2, "op": "CheckInLicense"}]},
    )
    started = time.monotonic()
    assert p.stop() == 0
    assert time.monotonic() - started < 5 + 3
    codes = [c["code"] for c in _lm_state(server)["calls"] if c["op"] == "CheckInLicense"]
    assert codes == ["RateLimitExceededException"] * 2 + ["ok"], p.logs()
    assert _lm_state(server)["licenses"][POD_SKU]["in_use"] == {}


def test_license_manager_unreachable_at_stop_still_stops_within_the_drain(
    api: Any, pods: Any, server: EmulatorServer
) -> None:
    """Every CheckInLicense at stop fails (the connection drops): the retries end with the
    drain, the pod exits 0 in time, and the log says the seat stays out until it expires."""
    api(
        "licenses", {"sku": POD_SKU, "entitlements": [{"name": "Seats", "unit": "Count", "max": 1}]}
    )
    p = pods(MARKETPLACE_DRAIN_SECONDS="2")
    p.wait(lambda d: d["state"] == "checked_out")
    api("config", {"faults": [{"error": RESET, "first": 10_000, "op": "CheckInLicense"}]})
    started = time.monotonic()
    assert p.stop() == 0
    assert time.monotonic() - started < 2 + 3
    codes = [c["code"] for c in _lm_state(server)["calls"] if c["op"] == "CheckInLicense"]
    assert len(codes) >= 2 and set(codes) == {RESET}, codes  # retried, never succeeded
    logs = p.logs()
    assert "license_checkin_failed" in logs and "license_not_returned_at_stop" in logs, logs


# -- 6. the product's leases at stop ---------------------------------------------------------


def _book(b: LicenseBook, tmp_path: Path) -> LeaseBook:
    b.clock = time.time
    gateway = LicenseGateway("us-east-1", 5.0)
    return LeaseBook(
        ContractStore(tmp_path),
        lambda: gateway,
        ManualClock(),
        product_sku=SKU,
        key_fingerprint=MARKETPLACE_FINGERPRINT,
        units_of={"Seats": "Count"},
        timeout=300.0,
    )


def test_a_lease_asked_for_after_the_stop_returned_the_leases_is_refused(
    lm: LicenseBook, tmp_path: Path
) -> None:
    """The stop checked every lease in; the API is still up (the drain), and the product,
    stopping too, asks for a lease again. Granted, it was never checked in: the process
    exits holding a seat at AWS for an hour. Refused (503, nothing checked out)."""
    grant(lm, seats=2)
    leases = _book(lm, tmp_path)
    status, _ = leases.checkout(
        json.dumps({"id": "a", "entitlement": "Seats", "units": 1}).encode()
    )
    assert status == 200 and in_use(lm) == {"Seats": 1}
    leases.checkin_all()
    assert in_use(lm) == {}
    status, body = leases.checkout(
        json.dumps({"id": "b", "entitlement": "Seats", "units": 1}).encode()
    )
    assert status == 503 and body["error"] == "stopping", body
    assert in_use(lm) == {} and len(ops(lm, "CheckoutLicense")) == 1


def test_a_lease_answered_after_the_stop_is_checked_in(lm: LicenseBook, tmp_path: Path) -> None:
    """A lease's CheckoutLicense is out when the stop returns the leases; its answer comes
    after. It goes straight back (the product is told 503), not into a book nobody keeps."""
    grant(lm, seats=2)
    leases = _book(lm, tmp_path)
    with lm.lock:
        lm.faults = [Fault(HELD, 1, "CheckoutLicense")]
    answers: list[tuple[int, dict[str, Any]]] = []
    body = json.dumps({"id": "a", "entitlement": "Seats", "units": 1}).encode()
    asker = threading.Thread(target=lambda: answers.append(leases.checkout(body)), daemon=True)
    asker.start()
    until(lambda: len(ops(lm, "CheckoutLicense")) == 1)
    stopper = threading.Thread(target=leases.checkin_all, daemon=True)
    stopper.start()  # it returns the leases; the pending one waits for its answer
    until(lambda: leases.checkout(body)[0] == 503)  # the stop has begun: no new checkout
    lm.gate.set()
    asker.join(timeout=20)
    stopper.join(timeout=20)
    assert not asker.is_alive() and not stopper.is_alive()
    assert answers and answers[0][0] in (404, 503), answers
    assert in_use(lm) == {}


def test_a_pending_lease_whose_answer_was_lost_goes_back_at_stop(
    lm: LicenseBook, tmp_path: Path
) -> None:
    """A lease's CheckoutLicense was made at AWS but its answer lost (the product got a 503
    and the pending lease kept its ClientToken). The stop forgot the pending lease, token and
    all: AWS held those units for an hour. The stop resends the token (AWS answers the
    checkout it made) and checks it in."""
    grant(lm, seats=2)
    leases = _book(lm, tmp_path)
    with lm.lock:
        lm.faults = [Fault(LOST, 1, "CheckoutLicense")]
    body = json.dumps({"id": "a", "entitlement": "Seats", "units": 1}).encode()
    status, _ = leases.checkout(body)
    assert status == 503 and in_use(lm) == {"Seats": 1}  # made at AWS, unknown here
    leases.checkin_all()
    tokens = [c["client_token"] for c in ops(lm, "CheckoutLicense")]
    assert len(tokens) == 2 and tokens[0] == tokens[1], tokens  # the same request, once more
    assert in_use(lm) == {}
    assert ContractStore(tmp_path).get("leases") == {}


def test_a_counted_perpetual_checkout_is_still_kept_after_the_stop(
    lm: LicenseBook, tmp_path: Path
) -> None:
    """PERPETUAL is never checked in: the stop must leave it kept, so a container restarted
    in the same pod adopts it instead of drawing the units down a second time."""
    grant(lm, seats=5)
    first = Harness(lm, store=ContractStore(tmp_path), kind="PERPETUAL", max_waits=1)
    first.join()
    first.service.checkin_at_stop(1.0)
    again = Harness(lm, store=ContractStore(tmp_path), kind="PERPETUAL", max_waits=1)
    again.join()
    assert again.service.resumed and len(ops(lm, "CheckoutLicense")) == 1
    assert not ops(lm, "CheckInLicense")


def test_an_extension_failing_for_a_checked_in_lease_does_not_mark_its_successor_lost(
    lm: LicenseBook, tmp_path: Path
) -> None:
    """The keeper's ExtendLicenseConsumption of lease "a" is on its way; meanwhile the product
    checks "a" in and checks out "a" again (a new checkout). The old checkout's extension then
    answers ResourceNotFoundException: that was the old one's, not the new lease's, which must
    stay held (marked lost, the product is told 410 and drops units it holds at AWS)."""
    grant(lm, seats=2)
    leases = _book(lm, tmp_path)
    body = json.dumps({"id": "a", "entitlement": "Seats", "units": 1}).encode()
    assert leases.checkout(body)[0] == 200
    with lm.lock:
        lm.faults = [Fault(DELAYED, 1, "ExtendLicenseConsumption")]
    clock = leases._clock
    assert isinstance(clock, ManualClock)
    clock.mono += 3000.0  # the extension is due (half the hour); the lease renewed just now
    leases.renew(json.dumps({"id": "a"}).encode())
    keeper = threading.Thread(target=leases.tick, daemon=True)
    keeper.start()
    until(lambda: bool(lm.faults) and lm.faults[0].seen == 1)  # the extension is on its way
    assert leases.checkin(json.dumps({"id": "a"}).encode())[0] == 200
    assert leases.checkout(body)[0] == 200  # the same id: a new checkout
    lm.gate.set()
    keeper.join(timeout=20)
    assert not keeper.is_alive()
    assert [c["code"] for c in ops(lm, "ExtendLicenseConsumption")] == ["ResourceNotFoundException"]
    status, view = leases.renew(json.dumps({"id": "a"}).encode())
    assert status == 200 and view["state"] == "held", view
    assert in_use(lm) == {"Seats": 1}


def test_a_timed_out_lease_returned_late_does_not_forget_its_successor(
    lm: LicenseBook, tmp_path: Path
) -> None:
    """The keeper times lease "a" out and checks it in; that CheckInLicense is on its way while
    the product checks "a" in itself and checks out "a" again. The keeper's late success must
    not forget the new lease: forgotten, its units stay out at AWS for an hour, unknown."""
    grant(lm, seats=2)
    leases = _book(lm, tmp_path)
    body = json.dumps({"id": "a", "entitlement": "Seats", "units": 1}).encode()
    assert leases.checkout(body)[0] == 200
    with lm.lock:
        lm.faults = [Fault(DELAYED, 1, "CheckInLicense")]
    clock = leases._clock
    assert isinstance(clock, ManualClock)
    clock.mono += 400.0  # past the 300 s lease timeout, before the extension is due
    keeper = threading.Thread(target=leases.tick, daemon=True)
    keeper.start()
    until(lambda: bool(lm.faults) and lm.faults[0].seen == 1)  # the keeper's check-in is out
    assert leases.checkin(json.dumps({"id": "a"}).encode())[0] == 200
    assert leases.checkout(body)[0] == 200  # the same id: a new checkout
    lm.gate.set()
    keeper.join(timeout=20)
    assert not keeper.is_alive()
    status, view = leases.renew(json.dumps({"id": "a"}).encode())
    assert status == 200 and view["state"] == "held", view
    assert in_use(lm) == {"Seats": 1}


def test_the_owed_check_in_gauge_rises_while_check_ins_fail_and_falls_once_they_succeed(
    lm: LicenseBook,
) -> None:
    """The re-check's old checkout could not be checked in (throttled twice): a seat AWS
    holds that no metric showed. `marketplace_license_checkins_owed{source="checkout"}` is 1
    while it is retried, 0 once AWS took it back."""
    from sidecar.ops.metrics import ContractCounts, Metrics

    grant(lm, seats=3)
    faults = arm(lm, Fault("RateLimitExceededException", 2, "CheckInLicense"))
    seen: list[int] = []

    def at_wait(service: ContractService, clock: ManualClock) -> None:
        faults(service, clock)
        seen.append(service.checkins_owed())

    h = Harness(lm, at_wait=at_wait, max_waits=8)
    h.join()
    codes = [c["code"] for c in ops(lm, "CheckInLicense")]
    assert codes[:3] == ["RateLimitExceededException"] * 2 + ["ok"], codes
    rise = seen.index(1)
    assert seen[:rise] == [0] * rise and 0 in seen[rise:] and seen[-1] == 0, seen
    owed = {"checkout": 1}
    metrics = Metrics(None, frozenset())
    metrics.watch_contract(lambda: ContractCounts("checked_out", None, {}, {}, owed))
    gauge = 'marketplace_license_checkins_owed{source="checkout"} '
    assert gauge + "1.0" in metrics.render().decode()
    owed["checkout"] = h.service.checkins_owed()
    assert gauge + "0.0" in metrics.render().decode()
