"""How full the state volume is, counted the way the kubelet counts an emptyDir (the bytes of
its files), so usage is refused (503) before the pod would be evicted with its unsent hours.

The kubelet evicts a pod whose emptyDir holds more than its `sizeLimit`, and `statvfs` shows
the node's disk, not that limit: the limit comes from configuration
(MARKETPLACE_STATE_VOLUME_BYTES, the chart sets it from the same value), or from the
filesystem when that has less room. Free pages inside the SQLite file are reused before the
file grows, so they count as room.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sidecar.usage.db import Db

MIB = 1024 * 1024
WARN_FRACTION = 0.8  # warnings, /readyz, the metric's alert
REFUSE_FRACTION = 0.9  # new usage is refused: the rest is for sealing, sending and pruning
# Dirty pages of an open transaction stay in SQLite's page cache (2 MiB by default) until
# commit or a spill, where the files do not show them yet.
CACHE_RESERVE = 2 * MIB


class VolumeFullError(Exception):
    """Storing this usage would bring the state volume past its refusal threshold."""

    def __init__(self, reading: Reading) -> None:
        super().__init__(
            f"the state volume is {reading.percent}% full ({reading.describe()}); usage "
            f"is refused above {round(REFUSE_FRACTION * 100)}% so the pod is never evicted"
        )
        self.reading = reading


@dataclass(frozen=True)
class Reading:
    used: int  # the files' bytes, less the store's free pages, plus its pending growth and cache
    limit: int
    source: str  # the setting, or "filesystem" when the disk has less room

    @property
    def fraction(self) -> float:
        return self.used / self.limit if self.limit > 0 else 1.0

    @property
    def percent(self) -> int:
        return int(self.fraction * 100)

    def describe(self) -> str:
        return f"{self.used / MIB:.1f} MiB of {self.limit / MIB:.1f} MiB, limit from {self.source}"

    @property
    def refusing(self) -> bool:
        return self.fraction >= REFUSE_FRACTION

    def warning(self) -> str | None:
        if self.refusing:
            return f"state volume {self.percent}% full ({self.describe()}): new usage is refused"
        if self.fraction >= WARN_FRACTION:
            return (
                f"state volume {self.percent}% full ({self.describe()}): new usage is refused "
                f"at {round(REFUSE_FRACTION * 100)}%; see the docs, custom-capacity"
            )
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "used_bytes": self.used,
            "limit_bytes": self.limit,
            "limit_source": self.source,
            "percent": self.percent,
        }


def reading(
    files: int,
    store_file: int,
    store_pages: int,
    free_pages: int,
    page_size: int,
    fs_room: int,
    configured: int | None,
    setting: str,
) -> Reading:
    """Pure: `files` bytes in the volume, the store file's size on disk and its logical size
    (`store_pages`, of which `free_pages` are free), and `fs_room` bytes free on the disk.
    `used` counts SQLite's page cache as taken: an open transaction's pages may be there."""
    growth = max(0, store_pages * page_size - store_file)
    used = max(0, files + growth - free_pages * page_size) + CACHE_RESERVE
    fs_limit = files + fs_room
    if configured is not None and configured <= fs_limit:
        return Reading(used, configured, setting)
    return Reading(used, fs_limit, "filesystem")


def files_bytes(directory: Path, name: str) -> tuple[int, int]:
    """(bytes of every file under `directory`, bytes of the store file `name`), as du counts."""
    total = store = 0
    for root, _, names in os.walk(directory):
        for n in names:
            try:
                st = os.lstat(os.path.join(root, n))
            except OSError:
                continue  # removed meanwhile
            size = max(st.st_blocks * 512, st.st_size)
            total += size
            if n == name and root == str(directory):
                store = size
    return total, store


def measure(db: Db, directory: Path, name: str, configured: int | None, setting: str) -> Reading:
    """A reading inside a transaction (or a read snapshot) of the store `name` in `directory`."""
    files, store = files_bytes(directory, name)
    pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
    st = os.statvfs(directory)
    return reading(
        files, store, pages, free, page_size, st.f_bavail * st.f_frsize, configured, setting
    )


def check(found: Reading) -> Reading:
    """`found` when usage may still be stored; VolumeFullError otherwise."""
    if found.refusing:
        raise VolumeFullError(found)
    return found
