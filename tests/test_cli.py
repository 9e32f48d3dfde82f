"""Commands as an operator runs them: config errors, probe, verify-token, demo, --version."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import requests

from sidecar import __version__
from sidecar.emulator.service import Emulator
from tests.helpers import ROOT, Launch, free_port, loopback_env, new_key, pem, sign
from tests.test_keys import JWT_IO_DEMO_KEY


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env=env,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_version() -> None:
    assert cli("--version").stdout.strip() == f"marketplace-sidecar {__version__}"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ["MARKETPLACE_PRODUCT_CODE: is required", "MARKETPLACE_PUBLIC_KEY / "]),
        (
            {
                "MARKETPLACE_PRODUCT_CODE": "bad code!",
                "MARKETPLACE_PUBLIC_KEY_VERSION": "0",
                "MARKETPLACE_LISTEN": "localhost",
                "MARKETPLACE_REGISTER_INTERVAL_SECONDS": "soon",
                "MARKETPLACE_THROTTLE_SCHEDULE_SECONDS": "40,25",
            },
            [
                "MARKETPLACE_THROTTLE_SCHEDULE_SECONDS: must be 1-10 strictly increasing",
                "MARKETPLACE_PRODUCT_CODE: must be 1-255 characters",
                "MARKETPLACE_PUBLIC_KEY_VERSION: Input should be greater than or equal to 1",
                "MARKETPLACE_LISTEN: 'localhost' is not host:port",
                "MARKETPLACE_REGISTER_INTERVAL_SECONDS: Input should be a valid number",
            ],
        ),
        (
            {"MARKETPLACE_PRODUCT_CODE": "p", "MARKETPLACE_PUBLIC_KEY": JWT_IO_DEMO_KEY},
            ["MARKETPLACE_PUBLIC_KEY: refused: the jwt.io demo key"],
        ),
        (
            {
                "MARKETPLACE_PRODUCT_CODE": "p",
                "MARKETPLACE_PUBLIC_KEY": JWT_IO_DEMO_KEY,
                "MARKETPLACE_STATE_DIR": "/nonexistent-dir",
            },
            [
                "MARKETPLACE_STATE_DIR: /nonexistent-dir must be an existing writable directory",
                "MARKETPLACE_PUBLIC_KEY: refused",
            ],
        ),
        (
            {"MARKETPLACE_PRODUCT_CODE": "p", "MARKETPLACE_PUBLIC_KEY_FILE": "/nonexistent.pem"},
            ["MARKETPLACE_PUBLIC_KEY_FILE: cannot read /nonexistent.pem"],
        ),
        (
            {
                "MARKETPLACE_PRODUCT_CODE": "p",
                "MARKETPLACE_PUBLIC_KEY": "x",
                "MARKETPLACE_PUBLIC_KEY_FILE": "/k.pem",
            },
            ["set exactly one"],
        ),
        (
            {
                "MARKETPLACE_PRODUCT_CODE": "p",
                "MARKETPLACE_PUBLIC_KEY": "PEM?",
                "AWS_ENDPOINT_URL_MARKETPLACE_METERING": "localhost:99",
            },
            [
                "MARKETPLACE_PUBLIC_KEY: not a PEM public key",
                "AWS_ENDPOINT_URL_MARKETPLACE_METERING: must be an http(s) URL",
            ],
        ),
    ],
)
def test_bad_config_exits_2_before_binding_with_one_line_per_problem(
    env: dict[str, str], expected: list[str]
) -> None:
    port = free_port()
    full = loopback_env("http://127.0.0.1:9", MARKETPLACE_PROBE_LISTEN=f"127.0.0.1:{port}")
    del full["AWS_ENDPOINT_URL_MARKETPLACE_METERING"]
    full.update(env)
    out = cli("run", env=full)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    for want in expected:
        assert any(want in line for line in lines), (want, lines)
    assert all(line.startswith("config error: ") for line in lines)
    assert "Traceback" not in out.stderr


def test_probe_exit_codes(launch: Launch, emulator: Emulator) -> None:
    port = free_port()
    assert cli("probe", "--address", f"127.0.0.1:{port}").returncode == 1  # nothing there
    bad = cli("probe", "--address", "nonsense")
    assert bad.returncode == 2 and "probe: --address: 'nonsense' is not host:port" in bad.stderr
    emulator.reconfigure({"entitled": False})
    car = launch()
    car.wait_for(lambda d: d["state"] == "not_entitled")
    address = car.probe.removeprefix("http://")
    assert cli("probe", "--address", address).returncode == 1
    assert cli("probe", "--address", address, "--path", "/healthz").returncode == 0
    emulator.reconfigure({"entitled": True})
    ok = launch()
    ok.wait_for(lambda d: d["state"] == "entitled")
    env = {"PATH": "/usr/bin", "MARKETPLACE_PROBE_LISTEN": ok.probe.removeprefix("http://")}
    out = cli("probe", env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["state"] == "entitled"


def test_probe_imports_neither_boto3_nor_pydantic() -> None:
    check = (
        "import sys\n"
        "sys.argv = ['x', 'probe', '--address', '127.0.0.1:9']\n"
        "from sidecar.cli import main\n"
        "main()\n"
        "heavy = ('boto3', 'botocore', 'pydantic', 'jwt', 'requests')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "print(','.join(bad) or 'clean')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.stdout.strip().splitlines()[-1] == "clean"


def test_verify_token_cli(key: object) -> None:
    k = new_key()
    env = {
        "PATH": "/usr/bin",
        "MARKETPLACE_PRODUCT_CODE": "prod-abc",
        "MARKETPLACE_PUBLIC_KEY": pem(k),
    }
    token = sign(
        k,
        {"productCode": "prod-abc", "publicKeyVersion": 1, "nonce": "n1", "iat": int(time.time())},
    )
    good = cli("verify-token", "--nonce", "n1", env=env, stdin=token)
    assert good.returncode == 0 and json.loads(good.stdout)["nonce"] == "n1"
    replay = cli("verify-token", "--nonce", "n2", env=env, stdin=token)
    assert replay.returncode == 1 and "nonce_mismatch" in replay.stderr
    unchecked = cli("verify-token", env=env, stdin=token)
    assert unchecked.returncode == 0 and "nonce was not checked" in unchecked.stderr
    forged = sign(
        new_key(),
        {"productCode": "prod-abc", "publicKeyVersion": 1, "nonce": "n1", "iat": int(time.time())},
    )
    bad = cli("verify-token", "--nonce", "n1", env=env, stdin=forged)
    assert bad.returncode == 1 and "bad_signature" in bad.stderr


def test_demo_runs_emulator_and_sidecar_together() -> None:
    api, probe = free_port(), free_port()
    env = loopback_env(
        "unused",
        MARKETPLACE_LISTEN=f"127.0.0.1:{api}",
        MARKETPLACE_PROBE_LISTEN=f"127.0.0.1:{probe}",
    )
    del env["AWS_ENDPOINT_URL_MARKETPLACE_METERING"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        doc: dict[str, object] = {}
        while time.monotonic() < deadline:
            try:
                doc = requests.get(f"http://127.0.0.1:{api}/v1/entitlement", timeout=2).json()
                if doc["state"] == "entitled":
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        assert doc.get("state") == "entitled"
        r = requests.post(
            f"http://127.0.0.1:{api}/v1/entitlement/challenge",
            json={"nonce": "from-the-product"},
            timeout=10,
        )
        assert r.json()["claims"]["nonce"] == "from-the-product"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert f"curl -s http://127.0.0.1:{api}/v1/entitlement" in out


def test_emulator_command_writes_its_key_and_serves_boto3(tmp_path: object) -> None:
    import pathlib

    key_file = pathlib.Path(str(tmp_path)) / "emu.pem"
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "emulator",
            "--listen",
            f"127.0.0.1:{port}",
            "--write-public-key",
            str(key_file),
            "--not-entitled",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        assert "BEGIN PUBLIC KEY" in key_file.read_text()
        import boto3

        c = boto3.client(
            "meteringmarketplace",
            region_name="us-east-1",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="a",
            aws_secret_access_key="b",
        )
        with pytest.raises(c.exceptions.CustomerNotEntitledException):
            c.register_usage(ProductCode="p", PublicKeyVersion=1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0


@pytest.mark.parametrize("command", [[], ["run"], ["doctor"], ["verify-token"]])
def test_help_lists_every_setting_with_its_default_and_meaning(command: list[str]) -> None:
    from sidecar.config import SPECS, variables

    out = cli(*command, "--help", env={"PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for env_name, field in variables().items():
        info = SPECS[field]
        (head,) = [i for i, line in enumerate(lines) if line.startswith(f"  {env_name}  [")]
        assert ("required" if info.required else "default: ") in lines[head]
        assert info.description, f"{field}: give the settings field a description for --help"
        following = " ".join(line.strip() for line in lines[head + 1 : head + 6])
        assert following.startswith(info.description[:30]), (env_name, following)
    assert "  MARKETPLACE_LISTEN  [default: 127.0.0.1:8787]" in lines
    assert "  MARKETPLACE_REGISTER_JITTER  [default: 0.1; >= 0; <= 0.5]" in lines
    assert "  MARKETPLACE_LOG_FORMAT  [default: json; one of json, text]" in lines
    assert "AWS_ENDPOINT_URL_MARKETPLACE_METERING" in out.stdout
    assert "does not know (a misspelling), stops it" in out.stdout
    assert "README" not in out.stdout  # the image carries no README


def test_top_level_help_shows_every_command_with_its_options() -> None:
    out = cli("--help", env={"PATH": "/usr/bin"})
    assert out.returncode == 0
    for option in ("--address", "--timeout", "--nonce", "--max-age", "--not-entitled",
                   "--throttle-rps", "--write-public-key", "--exit-after"):  # fmt: skip
        assert option in out.stdout
    for command in ("run", "probe", "verify-token", "emulator", "doctor", "demo"):
        assert f"marketplace-sidecar {command} [-h]" in out.stdout


def test_a_misspelled_variable_exits_2_naming_it() -> None:
    env = loopback_env(
        "http://127.0.0.1:9",
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_PUBLICKEY_FILE="/etc/marketplace/public-key.pem",
    )
    out = cli("run", env=env)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "config error: MARKETPLACE_PUBLICKEY_FILE: unknown variable; "
        "did you mean MARKETPLACE_PUBLIC_KEY_FILE?"
    ]


def test_service_links_of_a_namespace_do_not_stop_the_sidecar(launch: Launch) -> None:
    car = launch(
        MARKETPLACE_SIDECAR_SERVICE_HOST="10.96.0.12",
        MARKETPLACE_SIDECAR_SERVICE_PORT="8788",
        MARKETPLACE_SIDECAR_PORT="tcp://10.96.0.12:8788",
        MARKETPLACE_SIDECAR_PORT_8788_TCP_ADDR="10.96.0.12",
        MARKETPLACE_SIDECAR_URL="http://127.0.0.1:8787",
    )
    assert car.wait_for(lambda d: d["state"] == "entitled")["warnings"] == []


def test_verify_token_accepts_a_one_line_public_key_with_backslash_n() -> None:
    k = new_key()
    one_line = pem(k).strip().replace("\n", "\\n")
    env = {"PATH": "/usr/bin", "MARKETPLACE_PRODUCT_CODE": "p", "MARKETPLACE_PUBLIC_KEY": one_line}
    token = sign(
        k, {"productCode": "p", "publicKeyVersion": 1, "nonce": "n", "iat": int(time.time())}
    )
    out = cli("verify-token", "--nonce", "n", env=env, stdin=token)
    assert out.returncode == 0, out.stderr
