"""SaaS mode on a PostgreSQL that is down when the sidecar STARTS: the `run` process binds and
reports an outage (503 + Retry-After, /readyz says why) instead of exiting, and starts working by
itself once the server is up. What a retry cannot fix (a refused login) still stops it before it
binds. Real server, real sidecar process, boto3 to the emulator over loopback.

The session's server is shared: every test that stops it starts it again in a `finally`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import Sidecar, free_port, loopback_env, start_sidecar
from tests.test_pgstore import password_role

PASSWORD = "pw-9d2e-never-logged"
PROBE_503 = {"ready": False, "state": "store_unavailable", "error": {"code": "store_unavailable"}}


def saas_env(emulator_server: EmulatorServer, url: str) -> dict[str, str]:
    return loopback_env(
        emulator_server.url,
        MARKETPLACE_MODE="saas",
        MARKETPLACE_DIMENSIONS="users,scans",
        MARKETPLACE_PRODUCT_CODE="",
        MARKETPLACE_THROTTLE_SCHEDULE_SECONDS="",
        MARKETPLACE_USAGE_DATABASE_URL=url,
    )


@pytest.fixture
def cars() -> Iterator[list[Sidecar]]:
    started: list[Sidecar] = []
    yield started
    for car in started:
        car.stop()


def wait_status(car: Sidecar, path: str, status: int, timeout: float = 20.0) -> requests.Response:
    deadline = time.monotonic() + timeout
    while (r := car.get(path)).status_code != status and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == status, r.text
    return r


def test_a_sidecar_started_while_the_database_is_down_binds_answers_503_and_recovers(
    emulator_server: EmulatorServer,
    emulator: Emulator,
    pg_server: Any,
    pg_url: str,
    cars: list[Sidecar],
) -> None:
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")
    buyer = emulator.saas_customer({"customer_aws_account_id": "444455556666"})
    record = {
        "customer_aws_account_id": "444455556666",
        "license_arn": buyer["license_arn"],
        "dimension": "users",
        "quantity": 7,
        "id": "usage-while-degraded-1",
    }
    resolve = {"registration_token": buyer["registration_token"]}
    pg_server.stop()
    try:
        car = start_sidecar(saas_env(emulator_server, url))  # binds: no exit 1, no crash loop
        cars.append(car)
        assert car.get("/healthz").status_code == 200
        assert car.get("/healthz", probe=True).status_code == 200
        ready = car.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["state"] == "store_unavailable"
        assert "database unreachable" in ready.json()["error"]["message"]
        probe = car.get("/readyz", probe=True)
        assert probe.status_code == 503 and probe.json() == PROBE_503  # nothing more there
        for path, body in (("/v1/usage", record), ("/v1/customers/resolve", resolve)):
            r = requests.post(car.api + path, json=body, timeout=15)
            assert r.status_code == 503, (path, r.text)
            assert int(r.headers["Retry-After"]) >= 1
        assert car.get("/metrics", probe=True).status_code == 200
        report = car.get("/v1/usage")  # read-only, but an answer, not a dropped connection
        assert report.status_code == 503 and int(report.headers["Retry-After"]) >= 1
        assert car.proc.poll() is None
    finally:
        pg_server.start()
    # No restart: the store connects, creates the schema and works.
    wait_status(car, "/readyz", 200)
    r = requests.post(car.api + "/v1/customers/resolve", json=resolve, timeout=20)
    assert r.status_code == 200, r.text
    r = requests.post(car.api + "/v1/usage", json=record, timeout=15)
    assert r.status_code == 202, r.text
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT customer, dimension, quantity FROM saas_open").fetchall()
    # 7 units, stored as micro-units
    assert [tuple(row) for row in rows] == [
        (f"444455556666/{buyer['license_arn']}", "users", 7_000_000)
    ]
    assert car.stop() == 0
    logs = car.logs()
    assert PASSWORD not in logs
    assert "usage_store_starting_without_database" in logs
    assert "usage_store_reachable" in logs
    assert "usage_store_migrated" in logs


@pytest.mark.parametrize("refused", ["wrong password", "no such role", "no such database"])
def test_a_refused_login_exits_before_binding_naming_why_never_the_password(
    refused: str, emulator_server: EmulatorServer, pg_server: Any, pg_url: str
) -> None:
    with password_role(pg_server, "the-right-one") as role:
        url = {
            "wrong password": pg_url.replace("postgres@", f"{role}:{PASSWORD}@"),
            "no such role": pg_url.replace("postgres@", f"nobody_at_all:{PASSWORD}@"),
            "no such database": pg_url.replace("postgres@", f"postgres:{PASSWORD}@").rsplit("/", 1)[
                0
            ]
            + "/no_such_database",
        }[refused]
        api_port = free_port()
        car = start_sidecar(
            {**saas_env(emulator_server, url), "MARKETPLACE_LISTEN": f"127.0.0.1:{api_port}"},
            wait=False,
        )
        try:
            code = car.proc.wait(timeout=20)
        finally:
            car.stop()
    logs = car.logs()
    assert code not in (0, None)
    assert refused in logs, logs
    assert "usage_store_unusable" in logs
    assert PASSWORD not in logs
    assert "listening" not in logs
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{api_port}/healthz", timeout=2)
