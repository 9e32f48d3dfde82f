"""Issue: hostile files must be refused with a sentence, never hang or crash the sidecar.

Key file (`run`, `doctor`, `verify-token`): a FIFO, a directory, a device, a symlink to
/dev/zero or a huge file is one config line and a non-zero exit, before anything binds.
Verdict file: the same hostile shapes, deep nesting, bad UTF-8, wrong types and planted
symlinks are an "unreadable verdict" (a refusal), and saving never writes through a symlink.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.aws.errors import ErrorInfo, classify
from sidecar.config import load
from sidecar.core.files import UnsafeFileError, read_small_file
from sidecar.emulator.service import Emulator
from sidecar.entitlement.verdict import FILENAME, MAX_VERDICT_BYTES, VerdictStore
from tests.helpers import ROOT, Launch, free_port, loopback_env, pem

HANG = 15  # a command still running after this many seconds is hanging


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def directory(path: Path) -> Path:
    path.mkdir()
    return path


def to_dev_zero(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def huge(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(100 * 1024 * 1024)  # sparse: 100 MB without the disk
    return path


HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "fifo": (fifo, "is a FIFO (named pipe), not a regular file"),
    "directory": (directory, "is a directory, not a regular file"),
    "dev_zero_symlink": (to_dev_zero, "is a character device, not a regular file"),
    "huge": (huge, "is 104857600 bytes; at most"),
}


def command(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env=env,
        cwd=ROOT,
        input="",
        capture_output=True,
        text=True,
        timeout=HANG,  # raises, failing the test, if the command hangs
    )


@pytest.mark.parametrize("shape", sorted(HOSTILE))
def test_a_hostile_key_file_is_one_line_and_exit_2_for_run_and_verify_token(
    shape: str, tmp_path: Path
) -> None:
    make, expected = HOSTILE[shape]
    path = make(tmp_path / "key.pem")
    probe = free_port()
    env = loopback_env(
        f"http://127.0.0.1:{free_port()}",
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_PUBLIC_KEY_FILE=str(path),
        MARKETPLACE_PROBE_LISTEN=f"127.0.0.1:{probe}",
        MARKETPLACE_LISTEN=f"127.0.0.1:{free_port()}",
    )
    for args in (["run"], ["verify-token", "--nonce", "n"]):
        out = command(args, env)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, lines)
        assert lines[0].startswith(f"config error: MARKETPLACE_PUBLIC_KEY_FILE: {path} ")


@pytest.mark.parametrize("shape", sorted(HOSTILE))
def test_a_hostile_key_file_is_a_failed_check_in_doctor(shape: str, tmp_path: Path) -> None:
    make, expected = HOSTILE[shape]
    path = make(tmp_path / "key.pem")
    env = loopback_env(
        f"http://127.0.0.1:{free_port()}",
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_PUBLIC_KEY_FILE=str(path),
    )
    out = command(["doctor"], env)
    assert out.returncode == 2, out.stdout + out.stderr  # a configuration error, as for `run`
    lines = [line for line in out.stdout.splitlines() if "PUBLIC_KEY_FILE" in line]
    assert len(lines) == 1 and lines[0].startswith("✘ configuration: ") and expected in lines[0]


def test_a_key_file_with_two_keys_stops_run_naming_the_problem(
    tmp_path: Path, key: rsa.RSAPrivateKey
) -> None:
    path = tmp_path / "key.pem"
    path.write_text(pem(key) + pem(key))
    env = loopback_env(
        f"http://127.0.0.1:{free_port()}",
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_PUBLIC_KEY_FILE=str(path),
    )
    out = command(["run"], env)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "config error: MARKETPLACE_PUBLIC_KEY_FILE: holds 2 PEM blocks (PUBLIC KEY, PUBLIC KEY); "
        "give exactly one public key"
    ]


def test_a_key_mounted_the_kubernetes_way_through_symlinks_still_loads(
    tmp_path: Path, key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Secret and ConfigMap volumes: key.pem -> ..data/key.pem, ..data -> ..2026_11_27_...
    real = tmp_path / "..2026_11_27_03_00_00.1"
    real.mkdir()
    (real / "key.pem").write_text(pem(key))
    (tmp_path / "..data").symlink_to(real.name)
    (tmp_path / "key.pem").symlink_to("..data/key.pem")
    monkeypatch.setenv("MARKETPLACE_PRODUCT_CODE", "prod-abc")
    monkeypatch.setenv("MARKETPLACE_PUBLIC_KEY_FILE", str(tmp_path / "key.pem"))
    monkeypatch.delenv("MARKETPLACE_PUBLIC_KEY", raising=False)
    _, keys = load()
    assert keys[1].public_numbers() == key.public_key().public_numbers()


def test_a_file_swapped_for_a_fifo_after_the_check_is_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race: the path is a regular file when checked, a FIFO when opened. The type is
    # checked again on the opened descriptor, and O_NONBLOCK keeps that open from hanging.
    path = fifo(tmp_path / "swapped")
    regular = tmp_path / "regular"
    regular.write_text("x")
    real_stat = os.stat

    def checked_before_the_swap(p: Any, *, follow_symlinks: bool = True) -> os.stat_result:
        return real_stat(regular if p == path else p, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(os, "stat", checked_before_the_swap)
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(_read(path)), daemon=True)
    worker.start()
    worker.join(HANG)
    assert not worker.is_alive(), "opening a FIFO hung"
    assert result == ["is a FIFO (named pipe), not a regular file"]


def _read(path: Path) -> str:
    try:
        read_small_file(path, 1024)
    except UnsafeFileError as exc:
        return str(exc)
    return "read"


# -- the verdict file ----------------------------------------------------------------------


def verdict(**over: object) -> bytes:
    doc: dict[str, object] = {
        "product_code": "prod-abc",
        "error": {
            "code": "CustomerNotEntitledException",
            "message": "no subscription",
            "hint": "subscribe",
            "kind": "entitlement",
            "retryable": False,
            "request_id": "r-1",
        },
    }
    doc.update(over)
    return json.dumps(doc).encode()


def load_within(store: VerdictStore) -> ErrorInfo | None:
    result: list[ErrorInfo | None] = []
    worker = threading.Thread(target=lambda: result.append(store.load()), daemon=True)
    worker.start()
    worker.join(HANG)
    assert not worker.is_alive(), "loading the verdict hung"
    return result[0]


def unreadable(store: VerdictStore) -> str:
    got = load_within(store)
    assert got is not None and got.code == "VerdictUnreadable", got
    assert got.kind == "entitlement" and not got.retryable  # a refusal, final
    return got.message


@pytest.mark.parametrize("shape", sorted(HOSTILE))
def test_a_hostile_verdict_file_is_a_refusal_without_hanging(shape: str, tmp_path: Path) -> None:
    make, expected = HOSTILE[shape]
    make(tmp_path / FILENAME)
    message = unreadable(VerdictStore(tmp_path, "prod-abc"))
    if shape == "dev_zero_symlink":
        expected = "is a symbolic link"  # never followed: the sidecar wrote a regular file
    elif shape == "huge":
        expected = f"at most {MAX_VERDICT_BYTES} are allowed"
    assert expected in message


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b"[" * 60_000, "RecursionError"),
        (b'{"product_code": "prod-abc", "error": ' + b"[" * 60_000, "RecursionError"),
        (b"\xff\xfe" + verdict(), "UnicodeDecodeError"),
        (b"not json", "JSONDecodeError"),
        (b"[]", "not a JSON object"),
        (verdict(error="gone"), "error is not an object"),
        (verdict(product_code=["prod-abc"]), "product_code is not a string"),
        (verdict(error={"code": 1, "message": "", "hint": "", "kind": "entitlement"}), "code"),
        (verdict(error={"code": "X", "message": "m", "hint": "h", "kind": "transient"}), "kind"),
        (
            verdict(
                error={
                    "code": "X",
                    "message": "m",
                    "hint": "h",
                    "kind": "entitlement",
                    "request_id": 5,
                }
            ),
            "request_id",
        ),
    ],
)
def test_a_damaged_verdict_is_a_refusal_whatever_the_damage(
    content: bytes, detail: str, tmp_path: Path
) -> None:
    (tmp_path / FILENAME).write_bytes(content)
    assert detail in unreadable(VerdictStore(tmp_path, "prod-abc"))


def test_a_symlinked_verdict_is_not_followed_even_to_a_valid_record(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(verdict())
    (tmp_path / FILENAME).symlink_to(elsewhere)
    assert "is a symbolic link" in unreadable(VerdictStore(tmp_path, "prod-abc"))


def test_a_genuine_verdict_round_trips_and_no_file_means_no_verdict(tmp_path: Path) -> None:
    store = VerdictStore(tmp_path, "prod-abc")
    assert load_within(store) is None
    store.save(classify("CustomerNotEntitledException", "no subscription"))
    got = load_within(store)
    assert got is not None and got.code == "CustomerNotEntitledException" and not got.retryable
    assert got.message == "recorded earlier in this pod: no subscription"
    assert load_within(VerdictStore(tmp_path, "other-product")) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]  # no temp file left


def test_save_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    state = tmp_path / "state"
    state.mkdir()
    (state / "verdict.tmp").symlink_to(victim)  # the old fixed temp name
    (state / FILENAME).symlink_to(victim)
    VerdictStore(state, "prod-abc").save(classify("CustomerNotEntitledException", "no"))
    assert victim.read_text() == "precious"
    assert not (state / FILENAME).is_symlink()  # the symlink itself was replaced
    got = load_within(VerdictStore(state, "prod-abc"))
    assert got is not None and got.code == "CustomerNotEntitledException"


@pytest.mark.parametrize("content", ["fifo", "nested"])
def test_the_registrar_refuses_on_a_hostile_verdict_and_stays_healthy(
    content: str, launch: Launch, emulator: Emulator, tmp_path: Path
) -> None:
    if content == "fifo":
        os.mkfifo(tmp_path / FILENAME)
    else:
        (tmp_path / FILENAME).write_bytes(b"[" * 60_000)
    car = launch(MARKETPLACE_STATE_DIR=str(tmp_path))
    doc = car.wait_for(lambda d: d["state"] != "registering", timeout=HANG)
    assert doc["state"] == "not_entitled" and doc["error"]["code"] == "VerdictUnreadable"
    assert car.get("/healthz", probe=True).status_code == 200  # the registrar thread lives on
    assert emulator.calls == []  # a refusal: AWS is not asked
