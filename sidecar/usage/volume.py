"""How full the state volume is, counted the way the kubelet counts an emptyDir (the bytes of
its files), so usage is refused (503) before the pod would be evicted with its unsent hours.

The kubelet evicts a pod whose emptyDir holds more than its `sizeLimit`, and `statvfs` shows
the node's disk, not that limit: the limit comes from configuration
(MARKETPLACE_STATE_VOLUME_BYTES, the chart sets it from the same value), or from the
filesystem when that has less room. Free pages inside the SQLite file are reused before the
file grows, so they count as room.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from sidecar.usage.db import Db

MIB = 1024 * 1024
WARN_FRACTION = 0.8  # warnings, /readyz, the metric's alert
REFUSE_FRACTION = 0.9  # new usage is refused: the rest is for sealing, sending and pruning
# Dirty pages of an open transaction stay in SQLite's page cache (2 MiB by default) until
# commit or a spill, where the files do not show them yet.
CACHE_RESERVE = 2 * MIB
# A full reading (a walk of the state dir, statvfs, three PRAGMAs) costs more than the write it
# guards, so writes measure at most once a second (MEASURE_EVERY) unless they could have
# brought the volume to the refusal threshold since the last reading. Between two readings the
# store's own writes can add at most: the WAL up to its ceiling (checkpointed at 1,000 pages
# and cut back to 4 MiB: the store's WAL_LIMIT_BYTES), and the rows the accepted POSTs brought,
# at most GROWTH_PER_BODY_BYTE bytes per byte of their bodies (a row holds less than its JSON:
# ids are 20-byte digests, tags JSON at most 3x escaped, in B-tree pages at least half full).
MEASURE_EVERY = 1.0
WAL_CEILING = 4 * MIB + 1000 * 24  # 1,000 frames of 4 KiB pages and their headers
GROWTH_PER_BODY_BYTE = 8


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
    wal: int = 0  # of `used`, the store's WAL file

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
    wal: int = 0,
) -> Reading:
    """Pure: `files` bytes in the volume, the store file's size on disk and its logical size
    (`store_pages`, of which `free_pages` are free), and `fs_room` bytes free on the disk.
    `used` counts SQLite's page cache as taken: an open transaction's pages may be there."""
    growth = max(0, store_pages * page_size - store_file)
    used = max(0, files + growth - free_pages * page_size) + CACHE_RESERVE
    fs_limit = files + fs_room
    if configured is not None and configured <= fs_limit:
        return Reading(used, configured, setting, wal)
    return Reading(used, fs_limit, "filesystem", wal)


def files_bytes(directory: Path, name: str) -> tuple[int, int, int]:
    """(bytes of every file under `directory`, of the store file `name`, of its WAL), as du
    counts."""
    total = store = wal = 0
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
            elif n == name + "-wal" and root == str(directory):
                wal = size
    return total, store, wal


def measure(db: Db, directory: Path, name: str, configured: int | None, setting: str) -> Reading:
    """A reading inside a transaction (or a read snapshot) of the store `name` in `directory`."""
    files, store, wal = files_bytes(directory, name)
    pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
    st = os.statvfs(directory)
    return reading(
        files, store, pages, free, page_size, st.f_bavail * st.f_frsize, configured, setting, wal
    )


def check(found: Reading) -> Reading:
    """`found` when usage may still be stored; VolumeFullError otherwise."""
    if found.refusing:
        raise VolumeFullError(found)
    return found


class Guard:
    """When a write must take a full reading: at most once per MEASURE_EVERY seconds, unless
    the last reading is at the warning level or above (then every write), or the store's own
    writes since (see GROWTH_PER_BODY_BYTE) could have reached the refusal threshold. Usage
    from outside the store (other files, the node's disk) is seen within a second."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: Reading | None = None
        self._at = -math.inf
        self._written = 0

    def due(self, now: float, body_bytes: int) -> bool:
        """A write of a POST of `body_bytes` at monotonic `now`: measure before accepting?"""
        with self._lock:
            self._written += body_bytes
            last = self._last
            if last is None or now - self._at >= MEASURE_EVERY or last.fraction >= WARN_FRACTION:
                return True
            bound = (
                last.used + max(0, WAL_CEILING - last.wal) + GROWTH_PER_BODY_BYTE * self._written
            )
            return bound >= REFUSE_FRACTION * last.limit

    def measured(self, found: Reading, now: float) -> None:
        with self._lock:
            self._last, self._at, self._written = found, now, 0
