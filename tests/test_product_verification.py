"""Issue: the product verifies entitlement itself, so deleting or faking the sidecar unlocks
nothing. Real processes over HTTP: the sidecar, the emulator, fake sidecars, a Node verifier."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any, ClassVar

import pytest

from sidecar import client
from sidecar.emulator.service import TOKEN_FAULTS, Emulator
from tests.helpers import ROOT, Launch, claims, free_port, new_key, pem, sign

NODE = shutil.which("node")
NODE_VERIFIER = ROOT / "examples" / "node" / "verify.js"


class FakeSidecar(BaseHTTPRequestHandler):
    """Answers every challenge with `token` (a forgery or a replay) and entitled: true."""

    token: ClassVar[str] = ""

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"state": "entitled", "entitled": True, "token": self.token}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def fake() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSidecar)
    Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_genuine_sidecar_passes(launch: Launch, emulator: Emulator) -> None:
    car = launch()
    car.wait_for(lambda d: d["state"] == "entitled")
    got = client.challenge(emulator.public_pem(), "prod-abc", url=car.api)
    assert got["productCode"] == "prod-abc"
    assert emulator.calls[-1]["nonce"] == got["nonce"]  # AWS saw the product's own nonce


def test_fake_sidecar_with_unsigned_or_self_signed_token_fails(
    fake: str, emulator: Emulator
) -> None:
    for token in (
        "eyJhbGciOiJub25lIn0.eyJwcm9kdWN0Q29kZSI6InByb2QtYWJjIn0.",
        sign(new_key(), claims()),
        "not a token",
    ):
        FakeSidecar.token = token
        with pytest.raises(client.EntitlementError) as info:
            client.challenge(emulator.public_pem(), "prod-abc", url=fake)
        assert info.value.reason.startswith("token_")


def test_replayed_genuine_token_fails(launch: Launch, emulator: Emulator, fake: str) -> None:
    car = launch()
    genuine = car.wait_for(lambda d: d["state"] == "entitled")["token"]
    FakeSidecar.token = genuine  # verified by the sidecar, signed by "AWS", but for another nonce
    with pytest.raises(client.EntitlementError) as info:
        client.challenge(emulator.public_pem(), "prod-abc", url=fake)
    assert info.value.reason == "token_nonce_mismatch"


def test_token_for_another_product_code_fails(launch: Launch, emulator: Emulator) -> None:
    # A customer points the sidecar at a free product's code: AWS signs, the product refuses.
    car = launch(MARKETPLACE_PRODUCT_CODE="free-product")
    car.wait_for(lambda d: d["state"] == "entitled")
    with pytest.raises(client.EntitlementError) as info:
        client.challenge(emulator.public_pem(), "prod-abc", url=car.api)
    assert info.value.reason == "token_product_code_mismatch"


def test_missing_sidecar_is_a_clear_error_not_a_hang() -> None:
    started = time.monotonic()
    with pytest.raises(client.EntitlementError) as info:
        client.challenge(
            pem(new_key()), "prod-abc", url=f"http://127.0.0.1:{free_port()}", timeout=2
        )
    assert info.value.reason == "no_sidecar" and "no entitlement sidecar" in info.value.message
    assert time.monotonic() - started < 2


def test_not_entitled_and_rate_limit_are_reported(launch: Launch, emulator: Emulator) -> None:
    emulator.reconfigure({"entitled": False})
    car = launch()
    car.wait_for(lambda d: d["state"] == "not_entitled")
    with pytest.raises(client.EntitlementError) as info:
        client.challenge(emulator.public_pem(), "prod-abc", url=car.api)
    assert info.value.reason == "not_entitled"
    emulator.reconfigure({"entitled": True})
    ok = launch(MARKETPLACE_CHALLENGE_BURST="1")
    ok.wait_for(lambda d: d["state"] == "entitled")
    client.challenge(emulator.public_pem(), "prod-abc", url=ok.api)
    with pytest.raises(client.EntitlementError) as info:
        client.challenge(emulator.public_pem(), "prod-abc", url=ok.api)
    assert info.value.reason == "rate_limited" and info.value.retry_after == 1


def test_challenge_retries_retryable_aws_errors(launch: Launch, emulator: Emulator) -> None:
    car = launch()
    car.wait_for(lambda d: d["state"] == "entitled")
    emulator.reconfigure({"faults": [{"error": "ThrottlingException", "first": 2}]})
    got = client.challenge(emulator.public_pem(), "prod-abc", url=car.api)
    assert [c["code"] for c in emulator.calls[-3:]] == ["ThrottlingException"] * 2 + ["ok"]
    assert {c["nonce"] for c in emulator.calls[-3:]} == {got["nonce"]}


def test_client_library_does_not_import_boto3_or_kubernetes() -> None:
    code = (
        "import sys; import sidecar.client\n"
        "print(sorted(m for m in ('boto3', 'botocore', 'kubernetes', 'pydantic') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_verify_rejects_stale_tokens() -> None:
    k = new_key()
    token = sign(k, claims(nonce="n", iat=time.time() - 600))
    with pytest.raises(client.EntitlementError) as info:
        client.verify(token, pem(k), "prod-abc", "n", max_age=300)
    assert info.value.reason == "token_too_old"
    assert client.verify(token, pem(k), "prod-abc", "n", max_age=900)["nonce"] == "n"


def test_node_verifier_accepts_real_tokens_and_rejects_forgeries(
    emulator_server: Any, emulator: Emulator, tmp_path: Path
) -> None:
    import boto3

    assert NODE is not None, "node is required (.ci/run installs it)"
    key_file = tmp_path / "product.pem"
    key_file.write_text(emulator.public_pem())
    c = boto3.client(
        "meteringmarketplace",
        region_name="us-east-1",
        endpoint_url=emulator_server.url,
        aws_access_key_id="node",
        aws_secret_access_key="x",
    )

    def node(token: str, nonce: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(NODE), str(NODE_VERIFIER), str(key_file), "prod-abc", nonce],
            input=token,
            capture_output=True,
            text=True,
            timeout=30,
        )

    token = c.register_usage(ProductCode="prod-abc", PublicKeyVersion=1, Nonce="node-n")
    ok = node(token["Signature"], "node-n")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["nonce"] == "node-n"
    assert "nonce_mismatch" in node(token["Signature"], "other").stderr
    expected = {
        "tamper": "bad_signature",
        "other_key": "bad_signature",
        "rs256": "bad_algorithm",
        "alg_none": "malformed",
        "wrong_product": "product_code_mismatch",
        "wrong_nonce": "nonce_mismatch",
        "no_nonce": "nonce_mismatch",
        "wrong_version": "key_version_mismatch",
        "future_iat": "iat_in_future",
    }
    assert set(expected) == set(TOKEN_FAULTS)
    for fault, reason in expected.items():
        emulator.reconfigure({"token_fault": fault})
        forged = c.register_usage(ProductCode="prod-abc", PublicKeyVersion=1, Nonce="node-n")
        out = node(forged["Signature"], "node-n")
        assert out.returncode == 1 and reason in out.stderr, (fault, out.stderr)
