"""Two or three stop signals back to back, as kubelet, ECS, shells and test harnesses send them.

A signal handler runs on the main thread between two bytecodes, possibly inside another
handler: one that takes a lock (`threading.Event.set`) can wait forever for the lock its own
thread already holds. The sidecar would then hang until the grace period ends and be killed
with its drain unfinished. Each round starts a real `run` process in one mode, has it
acknowledge usage, sends the burst and expects exit 0 within a bound and the usage billed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import ROOT, free_port
from tests.saas_kit import Car, Ops, saas_env, wait_up

# Rounds per mode; 2 and 3 signals alternate. 66 rounds in all, each a fresh process (the slow
# set). `make test` runs one round of each kind per mode (FAST_ROUNDS): 2 signals plus one at the
# worst instant; 3 signals; 3 ending in SIGINT plus one at the worst instant.
ROUNDS = {"hourly": 22, "custom": 22, "saas": 22}
FAST_ROUNDS = (0, 3, 6)
BOUND = 20.0  # drain budget 3 s; a hang is forever, a loaded machine is not that slow
PARALLEL = 3


def _env(mode: str, url: str, emulator: Emulator, state: Path) -> dict[str, str]:
    # saas_env: loopback, fast backoff, faulthandler; other modes replace the mode's settings.
    env = saas_env(url, state_dir=state, MARKETPLACE_DRAIN_SECONDS="3")
    env["MARKETPLACE_LOG_LEVEL"] = "INFO"
    if mode == "saas":
        env["MARKETPLACE_ACCEPT_UNRESOLVED_CUSTOMERS"] = "true"
        return env
    env.update(MARKETPLACE_MODE=mode, MARKETPLACE_PRODUCT_CODE="prod-abc")
    if mode == "hourly":
        env.pop("MARKETPLACE_DIMENSIONS")
        env["MARKETPLACE_PUBLIC_KEY"] = emulator.public_pem()
    else:
        env.update(MARKETPLACE_DIMENSIONS="users", MARKETPLACE_ENTITLEMENT_CHECK="dry_run")
    return env


def _spawn(env: dict[str, str], logs: Path, name: str, *, worst_moment: bool) -> Car:
    """A `run` process (saas_kit.spawn's twin), optionally under tests/worst_moment.py."""
    api, probe = free_port(), free_port()
    env = {**env, "MARKETPLACE_LISTEN": f"127.0.0.1:{api}"}
    env["MARKETPLACE_PROBE_LISTEN"] = f"127.0.0.1:{probe}"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    module = "tests.worst_moment" if worst_moment else "sidecar"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "run"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    return Car(name, env, log, proc, f"http://127.0.0.1:{api}", f"http://127.0.0.1:{probe}")


def _ready(car: Car) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if car.get("/readyz", probe=True).status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"{car.name} not ready: {car.logs()[-2000:]}")


def _round(n: int, mode: str, ops: Ops, emulator: Emulator, url: str, tmp: Path) -> str | None:
    """One process, one burst. None when all went well, else what went wrong."""
    state = tmp / f"{mode}{n}"
    state.mkdir()
    worst = n % 2 == 0  # every other round: one more signal at the worst instant
    car = _spawn(_env(mode, url, emulator, state), tmp / "logs", f"{mode}{n}", worst_moment=worst)
    try:
        wait_up(car)
        _ready(car)
        if mode == "custom":
            record = {"dimension": "users", "quantity": 5, "id": uuid.uuid4().hex}
        elif mode == "saas":
            cust = ops.customer(10_000 + n)
            record = {"dimension": "seats", "quantity": 5, **cust.fields()}
        if mode != "hourly":
            resp = requests.post(car.api + "/v1/usage", json=record, timeout=10)
            assert resp.status_code == 202, resp.text
        burst = [signal.SIGTERM] * (2 + (n // 2) % 2)  # 2, 2, 3, 3, 2, 2, ...
        if n % 8 >= 6:
            burst[-1] = signal.SIGINT  # a Ctrl-C on top of the orchestrator's SIGTERM
        for sig in burst:
            os.kill(car.proc.pid, sig)
        started = time.monotonic()
        try:
            code = car.proc.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            car.proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack
            car.proc.wait(timeout=10)
            how = f"{len(burst)} signals" + (" + 1 at the worst instant" if worst else "")
            return f"{car.name} ({how}) hung:\n{car.logs()[-4000:]}"
        took = time.monotonic() - started
        if code != 0:
            return f"{car.name} exited {code} after {took:.1f} s: {car.logs()[-2000:]}"
        logs = car.logs()
        if "drain_incomplete" in logs or "drain_failed" in logs:
            return f"{car.name}: drain unfinished: {logs[-2000:]}"
        if mode == "custom":
            pods = [
                r for r in emulator.ledger()["records"] if r["pod"] == car.env["AWS_ACCESS_KEY_ID"]
            ]
            if [r["quantity"] for r in pods if r["dimension"] == "users"] != [5]:
                return f"{car.name}: drained {pods}"
        if mode == "saas":
            billed = [r for r in ops.ledger()["records"] if r["customer"] == cust.key]
            if [r["quantity"] for r in billed] != [5]:
                return f"{car.name}: drained {billed}"
        return None
    finally:
        if car.proc.poll() is None:
            car.proc.kill()
            car.proc.wait(timeout=10)


def _rounds(
    mode: str, rounds: Sequence[int], server: EmulatorServer, emulator: Emulator, tmp: Path
) -> None:
    ops = Ops(server.url)
    with ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = list(pool.map(lambda n: _round(n, mode, ops, emulator, server.url, tmp), rounds))
    failures = [o for o in outcomes if o is not None]
    assert failures == [], f"{len(failures)}/{len(rounds)} rounds failed:\n" + "\n".join(failures)


@pytest.mark.slow  # 66 fresh processes, 3 at a time: a chaos run (FAST_ROUNDS below is its sample)
@pytest.mark.parametrize("mode", list(ROUNDS))
def test_a_burst_of_stop_signals_exits_0_with_the_drain_done(
    mode: str, emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    _rounds(mode, range(ROUNDS[mode]), emulator_server, emulator, tmp_path)


@pytest.mark.parametrize("mode", list(ROUNDS))
def test_each_kind_of_stop_signal_burst_exits_0_with_the_drain_done(
    mode: str, emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    """The chaos run's three kinds of round, once each: what `make test` keeps of it."""
    _rounds(mode, FAST_ROUNDS, emulator_server, emulator, tmp_path)


def test_the_emulator_command_also_exits_0_on_a_burst(tmp_path: Path) -> None:
    """`marketplace-sidecar emulator` had the same handler (Event.set in the handler)."""
    for n in range(6):
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.worst_moment",
                "emulator",
                "--listen",
                f"127.0.0.1:{port}",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            assert proc.stdout is not None
            assert b"emulator listening" in proc.stdout.readline()
            for _ in range(2 + n % 2):
                os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=BOUND) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
