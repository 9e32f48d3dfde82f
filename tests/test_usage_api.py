"""Custom mode end to end: the real `run` process in MARKETPLACE_MODE=custom, its local API,
probes, metrics and SIGTERM drain, against the emulator's MeterUsage over loopback."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import yaml

from sidecar.client import FieldProblem, UsageError, report_usage
from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import Sidecar, loopback_env, start_sidecar

SPEC: dict[str, Any] = yaml.safe_load(
    resources.files("sidecar").joinpath("openapi.yaml").read_text()
)
DIMS = "scans,users"


@pytest.fixture
def custom(emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path) -> Iterator[Any]:
    """Start custom-mode sidecars on one state dir (a pod's emptyDir); all stopped at the end."""
    started: list[Sidecar] = []
    pod_key = "pod-" + str(time.monotonic_ns())

    def launch(**extra: str) -> Sidecar:
        env = loopback_env(
            emulator_server.url,
            AWS_ACCESS_KEY_ID=pod_key,  # the same pod across container restarts
            MARKETPLACE_MODE="custom",
            MARKETPLACE_DIMENSIONS=DIMS,
            MARKETPLACE_STATE_DIR=str(tmp_path),
            **extra,
        )
        car = start_sidecar(env)
        started.append(car)
        return car

    yield launch
    for car in started:
        car.stop()


def wait_ready(car: Sidecar, want: str = "entitled", timeout: float = 15.0) -> dict[str, Any]:
    return car.wait_for(lambda d: d["state"] == want, timeout)


def check(path: str, method: str, resp: requests.Response) -> None:
    op = SPEC["paths"][path][method.lower()]
    declared = op["responses"].get(str(resp.status_code))
    assert declared is not None, f"{method} {path} answered undocumented {resp.status_code}"
    schema = {**declared["content"]["application/json"]["schema"], "components": SPEC["components"]}
    jsonschema.validate(resp.json(), schema, cls=jsonschema.Draft202012Validator)


def ledger(emulator: Emulator) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = emulator.ledger()["records"]
    return records


def test_meter_zero_entitles_and_usage_round_trips(custom: Any, emulator: Emulator) -> None:
    car = custom()
    doc = wait_ready(car)
    assert doc["token"] is None and doc["claims"] is None  # MeterUsage signs nothing
    assert doc["metering"] == {
        "mode": "custom",
        "entitlement_check": "meter_zero",
        "subscription_checked": True,
    }
    assert car.get("/readyz").status_code == 200
    assert [(r["dimension"], r["quantity"]) for r in ledger(emulator)] == [("scans", 0)]

    url = car.api + "/v1/usage"
    batch = [
        {"dimension": "users", "quantity": 3, "id": "a1"},
        {"dimension": "scans", "quantity": 2},
    ]
    first = requests.post(url, json=batch, timeout=5)
    assert first.status_code == 202, first.text
    check("/v1/usage", "POST", first)
    answers = first.json()["records"]
    assert [a["quantity"] for a in answers] == [3, 2]
    assert answers[0]["id"] == "a1" and answers[0]["hour"].endswith(":00:00Z")
    # meter_zero took scans' first hour: its usage is carried into the next one, and said so.
    assert answers[1]["carried_from"] < answers[1]["hour"]

    again = requests.post(url, json=batch[0], timeout=5)
    assert again.status_code == 200 and again.json()["repeats"] == 1
    changed = requests.post(url, json={**batch[0], "quantity": 4}, timeout=5)
    assert changed.status_code == 409
    assert changed.json()["error"]["code"] == "id_conflict"
    check("/v1/usage", "POST", changed)

    bad = requests.post(url, json={"dimension": "nope", "quantity": -1}, timeout=5)
    assert bad.status_code == 400
    check("/v1/usage", "POST", bad)
    assert bad.json()["error"]["field"] == "dimension"

    report = car.get("/v1/usage")
    assert report.status_code == 200
    check("/v1/usage", "GET", report)
    totals = report.json()["totals"]
    assert (totals["users"]["accepted"], totals["scans"]["accepted"]) == (3, 2)

    metrics = car.get("/metrics", probe=True).text
    assert 'marketplace_usage_units_accepted_total{dimension="users"} 3.0' in metrics
    assert 'marketplace_usage_units_accepted_total{dimension="scans"} 2.0' in metrics
    assert 'marketplace_usage_hours{state="open"} 2.0' in metrics
    assert 'marketplace_usage_hours{state="sent"} 1.0' in metrics  # meter_zero's record
    assert 'marketplace_usage_send_attempts_total{code="ok",result="sent"} 1.0' in metrics
    assert "marketplace_usage_oldest_unsent_hour_age_seconds 0.0" in metrics


def test_challenge_is_a_clear_4xx_and_usage_is_never_on_the_probe_port(custom: Any) -> None:
    car = custom(MARKETPLACE_ENTITLEMENT_CHECK="none")
    wait_ready(car)
    resp = requests.post(car.api + "/v1/entitlement/challenge", json={"nonce": "n"}, timeout=5)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "no_token_in_custom_mode"
    check("/v1/entitlement/challenge", "POST", resp)
    for method in ("GET", "POST"):
        probe = requests.request(method, car.probe + "/v1/usage", json={}, timeout=5)
        assert probe.status_code == 404  # billing data stays on the loopback API


def test_hourly_mode_says_usage_needs_custom_mode(launch: Any) -> None:
    car = launch()
    car.wait_for(lambda d: d["state"] == "entitled")
    resp = requests.post(car.api + "/v1/usage", json={"dimension": "a", "quantity": 1}, timeout=5)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "usage_needs_custom_mode"
    check("/v1/usage", "POST", resp)
    with pytest.raises(UsageError) as caught:
        report_usage({"dimension": "a", "quantity": 1}, url=car.api)
    assert caught.value.reason == "not_custom_mode"


def test_a_refusal_is_final_not_ready_and_remembered_across_restarts(
    custom: Any, emulator: Emulator
) -> None:
    emulator.reconfigure({"entitled": False})
    car = custom()
    doc = wait_ready(car, "not_entitled")
    assert doc["error"]["code"] == "CustomerNotEntitledException"
    assert car.get("/readyz").status_code == 503
    assert car.get("/readyz", probe=True).status_code == 503
    calls = len(emulator.calls)
    car.stop()
    emulator.reconfigure({"entitled": True})  # AWS would not say it twice; the store remembers
    again = custom()
    doc = wait_ready(again, "not_entitled")
    assert doc["error"]["code"] == "CustomerNotEntitledException"
    time.sleep(0.5)
    assert len(emulator.calls) == calls  # no new MeterUsage call from the restarted container


def test_sigterm_drains_the_partial_hour_and_exits_within_budget(
    custom: Any, emulator: Emulator
) -> None:
    car = custom(MARKETPLACE_ENTITLEMENT_CHECK="dry_run", MARKETPLACE_DRAIN_SECONDS="5")
    wait_ready(car)
    acked = 0
    for i in range(20):
        r = requests.post(
            car.api + "/v1/usage", json={"dimension": "users", "quantity": i}, timeout=5
        )
        assert r.status_code == 202
        acked += i
    started = time.monotonic()
    car.proc.send_signal(signal.SIGTERM)
    assert car.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5 + 2
    sent = [r for r in ledger(emulator) if r["dimension"] == "users"]
    assert [r["quantity"] for r in sent] == [acked]  # one record for the hour, every unit


def test_sigterm_with_aws_down_keeps_unsent_usage_for_the_next_start(
    custom: Any, emulator: Emulator
) -> None:
    car = custom(MARKETPLACE_ENTITLEMENT_CHECK="none", MARKETPLACE_DRAIN_SECONDS="1")
    wait_ready(car)
    r = requests.post(car.api + "/v1/usage", json={"dimension": "users", "quantity": 7}, timeout=5)
    assert r.status_code == 202
    emulator.reconfigure({"faults": [{"error": "InternalServiceErrorException", "rate": 1.0}]})
    started = time.monotonic()
    car.proc.send_signal(signal.SIGTERM)
    assert car.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 1 + 3  # the budget holds while AWS fails
    assert ledger(emulator) == []
    emulator.reconfigure({"faults": []})
    again = custom(MARKETPLACE_ENTITLEMENT_CHECK="none", MARKETPLACE_DRAIN_SECONDS="5")
    wait_ready(again)
    hours = again.get("/v1/usage").json()["hours"]
    assert [(h["dimension"], h["quantity"], h["state"]) for h in hours] == [("users", 7, "sealed")]
    again.stop()
    assert [(r["dimension"], r["quantity"]) for r in ledger(emulator)] == [("users", 7)]


def test_a_thousand_records_fit_and_oversize_is_413(custom: Any) -> None:
    car = custom(MARKETPLACE_ENTITLEMENT_CHECK="none")
    wait_ready(car)
    records = [
        {
            "dimension": "users",
            "quantity": 1,
            "id": f"{i:04d}-" + "k" * 59,
            "allocations": [{"quantity": 1, "tags": {"team": "a", "env": "prod"}}],
        }
        for i in range(1000)
    ]
    body = json.dumps(records).encode()
    assert len(body) > 100_000
    resp = requests.post(car.api + "/v1/usage", data=body, timeout=30)
    assert resp.status_code == 202, resp.text[:300]
    assert resp.json()["accepted"] == 1000
    huge = requests.post(car.api + "/v1/usage", data=b"[" + b" " * (1 << 20) + b"]", timeout=30)
    assert huge.status_code == 413
    assert "limited to 1048576 bytes" in huge.json()["error"]["message"]
    assert car.get("/healthz").status_code == 200


def test_report_usage_client(custom: Any) -> None:
    car = custom(MARKETPLACE_ENTITLEMENT_CHECK="none")
    wait_ready(car)
    ok = report_usage([{"dimension": "users", "quantity": 2, "id": "c1"}], url=car.api)
    assert ok["accepted"] == 1 and ok["records"][0]["id"] == "c1"
    assert (
        report_usage({"dimension": "users", "quantity": 2, "id": "c1"}, url=car.api)["repeats"] == 1
    )
    with pytest.raises(UsageError) as caught:
        report_usage({"dimension": "nope", "quantity": 1}, url=car.api)
    assert caught.value.reason == "invalid" and caught.value.status == 400
    assert "dimension" in caught.value.message
    with pytest.raises(UsageError) as caught:
        report_usage({"dimension": "users", "quantity": 3, "id": "c1"}, url=car.api)
    assert caught.value.reason == "conflict"
    with pytest.raises(UsageError) as caught:
        report_usage({"dimension": "users", "quantity": {1}}, url=car.api)
    assert caught.value.reason == "invalid"


def test_report_usage_keeps_every_field_the_sidecars_400_names(custom: Any) -> None:
    """A product's log line must say which field of which record to fix, not only the first."""
    car = custom(MARKETPLACE_ENTITLEMENT_CHECK="none")
    wait_ready(car)
    bad = [
        {"dimension": "users", "quantity": 1},
        {"dimension": "nope", "quantity": -1},
        {"dimension": "scans", "quantity": 1, "colour": "red"},
    ]
    raw = requests.post(car.api + "/v1/usage", json=bad, timeout=10)
    assert raw.status_code == 400
    listed = raw.json()["error"]["problems"]
    assert len(listed) >= 3  # the real answer: one entry per bad field
    with pytest.raises(UsageError) as caught:
        report_usage(bad, url=car.api)
    error = caught.value
    assert (error.reason, error.status) == ("invalid", 400)
    assert error.problems == [FieldProblem(p["field"], p["message"]) for p in listed]
    text = str(error)
    for p in listed:
        assert f"{p['field']}: {p['message']}" in text, text
    # A one-field refusal (a conflicting id) is named the same way.
    assert report_usage({"dimension": "users", "quantity": 2, "id": "k"}, url=car.api)
    with pytest.raises(UsageError) as caught:
        report_usage({"dimension": "users", "quantity": 3, "id": "k"}, url=car.api)
    assert caught.value.reason == "conflict"
    assert [p.field for p in caught.value.problems] == ["id"]
    assert str(caught.value).startswith("conflict: id_conflict: id: ")


def test_report_usage_fails_typed_without_a_sidecar_and_against_a_dripping_one() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with pytest.raises(UsageError) as caught:
        report_usage({"dimension": "a", "quantity": 1}, url=f"http://127.0.0.1:{dead}")
    assert caught.value.reason == "no_sidecar"

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def drip() -> None:  # answers one header byte every 0.2 s, forever
        conn, _ = listener.accept()
        held.append(conn)
        conn.recv(65536)
        for byte in b"HTTP/1.1 202 Accepted\r\nX-Slow: " + b"a" * 1000:
            if stop.wait(0.2):
                return
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return

    threading.Thread(target=drip, daemon=True).start()
    port = listener.getsockname()[1]
    started = time.monotonic()
    try:
        with pytest.raises(UsageError) as caught:
            report_usage(
                {"dimension": "a", "quantity": 1}, url=f"http://127.0.0.1:{port}", timeout=1.0
            )
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        listener.close()
        for conn in held:
            conn.close()
    assert caught.value.reason == "timeout"
    assert elapsed < 2.0  # one overall deadline, however the bytes trickle in


def test_client_module_still_imports_without_boto3() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import sidecar.client as c; c.report_usage; "
        "print('boto3' in sys.modules, 'botocore' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["False", "False"], out.stderr


@pytest.mark.slow  # a fuzzing campaign
def test_schemathesis_in_custom_mode_finds_no_5xx_and_no_schema_violation(
    custom: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The shipped OpenAPI document, fuzzed against custom mode (usage paths included).

    positive_data_acceptance is skipped: the schema cannot say "one of the configured
    dimensions" or "within AWS's six-hour window", so schema-valid usage is often a 400.
    413 is a correct refusal of 1,001 records (schemathesis's list lacks it).
    """
    import shutil
    import subprocess
    import sys

    car = custom(MARKETPLACE_ENTITLEMENT_CHECK="none")
    wait_ready(car)
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is a dev dependency"
    spec = str(resources.files("sidecar").joinpath("openapi.yaml"))
    config = tmp_path_factory.mktemp("schemathesis") / "schemathesis.toml"
    refusals = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
    config.write_text(
        f"[checks.negative_data_rejection]\nexpected-statuses = {json.dumps(refusals)}\n"
    )
    out = subprocess.run(
        [
            st,
            "--config-file",
            str(config),
            "run",
            spec,
            "--url",
            car.api,
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "60",
            "--seed",
            "20261127",
            "--request-timeout",
            "10",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-4000:]
    assert "Failures:" not in out.stdout  # warnings (many 400s, a 404 challenge) are expected
    assert car.get("/healthz").status_code == 200
    report = car.get("/v1/usage").json()
    assert report["hours_total"] >= 1  # the fuzzer's valid records were stored, not lost


def test_a_corrupt_store_stops_the_start_with_a_clear_error_and_is_kept(tmp_path: Path) -> None:
    """Never a silent reset to zero: the damaged file stays for a human, nothing is bound."""
    import subprocess
    import sys

    from sidecar.usage.store import DB_NAME
    from tests.helpers import ROOT, free_port

    damaged = b"SQLite format 3\x00" + b"\xff" * 4000
    (tmp_path / DB_NAME).write_bytes(damaged)
    port = free_port()
    env = loopback_env(
        "http://127.0.0.1:9",
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_MODE="custom",
        MARKETPLACE_DIMENSIONS=DIMS,
        MARKETPLACE_STATE_DIR=str(tmp_path),
        MARKETPLACE_LISTEN=f"127.0.0.1:{port}",
        MARKETPLACE_PROBE_LISTEN=f"127.0.0.1:{free_port()}",
    )
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert '"event":"usage_store_unusable"' in out.stderr
    assert '"event":"listening"' not in out.stderr
    assert "Traceback" not in out.stderr
    assert (tmp_path / DB_NAME).read_bytes() == damaged
