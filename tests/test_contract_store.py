"""contract-state.json: replaced whole, mode 0600 (it holds consumption tokens), and never
followed into something planted in its place."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sidecar.entitlement.contract_store import NAME, ContractStore


def test_saves_are_whole_documents_readable_by_the_owner_only(tmp_path: Path) -> None:
    os.umask(0o022)
    leftover = tmp_path / f".{NAME}.{os.getpid()}.tmp"
    leftover.write_text("old")
    leftover.chmod(0o666)  # a temporary file left by a crash, world-readable
    store = ContractStore(tmp_path)
    store.save(checkout={"held": {"consumption_token": "secret-token"}})
    store.save(leases={"a": {"state": "held"}})
    path = tmp_path / NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["checkout"]["held"]["consumption_token"] == "secret-token"
    assert doc["leases"] == {"a": {"state": "held"}}
    assert not leftover.exists()
    again = ContractStore(tmp_path)
    assert again.get("leases") == {"a": {"state": "held"}} and again.problem is None


def test_a_failed_save_leaves_memory_and_disk_as_they_were(tmp_path: Path) -> None:
    store = ContractStore(tmp_path)
    store.save(leases={"a": {"state": "held"}})
    os.rename(tmp_path / NAME, tmp_path / "moved")
    (tmp_path / NAME).mkdir()  # the rename over it fails, as on a broken volume
    with pytest.raises(OSError):
        store.save(leases={})
    assert store.get("leases") == {"a": {"state": "held"}}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("planted", ["symlink", "junk", "fifo", "wrong_version"])
def test_something_planted_in_its_place_is_reported_not_followed(
    tmp_path: Path, planted: str
) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"version": 1, "checkout": None, "leases": {"x": {}}}))
    path = tmp_path / NAME
    if planted == "symlink":
        path.symlink_to(target)
    elif planted == "fifo":
        os.mkfifo(path)
    elif planted == "junk":
        path.write_bytes(b"\x00{not json")
    else:
        path.write_text(json.dumps({"version": 99, "leases": {"x": {}}}))
    store = ContractStore(tmp_path)
    assert store.problem is not None and NAME in store.problem
    assert store.get("leases") == {} and store.get("checkout") is None
