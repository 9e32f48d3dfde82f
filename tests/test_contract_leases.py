"""Contract mode with a state directory: the pod's checkout across restarts, and the product's
floating leases (`/v1/licenses/*`). Real `run` processes, boto3 over real HTTP to the
emulator's License Manager; the emulator's pool is the judge of what is counted."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.contract_kit import SEATS, SKU, TIER, LicenseApi, Pod, license_api
from tests.helpers import loopback_env
from tests.test_contract import calls, checked_out, grant, state

STATE_FILE = "contract-state.json"


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    srv = EmulatorServer(Emulator()).start()
    yield srv
    srv.shutdown()


@pytest.fixture
def lm(server: EmulatorServer) -> LicenseApi:
    return license_api(server.url)


@pytest.fixture
def pod(server: EmulatorServer, tmp_path: Path) -> Iterator[Callable[..., Pod]]:
    """Pods sharing one state directory (a pod's emptyDir across container restarts)."""
    pods: list[Pod] = []
    (tmp_path / "state").mkdir()

    def start(entitlements: list[dict[str, Any]] = TIER, **env: str) -> Pod:
        base = loopback_env(
            server.url,
            AWS_ENDPOINT_URL_LICENSE_MANAGER=server.url,
            MARKETPLACE_LICENSE_ENTITLEMENTS=json.dumps(entitlements),
            MARKETPLACE_STATE_DIR=str(tmp_path / "state"),
        )
        base.update(env)
        p = Pod(base, tmp_path / f"pod{len(pods)}.log")
        pods.append(p)
        return p

    yield start
    for p in pods:
        p.stop()


@pytest.fixture(scope="module")
def input_pod(server: EmulatorServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """One pod for the bad-input cases: a refused lease changes nothing in the pod or in
    License Manager (each case checks that), so the next case sees what a fresh pod would
    (a start costs ~0.6 s of CPU; 7 cases share one)."""
    tmp = tmp_path_factory.mktemp("input-pod")
    (tmp / "state").mkdir()
    env = loopback_env(
        server.url,
        AWS_ENDPOINT_URL_LICENSE_MANAGER=server.url,
        MARKETPLACE_LICENSE_ENTITLEMENTS=json.dumps(TIER),
        MARKETPLACE_STATE_DIR=str(tmp / "state"),
    )
    p = Pod(env, tmp / "pod.log")
    yield p
    p.stop()


def in_use(server: EmulatorServer) -> dict[str, int]:
    found: dict[str, int] = state(server)["licenses"][SKU]["in_use"]
    return found


def post(p: Pod, path: str, body: Any) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"http://127.0.0.1:{p.api_port}{path}", data=data, timeout=15)


def lease(p: Pod, lease_id: str, units: int = 1, name: str = "Seats") -> requests.Response:
    return post(p, "/v1/licenses/checkout", {"id": lease_id, "entitlement": name, "units": units})


def until(predicate: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not met in {timeout}s: {what}")


@pytest.fixture
def held_answer(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], threading.Event]]:
    """`held_answer(n)`: the n-th CheckoutLicense is consumed by the emulator, then its answer
    is held back until the test ends; the Event is set once AWS has consumed the units, so
    the test kills the sidecar exactly between AWS's consumption and the answer."""
    import sidecar.emulator.license_manager as emulated

    real = emulated.call
    release = threading.Event()
    seen = [0]

    def arm(n: int) -> threading.Event:
        consumed = threading.Event()

        def call(b: Any, target: str, body: bytes, auth: str = "") -> Any:
            answer = real(b, target, body, auth)
            if target.endswith(".CheckoutLicense"):
                seen[0] += 1
                if seen[0] == n:
                    consumed.set()
                    release.wait(30)  # the caller is killed meanwhile
            return answer

        monkeypatch.setattr(emulated, "call", call)
        return consumed

    yield arm
    release.set()


def kill(p: Pod) -> None:
    p.proc.kill()  # SIGKILL: no check-in, no drain, nothing flushed
    p.proc.wait(timeout=10)


# -- item 1: the pod's own checkout across a restart ---------------------------------------


def test_a_restarted_sidecar_extends_its_seat_instead_of_taking_a_second(
    lm: Any, pod: Any, server: EmulatorServer, tmp_path: Path
) -> None:
    """One seat in the license: without the kept checkout the restart would find the pool full
    (AWS still counts the killed process's seat for up to an hour) and the pod not entitled."""
    grant(lm, seats=1)
    first = pod(SEATS)
    before = first.wait(checked_out)
    kill(first)
    second = pod(SEATS)
    doc = second.wait(checked_out)
    assert doc["ready"] and doc["license_arn"] == before["license_arn"]
    assert doc["consumption_token"] == before["consumption_token"]  # the same checkout
    assert in_use(server) == {"Seats": 1}
    assert len(calls(server, "CheckoutLicense")) == 1
    assert "license_resumed" in second.logs()
    kept = tmp_path / "state" / STATE_FILE
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600  # it holds the consumption token
    token = json.loads(kept.read_text())["checkout"]["held"]["consumption_token"]
    assert token not in first.logs() + second.logs()
    assert token not in second.get("/v1/entitlement").text
    assert second.stop() == 0  # SIGTERM checks it in and forgets it
    assert in_use(server) == {}
    assert json.loads(kept.read_text())["checkout"] is None


def test_a_start_killed_with_its_checkout_in_flight_resends_the_same_client_token(
    lm: Any, pod: Any, server: EmulatorServer, held_answer: Callable[[int], threading.Event]
) -> None:
    """The sidecar dies after the request left and before the answer came back; AWS consumed
    the last seat. The restart resends the kept ClientToken: AWS answers the same checkout."""
    grant(lm, seats=1)
    consumed = held_answer(1)
    first = pod(SEATS)
    assert consumed.wait(20), "the checkout never reached the emulator"
    kill(first)
    assert in_use(server) == {"Seats": 1}
    second = pod(SEATS)
    assert second.wait(checked_out)["ready"]
    assert in_use(server) == {"Seats": 1}
    assert len({c["client_token"] for c in calls(server, "CheckoutLicense")}) == 1


def test_an_in_flight_token_is_not_resent_by_a_pod_of_another_name(
    lm: Any, pod: Any, server: EmulatorServer, held_answer: Callable[[int], threading.Event]
) -> None:
    """The state directory outlives the pod (a Deployment's PersistentVolumeClaim): the next
    pod has another name, so another NodeId. Resending the kept ClientToken with it is the same
    token with other parameters, which AWS refuses (ValidationException): without care the new
    pod is refused for good while the buyer's license has seats."""
    grant(lm, seats=2)
    consumed = held_answer(1)
    first = pod(SEATS, MARKETPLACE_POD_NAME="app-7d9f-abcde")
    assert consumed.wait(20), "the checkout never reached the emulator"
    kill(first)
    second = pod(SEATS, MARKETPLACE_POD_NAME="app-7d9f-fghij")
    doc = second.wait(lambda d: d["state"] in ("checked_out", "not_entitled"))
    assert doc["state"] == "checked_out", doc
    codes = [c["code"] for c in calls(server, "CheckoutLicense")]
    assert "ValidationException" not in codes, codes


def test_a_restart_with_other_entitlements_checks_the_old_checkout_in(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    grant(lm, seats=2)
    first = pod(SEATS)
    first.wait(checked_out)
    kill(first)
    second = pod(TIER)  # the settings changed: what was kept is not what is asked
    second.wait(checked_out)
    assert in_use(server) == {}
    assert [c["code"] for c in calls(server, "CheckInLicense")] == ["ok"]


def test_an_unreadable_state_file_is_reported_and_the_pod_still_starts(
    lm: Any, pod: Any, server: EmulatorServer, tmp_path: Path
) -> None:
    grant(lm, seats=2)
    os.mkfifo(tmp_path / "state" / STATE_FILE)  # a FIFO would block a naive open forever
    p = pod(SEATS)
    assert p.wait(checked_out)["ready"]
    assert "contract_state_unreadable" in p.logs()


# -- item 2: floating leases for the product ------------------------------------------------


def test_lease_checkout_is_idempotent_by_id_and_checked_in_once(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    grant(lm, seats=3)
    p = pod()
    p.wait(checked_out)
    r = lease(p, "job-1", 2)
    assert r.status_code == 200, r.text
    assert r.json()["created"] and r.json()["state"] == "held"
    assert in_use(server) == {"Seats": 2}
    again = lease(p, "job-1", 2)  # a retry after a lost answer: the same lease
    assert again.status_code == 200 and not again.json()["created"]
    assert in_use(server) == {"Seats": 2}
    assert len(calls(server, "CheckoutLicense")) == 2  # the pod's own and one for the lease
    other = lease(p, "job-1", 1)
    assert other.status_code == 409 and other.json()["error"]["code"] == "lease_id_in_use"
    full = lease(p, "job-2", 2)
    assert full.status_code == 409, full.text
    body = full.json()
    assert body["error"]["code"] == "no_units_left" and body["entitlement"] == "Seats"
    assert body["held_here"] == 2 and "Seats" in body["error"]["message"]
    listed = p.get("/v1/licenses").json()
    assert [x["id"] for x in listed["leases"]] == ["job-1"]
    assert listed["held_by_entitlement"] == {"Seats": 2}
    held_metric = 'marketplace_license_lease_units{entitlement="Seats"} 2.0'
    assert held_metric in p.get("/metrics", probe=True).text
    assert p.get("/v1/licenses", probe=True).status_code == 404  # loopback API only
    assert post(p, "/v1/licenses/renew", {"id": "job-1"}).status_code == 200
    out = post(p, "/v1/licenses/checkin", {"id": "job-1"})
    assert out.status_code == 200 and out.json()["returned_to_license"]
    assert in_use(server) == {}
    assert post(p, "/v1/licenses/checkin", {"id": "job-1"}).status_code == 404
    metrics = p.get("/metrics", probe=True).text
    assert 'marketplace_license_state{state="checked_out"} 1.0' in metrics
    left = [x for x in metrics.splitlines() if x.startswith("marketplace_license_expires_in")]
    assert len(left) == 1 and 3000 < float(left[0].split()[-1]) <= 3600
    assert 'marketplace_license_lease_units{entitlement="Seats"} 0.0' not in metrics
    assert 'marketplace_license_calls_total{operation="CheckoutLicense",result="gone"} 1.0' in (
        metrics
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"id": "a", "entitlement": "Seats", "units": 0}, "units"),
        ({"id": "a", "entitlement": "Seats", "units": "2"}, "units"),
        ({"id": "a", "entitlement": "Seats", "units": True}, "units"),
        ({"id": "a b", "entitlement": "Seats", "units": 1}, "id"),
        ({"entitlement": "Seats", "units": 1}, "id"),
        ({"id": "a", "entitlement": "", "units": 1}, "entitlement"),
        ({"id": "a", "entitlement": "Seats", "units": 1, "unit": "Count"}, "unit"),
    ],
)
def test_bad_lease_input_is_a_400_naming_the_field(
    lm: Any, input_pod: Pod, server: EmulatorServer, body: dict[str, Any], field: str
) -> None:
    grant(lm, seats=3)
    p = input_pod
    r = post(p, "/v1/licenses/checkout", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field and field in r.json()["error"]["message"]
    assert post(p, "/v1/licenses/checkout", b"[1").status_code == 400
    assert in_use(server) == {}


def test_leases_need_a_state_directory(lm: Any, server: EmulatorServer, tmp_path: Path) -> None:
    grant(lm, seats=3)
    env = loopback_env(
        server.url,
        AWS_ENDPOINT_URL_LICENSE_MANAGER=server.url,
        MARKETPLACE_LICENSE_ENTITLEMENTS=json.dumps(TIER),
    )
    p = Pod(env, tmp_path / "nostate.log")
    try:
        r = lease(p, "a")
        assert r.status_code == 404 and r.json()["error"]["code"] == "leases_need_state_dir"
    finally:
        p.stop()


def test_a_product_killed_holding_a_lease_loses_it_after_the_timeout(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    grant(lm, seats=3)
    p = pod(MARKETPLACE_LICENSE_LEASE_TIMEOUT_SECONDS="5")
    p.wait(checked_out)
    assert lease(p, "dead", 1).status_code == 200
    assert lease(p, "alive", 1).status_code == 200
    started = time.monotonic()

    def renew_alive() -> bool:
        assert post(p, "/v1/licenses/renew", {"id": "alive"}).status_code == 200
        return in_use(server) == {"Seats": 1}

    until(renew_alive, what="the dead product's unit back in the pool")
    assert time.monotonic() - started >= 4.5  # not before the lease timeout
    assert post(p, "/v1/licenses/renew", {"id": "dead"}).status_code == 404
    assert "lease_timed_out" in p.logs()
    assert [x["id"] for x in p.get("/v1/licenses").json()["leases"]] == ["alive"]


def test_sidecar_killed_with_leases_out_restarts_without_double_counting(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    grant(lm, seats=3)
    first = pod()
    first.wait(checked_out)
    assert lease(first, "a", 2).status_code == 200
    assert in_use(server) == {"Seats": 2}
    checkouts = len(calls(server, "CheckoutLicense"))
    kill(first)
    second = pod()
    second.wait(checked_out)
    listed = second.get("/v1/licenses").json()
    assert [(x["id"], x["state"]) for x in listed["leases"]] == [("a", "held")]
    assert post(second, "/v1/licenses/renew", {"id": "a"}).status_code == 200
    again = lease(second, "a", 2)
    assert again.status_code == 200 and not again.json()["created"]
    until(
        lambda: any(c["code"] == "ok" for c in calls(server, "ExtendLicenseConsumption")),
        what="the restored lease extended at AWS",
    )
    assert in_use(server) == {"Seats": 2}  # the emulator's pool: the same count
    assert len(calls(server, "CheckoutLicense")) == checkouts  # the pod's own was resumed too
    assert lease(second, "b", 2).status_code == 409  # 1 left: still counted as taken
    assert second.stop() == 0
    assert in_use(server) == {}  # SIGTERM: the pod and its products go; the units go back


def test_a_lease_checkout_killed_in_flight_is_resolved_with_the_same_client_token(
    lm: Any, pod: Any, server: EmulatorServer, held_answer: Callable[[int], threading.Event]
) -> None:
    grant(lm, seats=1)
    consumed = held_answer(2)  # the pod's own checkout is the first
    first = pod(MARKETPLACE_LICENSE_LEASE_TIMEOUT_SECONDS="5")
    first.wait(checked_out)
    out: list[requests.Response | Exception] = []

    def ask() -> None:
        try:
            out.append(lease(first, "x", 1))
        except requests.RequestException as exc:
            out.append(exc)

    t = threading.Thread(target=ask)
    t.start()
    assert consumed.wait(20), "the lease checkout never reached the emulator"
    kill(first)
    t.join(timeout=10)
    assert in_use(server) == {"Seats": 1}
    second = pod(MARKETPLACE_LICENSE_LEASE_TIMEOUT_SECONDS="5")
    r = lease(second, "x", 1)  # the product retries the same id
    assert r.status_code == 200, r.text
    assert in_use(server) == {"Seats": 1}
    lease_tokens = {c["client_token"] for c in calls(server, "CheckoutLicense")[1:]}
    assert len(lease_tokens) == 1


def test_two_products_racing_for_the_last_seat_exactly_one_wins(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    grant(lm, seats=1)
    p = pod()
    p.wait(checked_out)
    for round_ in range(10):
        gate = threading.Barrier(2)
        got: dict[str, requests.Response] = {}

        def race(lease_id: str, gate: threading.Barrier, got: dict[str, Any]) -> None:
            gate.wait()
            got[lease_id] = lease(p, lease_id, 1)

        ids = [f"r{round_}-a", f"r{round_}-b"]
        threads = [threading.Thread(target=race, args=(i, gate, got)) for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        codes = sorted(got[i].status_code for i in ids)
        assert codes == [200, 409], [got[i].text for i in ids]
        assert in_use(server) == {"Seats": 1}
        winner = next(i for i in ids if got[i].status_code == 200)
        assert post(p, "/v1/licenses/checkin", {"id": winner}).status_code == 200
        assert in_use(server) == {}


def test_license_revoked_with_leases_out_tells_the_product(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    grant(lm, seats=3)
    lm("config", {"ttl_seconds": 4})  # extensions every ~2 s
    p = pod()
    p.wait(checked_out)
    assert lease(p, "a", 1).status_code == 200
    lm("change", {"sku": SKU, "revoke": True})

    def lost() -> bool:
        return post(p, "/v1/licenses/renew", {"id": "a"}).status_code == 410

    until(lost, what="the lease reported lost")
    assert post(p, "/v1/licenses/renew", {"id": "a"}).json()["error"]["code"] == "lease_lost"
    assert in_use(server) == {} or state(server)["licenses"][SKU]["revoked"]
    assert post(p, "/v1/licenses/checkin", {"id": "a"}).status_code == 200
    assert p.get("/v1/licenses").json()["leases"] == []


def test_a_lease_whose_extension_lands_after_expiry_is_reported_lost_not_held(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    """Expiry racing an extension: AWS returned the units before the late extension arrived.
    The product must hear it (410), and nothing stays counted."""
    grant(lm, seats=3)
    p = pod()
    p.wait(checked_out)
    lm("config", {"ttl_seconds": 2})
    assert lease(p, "late", 1).status_code == 200
    lm("config", {"ttl_seconds": 2, "latency": 1.6})  # extend at ~1 s, arrives at ~2.6 s
    until(
        lambda: post(p, "/v1/licenses/renew", {"id": "late"}).status_code == 410,
        what="the lease reported lost",
    )
    lm("config", {"latency": 0})
    assert in_use(server).get("Seats", 0) == 0


@pytest.mark.parametrize("offset", [240.0, -240.0])
def test_leases_hold_across_extensions_with_a_skewed_clock(
    lm: Any, pod: Any, server: EmulatorServer, offset: float
) -> None:
    """AWS's Expiration is minutes from this machine's clock: leases are still kept (the expiry
    is counted from AWS's own IssuedAt on the monotonic clock, never compared with ours). Past
    SigV4's five minutes AWS denies every signed call (test_contract's hours-off test)."""
    grant(lm, seats=3)
    lm("config", {"ttl_seconds": 3, "clock_offset": offset})
    p = pod()
    p.wait(checked_out)
    assert lease(p, "s", 1).status_code == 200
    deadline = time.monotonic() + 7  # more than two lifetimes
    while time.monotonic() < deadline:
        assert post(p, "/v1/licenses/renew", {"id": "s"}).status_code == 200
        time.sleep(0.2)
    assert in_use(server) == {"Seats": 1}
    ok = [c for c in calls(server, "ExtendLicenseConsumption") if c["code"] == "ok"]
    assert len(ok) >= 2


def test_contract_and_lease_answers_match_the_openapi_document(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    from tests.test_openapi import check

    grant(lm, seats=1)
    p = pod()
    p.wait(checked_out)
    check("/v1/entitlement", "GET", p.get("/v1/entitlement"))
    check("/v1/licenses/checkout", "POST", lease(p, "a", 1))
    check("/v1/licenses/checkout", "POST", lease(p, "a", 1))
    check("/v1/licenses/checkout", "POST", lease(p, "b", 1))  # 409: no units left
    check("/v1/licenses/checkout", "POST", lease(p, "a", 0))  # 400
    check("/v1/licenses", "GET", p.get("/v1/licenses"))
    check("/v1/licenses/renew", "POST", post(p, "/v1/licenses/renew", {"id": "a"}))
    check("/v1/licenses/renew", "POST", post(p, "/v1/licenses/renew", {"id": "zz"}))
    check("/v1/licenses/renew", "POST", post(p, "/v1/licenses/renew", {"ids": "a"}))
    check("/v1/licenses/checkin", "POST", post(p, "/v1/licenses/checkin", {"id": "a"}))
    check("/v1/licenses/checkin", "POST", post(p, "/v1/licenses/checkin", {"id": "a"}))


def test_the_client_package_holds_and_returns_a_seat(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    from sidecar.client import LeaseError, checkin_lease, checkout_lease, renew_lease

    grant(lm, seats=1)
    p = pod()
    p.wait(checked_out)
    url = f"http://127.0.0.1:{p.api_port}"
    held = checkout_lease("worker-7", "Seats", 1, url=url)
    assert held["state"] == "held" and held["renew_within_seconds"] > 0
    assert renew_lease("worker-7", url=url)["id"] == "worker-7"
    with pytest.raises(LeaseError) as full:
        checkout_lease("worker-8", "Seats", 1, url=url)
    assert full.value.reason == "no_units_left"
    assert full.value.details == {"entitlement": "Seats", "units_asked": 1, "held_here": 1}
    assert checkin_lease("worker-7", url=url)["returned_to_license"]
    with pytest.raises(LeaseError) as gone:
        renew_lease("worker-7", url=url)
    assert gone.value.reason == "unknown_lease"
    assert in_use(server) == {}


def test_a_lease_that_cannot_be_kept_on_disk_is_refused_before_any_checkout(
    lm: Any, pod: Any, server: EmulatorServer, tmp_path: Path
) -> None:
    """Something sits where the state file goes (here a directory: the rename over it fails,
    as on a full or read-only volume): the lease is refused with 503 and nothing is consumed."""
    grant(lm, seats=3)
    (tmp_path / "state" / STATE_FILE).mkdir()
    p = pod()
    p.wait(checked_out)  # the pod itself still runs (its restart protection is off: logged)
    assert "contract_state_not_saved" in p.logs()
    before = len(calls(server, "CheckoutLicense"))
    r = lease(p, "a", 1)
    assert r.status_code == 503 and r.json()["error"]["code"] == "state_not_saved"
    assert "Retry-After" in r.headers
    assert len(calls(server, "CheckoutLicense")) == before
    assert in_use(server) == {}


def test_a_restart_while_license_manager_throttles_keeps_the_leases(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    """After a SIGKILL, the first extensions of the restored leases are throttled: the leases
    still have most of their grant (counted from the last extension), so they stay held and
    are extended once License Manager answers, not reported lost at the first refusal."""
    grant(lm, seats=3)
    first = pod()
    first.wait(checked_out)
    assert lease(first, "a", 2).status_code == 200
    kill(first)
    lm(
        "config",
        {
            "faults": [
                {
                    "error": "RateLimitExceededException",
                    "first": 4,
                    "op": "ExtendLicenseConsumption",
                }
            ]
        },
    )
    second = pod()
    second.wait(checked_out)

    def extended_twice() -> bool:
        assert post(second, "/v1/licenses/renew", {"id": "a"}).status_code == 200
        ok = [c for c in calls(server, "ExtendLicenseConsumption") if c["code"] == "ok"]
        return len(ok) >= 2  # the pod's own checkout and the lease

    until(extended_twice, what="the lease extended after the throttling")
    assert in_use(server) == {"Seats": 2}
    assert "lease_lost" not in second.logs()


def test_a_lease_check_in_owed_shows_in_the_metrics_until_aws_takes_it_back(
    lm: Any, pod: Any, server: EmulatorServer
) -> None:
    """The product checked its lease in while License Manager throttled CheckInLicense: the
    sidecar retries it, but nothing on /metrics said a seat was still held at AWS."""
    grant(lm, seats=3)
    p = pod()
    p.wait(checked_out)
    assert lease(p, "job-1", 2).status_code == 200
    gauge = 'marketplace_license_checkins_owed{source="lease"} '
    assert gauge + "0.0" in p.get("/metrics", probe=True).text
    throttled = {"error": "RateLimitExceededException", "first": 10_000, "op": "CheckInLicense"}
    lm("config", {"faults": [throttled]})
    out = post(p, "/v1/licenses/checkin", {"id": "job-1"})
    assert out.status_code == 200 and out.json()["returned_to_license"] is False
    metrics = p.get("/metrics", probe=True).text
    assert gauge + "1.0" in metrics
    assert 'marketplace_license_checkins_owed{source="checkout"} 0.0' in metrics
    until(lambda: len(calls(server, "CheckInLicense")) >= 3, what="the check-in retried")
    assert gauge + "1.0" in p.get("/metrics", probe=True).text  # still owed, still shown
    assert in_use(server) == {"Seats": 2}
    lm("config", {"faults": []})
    until(lambda: gauge + "0.0" in p.get("/metrics", probe=True).text, what="gauge back to 0")
    assert in_use(server) == {}
