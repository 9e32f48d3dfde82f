"""The store's transactions. Each function runs inside the writer's transaction (or a read
snapshot) and takes the time it needs, so tests drive them with any clock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sidecar.core import quantity as qty
from sidecar.usage.db import Db
from sidecar.usage.hours import (
    HourPolicy,
    hour_of,
    hour_start,
    iso,
    iso_hour,
    request_timestamp,
    target_hour,
)
from sidecar.usage.intake import IdConflictError, record_answer
from sidecar.usage.store import dumps
from sidecar.usage.validate import (
    MAX_ALLOCATIONS,
    Problem,
    RejectedError,
    UsageRecord,
)

UNALLOCATED_TAGS = (("unallocated", "true"),)
UNTAGGED = ""  # open_tags.tags of usage without allocations
ID_KEY_BYTES = 12
BODY_KEY_BYTES = 8
# Add a record (or one allocation) to its hour's totals for its tag set.
_ADD_TAGS = (
    "INSERT INTO open_tags (dimension, hour, tags, quantity, n, carried) VALUES (?, ?, ?, ?, 1, ?) "
    "ON CONFLICT (dimension, hour, tags) DO UPDATE SET quantity = quantity + excluded.quantity, "
    "n = n + excluded.n, carried = carried + excluded.carried"
)
# Move an hour's totals to another hour: every moved row counts as carried.
_MOVE_TAGS = (
    "INSERT INTO open_tags (dimension, hour, tags, quantity, n, carried) "
    "SELECT dimension, ?, tags, quantity, n, n FROM open_tags WHERE dimension = ? AND hour = ? "
    "ON CONFLICT (dimension, hour, tags) DO UPDATE SET quantity = quantity + excluded.quantity, "
    "n = n + excluded.n, carried = carried + excluded.carried"
)
FINAL_STATES = ("sent", "conflict", "expired", "rejected")
STATES = ("open", "sealed", *FINAL_STATES)


@dataclass(frozen=True)
class Pending:
    """A sealed hour, as the sender needs it."""

    dimension: str
    hour: int
    request: dict[str, Any]
    send_after: float
    deadline: float
    attempts: int
    purpose: str


# -- ingest -------------------------------------------------------------------------------


def id_key(record_id: str) -> bytes:
    """What the store keeps of a client id: 12 bytes of its SHA-256 (a false match needs ~2^48
    ids in one 48-hour window), so the idempotency window costs ~30 bytes per record."""
    return hashlib.sha256(record_id.encode()).digest()[:ID_KEY_BYTES]


def body_key(digest: str) -> bytes:
    """What the store keeps of a record's content digest (`UsageRecord.digest`): 8 bytes, so an
    id sent again with other content is still a 409."""
    return bytes.fromhex(digest)[:BODY_KEY_BYTES]


def ingest(
    conn: Db, records: list[UsageRecord], now: float, policy: HourPolicy
) -> tuple[int, list[dict[str, Any]]]:
    """Store the records (all or nothing); (202 or 200 if every record was a repeat, answers).

    A record is added to its hour's totals (per tag set) at once; what is kept of it afterwards
    is its id's digest and content digest, for the idempotency window."""
    sealed_cache: dict[tuple[str, int], bool] = {}
    hours: dict[tuple[str, int], list[int]] = {}  # (dimension, hour) -> [quantity, tag sets]
    known_tags: set[tuple[str, int, str]] = set()
    answers: list[dict[str, Any]] = []
    fresh = 0
    made = hour_of(now)

    def sealed(dimension: str, hour: int) -> bool:
        key = (dimension, hour)
        if key not in sealed_cache:
            row = conn.execute(
                "SELECT 1 FROM hours WHERE dimension = ? AND hour = ?", key
            ).fetchone()
            sealed_cache[key] = row is not None
        return sealed_cache[key]

    for rec in records:
        where = f"{rec.field}.id" if rec.field else "id"
        if rec.id is not None:
            row = conn.execute(
                "SELECT body, made, counted, carried FROM ids WHERE id = ?", (id_key(rec.id),)
            ).fetchone()
            if row is not None:
                if bytes(row[0]) != body_key(rec.digest):
                    raise IdConflictError(where, rec.id)
                hour = int(row[1]) + int(row[2])
                answer = record_answer(rec.id, rec.dimension, rec.micros, hour, hour + int(row[3]))
                answers.append({**answer, "repeat": True})
                continue
        own = hour_of(rec.timestamp if rec.timestamp is not None else now)
        hour = target_hour(own, now, functools.partial(sealed, rec.dimension), policy)
        key = (rec.dimension, hour)
        if key not in hours:
            row = conn.execute(
                "SELECT quantity, tagsets FROM open_hours WHERE dimension = ? AND hour = ?", key
            ).fetchone()
            hours[key] = [int(row[0]), int(row[1])] if row else [0, 0]
        totals = hours[key]
        totals[0] += rec.micros  # micro-units: exact, and compared by value
        if totals[0] > qty.MAX_MICROS:
            raise RejectedError(
                400,
                [
                    Problem(
                        f"{rec.field}.quantity" if rec.field else "quantity",
                        f"{rec.dimension} would exceed {qty.MAX_TEXT} units in hour "
                        f"{iso_hour(hour)} (the most MeterUsage's UsageQuantityAsDecimal holds); "
                        "use a larger unit",
                    )
                ],
            )
        rows: list[tuple[int, str]] = [(rec.micros, UNTAGGED)]
        if rec.allocations:
            rows = [(a.micros, dumps(dict(a.tags))) for a in rec.allocations]
            for _, tags in rows:
                tag_key = (rec.dimension, hour, tags)
                if tag_key in known_tags:
                    continue
                known_tags.add(tag_key)
                if not conn.execute(
                    "SELECT 1 FROM open_tags WHERE dimension = ? AND hour = ? AND tags = ?",
                    tag_key,
                ).fetchone():
                    totals[1] += 1
            if totals[1] >= MAX_ALLOCATIONS:  # one allocation is kept for untagged usage
                raise RejectedError(
                    400,
                    [
                        Problem(
                            f"{rec.field}.allocations" if rec.field else "allocations",
                            f"{rec.dimension} would have more than {MAX_ALLOCATIONS - 1} distinct "
                            f"tag sets in hour {iso_hour(hour)} (MeterUsage allows "
                            f"{MAX_ALLOCATIONS} allocations per record)",
                        )
                    ],
                )
        carried = 1 if hour != own else 0
        conn.executemany(
            _ADD_TAGS,
            [(rec.dimension, hour, t, q, carried) for q, t in rows],
        )
        rid = rec.id or f"u-{uuid.uuid4().hex}"
        if rec.id is not None:
            conn.execute(
                "INSERT INTO ids (id, body, made, counted, carried) VALUES (?, ?, ?, ?, ?)",
                (id_key(rec.id), body_key(rec.digest), made, hour - made, own - hour),
            )
        answers.append(record_answer(rid, rec.dimension, rec.micros, hour, own))
        fresh += 1
    conn.executemany(
        "INSERT INTO open_hours (dimension, hour, quantity, tagsets) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (dimension, hour) DO UPDATE SET quantity = excluded.quantity, "
        "tagsets = excluded.tagsets",
        [(d, h, q, t) for (d, h), (q, t) in hours.items()],
    )
    return (202 if fresh else 200), answers


# -- sealing ------------------------------------------------------------------------------


def _allocations(rows: Iterable[tuple[str, int]]) -> list[dict[str, Any]] | None:
    by_tags: dict[tuple[tuple[str, str], ...], int] = {}
    tagged = False
    for tags, quantity in rows:
        key = tuple(sorted(json.loads(tags).items())) if tags != UNTAGGED else UNALLOCATED_TAGS
        tagged = tagged or tags != UNTAGGED
        by_tags[key] = by_tags.get(key, 0) + quantity
    if not tagged:
        return None
    return [
        {
            "AllocatedUsageQuantityAsDecimal": qty.text(q),
            "Tags": [{"Key": k, "Value": v} for k, v in tags],
        }
        for tags, q in sorted(by_tags.items())
    ]


def _insert_hour(
    conn: Db,
    dimension: str,
    hour: int,
    quantity: int,
    request: dict[str, Any],
    now: float,
    send_after: float,
    deadline: float,
    purpose: str,
) -> None:
    conn.execute(
        "INSERT INTO hours (dimension, hour, state, purpose, quantity, request, sealed_at, "
        "send_after, deadline) VALUES (?, ?, 'sealed', ?, ?, ?, ?, ?, ?)",
        (dimension, hour, purpose, quantity, dumps(request), now, send_after, deadline),
    )


def seal(
    conn: Db,
    through: int,
    now: float,
    policy: HourPolicy,
    product_code: str,
    rng: Callable[[], float],
    *,
    send_now: bool = False,
) -> list[tuple[str, int]]:
    """Seal every open (dimension, hour) up to hour `through`: write its exact request.

    An open hour too old to be sent safely (the sidecar was down for hours) is not sealed: its
    usage moves into the open hour, as AWS advises after an outage, instead of expiring unsent.
    """
    for dimension, hour in conn.execute(
        "SELECT dimension, hour FROM open_hours WHERE hour <= ?", (through,)
    ).fetchall():
        if not policy.worth_sealing(hour, now):
            _carry(conn, dimension, hour, now, policy)
    sealed = []
    opened = conn.execute(
        "SELECT dimension, hour FROM open_hours WHERE hour <= ? ORDER BY hour, dimension",
        (through,),
    ).fetchall()
    for dimension, hour in opened:
        rows = conn.execute(
            "SELECT tags, quantity FROM open_tags WHERE dimension = ? AND hour = ?",
            (dimension, hour),
        ).fetchall()
        quantity = sum(int(q) for _, q in rows)  # micro-units
        stamp = request_timestamp(hour, now)
        # The decimal field only (the model: UsageQuantity "Use UsageQuantityAsDecimal
        # instead"; a request may not carry both). Requests sealed before decimals keep their
        # integer field: a stored request is resent byte for byte, never rewritten.
        request: dict[str, Any] = {
            "ProductCode": product_code,
            "Timestamp": stamp,
            "UsageDimension": dimension,
            "UsageQuantityAsDecimal": qty.text(quantity),
            "ClientToken": uuid.uuid4().hex,
        }
        allocations = _allocations(rows)
        if allocations is not None:
            request["UsageAllocations"] = allocations
        send_after = now if send_now else max(now, policy.send_after(hour, rng))
        _insert_hour(
            conn,
            dimension,
            hour,
            quantity,
            request,
            now,
            send_after,
            policy.deadline(stamp),
            "usage",
        )
        conn.execute("DELETE FROM open_hours WHERE dimension = ? AND hour = ?", (dimension, hour))
        # The sealed request holds the totals now: the per-tag-set rows are not needed again.
        conn.execute("DELETE FROM open_tags WHERE dimension = ? AND hour = ?", (dimension, hour))
        sealed.append((dimension, hour))
    return sealed


def _move(conn: Db, dimension: str, hour: int, target: int) -> None:
    """Move an unsealed hour's totals into `target`; every moved row counts as carried."""
    conn.execute(_MOVE_TAGS, (target, dimension, hour))
    conn.execute("DELETE FROM open_tags WHERE dimension = ? AND hour = ?", (dimension, hour))
    moved = conn.execute(
        "SELECT quantity FROM open_hours WHERE dimension = ? AND hour = ?", (dimension, hour)
    ).fetchone()
    if moved is not None:
        conn.execute("DELETE FROM open_hours WHERE dimension = ? AND hour = ?", (dimension, hour))
        conn.execute(
            "INSERT INTO open_hours (dimension, hour, quantity, tagsets) VALUES (?, ?, ?, 0) "
            "ON CONFLICT (dimension, hour) DO UPDATE SET quantity = quantity + excluded.quantity",
            (dimension, target, moved[0]),
        )
        conn.execute(
            "UPDATE open_hours SET tagsets = (SELECT COUNT(*) FROM open_tags WHERE "
            "dimension = ? AND hour = ? AND tags != '') WHERE dimension = ? AND hour = ?",
            (dimension, target, dimension, target),
        )


def _carry(conn: Db, dimension: str, hour: int, now: float, policy: HourPolicy) -> int:
    """Move an unsealed hour's records into the open hour; the hour they now count in."""

    def sealed(h: int) -> bool:
        return (
            conn.execute(
                "SELECT 1 FROM hours WHERE dimension = ? AND hour = ?", (dimension, h)
            ).fetchone()
            is not None
        )

    target = target_hour(hour, now, sealed, policy)
    if target == hour:
        return hour
    moving = conn.execute(
        "SELECT quantity FROM open_hours WHERE dimension = ? AND hour = ?", (dimension, hour)
    ).fetchone()
    amount = int(moving[0]) if moving else 0

    def full(h: int) -> bool:
        """Adding `amount` (or the tag sets) would make one record over MeterUsage's limits:
        AWS would refuse it, losing every unit of that hour. The carry goes one hour further."""
        row = conn.execute(
            "SELECT quantity FROM open_hours WHERE dimension = ? AND hour = ?", (dimension, h)
        ).fetchone()
        if row is None:
            return False
        tagsets = conn.execute(
            "SELECT COUNT(DISTINCT tags) FROM open_tags WHERE dimension = ? AND hour IN (?, ?) "
            "AND tags != ''",
            (dimension, hour, h),
        ).fetchone()[0]
        # One allocation is kept for untagged usage, as at ingest.
        return int(row[0]) + amount > qty.MAX_MICROS or int(tagsets) >= MAX_ALLOCATIONS

    while full(target) or sealed(target):
        target += 1
    _move(conn, dimension, hour, target)
    return target


@dataclass(frozen=True)
class Claim:
    """The entitlement record: `already` (a call was accepted in this pod before), or a request."""

    already: bool
    pending: Pending | None


def claim_entitlement(
    conn: Db, dimension: str, now: float, policy: HourPolicy, product_code: str
) -> Claim:
    """Take (dimension, current hour) for a quantity-0 record, unless this pod already has an
    accepted record (AWS refuses entitlement only on a pod's first call)."""
    if conn.execute("SELECT 1 FROM hours WHERE state IN ('sent', 'conflict') LIMIT 1").fetchone():
        return Claim(True, None)
    earlier = conn.execute(
        "SELECT dimension, hour FROM hours WHERE purpose = 'entitlement' AND state = 'sealed' "
        "AND deadline > ? ORDER BY hour DESC LIMIT 1",
        (now,),
    ).fetchone()
    if earlier is not None:  # a restart before its answer was stored: the same request again
        return Claim(False, load_pending(conn, earlier[0], earlier[1]))
    hour = hour_of(now)
    row = conn.execute(
        "SELECT state FROM hours WHERE dimension = ? AND hour = ?", (dimension, hour)
    ).fetchone()
    if row is None:
        # Usage already counted in this hour moves to the next: the hour's record is taken.
        _move(conn, dimension, hour, hour + 1)
        stamp = int(now)
        request = {
            "ProductCode": product_code,
            "Timestamp": stamp,
            "UsageDimension": dimension,
            "UsageQuantityAsDecimal": "0",
            "ClientToken": uuid.uuid4().hex,
        }
        _insert_hour(
            conn, dimension, hour, 0, request, now, now, policy.deadline(stamp), "entitlement"
        )
    elif row[0] != "sealed":
        return Claim(False, None)  # refused or expired before: the caller decides
    pending = load_pending(conn, dimension, hour)
    return Claim(False, pending)


# -- sending ------------------------------------------------------------------------------


def _pending(row: tuple[Any, ...]) -> Pending:
    return Pending(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5], row[6])


_PENDING = "SELECT dimension, hour, request, send_after, deadline, attempts, purpose FROM hours"


def load_pending(conn: Db, dimension: str, hour: int) -> Pending | None:
    row = conn.execute(
        _PENDING + " WHERE dimension = ? AND hour = ? AND state = 'sealed'",
        (dimension, hour),
    ).fetchone()
    return _pending(row) if row else None


def due(conn: Db, now: float | None) -> list[Pending]:
    """Sealed hours whose send time has come (all of them when `now` is None), oldest first."""
    sql = _PENDING + " WHERE state = 'sealed'"
    args: tuple[Any, ...] = ()
    if now is not None:
        sql += " AND send_after <= ?"
        args = (now,)
    return [_pending(r) for r in conn.execute(sql + " ORDER BY deadline, dimension", args)]


def next_send_after(conn: Db) -> float | None:
    row = conn.execute("SELECT MIN(send_after) FROM hours WHERE state = 'sealed'").fetchone()
    return float(row[0]) if row and row[0] is not None else None


def next_open_hour(conn: Db) -> int | None:
    row = conn.execute("SELECT MIN(hour) FROM open_hours").fetchone()
    return int(row[0]) if row and row[0] is not None else None


def finish(
    conn: Db,
    dimension: str,
    hour: int,
    state: str,
    now: float,
    *,
    record_id: str | None = None,
    code: str | None = None,
    error: str | None = None,
) -> bool:
    """Record one answered attempt; `state` 'sealed' keeps the hour pending. Only a sealed hour
    changes: an hour that reached a final state never goes back."""
    cur = conn.execute(
        "UPDATE hours SET state = ?, attempts = attempts + 1, record_id = COALESCE(?, record_id), "
        "last_code = ?, last_error = ?, done_at = CASE WHEN ? = 'sealed' THEN NULL ELSE ? END "
        "WHERE dimension = ? AND hour = ? AND state = 'sealed'",
        (state, record_id, code, error, state, now, dimension, hour),
    )
    return cur.rowcount == 1


def expire_overdue(conn: Db, now: float) -> list[tuple[str, int]]:
    rows = conn.execute(
        "SELECT dimension, hour FROM hours WHERE state = 'sealed' AND deadline < ?", (now,)
    ).fetchall()
    for dimension, hour in rows:
        conn.execute(
            "UPDATE hours SET state = 'expired', done_at = ?, last_error = COALESCE(last_error, "
            "'not sent within AWS''s six-hour window') WHERE dimension = ? AND hour = ?",
            (now, dimension, hour),
        )
    return [(str(d), int(h)) for d, h in rows]


def prune(conn: Db, now: float, keep_seconds: float = 48 * 3600.0) -> None:
    """Drop idempotency keys older than the window (kept from 48 to 49 hours: by the hour they
    were made). Totals of open hours go when sealed. The hour rows (quantity, state,
    MeteringRecordId, timestamp) stay for audit; past the window, a settled hour's request keeps
    only its timestamp (with 2,500 allocations it is ~150 kB, and it is never sent again)."""
    oldest = hour_of(now - keep_seconds)
    conn.execute("DELETE FROM ids WHERE made < ?", (oldest,))
    conn.execute(
        "UPDATE hours SET request = json_object('Timestamp', json_extract(request, "
        "'$.Timestamp')) WHERE hour < ? AND state != 'sealed' AND "
        "json_extract(request, '$.UsageAllocations') IS NOT NULL",
        (oldest,),
    )


# -- verdict ------------------------------------------------------------------------------


def save_verdict(conn: Db, error: dict[str, Any]) -> None:
    conn.execute("INSERT OR REPLACE INTO verdict VALUES (1, ?)", (dumps(error),))


def load_verdict(conn: Db) -> dict[str, Any] | None:
    row = conn.execute("SELECT error FROM verdict").fetchone()
    return dict(json.loads(row[0])) if row else None


# -- report -------------------------------------------------------------------------------


def report(conn: Db, now: float, policy: HourPolicy, limit: int = 500) -> dict[str, Any]:
    hours: list[dict[str, Any]] = []
    totals: dict[str, dict[str, int]] = {}  # micro-units until the answer is built
    by_state = dict.fromkeys(STATES, 0)
    warnings: list[str] = []

    def add(dimension: str, state: str, quantity: int) -> None:
        t = totals.setdefault(dimension, {"accepted": 0, **dict.fromkeys(STATES, 0)})
        t["accepted"] += quantity
        t[state] += quantity
        by_state[state] += 1

    for dimension, hour, quantity, carried in conn.execute(
        "SELECT o.dimension, o.hour, o.quantity, (SELECT COALESCE(SUM(t.carried), 0) FROM "
        "open_tags t WHERE t.dimension = o.dimension AND t.hour = o.hour) FROM open_hours o"
    ):
        add(dimension, "open", int(quantity))
        hours.append(
            {
                "dimension": dimension,
                "hour": iso_hour(hour),
                "state": "open",
                "quantity": qty.to_json(int(quantity)),
                "carried_records": int(carried),
                "seal_after": iso(policy.seal_due(hour)),
            }
        )
    for row in conn.execute(
        "SELECT dimension, hour, state, purpose, quantity, request, attempts, last_code, "
        "last_error, record_id, send_after, deadline, done_at FROM hours"
    ):
        dimension, hour, state, purpose, quantity = row[:5]
        add(dimension, state, int(quantity))
        item: dict[str, Any] = {
            "dimension": dimension,
            "hour": iso_hour(hour),
            "state": state,
            "purpose": purpose,
            "quantity": qty.to_json(int(quantity)),
            "timestamp": iso(json.loads(row[5])["Timestamp"]),
            "metering_record_id": row[9],
            "attempts": row[6],
            "last_error": {"code": row[7], "message": row[8]} if row[7] or row[8] else None,
            "send_after": iso(row[10]),
            "deadline": iso(row[11]),
        }
        if state == "sealed" and row[11] - now < policy.warn_before:
            item["warning"] = "AWS's six-hour window for this hour closes soon"
            warnings.append(f"{dimension} {iso_hour(hour)}: unsent, window closes {iso(row[11])}")
        if state in ("conflict", "expired", "rejected"):
            warnings.append(f"{dimension} {iso_hour(hour)}: {state} ({row[7] or row[8]})")
        hours.append(item)
    hours.sort(key=lambda h: (h["hour"], h["dimension"]), reverse=True)
    verdict = load_verdict(conn)
    return {
        "now": iso(now),
        "hours": hours[:limit],
        "hours_total": len(hours),
        "totals": {d: {state: qty.to_json(m) for state, m in t.items()} for d, t in totals.items()},
        "hours_by_state": by_state,
        "entitlement_refusal": verdict,
        "warnings": warnings,
    }


def hours_by_state(conn: Db) -> dict[str, int]:
    out = dict.fromkeys(STATES, 0)
    for state, count in conn.execute("SELECT state, COUNT(*) FROM hours GROUP BY state"):
        out[state] = int(count)
    out["open"] = int(conn.execute("SELECT COUNT(*) FROM open_hours").fetchone()[0])
    return out


def unsent(conn: Db) -> list[tuple[str, int, int, str]]:
    """(dimension, hour, micro-units, state) of every hour holding acknowledged units that AWS
    has not accepted: open (not sealed yet) or sealed (not sent yet)."""
    rows = conn.execute(
        "SELECT dimension, hour, quantity, 'open' FROM open_hours WHERE quantity > 0 "
        "UNION ALL SELECT dimension, hour, quantity, state FROM hours "
        "WHERE state = 'sealed' AND quantity > 0 ORDER BY 2, 1"
    ).fetchall()
    return [(str(d), int(h), int(q), str(s)) for d, h, q, s in rows]


def future_hour_units(conn: Db, now: float) -> dict[str, int]:
    """Micro-units per dimension counted in an hour that has not started yet (carried past an hour
    already taken): a drain cannot send them before the pod goes."""
    rows = conn.execute(
        "SELECT dimension, SUM(quantity) FROM open_hours WHERE hour > ? GROUP BY dimension",
        (hour_of(now),),
    ).fetchall()
    return {str(d): int(q) for d, q in rows}


def oldest_unsent_end(conn: Db, now: float) -> float | None:
    """End of the oldest hour that has ended and is not sent yet."""
    current = hour_of(now)
    candidates = [
        conn.execute("SELECT MIN(hour) FROM open_hours WHERE hour < ?", (current,)).fetchone()[0],
        conn.execute("SELECT MIN(hour) FROM hours WHERE state = 'sealed'").fetchone()[0],
    ]
    hours = [int(h) for h in candidates if h is not None]
    return hour_start(min(hours) + 1) if hours else None
