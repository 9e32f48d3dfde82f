"""The demo per mode as a newcomer runs it (loopback only), its papercuts, and the hints a
newcomer gets when starting a mode against the emulator by hand."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar import client
from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import ROOT, free_port, loopback_env, start_sidecar

BILLED_WITHIN = 60.0  # what the issue promises a newcomer
# PATH of a shell that never activated the virtualenv: the demo's lines must work from it.
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    lines: queue.Queue[str]
    seen: list[str]
    api: str
    probe: str

    def wait_line(self, pattern: str, timeout: float) -> str:
        """The first stdout line (seen or to come) matching `pattern`, within `timeout`."""
        deadline = time.monotonic() + timeout
        for line in self.seen:
            if re.search(pattern, line):
                return line
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r}; stdout: {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def next_lines(self, n: int, timeout: float) -> list[str]:
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            self.seen.append(line)
            out.append(line)
        return out


def _pump(stream: Any, into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))


@pytest.fixture
def start_demo() -> Iterator[Any]:
    started: list[Demo] = []

    def start(*args: str, **env: str) -> Demo:
        api, probe = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        full_env = {
            "PATH": PLAIN_PATH,
            "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHONUNBUFFERED": "1",
            "MARKETPLACE_LISTEN": api,
            "MARKETPLACE_PROBE_LISTEN": probe,
            **env,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "demo", *args],
            env=full_env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        demo = Demo(proc, lines, [], api, probe)
        started.append(demo)
        return demo

    yield start
    for demo in started:
        if demo.proc.poll() is None:
            demo.proc.send_signal(signal.SIGTERM)
            try:
                demo.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                demo.proc.kill()


def _wait_ready(demo: Demo, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"http://{demo.probe}/readyz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the demo never became ready"
        time.sleep(0.1)


def _stop(demo: Demo) -> int:
    demo.proc.send_signal(signal.SIGTERM)
    return demo.proc.wait(timeout=30)


# -- item 8: a demo per mode ----------------------------------------------------------------------


def test_custom_demo_prints_the_meter_usage_record_aws_billed(start_demo: Any) -> None:
    demo = start_demo("--mode", "custom")
    assert "Mode:              custom" in demo.wait_line(r"^Mode:", 30)
    posted = demo.wait_line(r"^demo: POST /v1/usage", 30)
    assert posted.endswith("-> 202")
    demo.wait_line(r"^demo: AWS billed \(MeterUsage", BILLED_WITHIN)
    record = json.loads(demo.next_lines(1, 5)[0])
    assert (record["dimension"], record["quantity"]) == ("scans", 3)
    assert record["metering_record_id"]
    assert _stop(demo) == 0


def test_saas_demo_prints_a_resolved_customer_and_its_batch_records(start_demo: Any) -> None:
    demo = start_demo("--mode", "saas")
    resolved = demo.wait_line(r"^demo: resolved customer ", 30)
    customer = json.loads(resolved.removeprefix("demo: resolved customer "))
    assert customer["state"] == "active" and customer["product_code"] == "demo-product-code"
    demo.wait_line(r"^demo: AWS billed \(BatchMeterUsage", BILLED_WITHIN)
    records = [json.loads(line) for line in demo.next_lines(2, 5)]
    assert sorted((r["dimension"], r["quantity"]) for r in records) == [("scans", 3), ("users", 2)]
    assert {r["customer"] for r in records} == {customer["customer"]}
    assert _stop(demo) == 0


def test_contract_demo_prints_a_license_manager_checkout(start_demo: Any) -> None:
    demo = start_demo("--mode", "contract")
    line = demo.wait_line(r"^demo: License Manager checkout", BILLED_WITHIN)
    doc = json.loads(line.split("): ", 1)[1])
    assert doc["state"] == "checked_out" and doc["license_arn"].startswith("arn:aws:")
    assert {"Name": "Seats", "Unit": "Count", "Value": "1"} in doc["entitlements_allowed"]
    assert demo.next_lines(1, 5)[0] == 'demo: seats in use: {"Seats": 1}'
    assert _stop(demo) == 0


def test_make_demo_passes_the_mode() -> None:
    out = subprocess.run(
        ["make", "-n", "demo", "MODE=saas"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "marketplace-sidecar demo --mode saas" in out.stdout


# -- item 9: papercuts ----------------------------------------------------------------------------


def test_the_printed_probe_line_works_as_printed_outside_the_virtualenv(start_demo: Any) -> None:
    demo = start_demo()
    line = demo.wait_line(r"probe .*&& echo ready$", 30).strip()
    _wait_ready(demo)
    shell = {"PATH": PLAIN_PATH, "HOME": os.environ.get("HOME", "/tmp")}  # no MARKETPLACE_*
    out = subprocess.run(
        ["bash", "-c", line], env=shell, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stdout.endswith("\nready\n"), out.stderr


def test_the_demo_key_file_verifies_the_challenge_and_verify_token(start_demo: Any) -> None:
    demo = start_demo()
    key_line = demo.wait_line(r"^Demo public key:", 30)
    key_file = Path(key_line.split(":", 1)[1].strip())
    assert key_file.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    demo.wait_line(r"^Ctrl-C to stop", 30)
    _wait_ready(demo)
    # The product side: the whole challenge with the key from the named file.
    claims = client.challenge(key_file.read_text(), "demo-product-code", url=f"http://{demo.api}")
    assert claims["productCode"] == "demo-product-code"
    # The banner's verify-token pipeline, run verbatim by a plain shell.
    start = next(i for i, s in enumerate(demo.seen) if "/v1/entitlement/challenge" in s)
    pipeline = "\n".join(demo.seen[start : start + 4])
    assert pipeline.rstrip().endswith("verify-token --nonce n1")
    shell = {"PATH": PLAIN_PATH, "HOME": os.environ.get("HOME", "/tmp")}
    out = subprocess.run(
        ["bash", "-o", "pipefail", "-c", pipeline],
        env=shell,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["nonce"] == "n1"


@pytest.mark.parametrize("variable", ["MARKETPLACE_LISTEN", "MARKETPLACE_PROBE_LISTEN"])
def test_a_taken_port_is_named_before_any_banner(start_demo: Any, variable: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        api, probe = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        env = {"MARKETPLACE_LISTEN": api, "MARKETPLACE_PROBE_LISTEN": probe, variable: taken}
        out = subprocess.run(
            [sys.executable, "-m", "sidecar", "demo"],
            env={"PATH": PLAIN_PATH, "HOME": os.environ.get("HOME", "/tmp"), **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2
    assert out.stdout == ""  # no banner, no curl lines
    assert f"config error: {variable}={taken}: port" in out.stderr
    assert f"{variable}=127.0.0.1:" in out.stderr.split("choose a free port:", 1)[1]


# -- item 8: hints against the emulator -----------------------------------------------------------


def _custom(endpoint: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return loopback_env(
        endpoint,
        MARKETPLACE_MODE="custom",
        MARKETPLACE_DIMENSIONS="scans",
        MARKETPLACE_STATE_DIR=str(tmp_path),
        MARKETPLACE_REGISTER_DEADLINE_SECONDS="60",
        MARKETPLACE_DRAIN_SECONDS="1",
        **extra,
    )


def _error_of(env: dict[str, str]) -> dict[str, Any]:
    car = start_sidecar(env)
    try:
        doc = car.wait_for(lambda d: d.get("error") is not None, 20)
    finally:
        car.proc.send_signal(signal.SIGTERM)
        try:
            car.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            car.proc.kill()
    error: dict[str, Any] = doc["error"]
    return error


@pytest.mark.parametrize("missing", ["region", "credentials"])
def test_custom_mode_by_hand_against_the_emulator_is_told_what_to_set_locally(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path, missing: str
) -> None:
    env = _custom(emulator_server.url, tmp_path)
    if missing == "region":
        del env["AWS_REGION"]
    else:
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    error = _error_of(env)
    assert error["code"] == ("RegionNotFound" if missing == "region" else "NoCredentialsError")
    assert "AWS_REGION=us-east-1" in error["hint"] and "AWS_ACCESS_KEY_ID=" in error["hint"]
    assert "IRSA" not in error["hint"] and "task role" not in error["hint"]


def test_against_a_remote_endpoint_the_hint_stays_the_production_one() -> None:
    from sidecar.aws.errors import classify, for_endpoint, is_local_endpoint

    info = classify("NoCredentialsError", "Unable to locate credentials")
    remote = for_endpoint(info, "https://metering.marketplace.us-east-1.amazonaws.com")
    assert "IRSA" in remote.hint
    assert "IRSA" not in for_endpoint(info, "http://localhost:8790").hint
    urls = ("http://[::1]:1", "http://127.0.0.2", "http://10.0.0.1")
    assert [is_local_endpoint(u) for u in urls] == [True, True, False]


def _doctor(env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor"],
        env={"MARKETPLACE_PRODUCT_CODE": "prod-abc", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.splitlines()


def test_doctor_against_the_emulator_says_what_to_set_locally(
    emulator_server: EmulatorServer, tmp_path: Path
) -> None:
    env = _custom(emulator_server.url, tmp_path)
    del env["AWS_REGION"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    lines = _doctor(env)
    region = next(s for s in lines if "region:" in s)
    fix = lines[lines.index(region) + 1]
    assert "AWS_REGION=us-east-1" in fix and "IRSA" not in fix, lines
    creds = next(s for s in lines if "credentials:" in s)
    fix = lines[lines.index(creds) + 1]
    assert "AWS_ACCESS_KEY_ID=" in fix and "IRSA" not in fix, lines


def test_doctor_calls_a_timestamp_refusal_a_clock_problem(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.meter_clock = lambda: time.time() + 8 * 3600  # AWS's clock 8 h ahead of ours
    lines = _doctor(_custom(emulator_server.url, tmp_path))
    clock = [s for s in lines if "TimestampOutOfBoundsException" in s]
    assert clock and all(s.startswith("✘ clock: MeterUsage (scans)") for s in clock), lines
    assert not any(s.startswith("✘ MeterUsage permission") for s in lines), lines
