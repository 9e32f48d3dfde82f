"""Custom mode's usage store as version 1 (before the capacity fix) wrote it: the schema, word for
word, and the rows its ingest, seal and prune wrote. For the migration test and the capacity
benchmark's floor; nothing of the sidecar is used to write it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from sidecar.usage.hours import iso_hour

V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- One row per accepted record (or per allocation of a record). Never updated after the hour is
-- sealed: the sealed request is built from these rows.
CREATE TABLE records (
    seq INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    quantity INTEGER NOT NULL,
    tags TEXT,
    received_at REAL NOT NULL,
    carried_from INTEGER
);
CREATE INDEX records_by_hour ON records (dimension, hour, tags);
-- (dimension, hour) pairs holding records and not sealed yet, with running totals (so an
-- ingest never scans the hour's records).
CREATE TABLE open_hours (
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    quantity INTEGER NOT NULL DEFAULT 0,
    tagsets INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dimension, hour)
) WITHOUT ROWID;
-- Client idempotency keys: same id and digest -> the stored answer again.
CREATE TABLE keys (
    id TEXT PRIMARY KEY, digest TEXT NOT NULL, answer TEXT NOT NULL, created_at REAL NOT NULL
);
-- One row per sealed (dimension, hour): the exact MeterUsage request, written before its first
-- send, and what became of it. States: sealed, sent, conflict, expired, rejected.
CREATE TABLE hours (
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    state TEXT NOT NULL,
    purpose TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    request TEXT NOT NULL,
    sealed_at REAL NOT NULL,
    send_after REAL NOT NULL,
    deadline REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_code TEXT,
    last_error TEXT,
    record_id TEXT,
    done_at REAL,
    PRIMARY KEY (dimension, hour)
);
CREATE INDEX hours_by_state ON hours (state, send_after);
-- AWS's entitlement refusal for this pod (it is given only once): one row at most.
CREATE TABLE verdict (one INTEGER PRIMARY KEY CHECK (one = 1), error TEXT NOT NULL);
"""


def dumps(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def digest(rec: dict[str, Any]) -> str:
    """Version 1's content digest (`UsageRecord.digest`, unchanged since)."""
    allocations = [[a["quantity"], sorted(a["tags"].items())] for a in rec.get("allocations") or []]
    doc = {"d": rec["dimension"], "q": rec["quantity"], "t": rec.get("t"), "a": allocations}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def create(directory: Path) -> sqlite3.Connection:
    """A version 1 store file, as version 1 made it (WAL, synchronous=FULL)."""
    conn = sqlite3.connect(directory / "usage.sqlite3", isolation_level=None)
    conn.executescript("BEGIN;" + V1_SCHEMA)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def ingest(
    conn: sqlite3.Connection,
    records: list[dict[str, Any]],
    now: float,
    *,
    hour: int | None = None,
    carried_from: int | None = None,
) -> list[dict[str, Any]]:
    """Version 1's rows for records accepted at `now` into `hour` (default: now's hour)."""
    hour = math.floor(now / 3600) if hour is None else hour
    answers = []
    for rec in records:
        rid = rec.get("id") or f"u-{uuid.uuid4().hex}"
        allocations = rec.get("allocations")
        rows: list[tuple[int, str | None]] = [(rec["quantity"], None)]
        if allocations:
            rows = [(a["quantity"], dumps(dict(sorted(a["tags"].items())))) for a in allocations]
        conn.executemany(
            "INSERT INTO records (record_id, dimension, hour, quantity, tags, received_at, "
            "carried_from) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(rid, rec["dimension"], hour, q, t, now, carried_from) for q, t in rows],
        )
        answer: dict[str, Any] = {
            "id": rid,
            "dimension": rec["dimension"],
            "quantity": rec["quantity"],
            "hour": iso_hour(hour),
        }
        if carried_from is not None:
            answer["carried_from"] = iso_hour(carried_from)
            answer["note"] = (
                f"hour {iso_hour(carried_from)} is already sealed or too old to send; "
                f"counted in {iso_hour(hour)}"
            )
        if rec.get("id") is not None:
            conn.execute(
                "INSERT INTO keys VALUES (?, ?, ?, ?)", (rec["id"], digest(rec), dumps(answer), now)
            )
        tagged = {t for _, t in rows if t is not None}
        known = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT tags FROM records WHERE dimension = ? AND hour = ? AND "
                "tags IS NOT NULL",
                (rec["dimension"], hour),
            )
        }
        conn.execute(
            "INSERT INTO open_hours (dimension, hour, quantity, tagsets) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (dimension, hour) DO UPDATE SET quantity = quantity + excluded.quantity, "
            "tagsets = ?",
            (rec["dimension"], hour, rec["quantity"], len(known | tagged), len(known | tagged)),
        )
        answers.append(answer)
    return answers


def seal(conn: sqlite3.Connection, through: int, now: float, state: str = "sealed") -> None:
    """Version 1's seal, as far as the store's size goes: an hours row, records kept."""
    for dimension, hour, quantity in conn.execute(
        "SELECT dimension, hour, quantity FROM open_hours WHERE hour <= ?", (through,)
    ).fetchall():
        request = {
            "ProductCode": "prod-abc",
            "Timestamp": hour * 3600 + 3599,
            "UsageDimension": dimension,
            "UsageQuantity": quantity,
            "ClientToken": uuid.uuid4().hex,
        }
        conn.execute(
            "INSERT INTO hours (dimension, hour, state, purpose, quantity, request, sealed_at, "
            "send_after, deadline) VALUES (?, ?, ?, 'usage', ?, ?, ?, ?, ?)",
            (dimension, hour, state, quantity, dumps(request), now, now, now + 6 * 3600),
        )
        conn.execute("DELETE FROM open_hours WHERE dimension = ? AND hour = ?", (dimension, hour))


def prune(conn: sqlite3.Connection, now: float, keep_seconds: float = 48 * 3600.0) -> None:
    """Version 1's prune, word for word."""
    oldest = math.floor((now - keep_seconds) / 3600)
    conn.execute(
        "DELETE FROM records WHERE hour < ? AND NOT EXISTS (SELECT 1 FROM open_hours o WHERE "
        "o.dimension = records.dimension AND o.hour = records.hour) AND NOT EXISTS (SELECT 1 "
        "FROM hours h WHERE h.dimension = records.dimension AND h.hour = records.hour AND "
        "h.state = 'sealed')",
        (oldest,),
    )
    conn.execute("DELETE FROM keys WHERE created_at < ?", (now - keep_seconds,))
