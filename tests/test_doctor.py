"""`marketplace-sidecar doctor` against the emulator, and against each broken setup."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import ROOT, Launch, free_port, loopback_env
from tests.metadata_fake import FakeMetadata, MotoSts
from tests.test_keys import JWT_IO_DEMO_KEY


def irsa_env(tmp_path: Path, sts: MotoSts) -> dict[str, str]:
    token = tmp_path / "token"
    token.write_text("eyJ.web-identity.token")
    return {
        "AWS_ROLE_ARN": "arn:aws:iam::111122223333:role/metering",
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
        "AWS_ENDPOINT_URL_STS": sts.url,
    }


def doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def base_env(server: EmulatorServer, emulator: Emulator, **extra: str) -> dict[str, str]:
    env = loopback_env(
        server.url,
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_PUBLIC_KEY=emulator.public_pem(),
    )
    env.update(extra)
    return env


def test_healthy_irsa_setup_passes_and_registers_nothing(
    emulator_server: EmulatorServer, emulator: Emulator, sts: MotoSts, tmp_path: Path
) -> None:
    env = base_env(emulator_server, emulator, **irsa_env(tmp_path, sts))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    out = doctor(env)
    assert out.returncode == 0, out.stdout
    lines = out.stdout.splitlines()
    assert lines[0].startswith("✔ configuration: product code prod-abc")
    assert any(line.startswith("✔ public key: RSA-2048, version 1") for line in lines)
    assert "✔ region: us-east-1 (from AWS_REGION)" in lines
    assert "✔ credentials: IRSA (arn:aws:iam::111122223333:role/metering)" in lines
    assert any(line.startswith(f"✔ endpoint: {emulator_server.url}") for line in lines)
    assert any(line.startswith("✔ clock:") for line in lines)
    assert lines[-1] == "no problems found"
    assert [a.role_arn for a in sts.assumed()] == ["arn:aws:iam::111122223333:role/metering"]
    assert emulator.calls == []  # the doctor never calls RegisterUsage


def test_irsa_credentials_sign_the_real_registration(
    launch: Launch, emulator: Emulator, sts: MotoSts, tmp_path: Path
) -> None:
    env = irsa_env(tmp_path, sts)
    car = launch(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", **env)
    car.wait_for(lambda d: d["state"] == "entitled")
    issued = sts.assumed()
    assert len(issued) == 1 and issued[0].access_key_id.startswith("ASIA")
    assert emulator.calls[-1]["pod"] == issued[0].access_key_id  # signed with the STS-issued key


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"MARKETPLACE_PUBLIC_KEY": JWT_IO_DEMO_KEY},
            "✘ configuration: MARKETPLACE_PUBLIC_KEY: refused: the jwt.io demo key",
        ),
        (
            {"MARKETPLACE_PRODUCT_CODE": None},
            "✘ configuration: MARKETPLACE_PRODUCT_CODE: is required",
        ),
        ({"AWS_REGION": None}, "✘ region: no AWS region found"),
        (
            {
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials",
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": "/nonexistent",
                "AWS_ACCESS_KEY_ID": None,
                "AWS_SECRET_ACCESS_KEY": None,
            },
            "✘ credentials: EKS Pod Identity: AWS Marketplace metering does not accept it",
        ),
        ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "✘ credentials: none found"),
        (
            {"AWS_ENDPOINT_URL_MARKETPLACE_METERING": "http://127.0.0.1:{dead}"},
            "✘ endpoint: http://127.0.0.1:{dead} unreachable",
        ),
        ({"date_offset": "600"}, "✘ clock: -"),
    ],
)
def test_each_broken_setup_is_named_with_a_fix(
    emulator_server: EmulatorServer,
    emulator: Emulator,
    change: dict[str, str | None],
    expected: str,
) -> None:
    dead = str(free_port())
    env = base_env(emulator_server, emulator)
    for name, value in change.items():
        if name == "date_offset":
            emulator.reconfigure({"date_offset": float(str(value))})
        elif value is None:
            env.pop(name, None)
        else:
            env[name] = value.replace("{dead}", dead)
    out = doctor(env)
    # Configuration errors exit 2, as `run` does; any other problem exits 1.
    assert out.returncode == (2 if expected.startswith("✘ configuration") else 1), out.stdout
    assert expected.replace("{dead}", dead) in out.stdout
    failing = [i for i, line in enumerate(out.stdout.splitlines()) if line.startswith("✘")]
    assert all(
        out.stdout.splitlines()[i + 1].startswith("    fix: ")
        for i in failing
        if not out.stdout.splitlines()[i].startswith("✘ configuration")
        and "skipped" not in out.stdout.splitlines()[i]
    )


def test_static_keys_are_a_warning_not_a_failure(
    emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    out = doctor(base_env(emulator_server, emulator))
    assert out.returncode == 0
    assert "! credentials: static access keys (env): discouraged" in out.stdout


@pytest.fixture
def credential_endpoints() -> Iterator[str]:
    server = FakeMetadata()
    yield server.url
    server.close()


def test_node_role_is_called_out(
    emulator_server: EmulatorServer, emulator: Emulator, credential_endpoints: str
) -> None:
    env = base_env(
        emulator_server, emulator, AWS_EC2_METADATA_SERVICE_ENDPOINT=credential_endpoints
    )
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_EC2_METADATA_DISABLED"]
    out = doctor(env)
    assert out.returncode == 1
    assert "✘ credentials: the EC2 instance (node) role: not accepted for metering" in out.stdout


def test_ecs_task_role_passes(
    emulator_server: EmulatorServer, emulator: Emulator, credential_endpoints: str
) -> None:
    env = base_env(
        emulator_server,
        emulator,
        AWS_CONTAINER_CREDENTIALS_FULL_URI=credential_endpoints + "/task-creds",
    )
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    out = doctor(env)
    assert out.returncode == 0, out.stdout
    assert "✔ credentials: ECS task role" in out.stdout


@pytest.mark.parametrize("ecs", [False, True])
def test_the_region_line_names_what_was_tried_once(
    emulator_server: EmulatorServer, emulator: Emulator, ecs: bool
) -> None:
    env = base_env(emulator_server, emulator)
    del env["AWS_REGION"]
    if ecs:  # a metadata lookup that fails (nothing listens there)
        env["ECS_CONTAINER_METADATA_URI_V4"] = f"http://127.0.0.1:{free_port()}/v4/task"
    lines = doctor(env).stdout.splitlines()
    at = next(i for i, s in enumerate(lines) if s.startswith("✘ region:"))
    region, fix = lines[at], lines[at + 1]
    tried = "AWS_REGION, AWS_DEFAULT_REGION" + (", ECS task metadata" if ecs else "")
    assert region == f"✘ region: no AWS region found (tried {tried})", lines
    assert fix.strip().startswith("fix: ") and "AWS_REGION=us-east-1" in fix, lines
    assert "AWS_DEFAULT_REGION" not in fix and "(tried" not in fix, lines
    assert ("retried with backoff" in fix) is ecs, lines
