"""Custom mode's store size: bytes per record over the idempotency window, and the sustained
rate a state volume holds for that window with 20% headroom, against a floor.

The floor, measured in the same run: version 1's store (a row per record and per allocation,
each id's full answer; tests/usage_v1.py writes its rows word for word). The sidecar's path is
`UsageService.post` and its loop (`tick`: seal, send to the emulator over loopback, prune),
on a manual clock: `--hours` hours pass with `--per-hour` records each, with ids, as single-record
POSTs (16 threads, group commit) or 1,000-record POSTs, without allocations and with three.
Once more than the 48-hour window has passed, the store holds a full window's ids (49 hours:
pruned hourly) and bytes per record are (volume used - empty store) / ids held.

The sustained rate for a volume V: (0.8 V - empty store - a 4 MiB WAL - 2 MiB of SQLite cache)
/ (bytes per record x 49 h). "used" is the sidecar's own reading (what the kubelet counts, free
pages of the store excluded, the cache counted).

Usage: python benchmarks/capacity.py [--hours 56] [--per-hour 3000] [--volume 64Mi] [--dir PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.aws.metering import MeteringGateway  # noqa: E402
from sidecar.config import parse_volume_bytes  # noqa: E402
from sidecar.emulator.service import Emulator, EmulatorServer  # noqa: E402
from sidecar.usage.hours import HOUR, HourPolicy, hour_of  # noqa: E402
from sidecar.usage.service import UsagePolicy, UsageService  # noqa: E402
from sidecar.usage.store import DB_NAME, WAL_LIMIT_BYTES  # noqa: E402
from sidecar.usage.volume import MIB, files_bytes, reading  # noqa: E402
from tests import usage_v1  # noqa: E402
from tests.helpers import ManualClock  # noqa: E402

WINDOW_HOURS = 49  # ids are kept 48 hours, pruned when the hour changes
HEADROOM = 0.8
TEAMS = [{"quantity": 1, "tags": {"team": t}} for t in ("a", "b", "c")]


def _used(directory: Path) -> int:
    """The sidecar's reading of `directory` after a checkpoint (the WAL folded in)."""
    conn = sqlite3.connect(directory / DB_NAME)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages, free, size = (
            int(conn.execute(f"PRAGMA {p}").fetchone()[0])
            for p in ("page_count", "freelist_count", "page_size")
        )
    finally:
        conn.close()
    files, store, _ = files_bytes(directory, DB_NAME)
    return reading(files, store, pages, free, size, 1 << 50, None, "").used


def _records(hour: int, n: int, allocations: bool) -> list[dict[str, Any]]:
    return [
        {
            "dimension": ("scans", "users")[i % 2],
            "quantity": 3 if allocations else 1,
            "id": uuid.UUID(int=hour << 64 | i).hex,  # 32 characters, as a uuid4 hex
            **({"allocations": TEAMS} if allocations else {}),
        }
        for i in range(n)
    ]


def run_v1(directory: Path, hours: int, per_hour: int, allocations: bool) -> tuple[int, int, int]:
    """Version 1's rows for the same traffic: (bytes used - empty, records held, empty)."""
    clock = ManualClock()
    conn = usage_v1.create(directory)
    empty = _used(directory)
    for _ in range(hours):
        h = hour_of(clock.t)
        records = _records(h, per_hour, allocations)
        for start in range(0, per_hour, 1000):
            conn.execute("BEGIN")
            usage_v1.ingest(conn, records[start : start + 1000], clock.t)
            conn.execute("COMMIT")
        clock.t += HOUR
        conn.execute("BEGIN")
        usage_v1.seal(conn, hour_of(clock.t) - 1, clock.t, state="sent")
        usage_v1.prune(conn, clock.t)
        conn.execute("COMMIT")
    held = int(conn.execute("SELECT COUNT(*) FROM keys").fetchone()[0])
    conn.close()
    return _used(directory) - empty, held, empty


def run_v2(
    directory: Path,
    hours: int,
    per_hour: int,
    allocations: bool,
    single: bool,
    server: EmulatorServer,
) -> tuple[int, int, int]:
    """The sidecar: (bytes used - empty, ids held, empty) after `hours` hours of traffic."""
    os.environ.update(
        {
            "AWS_ENDPOINT_URL_MARKETPLACE_METERING": server.url,
            "AWS_ACCESS_KEY_ID": f"bench-{directory.parent.name}",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }
    )
    clock = ManualClock()
    server.emulator.meter_clock = clock.time
    svc = UsageService(
        UsagePolicy(
            product_code="prod-abc",
            dimensions=("scans", "users"),
            state_dir=directory,
            entitlement_check="none",
            hours=HourPolicy(seal_margin=60, spread=0),
        ),
        lambda: MeteringGateway("us-east-1", 5.0),
        clock=clock,
        rng=lambda: 0.0,
    )
    empty = _used(directory)

    def post(doc: Any) -> None:
        status, body = svc.post(json.dumps(doc).encode())
        if status != 202:
            raise RuntimeError(f"POST answered {status}: {json.dumps(body)[:300]}")

    with ThreadPoolExecutor(16) as pool:
        for _ in range(hours):
            records = _records(hour_of(clock.t), per_hour, allocations)
            if single:
                list(pool.map(post, records))
            else:
                for start in range(0, per_hour, 1000):
                    post(records[start : start + 1000])
            clock.t += HOUR
            svc.tick(clock.t)
    held = svc.store.read(lambda c: int(c.execute("SELECT COUNT(*) FROM ids").fetchone()[0]))
    svc.close()
    return _used(directory) - empty, held, empty


def rate(volume: int, per_record: float, empty: int) -> float:
    """Records/s the volume holds for the whole window, the sidecar's reading <= 80%.
    `empty`: the empty store's reading (its files and the cache reserve)."""
    room = HEADROOM * volume - empty - WAL_LIMIT_BYTES
    return max(0.0, room) / (per_record * WINDOW_HOURS * HOUR)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=int, default=56, help="simulated hours (> 49)")
    parser.add_argument("--per-hour", type=int, default=3000, help="records per hour")
    parser.add_argument(
        "--volume", default="64Mi,128Mi", help="the volumes to size against (comma-separated)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the stores go")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    volumes = [parse_volume_bytes(v) or 64 * MIB for v in args.volume.split(",")]
    server = EmulatorServer(Emulator(seed=1)).start()
    rows = []
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as top:
            for name, allocations, single in (
                ("1,000-record POSTs", False, False),
                ("1,000-record POSTs, 3 allocations", True, False),
                ("single-record POSTs", False, True),
            ):
                base = Path(top) / name.replace(" ", "").replace(",", "")
                (base / "v1").mkdir(parents=True)
                (base / "v2").mkdir()
                old = run_v1(base / "v1", args.hours, args.per_hour, allocations)
                new = run_v2(base / "v2", args.hours, args.per_hour, allocations, single, server)
                rows.append((name, old, new))
    finally:
        server.shutdown()
    print(f"{args.hours} h x {args.per_hour} records/h, each with an id (32 characters)")
    head = "".join(f" {f'v1/v2 rec/s at {v / MIB:.0f} MiB':>24}" for v in volumes)
    print(f"{'traffic':36} {'v1 B/rec':>9} {'v2 B/rec':>9} {'ratio':>6}{head}")
    for name, (old_bytes, old_held, old_empty), (new_bytes, new_held, new_empty) in rows:
        old_per, new_per = old_bytes / old_held, new_bytes / new_held
        rates = "".join(
            f" {f'{rate(v, old_per, old_empty):.2f} / {rate(v, new_per, new_empty):.2f}':>24}"
            for v in volumes
        )
        print(f"{name:36} {old_per:9.0f} {new_per:9.1f} {old_per / new_per:6.1f}{rates}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
