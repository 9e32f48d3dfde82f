"""Contract mode's state on disk: the pod's own checkout and the product's leases.

Without it a restarted sidecar checks out anew while AWS still counts the old checkout (up to
60 minutes): two seats for one pod, and leases the product holds forgotten while their units
stay taken. One JSON document, `contract-state.json` in MARKETPLACE_STATE_DIR, replaced whole
on every change: written to a fresh temporary file (mode 0600: it holds consumption tokens,
bearer credentials of the checkouts), fsynced, renamed over the old one, directory fsynced. A
reader sees the old document or the new one, never half of either.

Files are opened with O_NOFOLLOW; anything odd in their place (a symlink, a FIFO, junk) is
reported and read as "nothing kept" (the previous checkouts return to the pool at their expiry,
as without a state directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from sidecar.core.files import UnsafeFileError, read_small_file

log = logging.getLogger("sidecar.contract")

NAME = "contract-state.json"
MAX_BYTES = 4 * 1024 * 1024
VERSION = 1


class ContractStore:
    """The document, kept in memory and on disk; `save` raises OSError when it cannot persist."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / NAME
        self._lock = threading.Lock()
        self.problem: str | None = None  # why the document found at start was not used
        self._doc: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"version": VERSION, "checkout": None, "leases": {}}
        try:
            raw = read_small_file(self.path, MAX_BYTES, follow_symlinks=False)
        except FileNotFoundError:
            return empty
        except (OSError, UnsafeFileError) as exc:
            self.problem = f"{NAME} {exc}"
            log.error("contract_state_unreadable", extra={"detail": self.problem})
            return empty
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            doc = None
        if (
            not isinstance(doc, dict)
            or doc.get("version") != VERSION
            or not isinstance(doc.get("leases"), dict)
        ):
            self.problem = f"{NAME} is not a contract state document"
            log.error("contract_state_unreadable", extra={"detail": self.problem})
            return empty
        return doc

    def get(self, key: str) -> Any:
        with self._lock:
            return json.loads(json.dumps(self._doc.get(key)))  # a copy: callers may change it

    def save(self, **changes: Any) -> None:
        """Apply `changes` (top-level keys) and persist; on failure memory is left unchanged."""
        with self._lock:
            doc = {**self._doc, **changes}
            self._write(doc)
            self._doc = doc

    def _write(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        tmp = self.directory / f".{NAME}.{os.getpid()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a leftover temporary file keeps its old mode otherwise
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        try:
            os.replace(tmp, self.path)
        except BaseException:
            _unlink(tmp)
            raise
        dfd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
