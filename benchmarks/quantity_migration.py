"""Room the custom store's upgrade to micro-unit quantities (schema 2 -> 3) needs beside it.

The migration scales every quantity in one transaction, so each page of the tables it updates
(mostly `hours`, the audit of every sealed dimension-hour, kept for the pod's life) is written
again to the WAL before the checkpoint. The store starts as the integer sidecar's own
(tests/legacy_v2/custom.sql) plus `--rows` settled hour rows shaped as that sidecar wrote them;
the figure is (store + WAL right after the migration) / store before.

Usage: python benchmarks/quantity_migration.py [--rows 100000] [--dir PATH]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.usage.store import DB_NAME, Store  # noqa: E402


def run(directory: Path, rows: int) -> dict[str, float]:
    path = directory / DB_NAME
    conn = sqlite3.connect(path)
    conn.executescript((ROOT / "tests" / "legacy_v2" / "custom.sql").read_text())
    request = (
        '{"ClientToken":"%s","ProductCode":"prod-abc","Timestamp":1799992799,'
        '"UsageDimension":"scans","UsageQuantity":2}'
    )
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO hours VALUES (?, ?, 'sent', 'usage', 2, ?, 0, 0, 0, 1, NULL, NULL, 'm', 0)",
        [(f"dim{i % 10}", 400_000 + i // 10, request % uuid.uuid4().hex) for i in range(rows)],
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = path.stat().st_size
    store = Store(directory)  # migrates; the WAL is not checkpointed yet
    wal = Path(f"{path}-wal")
    after = path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    store.close()
    return {
        "hour_rows": rows,
        "store_mb": round(before / 1e6, 1),
        "store_and_wal_after_mb": round(after / 1e6, 1),
        "extra_ratio": round((after - before) / before, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(args.dir, args.rows)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(Path(tmp), args.rows)))


if __name__ == "__main__":
    main()
