"""Custom mode through time and capacity faults, on the real `run` process and the emulator:
a clock ahead of AWS's at start, a full state volume, and the start check's first hour.

Hours pass in seconds on the test-only scaled clock (the emulator's MeterUsage clock runs with
the same formula); the full volume is a real 16 MiB tmpfs (room for the volume guard's
margins), filled and freed by the test.
"""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.usage.service import EntitlementResult
from tests.helpers import ROOT, ManualClock, Sidecar, loopback_env, start_sidecar
from tests.usage_kit import service

SCALE = 720.0  # an hour passes in 5 s


class Tail:
    """The sidecar's JSON log lines, read as they come (the process keeps running)."""

    def __init__(self, car: Sidecar) -> None:
        self.events: list[dict[str, Any]] = []
        self.text: list[str] = []
        assert car.proc.stderr is not None
        self._stream = car.proc.stderr
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.text.append(line)
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == event]

    def join(self) -> None:
        self._thread.join(timeout=10)


def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def custom_env(url: str, state: Path, **extra: str) -> dict[str, str]:
    base = {
        "MARKETPLACE_PRODUCT_CODE": "prod-abc",
        "MARKETPLACE_MODE": "custom",
        "MARKETPLACE_DIMENSIONS": "scans,users",
        "MARKETPLACE_STATE_DIR": str(state),
    }
    return loopback_env(url, **{**base, **extra})


def scaled(origin: float) -> dict[str, str]:
    return {
        "MARKETPLACE_TEST_ONLY_TIME_SCALE": str(SCALE),
        "MARKETPLACE_TEST_ONLY_TIME_ORIGIN": repr(origin),
    }


def post(car: Sidecar, dimension: str, quantity: int) -> requests.Response:
    return requests.post(
        car.api + "/v1/usage", json={"dimension": dimension, "quantity": quantity}, timeout=10
    )


def billed(emulator: Emulator) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in emulator.ledger()["records"]:
        out[rec["dimension"]] = out.get(rec["dimension"], 0) + rec["quantity"]
    return out


def assert_once(emulator: Emulator) -> None:
    ledger = emulator.ledger()
    keys = [(r["pod"], r["dimension"], r["hour"]) for r in ledger["records"]]
    assert len(keys) == len(set(keys))
    assert ledger["counts"].get("DuplicateRequestException", 0) == 0
    assert ledger["counts"].get("IdempotencyConflictException", 0) == 0


# -- item 2: the start check with a clock ahead of AWS's ----------------------------------------


def test_start_check_with_the_clock_ahead_is_not_ready_retried_then_heals_and_bills_once(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    """meter_zero's quantity-0 record is stamped with this pod's clock; AWS refuses a timestamp
    in its future (TimestampOutOfBoundsException). That is a clock problem, not a refusal: the
    pod is not ready with a ClockSkew error and a growing failure count, keeps acknowledging
    usage, and once the clocks agree it is entitled and everything is billed exactly once."""
    origin = time.time()
    ahead = 3600.0  # the pod's clock one hour ahead of AWS's (the emulator's)
    emulator.reconfigure(
        {"time_scale": SCALE, "time_origin": origin + ahead / (SCALE - 1), "dimensions": None}
    )
    env = custom_env(
        emulator_server.url,
        tmp_path,
        **scaled(origin),
        MARKETPLACE_BACKOFF_BASE_SECONDS="60",  # scaled seconds: ~0.1-0.4 s of real time
        MARKETPLACE_BACKOFF_CAP_SECONDS="300",
        MARKETPLACE_REGISTER_DEADLINE_SECONDS="20000",  # about 28 s of real time
    )
    car = start_sidecar(env)
    try:
        doc = car.wait_for(lambda d: d["consecutive_failures"] >= 2, 15)
        assert doc["state"] == "registering", doc
        assert doc["error"]["code"] == "ClockSkew"
        assert doc["error"]["kind"] == "clock"
        assert "TimestampOutOfBoundsException" in doc["error"]["message"]
        assert "clock" in doc["error"]["hint"]
        assert car.get("/readyz", probe=True).status_code == 503
        acked = {"users": 5, "scans": 3}
        for dim, q in acked.items():
            assert post(car, dim, q).status_code == 202
        assert emulator.ledger()["records"] == []
        emulator.reconfigure({"time_origin": origin})  # the clocks agree again
        doc = car.wait_for(lambda d: d["state"] == "entitled", 15)
        assert doc["error"] is None and doc["consecutive_failures"] == 0
        assert car.get("/readyz", probe=True).status_code == 200
        # the carried first hour of `scans` and the first hour of `users`: ~2 hours = 10 s
        until(lambda: billed(emulator) == acked, 40, f"billed {acked}")
    finally:
        car.stop()
    assert_once(emulator)
    zero = [r for r in emulator.ledger()["records"] if r["quantity"] == 0]
    assert [r["dimension"] for r in zero] == ["scans"]  # the start check itself, once


# -- item 6: a full state volume ----------------------------------------------------------------


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB tmpfs (the volume guard counts 2 MiB of SQLite cache besides the files;
    needs root, as in the project's CI container)."""
    vol = tmp_path / "vol"
    vol.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(vol)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a 16 MiB tmpfs (root needed): {out.stderr.strip()}")
    try:
        yield vol
    finally:  # lazily if a failed test left a file open on it: never leave a mount behind
        if subprocess.run(["umount", str(vol)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(vol)], check=True)


def fill(volume: Path) -> Path:
    """Write until the volume refuses (ENOSPC); the file that fills it."""
    filler = volume / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with contextlib.suppress(OSError), filler.open("ab", buffering=0) as f:
        while f.write(b"\0" * 512):  # the last partial chunk too
            pass
    return filler


def test_a_full_state_volume_answers_503_keeps_the_loop_alive_and_resumes_when_freed(
    emulator_server: EmulatorServer, emulator: Emulator, small_volume: Path
) -> None:
    origin = time.time()
    emulator.reconfigure({"time_scale": SCALE, "time_origin": origin})
    env = custom_env(
        emulator_server.url,
        small_volume,
        **scaled(origin),
        MARKETPLACE_ENTITLEMENT_CHECK="none",
        MARKETPLACE_BACKOFF_BASE_SECONDS="60",
        MARKETPLACE_BACKOFF_CAP_SECONDS="300",
    )
    car = start_sidecar(env)
    tail = Tail(car)
    try:
        car.wait_for(lambda d: d["state"] == "entitled", 15)
        acked = 4
        assert post(car, "users", 4).status_code == 202
        filler = fill(small_volume)
        for _ in range(3):  # never 202 for usage that is not durable
            r = post(car, "users", 1)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "store_unavailable"
        # the hour ends; sealing it needs a write: the loop meets the full volume, again and
        # again (a single failure may be the start's prune, which a later pass does not retry)
        until(
            lambda: (
                any(e["failures"] >= 2 for e in tail.named("usage_loop_store_unavailable"))
                or car.get("/healthz").status_code != 200
            ),
            30,
            "the loop met the full volume twice in a row",
        )
        health = car.get("/healthz")
        assert health.status_code == 200, health.text  # not "usage loop crashed"
        sending = car.get("/v1/usage").json()["sending"]
        assert sending["store_error"], "".join(tail.text[-20:])
        assert billed(emulator) == {}
        filler.unlink()  # space is freed: it resumes by itself
        until(lambda: billed(emulator) == {"users": acked}, 30, "the sealed hour sent")
        assert post(car, "users", 2).status_code == 202
        acked += 2
        until(lambda: billed(emulator) == {"users": acked}, 30, "the next hour sent")
        assert car.get("/healthz").status_code == 200
        assert car.get("/v1/usage").json()["sending"]["store_error"] is None
    finally:
        car.stop()
        tail.join()
    assert_once(emulator)
    assert tail.named("usage_loop_store_recovered")


def test_a_full_state_volume_at_the_start_check_is_retried_and_heals(
    clock: ManualClock, emulator: Emulator, small_volume: Path
) -> None:
    """The start check's own record cannot be stored: a retryable StateDirUnwritable (shown
    while it lasts), never a crash or a refusal; freeing space heals it."""
    seen: list[EntitlementResult] = []
    filler: list[Path] = []

    def on_entitlement(result: EntitlementResult) -> None:
        seen.append(result)
        if len(seen) == 2:
            filler[0].unlink()  # space is freed after two failed attempts

    svc = service(small_volume, clock, check="meter_zero", on_entitlement=on_entitlement)
    try:
        filler.append(fill(small_volume))
        result = svc.check_entitlement(threading.Event())
    finally:
        svc.close()
    assert result.outcome == "entitled", result
    assert [(r.outcome, r.error and r.error.code) for r in seen] == [
        ("retrying", "StateDirUnwritable"),
        ("retrying", "StateDirUnwritable"),
    ]
    assert seen[0].error is not None and "free space" in seen[0].error.hint
    assert billed(emulator) == {"scans": 0}


def test_an_unpublished_check_dimension_is_refused_with_a_hint_naming_the_setting(
    clock: ManualClock, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.reconfigure({"dimensions": ["scans", "users"]})
    svc = service(
        tmp_path,
        clock,
        check="meter_zero",
        dimensions=("scans", "users", "entitlement_check"),
        check_dimension="entitlement_check",
    )
    result = svc.check_entitlement(threading.Event())
    assert result.outcome == "refused"
    assert result.error is not None
    assert result.error.code == "InvalidUsageDimensionException"
    assert "MARKETPLACE_ENTITLEMENT_DIMENSION" in result.error.hint
    assert "'entitlement_check'" in result.error.hint
    svc.close()


# -- item 11: the start check's first hour ------------------------------------------------------


def away_from_the_hour_end(margin: float = 60.0) -> None:
    """These tests run on the real clock inside one hour: never straddle its end."""
    left = 3600 - time.time() % 3600
    if left < margin:
        time.sleep(left + 1)


def test_default_check_logs_and_counts_the_first_hour_usage_a_short_pod_loses(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    """meter_zero on the first dimension takes its current hour: that dimension's usage moves
    to the next hour, which a pod ending now cannot send. The loss is logged at shutdown with
    the dimension and quantity, and counted in a metric (before and at exit)."""
    away_from_the_hour_end()
    car = start_sidecar(custom_env(emulator_server.url, tmp_path))
    tail = Tail(car)
    try:
        car.wait_for(lambda d: d["state"] == "entitled", 15)
        assert post(car, "scans", 2).status_code == 202
        assert post(car, "users", 3).status_code == 202
        metrics = car.get("/metrics", probe=True).text
        assert 'marketplace_usage_future_hour_units{dimension="scans"} 2.0' in metrics
        assert 'marketplace_usage_future_hour_units{dimension="users"} 0.0' in metrics
    finally:
        assert car.stop() == 0
        tail.join()
    lost = tail.named("usage_unsent_at_exit")
    assert [(e["dimension"], e["quantity"], e["reason"]) for e in lost] == [
        ("scans", 2, "future_hour")
    ]
    (summary,) = tail.named("drain_incomplete")
    assert summary["unsent_units"] == 2
    assert billed(emulator) == {"scans": 0, "users": 3}


def test_a_check_dimension_locks_no_usage_dimension_and_a_short_pod_loses_nothing(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    away_from_the_hour_end()
    env = custom_env(
        emulator_server.url,
        tmp_path,
        MARKETPLACE_DIMENSIONS="scans,users,entitlement_check",
        MARKETPLACE_ENTITLEMENT_DIMENSION="entitlement_check",
    )
    car = start_sidecar(env)
    tail = Tail(car)
    try:
        car.wait_for(lambda d: d["state"] == "entitled", 15)
        first = post(car, "scans", 2)
        assert first.status_code == 202
        assert "carried_from" not in first.json()["records"][0]
        assert post(car, "users", 3).status_code == 202
        refused = post(car, "entitlement_check", 1)  # the check dimension takes no usage
        assert refused.status_code == 400
        assert "dimension" in refused.text
        report = car.get("/v1/usage").json()
        assert report["dimensions"] == ["scans", "users"]
        assert report["check_dimension"] == "entitlement_check"
    finally:
        assert car.stop() == 0
        tail.join()
    assert tail.named("usage_unsent_at_exit") == []
    assert tail.named("drain_incomplete") == []
    assert billed(emulator) == {"entitlement_check": 0, "scans": 2, "users": 3}
    hours = {r["hour"] for r in emulator.ledger()["records"]}
    assert len(hours) == 1  # all of it in the pod's only hour
    assert_once(emulator)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"MARKETPLACE_ENTITLEMENT_DIMENSION": "nope"},
            "MARKETPLACE_ENTITLEMENT_DIMENSION: 'nope' is not one of MARKETPLACE_DIMENSIONS "
            "(scans, users)",
        ),
        (
            {"MARKETPLACE_DIMENSIONS": "check", "MARKETPLACE_ENTITLEMENT_DIMENSION": "check"},
            "MARKETPLACE_ENTITLEMENT_DIMENSION: 'check' is the only dimension",
        ),
        (
            {"MARKETPLACE_ENTITLEMENT_DIMENSION": "users", "MARKETPLACE_ENTITLEMENT_CHECK": "none"},
            "MARKETPLACE_ENTITLEMENT_DIMENSION: only used with "
            "MARKETPLACE_ENTITLEMENT_CHECK=meter_zero",
        ),
        (
            {"MARKETPLACE_MODE": "hourly", "MARKETPLACE_ENTITLEMENT_DIMENSION": "users"},
            "MARKETPLACE_ENTITLEMENT_DIMENSION: only used with MARKETPLACE_MODE=custom",
        ),
    ],
)
def test_a_bad_check_dimension_is_a_config_error_naming_it(
    tmp_path: Path, env: dict[str, str], line: str
) -> None:
    # Config errors stop the process before any call: a loopback URL nothing listens on.
    full = custom_env("http://127.0.0.1:9", tmp_path, **env)
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert line in out.stderr, out.stderr
