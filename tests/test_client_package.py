"""The product's client as its own distribution (client/): a product image installs it alone,
with PyJWT and cryptography, and verifies a token the emulator signed through a real sidecar."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.emulator.service import Emulator
from tests.helpers import ROOT, Launch

CLIENT = ROOT / "client"
PACKAGE = CLIENT / "marketplace_sidecar_client"
# What the product image holds after the one install line, besides the installer itself.
EXPECTED = {"marketplace-sidecar-client", "pyjwt", "cryptography", "cffi", "pycparser"}
INSTALLERS = {"pip", "setuptools", "wheel"}

PRODUCT = """
import json, sys
import marketplace_sidecar_client as c
claims = c.challenge(open(sys.argv[1]).read(), "prod-abc", url=sys.argv[2])
heavy = [m for m in ("boto3", "botocore", "pydantic", "pydantic_settings", "psycopg",
                     "kubernetes", "requests", "sidecar") if m in sys.modules]
try:
    import boto3  # noqa: F401
    installed = True
except ModuleNotFoundError:
    installed = False
print(json.dumps({"claims": claims, "imported": heavy, "boto3_installed": installed}))
"""


@pytest.mark.slow  # builds a virtualenv and pip-installs the client into it
def test_a_fresh_venv_with_only_the_client_verifies_a_token_against_the_emulator(
    launch: Launch, emulator: Emulator, tmp_path: Path
) -> None:
    venv = tmp_path / "product"
    install = subprocess.run(
        [str(ROOT / "scripts" / "client-venv.sh"), str(venv), sys.executable],
        capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    python = venv / "bin" / "python"
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    names = {d["name"].lower() for d in json.loads(listed.stdout)} - INSTALLERS
    assert names == EXPECTED

    car = launch()
    car.wait_for(lambda d: d["state"] == "entitled")
    key = tmp_path / "product-key.pem"
    key.write_text(emulator.public_pem())
    out = subprocess.run(
        [str(python), "-c", PRODUCT, str(key), car.api],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["claims"]["productCode"] == "prod-abc"
    assert emulator.calls[-1]["nonce"] == doc["claims"]["nonce"]  # AWS saw the product's nonce
    assert doc["imported"] == [] and doc["boto3_installed"] is False


def test_the_client_package_imports_nothing_but_pyjwt_cryptography_and_the_stdlib() -> None:
    allowed = {"jwt", "cryptography", "marketplace_sidecar_client"}
    wrong = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert {p.name for p in files} == {"__init__.py", "keys.py", "tokens.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in allowed and top not in sys.stdlib_module_names:
                    wrong.append(f"{path.name} imports {name}")
    assert wrong == []


def test_the_client_declares_only_pyjwt_and_cryptography() -> None:
    import tomllib

    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert sorted(d.split(">")[0].split("=")[0].lower() for d in project["dependencies"]) == [
        "cryptography",
        "pyjwt",
    ]


def test_sidecar_client_is_the_standalone_package() -> None:
    import marketplace_sidecar_client
    import marketplace_sidecar_client.keys
    import marketplace_sidecar_client.tokens

    from sidecar import client
    from sidecar.entitlement import keys, verify

    assert client.challenge is marketplace_sidecar_client.challenge
    assert verify.verify_token is marketplace_sidecar_client.tokens.verify_token
    assert keys.load_public_key is marketplace_sidecar_client.keys.load_public_key
