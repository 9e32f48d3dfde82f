"""The real `run` process at start: taken ports, a non-loopback API, SIGTERM during imports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests

from sidecar.app import Daemon, ListenError
from sidecar.config_validate import validated
from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import ROOT, Sidecar, free_port, loopback_env, new_key, pem, start_sidecar


@pytest.fixture
def env(emulator_server: EmulatorServer, emulator: Emulator) -> dict[str, str]:
    return loopback_env(
        emulator_server.url,
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_PUBLIC_KEY=emulator.public_pem(),
        MARKETPLACE_LISTEN=f"127.0.0.1:{free_port()}",
        MARKETPLACE_PROBE_LISTEN=f"127.0.0.1:{free_port()}",
    )


@pytest.fixture
def taken() -> Iterator[str]:
    """A loopback port another process is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("variable", ["MARKETPLACE_LISTEN", "MARKETPLACE_PROBE_LISTEN"])
def test_a_port_in_use_is_a_config_error_naming_the_listener(
    env: dict[str, str], taken: str, emulator: Emulator, variable: str
) -> None:
    env[variable] = taken
    out = run(env)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("config error: ")]
    assert errors == [
        f"config error: {variable}: cannot listen on {taken}: address already in use: another "
        "process (or another container in the pod, which shares its network) holds this port; "
        "choose a free port"
    ]
    logged = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    failed = [r for r in logged if r["event"] == "bind_failed"]
    assert failed and failed[0]["variable"] == variable and failed[0]["address"] == taken
    assert not any(r["event"] in ("listening", "aws_client") for r in logged)
    assert emulator.calls == []  # nothing started, so AWS was not called


def test_a_probe_port_in_use_leaves_no_api_listener_behind(taken: str) -> None:
    """The API binds first: when the probe then fails, the API socket must be closed at once
    (not whenever the half-built daemon is collected), so nothing answers on it."""
    api = f"127.0.0.1:{free_port()}"
    key = new_key()
    settings = validated(
        {"product_code": "prod-abc", "public_key": pem(key), "listen": api, "probe_listen": taken}
    )
    with pytest.raises(ListenError) as exc:
        Daemon(settings, {1: key.public_key()})
    assert exc.value.variable == "MARKETPLACE_PROBE_LISTEN"
    with socket.socket() as s:  # exc still references the half-built daemon
        s.bind(("127.0.0.1", int(api.rsplit(":", 1)[1])))


def test_an_address_of_no_interface_is_a_config_error(env: dict[str, str]) -> None:
    env["MARKETPLACE_PROBE_LISTEN"] = f"192.0.2.1:{free_port()}"  # TEST-NET-1: never local
    out = run(env)
    assert out.returncode == 2
    assert "config error: MARKETPLACE_PROBE_LISTEN: cannot listen on 192.0.2.1:" in out.stderr
    assert "no interface of this host has that address" in out.stderr


def test_wildcard_api_is_refused_before_binding(env: dict[str, str]) -> None:
    port = free_port()
    env["MARKETPLACE_LISTEN"] = f"0.0.0.0:{port}"
    out = run(env)
    assert out.returncode == 2
    assert out.stderr.startswith(
        f"config error: MARKETPLACE_LISTEN: 0.0.0.0:{port} is not a loopback address"
    )
    assert "MARKETPLACE_LISTEN_ALLOW_NON_LOOPBACK=true" in out.stderr


def _start(env: dict[str, str], sidecars: list[Sidecar], api: str) -> Sidecar:
    """A sidecar whose API is at `api` (the helper's own readiness wait assumes 127.0.0.1)."""
    car = start_sidecar(env, wait=False)
    sidecars.append(car)
    car.api = api
    deadline = time.monotonic() + 15
    while car.proc.poll() is None and time.monotonic() < deadline:
        try:
            car.get("/healthz")
            return car
        except requests.ConnectionError:
            time.sleep(0.05)
    raise AssertionError(f"sidecar did not start: {car.stop()} {car.logs()}")


def test_ipv6_loopback_api_needs_no_opt_in(env: dict[str, str], sidecars: list[Sidecar]) -> None:
    port = free_port()
    env["MARKETPLACE_LISTEN"] = f"[::1]:{port}"
    car = _start(env, sidecars, f"http://[::1]:{port}")
    doc = car.wait_for(lambda d: d["state"] == "entitled")
    assert doc["warnings"] == []


def test_non_loopback_api_with_the_opt_in_warns_in_log_and_entitlement(
    env: dict[str, str], sidecars: list[Sidecar]
) -> None:
    # "127.1" is a host *name* to the sidecar (not an IP literal it can judge), so it needs the
    # opt-in like 0.0.0.0 does; the resolver reads it as 127.0.0.1, which keeps the test on
    # loopback.
    port = free_port()
    env["MARKETPLACE_LISTEN"] = f"127.1:{port}"
    env["MARKETPLACE_LISTEN_ALLOW_NON_LOOPBACK"] = "true"
    car = _start(env, sidecars, f"http://127.0.0.1:{port}")
    doc = car.wait_for(lambda d: d["state"] == "entitled")
    expected = (
        f"MARKETPLACE_LISTEN=127.1:{port} is not loopback (allowed by "
        "MARKETPLACE_LISTEN_ALLOW_NON_LOOPBACK): anything that reaches this address can read "
        "the entitlement token and send challenges to AWS; restrict it with a NetworkPolicy or "
        "security group"
    )
    assert doc["warnings"] == [expected]
    answer = requests.post(car.api + "/v1/entitlement/challenge", json={"nonce": "n"}, timeout=10)
    assert answer.status_code == 200 and answer.json()["warnings"] == [expected]
    assert car.stop() == 0
    logged = [json.loads(line) for line in car.logs().splitlines() if line.startswith("{")]
    assert any(r["event"] == "config" and r.get("detail") == expected for r in logged)


# -- SIGTERM while starting ------------------------------------------------------------------

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def _caught_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler installed (kernel view, /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & SIGTERM_BIT)
    return False


def _mapped(pid: int, library: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return library in f.read()


def _spawn(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:  # exited
        return []


@pytest.mark.parametrize(
    ("moment", "sig"),
    [
        ("validating", signal.SIGTERM),
        ("validating", signal.SIGINT),
        ("importing", signal.SIGTERM),
        ("importing", signal.SIGINT),
    ],
)
def test_a_signal_during_the_heavy_imports_exits_0(
    env: dict[str, str], emulator: Emulator, moment: str, sig: signal.Signals
) -> None:
    """Deterministic: the signal is sent the moment the child that validates the settings
    exists, or the moment cryptography's native module is mapped (the daemon's imports).
    Before the fix the handler came ~0.3 s later and the process died by the signal (exit
    -15). The child is gone when the sidecar has exited (no zombie, no orphan)."""
    proc = _spawn(env)
    children: list[int] = []
    try:
        while proc.poll() is None and not (
            (children := _children(proc.pid))
            if moment == "validating"
            else _mapped(proc.pid, "_rust.abi3")
        ):
            time.sleep(0.002)  # leave the CPU to the process under test
        assert proc.poll() is None, f"exited before {moment}"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert emulator.calls == []  # stopped before the first RegisterUsage
    for child in children:  # reaped by the sidecar before it exited
        assert not os.path.exists(f"/proc/{child}"), child


def test_sigterm_right_after_spawn_never_ends_the_process_once_our_code_runs(
    env: dict[str, str],
) -> None:
    """SIGTERM at 0-0.4 s after spawn, many times. A signal can still kill the interpreter
    while Python itself starts (before any of our code runs); from the first line of our
    code on it must exit 0, and the handler must be in place before the heavy imports
    (cryptography's native module here; pydantic is imported only by a child)."""
    outcomes = []
    for i in range(12):
        proc = _spawn(env)
        try:
            time.sleep(i * 0.035)
            heavy = _mapped(proc.pid, "_rust.abi3")
            caught = _caught_sigterm(proc.pid)  # read after `heavy`: the handler stays
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
        outcomes.append((i, heavy, caught, proc.returncode))
        assert not heavy or caught, f"cryptography imported before the handler: {outcomes}"
        if caught:
            assert proc.returncode == 0, (outcomes, stderr)
        else:  # the handler may have come up between our look and the signal
            assert proc.returncode in (0, -signal.SIGTERM), (outcomes, stderr)
    assert any(caught for _, _, caught, _ in outcomes), outcomes
