"""The demo per mode as a newcomer runs it (loopback only), its papercuts, and the hints a
newcomer gets when starting a mode against the emulator by hand."""

from __future__ import annotations

import contextlib
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

    def start(*args: str, logs: bool = False, **env: str) -> Demo:
        """`logs`: the sidecar's log (stderr) comes in the same stream as the banner."""
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
            stderr=subprocess.STDOUT if logs else subprocess.DEVNULL,
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


# A log line at warning level or above (text format: "<time>Z warning <event> ..."), a config
# error, or a traceback: a newcomer's first run of any mode shows none.
ALARM = re.compile(r"^\S+Z (warning|error|critical)\b|config error|Traceback|Exception")


def _alarms(demo: Demo) -> list[str]:
    """Every alarming line of the demo's whole output (call after _stop: the process is gone,
    so the pump reaches the end of its output within moments)."""
    while True:
        try:
            demo.seen.append(demo.lines.get(timeout=2))
        except queue.Empty:
            break
    return [line for line in demo.seen if ALARM.search(line)]


# -- item 8: a demo per mode ----------------------------------------------------------------------


def _records(demo: Demo, n: int) -> list[dict[str, Any]]:
    """The n billed records printed after the demo's "AWS billed" line (the sidecar's log lines
    may come between them: it logs from its own threads into the same stream)."""
    billed = max(i for i, s in enumerate(demo.seen) if s.startswith("demo: AWS billed"))
    deadline = time.monotonic() + 10
    while True:
        later = [s for s in demo.seen[billed + 1 :] if s.startswith("  {")]
        if len(later) >= n:
            return [json.loads(s) for s in later[:n]]
        assert time.monotonic() < deadline, demo.seen
        with contextlib.suppress(queue.Empty):
            demo.seen.append(demo.lines.get(timeout=0.5))


def test_custom_demo_prints_the_meter_usage_record_aws_billed_and_no_warning(
    start_demo: Any,
) -> None:
    demo = start_demo("--mode", "custom", logs=True)
    assert "Mode:              custom" in demo.wait_line(r"^Mode:", 30)
    posted = demo.wait_line(r"^demo: POST /v1/usage", 30)
    assert posted.endswith("-> 202")
    demo.wait_line(r"^demo: AWS billed \(MeterUsage", BILLED_WITHIN)
    [record] = _records(demo, 1)
    assert (record["dimension"], record["quantity"]) == ("scans", 3)
    assert record["metering_record_id"]
    # custom mode has no token: the demo neither sets nor shows a public key
    assert not any(s.startswith("Demo public key") for s in demo.seen)
    assert _stop(demo) == 0
    assert _alarms(demo) == []


def test_saas_demo_prints_a_resolved_customer_and_its_batch_records_and_no_warning(
    start_demo: Any,
) -> None:
    demo = start_demo("--mode", "saas", logs=True)
    resolved = demo.wait_line(r"^demo: resolved customer ", 30)
    customer = json.loads(resolved.removeprefix("demo: resolved customer "))
    assert customer["state"] == "active" and customer["product_code"] == "demo-product-code"
    demo.wait_line(r"^demo: AWS billed \(BatchMeterUsage", BILLED_WITHIN)
    records = _records(demo, 2)
    assert sorted((r["dimension"], r["quantity"]) for r in records) == [("scans", 3), ("users", 2)]
    assert {r["customer"] for r in records} == {customer["customer"]}
    # The lifecycle step: an event on the demo's queue changes the buyer's state in the API.
    changed = demo.wait_line(r"^demo: SaaS lifecycle: ", BILLED_WITHIN)
    assert f"/v1/customers/{customer['customer_aws_account_id']}" in changed
    assert "subscription subscribed -> pending_unsubscribe" in changed, changed
    assert _stop(demo) == 0
    assert _alarms(demo) == []


def test_without_moto_the_saas_demo_says_it_skips_the_lifecycle_step(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """moto is a development dependency: an install without it runs the demo, and says why the
    lifecycle step is missing instead of failing or staying silent."""
    from sidecar.demo import lifecycle_queue

    monkeypatch.setitem(sys.modules, "moto.moto_server.threaded_moto_server", None)
    monkeypatch.delenv("MARKETPLACE_SAAS_EVENTS_QUEUE_URL", raising=False)
    assert lifecycle_queue("http://127.0.0.1:1") is None
    assert "skipped" in capsys.readouterr().out
    assert "MARKETPLACE_SAAS_EVENTS_QUEUE_URL" not in os.environ


def test_hourly_demo_shows_no_warning(start_demo: Any) -> None:
    demo = start_demo(logs=True)
    demo.wait_line(r" state_changed .*to=entitled", 30)
    assert _stop(demo) == 0
    assert _alarms(demo) == []


@pytest.mark.parametrize("minute", [0.0, 1 / 60, 30.0, 47.99, 48.0, 48.5, 59.99])
def test_the_fast_clock_starts_at_the_same_minute_whatever_the_minute_now(minute: float) -> None:
    """The wait for the first bill (the hour after the entitlement check's hour, sealed) does
    not depend on when a newcomer starts the demo: the scaled clock starts at minute 48."""
    from sidecar.demo import START_MINUTE, TIME_SCALE, fast_clock_origin

    now = 1_796_666_400.0 + minute * 60  # an hour's start, plus `minute`
    origin = fast_clock_origin(now)
    scaled = origin + (now - origin) * TIME_SCALE  # the sidecar's and the emulator's formula
    assert 0 <= scaled - now < 3600  # never behind the real clock, never an hour ahead
    assert scaled % 3600 == pytest.approx(START_MINUTE * 60, abs=1e-3)
    # the clock runs at the demo's speed from there
    assert (origin + (now + 1 - origin) * TIME_SCALE) - scaled == pytest.approx(TIME_SCALE)


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


@pytest.mark.parametrize(
    ("variable", "mode"), [("MARKETPLACE_LISTEN", "custom"), ("MARKETPLACE_PROBE_LISTEN", "saas")]
)
def test_a_taken_port_is_named_before_any_banner_with_a_command_that_works_as_printed(
    variable: str, mode: str
) -> None:
    shell = {"PATH": PLAIN_PATH, "HOME": os.environ.get("HOME", "/tmp")}  # no .venv/bin
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        api, probe = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        env = {"MARKETPLACE_LISTEN": api, "MARKETPLACE_PROBE_LISTEN": probe, variable: taken}
        out = subprocess.run(
            [sys.executable, "-m", "sidecar", "demo", "--mode", mode],
            env={**shell, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2
    assert out.stdout == ""  # no banner, no curl lines
    lines = out.stderr.splitlines()
    assert lines[0].startswith(f"config error: {variable}={taken}: port"), lines
    assert "MARKETPLACE_LISTEN" in lines[1] and "MARKETPLACE_PROBE_LISTEN" in lines[1], lines
    command = lines[2].strip()
    assert command.endswith(f" demo --mode {mode}"), command  # the user's mode, repeated
    moved = dict(w.split("=", 1) for w in command.split() if w.startswith("MARKETPLACE_"))
    assert set(moved) == {"MARKETPLACE_LISTEN", "MARKETPLACE_PROBE_LISTEN"}, command
    if mode != "custom":
        return  # one case runs it: two would race for the same suggested ports
    # Pasted into a shell that never activated the virtualenv, from another directory.
    proc = subprocess.Popen(
        ["bash", "-c", command],
        env=shell,
        cwd="/",
        start_new_session=True,  # its own group: the demo is stopped even if bash forked it
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    readyz = f"http://{moved['MARKETPLACE_PROBE_LISTEN']}/readyz"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if requests.get(readyz, timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the printed command never became ready"
            time.sleep(0.1)
        api_url = f"http://{moved['MARKETPLACE_LISTEN']}/v1/usage"
        assert requests.get(api_url, timeout=5).status_code == 200  # custom and saas serve it
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0


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
