"""`marketplace-sidecar doctor` in saas mode: the store read without being created, the schema
version, no customers yet, and IAM permissions through calls that resolve and bill nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import ROOT, free_port, loopback_env, start_sidecar

PASSWORD = "doctor-pw-91c"


def doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def saas_env(server: EmulatorServer, **extra: str) -> dict[str, str]:
    return loopback_env(
        server.url, MARKETPLACE_MODE="saas", MARKETPLACE_DIMENSIONS="users", **extra
    )


def with_password(url: str) -> str:
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


def test_a_fresh_database_warns_and_is_left_untouched(
    emulator_server: EmulatorServer, emulator: Emulator, pg_url: str
) -> None:
    import psycopg

    out = doctor(saas_env(emulator_server, MARKETPLACE_USAGE_DATABASE_URL=with_password(pg_url)))
    lines = out.stdout.splitlines()
    assert "✔ configuration: saas mode, identity license" in lines, out.stdout
    assert any(
        line.startswith(
            "✔ metering: saas: 1 dimension(s) (users), store PostgreSQL "
            "postgresql://postgres@127.0.0.1:"
        )
        for line in lines
    )
    assert "✔ database: reachable" in lines
    assert "! schema: not created yet: the first sidecar to start creates it" in lines
    assert (
        "✔ ResolveCustomer permission: allowed (InvalidTokenException for a made-up token)" in lines
    )
    assert any(
        line.startswith(("✔ BatchMeterUsage permission", "! BatchMeterUsage permission"))
        for line in lines
    )
    assert PASSWORD not in out.stdout + out.stderr
    assert out.returncode == 0, out.stdout
    with psycopg.connect(pg_url) as conn:  # doctor created nothing
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
    assert tables == (0,)
    assert emulator.saas_ledger()["records"] == []


def test_a_started_store_shows_its_version_and_the_missing_customers(
    emulator_server: EmulatorServer, emulator: Emulator, pg_url: str
) -> None:
    from sidecar.usage.saas import SAAS_SCHEMA

    env = saas_env(emulator_server, MARKETPLACE_USAGE_DATABASE_URL=pg_url)
    car = start_sidecar(
        {**env, "MARKETPLACE_THROTTLE_SCHEDULE_SECONDS": "", "MARKETPLACE_PRODUCT_CODE": ""}
    )
    car.stop()
    lines = doctor(env).stdout.splitlines()
    assert f"✔ schema: version {SAAS_SCHEMA.version}" in lines
    assert any(line.startswith("! customers: none resolved yet") for line in lines), lines


def test_a_database_that_is_down_fails_without_showing_the_password(
    emulator_server: EmulatorServer,
) -> None:
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/m"
    out = doctor(saas_env(emulator_server, MARKETPLACE_USAGE_DATABASE_URL=url))
    assert out.returncode == 1
    failed = [line for line in out.stdout.splitlines() if line.startswith("✘ database: ")]
    assert failed and "postgresql://app@127.0.0.1:" in failed[0], out.stdout
    assert PASSWORD not in out.stdout + out.stderr


def test_a_denied_permission_is_named_with_its_fix(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.reconfigure({"denied_operations": ["ResolveCustomer", "BatchMeterUsage"]})
    out = doctor(saas_env(emulator_server, MARKETPLACE_STATE_DIR=str(tmp_path)))
    text = out.stdout
    assert out.returncode == 1
    assert "✘ ResolveCustomer permission: AccessDeniedException" in text
    assert "fix: grant aws-marketplace:ResolveCustomer" in text
    assert "✘ BatchMeterUsage permission: AccessDeniedException" in text
    assert "! schema: not created yet" in text  # SQLite: no file yet, and none created
    assert list(tmp_path.iterdir()) == []


def test_sqlite_store_is_read_in_place(
    emulator_server: EmulatorServer, emulator: Emulator, tmp_path: Path
) -> None:
    env: dict[str, Any] = saas_env(emulator_server, MARKETPLACE_STATE_DIR=str(tmp_path))
    car = start_sidecar(
        {**env, "MARKETPLACE_THROTTLE_SCHEDULE_SECONDS": "", "MARKETPLACE_PRODUCT_CODE": ""}
    )
    buyer = emulator.saas_customer({})
    r = requests.post(
        car.api + "/v1/customers/resolve",
        json={"registration_token": buyer["registration_token"]},
        timeout=20,
    )
    assert r.status_code == 200
    lines = doctor(env).stdout.splitlines()  # while the sidecar runs: read-only, no lock taken
    car.stop()
    assert "✔ customers: 1 resolved" in lines, lines
