"""The first-call marker files: written exclusively, never followed, and anything odd in their
place read cautiously ("sent, answer unknown"), never as "answered"."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.entitlement.marker import ANSWERED, SENT, FirstCall, FirstCallMarker


def test_lifecycle(tmp_path: Path) -> None:
    marker = FirstCallMarker(tmp_path)
    assert marker.status() is FirstCall.UNSENT
    marker.mark_sent()
    assert marker.status() is FirstCall.SENT
    assert (tmp_path / SENT).stat().st_mode & 0o777 == 0o600
    marker.unmark_sent()
    assert marker.status() is FirstCall.UNSENT
    marker.mark_sent()
    marker.mark_answered(lost=True)
    assert marker.status() is FirstCall.LOST
    marker.mark_answered(lost=False)  # the first record stands
    assert marker.status() is FirstCall.LOST


def test_no_directory_persists_nothing() -> None:
    marker = FirstCallMarker(None)
    marker.mark_sent()
    marker.mark_answered(lost=False)
    assert marker.status() is FirstCall.UNSENT


def test_a_planted_symlink_is_not_followed_when_writing(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me")
    (tmp_path / ANSWERED).symlink_to(target)
    marker = FirstCallMarker(tmp_path)
    marker.mark_answered(lost=False)
    assert target.read_text() == "keep me"
    # A symlink is not a record of an answer: read cautiously.
    assert marker.status() is FirstCall.SENT


def test_a_symlink_to_an_answered_record_is_not_believed(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.json"
    real.write_text(json.dumps({"first_answer_lost": False}))
    (tmp_path / ANSWERED).symlink_to(real)
    (tmp_path / SENT).write_text("{}")
    assert FirstCallMarker(tmp_path).status() is FirstCall.SENT


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"[" * 100_000, b'{"first_answer_lost": "no"}', b"x" * 10_000],
)
def test_junk_in_the_answered_file_reads_as_answer_unknown(tmp_path: Path, content: bytes) -> None:
    (tmp_path / ANSWERED).write_bytes(content)
    assert FirstCallMarker(tmp_path).status() is FirstCall.SENT


def test_a_fifo_does_not_hang_the_reader(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / ANSWERED)
    assert FirstCallMarker(tmp_path).status() is FirstCall.SENT


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory that exists and cannot be written, even by root (file modes do not stop
    root, so as root a read-only tmpfs is mounted on it; as a user, mode 0555 does)."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(directory)]
    out = subprocess.run(mount, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        pytest.skip(f"root without the right to mount a read-only tmpfs: {out.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True, timeout=30)


def test_an_unwritable_directory_raises_before_the_call(read_only_dir: Path) -> None:
    marker = FirstCallMarker(read_only_dir)
    with pytest.raises(OSError) as raised:
        marker.mark_sent()
    assert raised.value.errno in (errno.EROFS, errno.EACCES), raised.value
    assert marker.status() is FirstCall.UNSENT
