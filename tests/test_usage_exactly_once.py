"""Attacks on the usage pipeline's promise (every acknowledged unit billed exactly once): the
real store, the real boto3 gateway and the emulator over loopback, on a manual clock."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.usage.hours import hour_of, hour_start
from sidecar.usage.store import DB_NAME, Store, StoreError
from sidecar.usage.validate import MAX_QUANTITY
from tests.helpers import ManualClock, loopback_env, start_sidecar
from tests.usage_kit import ledger_totals, post, run_for, service

H0 = hour_of(ManualClock().t)


def test_two_old_hours_carried_into_one_never_exceed_meterusage_maximum(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    """Two unsent hours, each near MeterUsage's maximum, carried after a long outage into the
    same open hour must not make one record AWS refuses (every unit of it would be lost)."""
    big = MAX_QUANTITY - 10
    svc = service(tmp_path, clock)
    assert post(svc, {"dimension": "scans", "quantity": big})[0] == 202
    clock.t = hour_start(H0 + 1) + 5
    assert post(svc, {"dimension": "scans", "quantity": big})[0] == 202
    svc.close()
    # The sidecar was down (or AWS unreachable before sealing) until both hours are too old.
    clock.t = hour_start(H0 + 7) - 30
    svc = service(tmp_path, clock)
    run_for(svc, clock, 4 * 3600)
    report = svc.report()
    assert report["totals"]["scans"]["sent"] == 2 * big, report["hours"]
    assert all(h["quantity"] <= MAX_QUANTITY for h in report["hours"])
    assert ledger_totals(emulator) == {"scans": 2 * big}
    svc.close()


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_a_store_shared_with_another_sidecar_through_a_link_is_refused(
    tmp_path: Path, how: str
) -> None:
    """Each state dir has its own lock; a store reached through a link from a second state dir
    would have two senders on one set of sealed hours: every hour billed twice."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    owner = Store(first)
    try:
        owner.write(lambda c: c.execute("INSERT INTO meta VALUES ('marker', 'a')"))
        if how == "symlink":
            (second / DB_NAME).symlink_to(first / DB_NAME)
        else:
            os.link(first / DB_NAME, second / DB_NAME)
        with pytest.raises(StoreError, match="link"):
            Store(second)
        assert owner.read(lambda c: c.execute("SELECT COUNT(*) FROM meta").fetchone()[0]) == 2
    finally:
        owner.close()


def test_a_fifo_in_place_of_the_store_is_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / DB_NAME)
    with pytest.raises(StoreError):
        Store(tmp_path)


def test_two_old_hours_carried_into_one_never_exceed_meterusage_allocations(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    """Same outage, with tag sets: two hours of 1,800 distinct tag sets each, merged into one
    record, would make 3,600 allocations (AWS takes 2,500) and be refused whole."""

    def batch(prefix: str) -> list[dict[str, object]]:
        return [
            {
                "dimension": "scans",
                "quantity": 2,
                "allocations": [
                    {"quantity": 1, "tags": {"team": f"{prefix}a{i}"}},
                    {"quantity": 1, "tags": {"team": f"{prefix}b{i}"}},
                ],
            }
            for i in range(900)
        ]

    svc = service(tmp_path, clock)
    assert post(svc, batch("x"))[0] == 202
    clock.t = hour_start(H0 + 1) + 5
    assert post(svc, batch("y"))[0] == 202
    svc.close()
    clock.t = hour_start(H0 + 7) - 30
    svc = service(tmp_path, clock)
    run_for(svc, clock, 4 * 3600)
    report = svc.report()
    assert report["totals"]["scans"]["sent"] == 3600, report["hours"]
    assert ledger_totals(emulator) == {"scans": 3600}
    svc.close()


def _custom_env(server: EmulatorServer, state: Path) -> dict[str, str]:
    return loopback_env(
        server.url,
        MARKETPLACE_MODE="custom",
        MARKETPLACE_DIMENSIONS="scans,users",
        MARKETPLACE_STATE_DIR=str(state),
        MARKETPLACE_ENTITLEMENT_CHECK="none",
    )


def test_concurrent_posts_of_one_id_with_different_content_count_one_of_them(
    tmp_path: Path, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """A real sidecar process, 16 clients racing the same id with quantities 1..16: exactly one
    is acknowledged (202), the others get 409, and the store holds that one quantity."""
    car = start_sidecar(_custom_env(emulator_server, tmp_path))
    try:
        answers: list[tuple[int, int]] = []
        gate = threading.Barrier(16)

        def client(q: int) -> None:
            gate.wait()
            resp = requests.post(
                car.api + "/v1/usage",
                json={"dimension": "scans", "quantity": q, "id": "race-1"},
                timeout=10,
            )
            answers.append((resp.status_code, q))

        threads = [threading.Thread(target=client, args=(q,)) for q in range(1, 17)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        codes = sorted(code for code, _ in answers)
        assert codes == [202] + [409] * 15, answers
        winner = next(q for code, q in answers if code == 202)
        report = car.get("/v1/usage").json()
        assert report["totals"]["scans"]["accepted"] == winner
        assert car.stop() == 0  # SIGTERM drains the partial hour: AWS gets the winner only
        assert ledger_totals(emulator) == {"scans": winner}
    finally:
        car.stop()


def test_a_second_sidecar_on_the_same_state_dir_or_a_linked_store_exits_before_binding(
    tmp_path: Path, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start_sidecar(_custom_env(emulator_server, tmp_path / "a"))
    try:
        second = start_sidecar(_custom_env(emulator_server, tmp_path / "a"), wait=False)
        assert second.proc.wait(timeout=30) != 0
        assert "another sidecar process" in second.logs()
        (tmp_path / "b" / DB_NAME).symlink_to(tmp_path / "a" / DB_NAME)
        third = start_sidecar(_custom_env(emulator_server, tmp_path / "b"), wait=False)
        assert third.proc.wait(timeout=30) != 0
        assert "link" in third.logs()
        assert first.get("/healthz").status_code == 200
    finally:
        first.stop()
