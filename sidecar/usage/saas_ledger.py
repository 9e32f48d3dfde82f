"""SaaS mode's transactions: customers, ingest, sealing, batches. Pure apart from the `Db`.

Every function runs inside one store transaction (`UsageStore.write`/`read`) and takes the time
it needs. The SAME statements run on SQLite (one replica) and PostgreSQL (a fleet): `?`
placeholders, `ON CONFLICT`, `RETURNING`, no rowid, aggregates wrapped in `int()`.

AWS deduplicates BatchMeterUsage per product, customer, dimension and hour and bills the FIRST
quantity it saw, so the ledger's invariants are:
- usage is summed per (customer, dimension, hour) in `saas_open` until the hour is sealed: the
  row of tag set '' holds the hour's whole total, one row per tag set the part allocated to it
  (schema 6; usage without allocations is the total less the tagged parts);
- sealing writes ONE outbox row per (customer, dimension, hour) with its exact UsageRecord
  (Timestamp, QuantityAsDecimal, UsageAllocations); that text never changes afterwards;
- a call's exact request is stored (`saas_batches`, state 'sending') before it is sent, and is
  resent byte for byte until AWS answers; regrouping (unprocessed records, bisection) only ever
  puts the same stored record texts into another request (AWS: "identical requests are
  idempotent and can be retried with the same records or a subset").
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from sidecar.core import quantity as qty
from sidecar.usage import saas_contract, saas_events
from sidecar.usage.db import Db, Lock, insert_new
from sidecar.usage.headroom import HourSending
from sidecar.usage.hours import (
    BATCH_METER_USAGE,
    HourPolicy,
    hour_of,
    hour_start,
    iso,
    iso_hour,
    target_hour,
    window_closes,
)
from sidecar.usage.intake import IdConflictError as IdConflictError  # the intake's 409
from sidecar.usage.intake import record_answer
from sidecar.usage.overage import Basis
from sidecar.usage.store import dumps
from sidecar.usage.validate import (
    MAX_ALLOCATIONS,
    Problem,
    RejectedError,
    SaasRecord,
    record_identity,
)

# Advisory lock between ingest (shared) and sealing (exclusive); see `ingest` and `seal`.
SEAL_LOCK = 0x5AA50013
MAX_BATCH_RECORDS = 25
MAX_BATCH_BYTES = 1_000_000  # AWS: requests under 1 MB
RECORD_STATES = (
    "open",
    "sealed",
    "sent",
    "not_subscribed",
    "conflict",
    "expired",
    "rejected",
    "quarantined",
)
TIMESTAMP_CODE = "TimestampOutOfBoundsException"
EXPIRED_ERROR = (
    "not sent within BatchMeterUsage's window (24 hours; the closed month's records until "
    "06:00 UTC on the 1st)"
)
DIMENSION_CODE = "InvalidUsageDimensionException"
TOO_LARGE_ERROR = "the record alone makes a BatchMeterUsage request of 1 MB or more"
# Where a sealed record's Timestamp sits in its hour. AWS bills the hour, not the second, so the
# middle of the hour keeps half an hour between the stamp and both edges of AWS's window: a
# sender clock ahead of AWS's (the stamp "in the future") or behind it (the stamp "too old" at
# the window's end) by less than that never matters. An hour sealed before it ends (the drain)
# is stamped STAMP_LEAD before the sealing moment, never before the hour's start.
STAMP_INTO_HOUR = 1800
STAMP_LEAD = 300
CUSTOMER_STATES = ("active", "not_subscribed")
STATUS_STATE = {
    "Success": "sent",
    "CustomerNotSubscribed": "not_subscribed",
    "DuplicateRecord": "conflict",
}

DDL = """
-- Customers resolved by any sidecar of the fleet. `customer` is the ledger key: account id and
-- license ARN joined by '/' (identity license) or the CustomerIdentifier. The registration token
-- is kept only as its sha256 (the same token again answers from here while it lives).
CREATE TABLE saas_customers (
    customer TEXT PRIMARY KEY,
    account_id TEXT,
    license_arn TEXT,
    product_code TEXT,
    customer_identifier TEXT,
    state TEXT NOT NULL,
    state_since DOUBLE PRECISION NOT NULL,
    state_reason TEXT,
    resolved_at DOUBLE PRECISION NOT NULL,
    token_digest TEXT,
    token_expires DOUBLE PRECISION
);
CREATE INDEX saas_customers_by_token ON saas_customers (token_digest);
CREATE INDEX saas_customers_by_account ON saas_customers (account_id);
CREATE INDEX saas_customers_by_identifier ON saas_customers (customer_identifier);
-- Client idempotency keys (POST /v1/usage `id`).
CREATE TABLE saas_keys (
    id TEXT PRIMARY KEY, digest TEXT NOT NULL, answer TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
-- Every accepted record, for audit: written by sidecars before the ledger kept totals only, as
-- custom mode's does (no row per record); what is left of it goes with `prune` after 48 hours.
CREATE TABLE saas_records (
    id TEXT PRIMARY KEY,
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    carried_from BIGINT
);
CREATE INDEX saas_records_by_hour ON saas_records (hour, customer, dimension);
-- Running totals of unsealed hours: what sealing turns into records.
CREATE TABLE saas_open (
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    PRIMARY KEY (customer, dimension, hour)
);
CREATE INDEX saas_open_by_hour ON saas_open (hour);
-- Hours sealed (for every customer at once): usage for them goes to the open hour.
CREATE TABLE saas_sealed_hours (
    hour BIGINT PRIMARY KEY,
    sealed_at DOUBLE PRECISION NOT NULL,
    records BIGINT NOT NULL
);
-- One row per sealed (customer, dimension, hour): the exact UsageRecord, never changed.
-- States: sealed, sent, not_subscribed, conflict, expired, rejected, quarantined (its dimension
-- was refused as unpublished: held unsent until the sender starts again; see `quarantine`).
CREATE TABLE saas_outbox (
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    zero INTEGER NOT NULL,
    record TEXT NOT NULL,
    state TEXT NOT NULL,
    batch_id TEXT,
    sealed_at DOUBLE PRECISION NOT NULL,
    deadline DOUBLE PRECISION NOT NULL,
    metering_record_id TEXT,
    last_code TEXT,
    last_error TEXT,
    done_at DOUBLE PRECISION,
    PRIMARY KEY (customer, dimension, hour)
);
CREATE INDEX saas_outbox_by_batch ON saas_outbox (batch_id) WHERE batch_id IS NOT NULL;
-- The pool the sender draws 25 records from, oldest hour first (a record's deadline follows
-- its hour), and expires from: one partial index, so forming a call reads 25 index entries,
-- not every sealed row. The only index a pool query can use, so no planner picks another.
CREATE INDEX saas_outbox_pool ON saas_outbox (deadline, customer, dimension)
    WHERE state = 'sealed' AND batch_id IS NULL;
-- Each BatchMeterUsage call's exact request, stored before it is sent.
-- States: sending (to send or resend as is), done (answered), split (bisected into children),
-- suspect (the untried half of a bisection), released (its records went back to the pool).
CREATE TABLE saas_batches (
    id TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    records BIGINT NOT NULL,
    state TEXT NOT NULL,
    parent TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    deadline DOUBLE PRECISION NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    last_code TEXT,
    answered_at DOUBLE PRECISION
);
CREATE INDEX saas_batches_by_state ON saas_batches (state, created_at);
"""


# -- customers ----------------------------------------------------------------------------

_CUSTOMER_COLS = (
    "customer, account_id, license_arn, product_code, customer_identifier, state, state_since, "
    "state_reason, resolved_at, agreement_id"
)


def _customer_json(row: Sequence[Any]) -> dict[str, Any]:
    return {
        "customer": row[0],
        "customer_aws_account_id": row[1],
        "license_arn": row[2],
        "product_code": row[3],
        "customer_identifier": row[4],
        "state": row[5],
        "state_since": iso(float(row[6])),
        "state_reason": row[7],
        "resolved_at": iso(float(row[8])),
        # ResolveCustomer's Metadata.AgreementId (the agreement the buyer accepted); None for a
        # customer resolved before the sidecar kept it, or when AWS's answer had none.
        "agreement_id": row[9],
    }


def customer_by_token(db: Db, digest: str, now: float) -> dict[str, Any] | None:
    row = db.execute(
        f"SELECT {_CUSTOMER_COLS} FROM saas_customers WHERE token_digest = ? AND token_expires > ?",  # noqa: S608  # nosec B608 # constant columns; values are bound
        (digest, now),
    ).fetchone()
    return _customer_json(row) if row else None


def save_customer(
    db: Db,
    key: str,
    answer: dict[str, Any],
    now: float,
    token_digest: str,
    token_expires: float,
) -> dict[str, Any]:
    """Store a ResolveCustomer answer. A fresh registration makes the customer active again (a
    buyer who registers again has subscribed again; AWS will say otherwise if not). An answer
    without Metadata.AgreementId keeps the one stored before."""
    metadata = answer.get("Metadata")
    agreement = metadata.get("AgreementId") if isinstance(metadata, dict) else None
    db.execute(
        "INSERT INTO saas_customers (customer, account_id, license_arn, product_code, "
        "customer_identifier, state, state_since, state_reason, resolved_at, token_digest, "
        "token_expires, agreement_id) VALUES (?, ?, ?, ?, ?, 'active', ?, NULL, ?, ?, ?, ?) "
        "ON CONFLICT (customer) DO UPDATE SET account_id = excluded.account_id, "
        "license_arn = excluded.license_arn, product_code = excluded.product_code, "
        "customer_identifier = excluded.customer_identifier, state = 'active', "
        "state_since = CASE WHEN saas_customers.state = 'active' THEN saas_customers.state_since "
        "ELSE excluded.state_since END, state_reason = NULL, resolved_at = excluded.resolved_at, "
        "token_digest = excluded.token_digest, token_expires = excluded.token_expires, "
        "agreement_id = COALESCE(excluded.agreement_id, saas_customers.agreement_id)",
        (
            key,
            answer.get("CustomerAWSAccountId"),
            answer.get("LicenseArn"),
            answer.get("ProductCode"),
            answer.get("CustomerIdentifier"),
            now,
            now,
            token_digest,
            token_expires,
            str(agreement) if agreement is not None else None,
        ),
    )
    row = db.execute(
        f"SELECT {_CUSTOMER_COLS} FROM saas_customers WHERE customer = ?",  # noqa: S608  # nosec B608 # constant columns; values are bound
        (key,),
    ).fetchone()
    assert row is not None  # nosec B101 # narrowing: the row was written just above
    return _customer_json(row)


def find_customers(db: Db, key: str) -> list[dict[str, Any]]:
    """By ledger key, AWS account id or customer identifier."""
    rows = db.execute(
        f"SELECT {_CUSTOMER_COLS} FROM saas_customers WHERE customer = ? OR account_id = ? "  # noqa: S608  # nosec B608 # constant columns; values are bound
        "OR customer_identifier = ? ORDER BY resolved_at DESC",
        (key, key, key),
    ).fetchall()
    return [_customer_json(r) for r in rows]


def list_customers(db: Db, limit: int = 1000) -> tuple[list[dict[str, Any]], int]:
    rows = db.execute(
        f"SELECT {_CUSTOMER_COLS} FROM saas_customers ORDER BY resolved_at DESC LIMIT ?",  # noqa: S608  # nosec B608 # constant columns; values are bound
        (limit,),
    ).fetchall()
    total = db.execute("SELECT COUNT(*) FROM saas_customers").fetchone()
    return [_customer_json(r) for r in rows], int(total[0]) if total else 0


# -- ingest -------------------------------------------------------------------------------


def _row_key(*parts: str) -> int:
    """An advisory lock key (signed 64-bit) for one row, the same on every sidecar."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def ingest_locks(records: Sequence[SaasRecord]) -> list[Lock]:
    """The locks `ingest` needs, to declare to `UsageStore.write`: the seal lock shared, and
    each (customer, dimension) total and each idempotency id exclusively."""
    locks: set[Lock] = {(SEAL_LOCK, False)}
    for srec in records:
        locks.add((_row_key("open", srec.customer, srec.usage.dimension), True))
        if srec.usage.id is not None:
            locks.add((_row_key("id", srec.usage.id), True))
    return sorted(locks)


SEAL_LOCKS: tuple[Lock, ...] = ((SEAL_LOCK, True),)  # what `seal` declares
# How long a seal waits for ingests in flight to end: they take milliseconds, and every new
# ingest of the fleet queues behind a waiting seal. A frozen ingest makes the seal give up.
SEAL_LOCK_WAIT = 0.25


def _rows(n: int, width: int) -> str:
    """`(?, ?), (?, ?)`: n rows of a multi-row VALUES list (or an IN list, width 1)."""
    row = "(" + ", ".join(["?"] * width) + ")" if width > 1 else "?"
    return ", ".join([row] * n)


OpenKey = tuple[str, str, int]  # (customer, dimension, hour): one saas_open total
TOTAL = ""  # saas_open.tags of the row holding an hour's whole total (schema 6)
UNALLOCATED_TAGS = (("unallocated", "true"),)  # custom mode's tag set for untagged usage
MAX_TAG_SETS = MAX_ALLOCATIONS - 1  # one allocation is kept for untagged usage, as custom mode
# The bytes a UsageRecord may take on the wire, allocations included, so that a call holding it
# alone stays under AWS's 1 MB: what the request around one record can take (ProductCode of 255
# characters) is left out. botocore writes json.dumps' default separators (", ", ": ").
REQUEST_ROOM = 400
MAX_RECORD_BYTES = MAX_BATCH_BYTES - REQUEST_ROOM


def _allocation(tags: Sequence[tuple[str, str]], micros: int) -> dict[str, Any]:
    return {
        "AllocatedUsageQuantityAsDecimal": qty.text(micros),
        "Tags": [{"Key": k, "Value": v} for k, v in tags],
    }


def allocation_bytes(tags: str) -> int:
    """The most one allocation of the stored tag set `tags` takes in a request on the wire
    (its quantity at the maximum, the separator before it included)."""
    pairs = sorted(json.loads(tags).items())
    return len(json.dumps(_allocation(pairs, qty.MAX_MICROS))) + 2


def record_bytes(customer: str, dimension: str, tag_sets: Set[str]) -> int:
    """The most a sealed record of these tag sets takes on the wire: its members at their
    longest (identity: either kind, whichever is longer), the unallocated allocation included."""
    head = {
        "Timestamp": 10**10,
        "Dimension": dimension,
        "QuantityAsDecimal": qty.MAX_TEXT,
        "CustomerAWSAccountId": customer,
        "LicenseArn": "",
    }
    size = len(json.dumps(head)) + len(', "UsageAllocations": []')
    if tag_sets:
        size += len(json.dumps(_allocation(UNALLOCATED_TAGS, qty.MAX_MICROS))) + 2
        size += sum(allocation_bytes(t) for t in tag_sets)
    return size


def allocations(total: int, parts: Mapping[str, int], billed: int) -> list[dict[str, Any]] | None:
    """A sealed record's UsageAllocations: one per tag set (sorted, as custom mode's
    `ledger._allocations`), usage without allocations (`total` less the tagged `parts`) under
    UNALLOCATED_TAGS; None when the hour had no tagged usage.

    They sum to `billed`, the record's quantity, exactly (AWS: the allocations must add up to
    it). When a contract covered part of the hour (`billed` < `total`), each tag set bills its
    share of `billed` in proportion to its usage: floor(part x billed / total) micro-units, the
    micro-units left over going to the largest remainders (ties: the tag set sorted first), so
    no tag set is charged for another's usage and no micro-unit is lost or made up."""
    if not parts:
        return None
    by_tags: dict[tuple[tuple[str, str], ...], int] = {}
    for tags, micros in parts.items():
        key = tuple(sorted(json.loads(tags).items()))
        by_tags[key] = by_tags.get(key, 0) + micros
    untagged = total - sum(parts.values())
    if untagged > 0:
        by_tags[UNALLOCATED_TAGS] = by_tags.get(UNALLOCATED_TAGS, 0) + untagged
    order = sorted(by_tags)
    if billed == total:
        shares = {k: by_tags[k] for k in order}
    else:
        shares = {k: by_tags[k] * billed // total for k in order}
        left = billed - sum(shares.values())
        ranked = sorted(
            enumerate(order), key=lambda ik: (-(by_tags[ik[1]] * billed % total), ik[0])
        )
        for _, k in ranked[:left]:
            shares[k] += 1
    return [_allocation(k, shares[k]) for k in order]


def refuse_over_maximum(
    records: Sequence[SaasRecord],
    fresh: Sequence[tuple[int, OpenKey]],
    totals: dict[OpenKey, int],
) -> RejectedError | None:
    """THE range check of an hour's total, at intake: `totals` are the new totals the statement
    that added this POST's usage returned (`_add_to_totals`). The record named is the first of
    the POST whose running sum passes the maximum, as if the records had been added one by one.
    A total is never truncated later: what is acknowledged can always be sent."""
    added: dict[OpenKey, int] = {}
    for i, key in fresh:
        added[key] = added.get(key, 0) + records[i].usage.micros
    before = {key: totals[key] - n for key, n in added.items()}
    running: dict[OpenKey, int] = {}
    for i, key in fresh:
        rec = records[i].usage
        running[key] = running.get(key, 0) + rec.micros
        if before[key] + running[key] > qty.MAX_MICROS:
            return RejectedError(
                400,
                [
                    Problem(
                        f"{rec.field}.quantity" if rec.field else "quantity",
                        f"{rec.dimension} would exceed {qty.MAX_TEXT} units for this customer in "
                        f"hour {iso_hour(key[2])} (the most BatchMeterUsage's QuantityAsDecimal "
                        "holds); use a larger unit",
                    )
                ],
            )
    return None


OpenRow = tuple[str, str, int, str]  # (customer, dimension, hour, tags): one saas_open row
UPSERT_ROWS = 2000  # rows of saas_open per statement (5 values each)


def _add_to_totals(db: Db, added: dict[OpenRow, int]) -> dict[OpenKey, int]:
    """One statement (per UPSERT_ROWS rows): add to each row (the hour's total, tag set TOTAL,
    and each tag set's part), in key order (the row locks of one statement are taken in a
    fixed order); returns the new hour totals."""
    keys = sorted(added)
    out: dict[OpenKey, int] = {}
    # UPSERT_ROWS rows a statement: a POST's allocations may hold tens of thousands of tag sets,
    # more than a statement may bind (SQLite 32,766 values, PostgreSQL 65,535).
    for i in range(0, len(keys), UPSERT_ROWS):
        chunk = keys[i : i + UPSERT_ROWS]
        for c, d, h, t, q in db.execute(
            "INSERT INTO saas_open (customer, dimension, hour, tags, quantity) VALUES "  # noqa: S608  # nosec B608 # placeholders only; values are bound
            + _rows(len(chunk), 5)
            + " ON CONFLICT (customer, dimension, hour, tags) DO UPDATE SET "
            "quantity = saas_open.quantity + excluded.quantity "
            "RETURNING customer, dimension, hour, tags, quantity",
            [v for key in chunk for v in (*key, added[key])],
        ):
            if t == TOTAL:
                out[(str(c), str(d), int(h))] = int(q)
    return out


def _tag_sets(db: Db, keys: Set[OpenKey]) -> dict[OpenKey, set[str]]:
    """The tag sets stored for these hour totals (one statement)."""
    customers = sorted({k[0] for k in keys})
    dims = sorted({k[1] for k in keys})
    hours = sorted({k[2] for k in keys})
    out: dict[OpenKey, set[str]] = {k: set() for k in keys}
    for c, d, h, t in db.execute(
        "SELECT customer, dimension, hour, tags FROM saas_open WHERE tags <> '' AND "  # noqa: S608  # nosec B608 # placeholders only; values are bound
        f"customer IN ({_rows(len(customers), 1)}) AND dimension IN ({_rows(len(dims), 1)}) "
        f"AND hour IN ({_rows(len(hours), 1)})",
        [*customers, *dims, *hours],
    ):
        key = (str(c), str(d), int(h))
        if key in out:
            out[key].add(str(t))
    return out


def refuse_too_many_tags(
    db: Db, records: Sequence[SaasRecord], fresh: Sequence[tuple[int, OpenKey]]
) -> RejectedError | None:
    """At most MAX_TAG_SETS tag sets per (customer, dimension, hour), and a sealed record that
    fits a call under 1 MB (`record_bytes`): the first record of the POST that passes either is
    named. Reads the stored tag sets only when the POST has allocations."""
    tagged = {key for i, key in fresh if records[i].usage.allocations}
    if not tagged:
        return None
    sets = _tag_sets(db, tagged)
    for i, key in fresh:
        rec = records[i].usage
        if not rec.allocations:
            continue
        mine = sets[key]
        mine.update(dumps(dict(a.tags)) for a in rec.allocations)
        where = f"{rec.field}.allocations" if rec.field else "allocations"
        if len(mine) > MAX_TAG_SETS:
            message = (
                f"{rec.dimension} would have more than {MAX_TAG_SETS} distinct tag sets for this "
                f"customer in hour {iso_hour(key[2])} (BatchMeterUsage allows {MAX_ALLOCATIONS} "
                "allocations per record; one is kept for usage without allocations)"
            )
            return RejectedError(400, [Problem(where, message)])
        if record_bytes(key[0], key[1], mine) > MAX_RECORD_BYTES:
            message = (
                f"{rec.dimension}'s tag sets for this customer in hour {iso_hour(key[2])} would "
                "make its usage record too large for one BatchMeterUsage call (under 1 MB); "
                "use fewer or shorter tags"
            )
            return RejectedError(400, [Problem(where, message)])
    return None


def ingest(
    db: Db,
    records: list[SaasRecord],
    now: float,
    policy: HourPolicy,
    *,
    accept_unresolved: bool,
) -> tuple[int, list[dict[str, Any]]]:
    """Store the records, all or nothing: (202, or 200 if each was a repeat; answers).

    Set-based: whatever the number of records, at most three statements (four when an id was
    seen before, one more when the POST has allocations: the tag sets stored for its hours,
    `refuse_too_many_tags`): the customers' states and the sealed hours (one SELECT), the
    idempotency keys with their answers (one INSERT ... ON CONFLICT DO NOTHING RETURNING; the
    stored answers of the ids it did not take) and the hour totals with their tag sets' parts
    (one upsert RETURNING the new totals: the range check, `refuse_over_maximum`). No row is
    kept per record, as in custom mode's ledger: the totals are what is sealed, the keys what a
    repeat is answered from (the record rows of older sidecars, `saas_records`, are only
    pruned). Every check runs
    as the record-by-record version did, in the same order: the first record that fails
    (unresolved customer, then its id, then its total) names the answer.

    Why sealing never misses a record acknowledged for hour H (the seal lock). Intake holds
    SEAL_LOCK SHARED for its whole transaction (declared, so the store takes it before any
    statement: `ingest_locks`); `seal` takes it EXCLUSIVELY before it reads anything. So a seal
    and an intake transaction never overlap: either the intake commits first, and the seal (a
    later statement of READ COMMITTED, after the lock) reads its total in `saas_open` and seals
    it; or the seal commits first, and the intake's SELECT of `saas_sealed_hours` (a statement
    after the lock, so it sees the seal's commit) finds H sealed, and `target_hour` counts the
    record in a later, unsealed hour (its answer says `carried_from`). No third order exists:
    neither side looks at the other's tables before it holds the lock. Intakes share the lock
    (no intake waits for another on it); PostgreSQL's only exclusive locks on the path are per
    (customer, dimension) total and per id, each a key of its own, not the fleet's.

    Deadlocks: the totals and keys a transaction writes (a group commit of many POSTs, each its
    own statements) are guarded by the exclusive advisory keys `ingest_locks` declares, taken
    first, in key order, by the store; two transactions therefore never hold rows the other
    waits for. On SQLite the one writer thread serialises everything (locks are no-ops).
    """
    db.lock(SEAL_LOCK, shared=True)
    if not records:
        return 200, []
    owns = [hour_of(s.usage.timestamp if s.usage.timestamp is not None else now) for s in records]
    customers = sorted({s.customer for s in records})
    known: dict[str, str] = {}
    sealed_hours: set[int] = set()
    # Every hour `target_hour` may ask about is >= the lowest own hour or the current one.
    # ... and, in the same statement, what the lifecycle events say of these customers (their
    # states and final windows) and the hours sealed early for one of them (saas_events).
    lives: list[tuple[str, str, float, float | None]] = []
    sealed_for: set[tuple[str, int]] = set()
    first = min(*owns, hour_of(now))
    marks = _rows(len(customers), 1)
    for kind, key, state in db.execute(
        "SELECT 'c', customer, state FROM saas_customers WHERE customer IN ("  # noqa: S608  # nosec B608 # placeholders only; values are bound
        + marks
        + ") UNION ALL SELECT 'h', CAST(hour AS TEXT), NULL FROM saas_sealed_hours "
        "WHERE hour >= ? UNION ALL SELECT 'l', c.customer, l.state || '|' || "
        "CAST(l.state_time AS TEXT) || '|' || COALESCE(CAST(l.final_window_end AS TEXT), '') "
        "FROM saas_customers c JOIN saas_lifecycle l ON (l.subject = c.account_id "
        "OR l.subject = 'ci:' || c.customer_identifier) AND "
        + saas_events.license_left()
        + " WHERE c.customer IN ("
        + marks
        + ") UNION ALL SELECT 's', customer, CAST(hour AS TEXT) FROM saas_customer_seals "
        "WHERE hour >= ? AND customer IN (" + marks + ")",
        (*customers, first, *customers, first, *customers),
    ):
        if kind == "c":
            known[str(key)] = str(state)
        elif kind == "h":
            sealed_hours.add(int(key))
        elif kind == "l":
            life, at, until = str(state).split("|")
            lives.append((str(key), life, float(at), float(until) if until else None))
        else:
            sealed_for.add((str(key), int(state)))
    refused = saas_events.refused(lives, now)
    # The first failing record and why: (index, phase, error); phases in the order checked.
    failures: list[tuple[int, int, Exception]] = []
    if not accept_unresolved:
        for i, srec in enumerate(records):
            if srec.customer not in known:
                rec = srec.usage
                problem = Problem(
                    f"{rec.field}.customer" if rec.field else "customer",
                    f"customer {srec.customer!r} was never resolved by this fleet; "
                    "resolve its registration token first (POST /v1/customers/resolve), "
                    "or set MARKETPLACE_ACCEPT_UNRESOLVED_CUSTOMERS=true",
                )
                failures.append((i, 0, RejectedError(400, [problem])))
                break
    for i, srec in enumerate(records):
        if srec.customer in refused:
            left, end = refused[srec.customer]
            rec = srec.usage
            problem = Problem(
                f"{rec.field}.customer" if rec.field else "customer",
                f"customer {srec.customer!r} is {left}: its final metering window "
                f"{'closes' if end > now else 'closed'} at {iso(end)} (usage is refused "
                f"{int(saas_events.FINAL_MARGIN)} s before, to leave time to send it)",
            )
            failures.append((i, 0, RejectedError(400, [problem])))
            break
    answers: list[dict[str, Any]] = []
    hours: list[int] = []
    for srec, own in zip(records, owns, strict=True):
        rec = srec.usage
        hour = target_hour(
            own,
            now,
            lambda h, c=srec.customer: h in sealed_hours or (c, h) in sealed_for,  # type: ignore[misc]
            policy,
        )
        rid = rec.id or f"u-{uuid.uuid4().hex}"
        answer = record_answer(rid, rec.dimension, rec.micros, hour, own, srec.customer)
        state = known.get(srec.customer)
        if state == "not_subscribed":
            answer["warning"] = (
                "AWS answered CustomerNotSubscribed for this customer; the usage is kept and "
                "sent, but AWS will not bill it unless the customer subscribes again"
            )
        elif state is None:
            answer["warning"] = "customer not resolved by this fleet (accepted by configuration)"
        answers.append(answer)
        hours.append(hour)
    # Idempotency keys: the first record of each id claims it, with its answer.
    first_of: dict[str, int] = {}
    for i, srec in enumerate(records):
        if srec.usage.id is not None:
            first_of.setdefault(srec.usage.id, i)
    repeat: dict[int, dict[str, Any]] = {}  # record index -> the answer it repeats
    if first_of:
        ids = sorted(first_of)
        took = {
            str(r[0])
            for r in db.execute(
                "INSERT INTO saas_keys (id, digest, answer, created_at) VALUES "  # noqa: S608  # nosec B608 # placeholders only; values are bound
                + _rows(len(ids), 4)
                + " ON CONFLICT (id) DO NOTHING RETURNING id",
                [
                    v
                    for key in ids
                    for v in (
                        key,
                        records[first_of[key]].digest,
                        dumps(answers[first_of[key]]),
                        now,
                    )
                ],
            )
        }
        seen = [key for key in ids if key not in took]
        stored = (
            {
                str(k): (str(d), str(a))
                for k, d, a in db.execute(
                    "SELECT id, digest, answer FROM saas_keys WHERE id IN ("  # noqa: S608  # nosec B608 # placeholders only; values are bound
                    + _rows(len(seen), 1)
                    + ")",
                    seen,
                )
            }
            if seen
            else {}
        )
        for i, srec in enumerate(records):
            key = srec.usage.id
            if key is None:
                continue
            if key in stored:
                digest, text = stored[key]
                if digest != srec.digest:
                    where = f"{srec.usage.field}.id" if srec.usage.field else "id"
                    failures.append((i, 1, IdConflictError(where, key)))
                    break
                repeat[i] = json.loads(text)
            elif first_of[key] != i:
                repeat[i] = answers[first_of[key]]
    limit = min(f[0] for f in failures) if failures else len(records)
    fresh = [
        (i, (records[i].customer, records[i].usage.dimension, hours[i]))
        for i in range(limit)
        if i not in repeat
    ]
    if fresh:
        added: dict[OpenKey, int] = {}
        rows: dict[OpenRow, int] = {}
        for i, key in fresh:
            rec = records[i].usage
            added[key] = added.get(key, 0) + rec.micros
            for tags, micros in [(TOTAL, rec.micros)] + [
                (dumps(dict(a.tags)), a.micros) for a in rec.allocations
            ]:
                rows[(*key, tags)] = rows.get((*key, tags), 0) + micros
        if any(n > qty.MAX_MICROS for n in added.values()):
            # Over whatever is stored (totals are >= 0), and the sum may not even fit the
            # column (1,000 records of the maximum: 1e19 micro-units > BIGINT): refused here.
            over = refuse_over_maximum(records, fresh, added)
        else:
            over = refuse_too_many_tags(db, records, fresh)
            if over is None:
                over = refuse_over_maximum(records, fresh, _add_to_totals(db, rows))
        if over is not None:
            raise over
    if failures:
        raise min(failures, key=lambda f: f[:2])[2]
    out = [
        {**repeat[i], "repeat": True} if i in repeat else answers[i] for i in range(len(records))
    ]
    return (202 if fresh else 200), out


# -- sealing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealSpec:
    """What sealing needs from the configuration."""

    dimensions: tuple[str, ...]
    identity: str
    zero_records: bool
    hours: HourPolicy
    # Dimensions the customers' contracts cover, and how (MARKETPLACE_SAAS_CONTRACT_DIMENSIONS):
    # their records bill only what the contract does not cover (sidecar.usage.saas_contract).
    contract: tuple[tuple[str, Basis], ...] = ()

    def __post_init__(self) -> None:
        # Sealed records are sent with BatchMeterUsage: their deadlines follow its window.
        object.__setattr__(self, "hours", self.hours.using(BATCH_METER_USAGE))


def _sealed(db: Db, hour: int) -> bool:
    return (
        db.execute("SELECT 1 FROM saas_sealed_hours WHERE hour = ?", (hour,)).fetchone() is not None
    )


def _carry(db: Db, hour: int, now: float, policy: HourPolicy) -> None:
    """An unsealed hour too old to send safely (the fleet was down): its totals move into the
    open hour, as AWS advises after an outage, instead of expiring unsent; each total with its
    tag sets' parts, to an hour where the sum stays sendable (AWS's maximum, MAX_TAG_SETS tag
    sets, a record under 1 MB)."""
    moving: dict[tuple[str, str], dict[str, int]] = {}
    for customer, dimension, tags, quantity in db.execute(
        "SELECT customer, dimension, tags, quantity FROM saas_open WHERE hour = ?", (hour,)
    ).fetchall():
        moving.setdefault((str(customer), str(dimension)), {})[str(tags)] = int(quantity)
    for (customer, dimension), parts in sorted(moving.items()):
        target = target_hour(hour, now, lambda h: _sealed(db, h), policy)
        while True:
            there = {
                str(t): int(q)
                for t, q in db.execute(
                    "SELECT tags, quantity FROM saas_open WHERE customer = ? AND dimension = ? "
                    "AND hour = ?",
                    (customer, dimension, target),
                ).fetchall()
            }
            sets = {t for t in (*there, *parts) if t != TOTAL}
            if _sealed(db, target) or (
                there
                and (
                    there.get(TOTAL, 0) + parts.get(TOTAL, 0) > qty.MAX_MICROS
                    or len(sets) > MAX_TAG_SETS
                    or record_bytes(customer, dimension, sets) > MAX_RECORD_BYTES
                )
            ):
                target += 1  # that record would not be sendable: one hour further
                continue
            break
        db.executemany(
            "INSERT INTO saas_open (customer, dimension, hour, tags, quantity) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (customer, dimension, hour, tags) DO UPDATE SET "
            "quantity = saas_open.quantity + excluded.quantity",
            [(customer, dimension, target, t, q) for t, q in sorted(parts.items())],
        )
    db.execute("DELETE FROM saas_open WHERE hour = ?", (hour,))


def seal(db: Db, through: int, now: float, spec: SealSpec) -> list[tuple[int, int]]:
    """Seal every hour up to `through`: [(hour, records)]. Leader only.

    Takes SEAL_LOCK exclusively (see `ingest`): the caller declares SEAL_LOCKS to the store,
    which waits only briefly for it and answers StoreBusyError rather than queue behind a frozen
    ingest (PostgreSQL would queue every new shared request behind this one). Each sealed hour
    becomes one outbox row per customer/dimension with usage, plus (zero_records) a quantity-0
    row for each active customer and configured dimension without usage: AWS's guidance is to
    send every hour.
    """
    db.lock(SEAL_LOCK)
    policy = spec.hours
    for (hour,) in db.execute(
        "SELECT DISTINCT hour FROM saas_open WHERE hour <= ?", (through,)
    ).fetchall():
        if not policy.worth_sealing(int(hour), now):
            _carry(db, int(hour), now, policy)
    last = db.execute("SELECT MAX(hour) FROM saas_sealed_hours").fetchone()
    first_open = db.execute(
        "SELECT MIN(hour) FROM saas_open WHERE hour <= ?", (through,)
    ).fetchone()
    starts = [int(first_open[0])] if first_open and first_open[0] is not None else []
    if last and last[0] is not None:
        starts.append(int(last[0]) + 1)
    elif spec.zero_records:
        first_customer = db.execute(
            "SELECT MIN(state_since) FROM saas_customers WHERE state = 'active'"
        ).fetchone()
        if first_customer and first_customer[0] is not None:
            starts.append(hour_of(float(first_customer[0])))
    if not starts:
        return []
    start = max(min(starts), policy.first_unexpired(now))  # older hours cannot be sent anyway
    out = []
    for hour in range(start, through + 1):
        if _sealed(db, hour) or not policy.worth_sealing(hour, now):
            continue
        out.append((hour, _seal_hour(db, hour, now, spec)))
    return out


def record_timestamp(hour: int, now: float) -> int:
    """A newly sealed record's Timestamp: inside `hour`, never after `now - STAMP_LEAD` unless
    that is before the hour (see STAMP_INTO_HOUR). Stored records keep the stamp they have."""
    start = hour_start(hour)
    return int(max(start, min(start + STAMP_INTO_HOUR, now - STAMP_LEAD)))


Parts = dict[tuple[str, str], dict[str, int]]  # (customer, dimension) -> {tags: micro-units}


def open_totals(rows: Sequence[Sequence[Any]]) -> tuple[dict[tuple[str, str], int], Parts]:
    """saas_open rows (customer, dimension, tags, quantity) -> (hour totals, tagged parts)."""
    totals: dict[tuple[str, str], int] = {}
    parts: Parts = {}
    for c, d, t, q in rows:
        if t == TOTAL:
            totals[(str(c), str(d))] = int(q)
        else:
            parts.setdefault((str(c), str(d)), {})[str(t)] = int(q)
    return totals, parts


def _seal_hour(db: Db, hour: int, now: float, spec: SealSpec) -> int:
    totals, parts = open_totals(
        db.execute(
            "SELECT customer, dimension, tags, quantity FROM saas_open WHERE hour = ?", (hour,)
        ).fetchall()
    )
    zero: set[tuple[str, str]] = set()
    if spec.zero_records:
        for (customer,) in db.execute(
            # Active since (first resolve, or re-subscription), not the last resolve: a buyer
            # opening the registration page again after the hour was active all of it.
            "SELECT customer FROM saas_customers WHERE state = 'active' AND state_since < ? "  # noqa: S608  # nosec B608 # constant SQL
            "AND " + saas_events.left_customers_sql(),
            (hour_start(hour + 1), hour_start(hour + 1)),
        ).fetchall():
            for dimension in spec.dimensions:
                if (str(customer), dimension) not in totals:
                    zero.add((str(customer), dimension))
                    totals[(str(customer), dimension)] = 0
    records = seal_records(db, hour, now, spec, totals, zero, parts)
    db.execute("DELETE FROM saas_open WHERE hour = ?", (hour,))
    db.execute(
        "INSERT INTO saas_sealed_hours (hour, sealed_at, records) VALUES (?, ?, ?)",
        (hour, now, records),
    )
    return records


OUTBOX_COLUMNS = (
    "customer",
    "dimension",
    "hour",
    "quantity",
    "zero",
    "record",
    "state",
    "sealed_at",
    "deadline",
)


def seal_records(
    db: Db,
    hour: int,
    now: float,
    spec: SealSpec,
    totals: Mapping[tuple[str, str], int],
    zero: Set[tuple[str, str]] = frozenset(),
    parts: Parts | None = None,
) -> int:
    """Write the sealed records of `hour`, one per (customer, dimension) of `totals` (its usage;
    `zero`: quantity-0 records of customers without usage), each billing what its contract does
    not cover (saas_contract.charge_hour): the hourly seal's and a final window's. `parts`: the
    tag sets' shares of a total, sent as its UsageAllocations (`allocations`). A record already
    sealed is kept as it is. Returns how many records were given."""
    parts = parts or {}
    stamp = record_timestamp(hour, now)
    deadline = spec.hours.deadline(stamp)
    # Zero records too: their explanation shows what the contract held in an hour without usage.
    billed = saas_contract.charge_hour(db, dict(spec.contract), hour, totals, now)
    rows = []
    for customer, dimension in sorted(totals):
        quantity = billed.get((customer, dimension), 0)
        # The decimal field only (the model: Quantity "Use QuantityAsDecimal instead"; one
        # kind per record). Records sealed before decimals keep their stored text.
        record: dict[str, Any] = {
            "Timestamp": stamp,
            "Dimension": dimension,
            "QuantityAsDecimal": qty.text(quantity),
            **record_identity(spec.identity, customer),
        }
        # AllocatedUsageQuantityAsDecimal, the record's own kind (the model: allocations "must
        # use the same type of quantity as the request").
        shares = allocations(
            totals[(customer, dimension)], parts.get((customer, dimension), {}), quantity
        )
        if shares is not None:
            record["UsageAllocations"] = shares
        zeroed = int((customer, dimension) in zero)
        rows.append(
            (customer, dimension, hour, quantity, zeroed, dumps(record), "sealed", now, deadline)
        )
    insert_new(db, "saas_outbox", OUTBOX_COLUMNS, "customer, dimension, hour", rows)
    return len(rows)


def seal_status(db: Db) -> tuple[int | None, int | None]:
    """(last sealed hour, first open hour): whether a seal pass has work."""
    last = db.execute("SELECT MAX(hour) FROM saas_sealed_hours").fetchone()
    first = db.execute("SELECT MIN(hour) FROM saas_open").fetchone()
    return (
        int(last[0]) if last and last[0] is not None else None,
        int(first[0]) if first and first[0] is not None else None,
    )


# -- batches ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    id: str
    body: str  # the exact stored request text: what is sent, every time
    records: int
    attempts: int

    @property
    def request(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass(frozen=True)
class Settled:
    """What happened to the records of one answered call."""

    sent: int = 0
    not_subscribed: tuple[str, ...] = ()  # customers newly marked
    conflicts: tuple[tuple[str, str, int], ...] = ()
    unprocessed: int = 0
    expired: tuple[tuple[str, str, int], ...] = ()
    rejected: tuple[tuple[str, str, int], ...] = ()
    split_into: int = 0


def _request_body(records: list[str], product_code: str | None) -> str:
    """Stored text of a request made of stored record texts (kept byte for byte)."""
    head = '{"ProductCode":' + json.dumps(product_code) + "," if product_code else "{"
    return head + '"UsageRecords":[' + ",".join(records) + "]}"


def _new_batch(
    db: Db,
    members: list[tuple[str, str, int, str, float]],
    now: float,
    product_code: str | None,
    parent: str | None = None,
    state: str = "sending",
) -> Batch:
    batch_id = uuid.uuid4().hex
    body = _request_body([m[3] for m in members], product_code)
    deadline = min(m[4] for m in members)
    db.execute(
        "INSERT INTO saas_batches (id, request, records, state, parent, created_at, deadline) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (batch_id, body, len(members), state, parent, now, deadline),
    )
    db.executemany(
        "UPDATE saas_outbox SET batch_id = ? WHERE customer = ? AND dimension = ? AND hour = ?",
        [(batch_id, m[0], m[1], m[2]) for m in members],
    )
    return Batch(batch_id, body, len(members), 0)


def _members(
    db: Db, batch_id: str, *, ordered: bool = True
) -> list[tuple[str, str, int, str, float]]:
    """The batch's records still unsettled, in the stored request's order when `ordered`."""
    rows = db.execute(
        "SELECT customer, dimension, hour, record, deadline FROM saas_outbox WHERE batch_id = ? "
        "AND state = 'sealed'",
        (batch_id,),
    ).fetchall()
    out = [(str(r[0]), str(r[1]), int(r[2]), str(r[3]), float(r[4])) for r in rows]
    if not ordered:
        return out
    body = db.execute("SELECT request FROM saas_batches WHERE id = ?", (batch_id,)).fetchone()
    order = {text: i for i, text in enumerate(_record_texts(str(body[0])))} if body else {}
    out.sort(key=lambda m: order.get(m[3], len(order)))
    return out


def _record_texts(body: str) -> list[str]:
    return [dumps(r) for r in json.loads(body)["UsageRecords"]]


def next_batch(db: Db, now: float, product_code: str | None) -> tuple[Batch | None, Settled]:
    """The next call to make. A stored batch still 'sending' first (a retry, or one a killed
    leader left: its exact request again); else a new one of up to 25 sealed records, stored
    before it is returned. Records past their window are expired here, never sent."""
    row = db.execute(
        "SELECT id, request, records, attempts, deadline FROM saas_batches "
        "WHERE state = 'sending' ORDER BY created_at, id LIMIT 1"
    ).fetchone()
    if row is not None and float(row[4]) >= now:
        return Batch(str(row[0]), str(row[1]), int(row[2]), int(row[3])), Settled()
    if row is not None:
        # A record in it is past its window: the batch is given up (a subset of an identical
        # request is still safe to send), its other records go back to the pool.
        # The untried half of its bisection, if any, goes back too.
        for (gone,) in db.execute(
            "SELECT id FROM saas_batches WHERE id = ? OR (state = 'suspect' AND parent = "
            "(SELECT parent FROM saas_batches WHERE id = ?))",
            (row[0], row[0]),
        ).fetchall():
            db.execute("UPDATE saas_batches SET state = 'released' WHERE id = ?", (gone,))
            db.execute(
                "UPDATE saas_outbox SET batch_id = NULL WHERE batch_id = ? AND state = 'sealed'",
                (gone,),
            )
        return next_batch(db, now, product_code)
    expired = db.execute(
        "UPDATE saas_outbox SET state = 'expired', done_at = ?, last_error = ? "
        "WHERE state = 'sealed' AND batch_id IS NULL AND deadline < ? "
        "RETURNING customer, dimension, hour",
        (now, EXPIRED_ERROR, now),
    ).fetchall()
    settled = Settled(expired=tuple((str(c), str(d), int(h)) for c, d, h in expired))
    rows = db.execute(
        "SELECT customer, dimension, hour, record, deadline FROM saas_outbox "
        "WHERE state = 'sealed' AND batch_id IS NULL ORDER BY deadline, customer, dimension "
        "LIMIT ?",
        (MAX_BATCH_RECORDS,),
    ).fetchall()
    members = [(str(r[0]), str(r[1]), int(r[2]), str(r[3]), float(r[4])) for r in rows]
    while members and wire_bytes([m[3] for m in members], product_code) >= MAX_BATCH_BYTES:
        if len(members) == 1:
            # Alone over 1 MB (intake keeps a record under MAX_RECORD_BYTES, so a record of
            # another sidecar): never sendable, and left in the pool it would stop every call.
            customer, dimension, hour = members[0][:3]
            db.execute(
                "UPDATE saas_outbox SET state = 'rejected', done_at = ?, last_error = ? "
                "WHERE customer = ? AND dimension = ? AND hour = ? AND state = 'sealed'",
                (now, TOO_LARGE_ERROR, customer, dimension, hour),
            )
            again, more = next_batch(db, now, product_code)
            key = ((customer, dimension, hour),)
            return again, Settled(
                expired=settled.expired + more.expired, rejected=key + more.rejected
            )
        members.pop()
    if not members:
        return None, settled
    return _new_batch(db, members, now, product_code), settled


def wire_bytes(records: list[str], product_code: str | None) -> int:
    """The bytes of the request botocore sends for these stored record texts: json.dumps with
    its default separators (", ", ": "), so more than the stored compact text (a record of 2,500
    allocations by some 30 kB)."""
    request: dict[str, Any] = {"ProductCode": product_code} if product_code else {}
    request["UsageRecords"] = [json.loads(r) for r in records]
    return len(json.dumps(request).encode())


def _key_of(record: dict[str, Any]) -> tuple[str, str, int]:
    if "CustomerIdentifier" in record and record["CustomerIdentifier"] is not None:
        customer = str(record["CustomerIdentifier"])
    else:
        customer = f"{record.get('CustomerAWSAccountId')}/{record.get('LicenseArn')}"
    stamp: Any = record.get("Timestamp")
    seconds = float(stamp.timestamp()) if hasattr(stamp, "timestamp") else float(stamp or 0)
    return customer, str(record.get("Dimension")), hour_of(seconds)


def answer(
    db: Db,
    batch_id: str,
    response: dict[str, Any],
    now: float,
    asked_at: float | None = None,
) -> Settled:
    """Store AWS's answer to one call, record by record. Unprocessed (or unanswered) records go
    back to the pool unchanged, for a later call.

    `asked_at`: when the call was made. CustomerNotSubscribed marks a customer only if it was
    last resolved before then: a buyer who subscribed again and was resolved while the call was
    on the wire is newer news than AWS's answer (the record itself stays not_subscribed)."""
    since = now if asked_at is None else asked_at
    members = {(m[0], m[1], m[2]) for m in _members(db, batch_id, ordered=False)}
    sent = 0
    marked: list[str] = []
    conflicts: list[tuple[str, str, int]] = []
    updates: list[tuple[Any, ...]] = []
    for result in response.get("Results") or []:
        key = _key_of(result.get("UsageRecord") or {})
        state = STATUS_STATE.get(str(result.get("Status")))
        if key not in members or state is None:
            continue
        members.discard(key)
        updates.append((state, result.get("MeteringRecordId"), result.get("Status"), now, *key))
        if state == "sent":
            sent += 1
        elif state == "conflict":
            conflicts.append(key)
        else:
            took = db.execute(
                "UPDATE saas_customers SET state = 'not_subscribed', state_since = ?, "
                "state_reason = 'CustomerNotSubscribed from BatchMeterUsage' "
                "WHERE customer = ? AND state <> 'not_subscribed' AND resolved_at <= ? "
                "RETURNING customer",
                (now, key[0], since),
            ).fetchone()
            if took is not None:
                marked.append(key[0])
    if updates:
        db.executemany(
            "UPDATE saas_outbox SET state = ?, metering_record_id = ?, last_code = ?, "
            "done_at = ? WHERE customer = ? AND dimension = ? AND hour = ? AND state = 'sealed'",
            updates,
        )
    if members:  # unprocessed or unanswered: back to the pool, unchanged
        db.executemany(
            "UPDATE saas_outbox SET batch_id = NULL WHERE customer = ? AND dimension = ? "
            "AND hour = ? AND state = 'sealed'",
            list(members),
        )
    parent = db.execute(
        "UPDATE saas_batches SET state = 'done', attempts = attempts + 1, last_code = 'ok', "
        "answered_at = ? WHERE id = ? RETURNING parent",
        (now, batch_id),
    ).fetchone()
    done = Settled(
        sent=sent,
        not_subscribed=tuple(marked),
        conflicts=tuple(conflicts),
        unprocessed=len(members),
    )
    # This half of a bisection was fine: the record that sank the parent is in the other half,
    # which is bisected in turn without a call of its own.
    if parent is None or parent[0] is None:
        return done
    for sibling, code in db.execute(
        "SELECT s.id, p.last_code FROM saas_batches b JOIN saas_batches s ON s.parent = b.parent "
        "JOIN saas_batches p ON p.id = b.parent WHERE b.id = ? AND s.state = 'suspect'",
        (batch_id,),
    ).fetchall():
        more = _bisect(db, str(sibling), now, product_code=_product_of(db, batch_id), code=code)
        done = Settled(
            sent=done.sent,
            not_subscribed=done.not_subscribed,
            conflicts=done.conflicts,
            unprocessed=done.unprocessed,
            expired=more.expired,
            rejected=more.rejected,
            split_into=more.split_into,
        )
    return done


def _product_of(db: Db, batch_id: str) -> str | None:
    row = db.execute("SELECT request FROM saas_batches WHERE id = ?", (batch_id,)).fetchone()
    code = json.loads(str(row[0])).get("ProductCode") if row else None
    return str(code) if code else None


def failed(db: Db, batch_id: str, code: str, now: float) -> None:
    """A call that may be retried as is (throttling, 5xx, network, configuration)."""
    db.execute(
        "UPDATE saas_batches SET attempts = attempts + 1, last_code = ?, answered_at = ? "
        "WHERE id = ? AND state = 'sending'",
        (code, now, batch_id),
    )


def _release_suspects(db: Db, batch_id: str) -> None:
    """`batch_id`, the tried half of a bisection, failed: the untried half's records go back to
    the pool (batched again with others, so no call is wasted on them)."""
    for (sibling,) in db.execute(
        "SELECT s.id FROM saas_batches b JOIN saas_batches s ON s.parent = b.parent "
        "WHERE b.id = ? AND s.state = 'suspect'",
        (batch_id,),
    ).fetchall():
        db.execute("UPDATE saas_batches SET state = 'released' WHERE id = ?", (sibling,))
        db.execute(
            "UPDATE saas_outbox SET batch_id = NULL WHERE batch_id = ? AND state = 'sealed'",
            (sibling,),
        )


def regroup(
    db: Db, batch_id: str, now: float, product_code: str | None, *, by: str, code: str
) -> int:
    """AWS refused the whole call for something all records of one hour (`by` "hour": the
    Timestamp) or of one dimension (`by` "dimension") share: one new call per hour or
    dimension, each stored before it is sent, every record keeping its stored text. Returns
    how many calls it became."""
    members = _members(db, batch_id)
    groups: dict[Any, list[tuple[str, str, int, str, float]]] = {}
    for m in members:
        groups.setdefault(m[2] if by == "hour" else m[1], []).append(m)
    db.execute(
        "UPDATE saas_batches SET state = 'split', attempts = attempts + 1, last_code = ?, "
        "answered_at = ? WHERE id = ?",
        (code, now, batch_id),
    )
    _release_suspects(db, batch_id)
    for group in groups.values():
        _new_batch(db, group, now, product_code, parent=batch_id)
    return len(groups)


def quarantine(
    db: Db, dimension: str, now: float, code: str, message: str, refused: str | None = None
) -> int:
    """AWS proved `dimension` unpublished: every unsent record of it leaves the pool (state
    'quarantined'), and every call in progress holding one is released (its other records go
    back to the pool, the same texts). Nothing of it is sent again until `release_quarantined`.
    `refused`, the call that proved it, may be the tried half of a bisection: its untried half
    goes back to the pool too, or nothing would ever send or expire it. Returns the records
    held."""
    if refused is not None:
        _release_suspects(db, refused)
    for (gone,) in db.execute(
        "SELECT b.id FROM saas_batches b WHERE b.state IN ('sending', 'suspect') AND EXISTS "
        "(SELECT 1 FROM saas_outbox o WHERE o.batch_id = b.id AND o.state = 'sealed' "
        "AND o.dimension = ?)",
        (dimension,),
    ).fetchall():
        db.execute(
            "UPDATE saas_batches SET state = 'released', last_code = ?, answered_at = ? "
            "WHERE id = ?",
            (code, now, gone),
        )
        db.execute(
            "UPDATE saas_outbox SET batch_id = NULL WHERE batch_id = ? AND state = 'sealed'",
            (gone,),
        )
    return hold(db, dimension, code, message)


def hold(db: Db, dimension: str, code: str, message: str) -> int:
    """Move `dimension`'s records waiting in the pool (just sealed, or released) to
    'quarantined'. Reads only the pool's partial index."""
    held = db.execute(
        "UPDATE saas_outbox SET state = 'quarantined', last_code = ?, last_error = ? "
        "WHERE state = 'sealed' AND batch_id IS NULL AND dimension = ? RETURNING hour",
        (code, message[:500], dimension),
    ).fetchall()
    return len(held)


def release_quarantined(db: Db, dimensions: Sequence[str]) -> int:
    """A new sender tries held records of still-configured dimensions once more (the seller may
    have fixed the product or the configuration). Records past their window then expire as any
    unsent record does; a dimension no longer configured stays held. Returns the records."""
    if not dimensions:
        return 0
    marks = ", ".join("?" * len(dimensions))
    sql = f"UPDATE saas_outbox SET state = 'sealed', batch_id = NULL WHERE state = 'quarantined' AND dimension IN ({marks}) RETURNING hour"  # noqa: S608, E501  # nosec B608 # placeholders only; values are bound
    back = db.execute(sql, tuple(dimensions)).fetchall()
    return len(back)


def retrying(db: Db) -> list[tuple[str, int, float]]:
    """Calls waiting to be resent after a refusal or failure: (last code, calls, the earliest
    deadline) per code. Reads the few 'sending' rows only."""
    rows = db.execute(
        "SELECT last_code, COUNT(*), MIN(deadline) FROM saas_batches WHERE state = 'sending' "
        "AND last_code IS NOT NULL GROUP BY last_code ORDER BY last_code"
    ).fetchall()
    return [(str(c), int(n), float(d)) for c, n, d in rows]


def split(
    db: Db, batch_id: str, now: float, product_code: str | None, *, code: str | None
) -> Settled:
    """AWS refused the whole call for one record in it (TimestampOutOfBounds, or a per-record
    error such as InvalidLicense); `code` None: a record in it is past its window. Bisect.

    The first half is stored and sent; the second is kept as 'suspect' and not sent. If the
    first half fails too, the bad record is there: the suspect half's records go back to the
    pool (batched again with others, so no call is wasted on them). If it succeeds, the bad
    record is in the suspect half, which is bisected the same way without a call. So a bad
    record in a call of 25 is isolated in at most ceil(log2(25)) = 5 further calls. Each new
    call is stored before it is sent; every record keeps its stored text.
    """
    db.execute(
        "UPDATE saas_batches SET state = 'split', attempts = attempts + ?, last_code = ?, "
        "answered_at = ? WHERE id = ?",
        (0 if code is None else 1, code or "window", now, batch_id),
    )
    # This batch was the tried half of a bisection and failed: its suspect sibling is cleared.
    _release_suspects(db, batch_id)
    return _bisect(db, batch_id, now, product_code=product_code, code=code, marked=True)


def _bisect(
    db: Db,
    batch_id: str,
    now: float,
    *,
    product_code: str | None,
    code: str | None,
    marked: bool = False,
) -> Settled:
    """`batch_id` holds a bad record: settle it if alone, else split it into a half to try
    and a suspect half."""
    members = _members(db, batch_id)
    if not marked:
        db.execute(
            "UPDATE saas_batches SET state = 'split', last_code = ?, answered_at = ? WHERE id = ?",
            (code or "window", now, batch_id),
        )
    if len(members) <= 1:
        if not members:
            return Settled()
        customer, dimension, hour, _, deadline = members[0]
        past = now >= window_closes(BATCH_METER_USAGE, hour) or now > deadline
        if code == TIMESTAMP_CODE and not past:
            # Inside our own window AWS refused the Timestamp: a clock disagreement, not a bad
            # record. Back to the pool, to be retried until its deadline (never 'rejected').
            db.execute(
                "UPDATE saas_outbox SET batch_id = NULL, last_code = ? WHERE customer = ? "
                "AND dimension = ? AND hour = ? AND state = 'sealed'",
                (code, customer, dimension, hour),
            )
            return Settled()
        state = "expired" if past else "rejected"
        db.execute(
            "UPDATE saas_outbox SET state = ?, last_code = ?, last_error = ?, done_at = ? "
            "WHERE customer = ? AND dimension = ? AND hour = ? AND state = 'sealed'",
            (
                state,
                code,
                EXPIRED_ERROR if code is None else f"AWS: {code}",
                now,
                customer,
                dimension,
                hour,
            ),
        )
        key = ((customer, dimension, hour),)
        return Settled(expired=key if state == "expired" else (), rejected=() if past else key)
    half = (len(members) + 1) // 2
    _new_batch(db, members[:half], now, product_code, parent=batch_id)
    _new_batch(db, members[half:], now, product_code, parent=batch_id, state="suspect")
    return Settled(split_into=2)


# -- report and counters ------------------------------------------------------------------

# AWS's answer is final for these: a record in one of them is never sent again, so once its hour
# is older than OUTBOX_KEEP it is folded into `saas_hour_summary` and deleted.
SETTLED_STATES = ("sent", "not_subscribed", "conflict", "expired", "rejected")
OUTBOX_KEEP = 48 * 3600.0  # settled outbox rows, like the client idempotency keys
SENDING_KEEP_HOURS = 7 * 24  # per-hour sending facts kept for the headroom trend
PRUNE_HOURS = 24  # hours pruned per transaction, so the writer is never held for long

# Version 2: counters kept in the transaction that changes a record's state, so scrapes and
# GET /v1/usage read a few rows instead of the whole outbox; the per-hour audit that remains of
# a pruned hour; per-hour sending facts (headroom); indexes for pruning and the unsent backlog.
COUNTS_DDL = """
-- Records (and units) per hour, dimension and state, kept by triggers on saas_outbox (every
-- INSERT and every change of `state`). Pruning folds a pruned hour's settled rows into hour -1,
-- so the table holds the kept hours plus one row per dimension and state: the totals since the
-- store was created, the backlog and the oldest unsent hour are read here, not in the outbox.
CREATE TABLE saas_counts (
    hour BIGINT NOT NULL,
    dimension TEXT NOT NULL,
    state TEXT NOT NULL,
    records BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    PRIMARY KEY (hour, dimension, state)
);
-- What remains of settled outbox rows once pruned: per hour, dimension and state.
CREATE TABLE saas_hour_summary (
    hour BIGINT NOT NULL,
    dimension TEXT NOT NULL,
    state TEXT NOT NULL,
    records BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    zero_records BIGINT NOT NULL,
    PRIMARY KEY (hour, dimension, state)
);
-- Per sealed hour: its records, the backlog it found, when its last record was settled.
CREATE TABLE saas_hour_sending (
    hour BIGINT PRIMARY KEY,
    sealed_at DOUBLE PRECISION NOT NULL,
    records BIGINT NOT NULL,
    backlog_before BIGINT NOT NULL,
    finished_at DOUBLE PRECISION
);
CREATE INDEX saas_outbox_by_hour ON saas_outbox (hour);
"""
COUNTS_BACKFILL = """
INSERT INTO saas_counts (hour, dimension, state, records, quantity)
SELECT hour, dimension, state, COUNT(*), SUM(quantity) FROM saas_outbox
GROUP BY hour, dimension, state;
"""
COUNTS_SQLITE = """
CREATE TRIGGER saas_outbox_counted AFTER INSERT ON saas_outbox BEGIN
    INSERT INTO saas_counts (hour, dimension, state, records, quantity)
    VALUES (NEW.hour, NEW.dimension, NEW.state, 1, NEW.quantity)
    ON CONFLICT (hour, dimension, state) DO UPDATE SET records = records + 1,
    quantity = quantity + excluded.quantity;
END;
CREATE TRIGGER saas_outbox_recounted AFTER UPDATE OF state ON saas_outbox
WHEN OLD.state <> NEW.state BEGIN
    UPDATE saas_counts SET records = records - 1, quantity = quantity - OLD.quantity
    WHERE hour = OLD.hour AND dimension = OLD.dimension AND state = OLD.state;
    INSERT INTO saas_counts (hour, dimension, state, records, quantity)
    VALUES (NEW.hour, NEW.dimension, NEW.state, 1, NEW.quantity)
    ON CONFLICT (hour, dimension, state) DO UPDATE SET records = records + 1,
    quantity = quantity + excluded.quantity;
END;
"""
# PostgreSQL: statement triggers over transition tables, one upsert per statement (a seal of
# 30,000 rows updates each counter once, not 30,000 times).
COUNTS_POSTGRESQL = """
CREATE FUNCTION saas_outbox_counted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO saas_counts AS c (hour, dimension, state, records, quantity)
    SELECT hour, dimension, state, COUNT(*), SUM(quantity) FROM saas_new
    GROUP BY hour, dimension, state
    ON CONFLICT (hour, dimension, state) DO UPDATE SET records = c.records + excluded.records,
    quantity = c.quantity + excluded.quantity;
    RETURN NULL;
END $$;
CREATE FUNCTION saas_outbox_recounted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO saas_counts AS c (hour, dimension, state, records, quantity)
    SELECT hour, dimension, state, SUM(d_records), SUM(d_quantity) FROM (
        SELECT hour, dimension, state, 1 AS d_records, quantity AS d_quantity FROM saas_new
        UNION ALL
        SELECT hour, dimension, state, -1, -quantity FROM saas_old
    ) AS delta GROUP BY hour, dimension, state HAVING SUM(d_records) <> 0
    ON CONFLICT (hour, dimension, state) DO UPDATE SET records = c.records + excluded.records,
    quantity = c.quantity + excluded.quantity;
    RETURN NULL;
END $$;
CREATE TRIGGER saas_outbox_counted AFTER INSERT ON saas_outbox
    REFERENCING NEW TABLE AS saas_new FOR EACH STATEMENT EXECUTE FUNCTION saas_outbox_counted();
CREATE TRIGGER saas_outbox_recounted AFTER UPDATE ON saas_outbox
    REFERENCING OLD TABLE AS saas_old NEW TABLE AS saas_new
    FOR EACH STATEMENT EXECUTE FUNCTION saas_outbox_recounted();
"""
MIGRATION_2 = (
    COUNTS_DDL + COUNTS_SQLITE + COUNTS_BACKFILL,
    COUNTS_DDL + COUNTS_POSTGRESQL + COUNTS_BACKFILL,
)


# Version 3: quantities in integer micro-units (1 unit = 1,000,000; sidecar.core.quantity), and
# ResolveCustomer's Metadata.AgreementId kept with the customer (NULL for customers resolved
# before). Integer history is scaled exactly (today's rows hold at most 2147483647 units, and
# the counters' sums stay far below BIGINT's 9.2e18 micro-units). The stored record and request
# texts (`saas_outbox.record`, `saas_batches.request`, the integer `Quantity`) are NOT
# rewritten: a request AWS may have seen is resent byte for byte. `saas_keys.answer` needs
# nothing: a whole quantity is shown as the integer it was. SQLite's counting trigger fires on
# `state` only; PostgreSQL's statement trigger nets the quantity-only update to no change
# (HAVING SUM(d_records) <> 0), so the counters are scaled by their own statement.
_MICROS_V3 = """
ALTER TABLE saas_customers ADD COLUMN agreement_id TEXT;
UPDATE saas_records SET quantity = quantity * 1000000;
UPDATE saas_open SET quantity = quantity * 1000000;
UPDATE saas_outbox SET quantity = quantity * 1000000;
UPDATE saas_counts SET quantity = quantity * 1000000;
UPDATE saas_hour_summary SET quantity = quantity * 1000000;
"""
# PostgreSQL is shared by a fleet, and a replica of the integer sidecar still running during a
# rollout never looks at the schema version again: its ingest would add whole units to
# micro-unit totals (billing 7 units as 0.000007) and its seal would send micro-unit sums as
# whole units. Its statements are refused instead (an error answered to its POST, the usage not
# stored; a seal that fails and is retried): every session of this sidecar sets
# `sidecar.quantity_unit` (pgstore.SESSION_OPTIONS); the triggers fire once per statement.
_GUARD_V3_POSTGRESQL = """
CREATE FUNCTION saas_quantity_unit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('sidecar.quantity_unit', true) IS DISTINCT FROM 'micro' THEN
        RAISE EXCEPTION USING MESSAGE = 'this usage database holds micro-unit quantities '
            || '(schema 3): a sidecar older than that must not write usage to it; '
            || 'upgrade every replica';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER saas_open_unit_guard BEFORE INSERT OR UPDATE ON saas_open
    FOR EACH STATEMENT EXECUTE FUNCTION saas_quantity_unit_guard();
CREATE TRIGGER saas_records_unit_guard BEFORE INSERT ON saas_records
    FOR EACH STATEMENT EXECUTE FUNCTION saas_quantity_unit_guard();
CREATE TRIGGER saas_outbox_unit_guard BEFORE INSERT ON saas_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION saas_quantity_unit_guard();
"""
# The counters add up a dimension's whole history (pruned hours fold into hour -1): in BIGINT
# micro-units that would stop at 9.2e12 units, which a busy fleet reaches in months, and then
# every state change's trigger would fail. NUMERIC(38) holds 1e32 units, exactly.
_WIDE_COUNTERS_V3 = """
ALTER TABLE saas_counts ALTER COLUMN quantity TYPE NUMERIC(38, 0);
ALTER TABLE saas_hour_summary ALTER COLUMN quantity TYPE NUMERIC(38, 0);
"""
# First, before anything is scaled: the tables an older replica writes usage to, so its
# transactions in flight commit before the scaling (their whole units are scaled with the rest)
# and its later statements wait, then meet the guard. Created after the scaling, the guard came
# too late for a row inserted under the UPDATE's snapshot: 7 units stayed 7 micro-units. The
# order is the older sidecar's (its seal writes the outbox, then the totals; its intake the
# totals, then the records), so the migration waits for it rather than deadlocking with it.
_QUIESCE_V3_POSTGRESQL = """
LOCK TABLE saas_outbox, saas_open, saas_records IN EXCLUSIVE MODE;
"""
MIGRATION_3 = (
    _MICROS_V3,
    _QUIESCE_V3_POSTGRESQL + _WIDE_COUNTERS_V3 + _MICROS_V3 + _GUARD_V3_POSTGRESQL,
)


# Version 6: the open totals keep the tag sets of usage allocations (POST /v1/usage
# `allocations`), keyed (customer, dimension, hour, tags): the row of tags '' (TOTAL) holds the
# hour's whole total, as the only row did before, so every stored total is carried over as is
# (`_add_to_totals`). Sealed records and stored requests are not touched.
_OPEN_TAGS_SQLITE = """
CREATE TABLE saas_open_v6 (
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    tags TEXT NOT NULL,
    PRIMARY KEY (customer, dimension, hour, tags)
);
INSERT INTO saas_open_v6 (customer, dimension, hour, quantity, tags)
SELECT customer, dimension, hour, quantity, '' FROM saas_open;
DROP TABLE saas_open;
ALTER TABLE saas_open_v6 RENAME TO saas_open;
CREATE INDEX saas_open_by_hour ON saas_open (hour);
"""
# A replica of the schema-5 sidecar still running during a rollout never reads the schema
# version again. Its intake names the old key (ON CONFLICT (customer, dimension, hour)), which
# no longer exists: PostgreSQL refuses the statement. Its seal would read a total AND each tag
# set's part as totals of their own, and the first written would win the outbox row: a part
# billed as the whole. Its statements on the open totals and the outbox are refused instead
# (every session of this sidecar sets `sidecar.open_tags`, pgstore.SESSION_OPTIONS). First, the
# tables in the older sidecar's order (its seal writes the outbox, then deletes totals; its
# intake only the totals), so a transaction of it in flight commits before the change (what it
# wrote is migrated with the rest) and its later statements wait, then meet the guard.
_OPEN_TAGS_POSTGRESQL = """
LOCK TABLE saas_outbox IN EXCLUSIVE MODE;
LOCK TABLE saas_open IN ACCESS EXCLUSIVE MODE;
CREATE FUNCTION saas_open_tags_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('sidecar.open_tags', true) IS DISTINCT FROM 'v6' THEN
        RAISE EXCEPTION USING MESSAGE = 'this usage database keeps usage allocations by tag '
            || 'set (schema 6): a sidecar older than that must not write usage to it; '
            || 'upgrade every replica';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER saas_open_v6_tags_guard BEFORE INSERT OR UPDATE OR DELETE ON saas_open
    FOR EACH STATEMENT EXECUTE FUNCTION saas_open_tags_guard();
CREATE TRIGGER saas_outbox_v6_tags_guard BEFORE INSERT ON saas_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION saas_open_tags_guard();
ALTER TABLE saas_open ADD COLUMN tags TEXT NOT NULL DEFAULT '';
ALTER TABLE saas_open ALTER COLUMN tags DROP DEFAULT;
ALTER TABLE saas_open DROP CONSTRAINT saas_open_pkey;
ALTER TABLE saas_open ADD PRIMARY KEY (customer, dimension, hour, tags);
"""
MIGRATION_6 = (_OPEN_TAGS_SQLITE, _OPEN_TAGS_POSTGRESQL)


def _state_counts(db: Db) -> dict[str, int]:
    records = dict.fromkeys(RECORD_STATES, 0)
    for state, n in db.execute("SELECT state, SUM(records) FROM saas_counts GROUP BY state"):
        records[str(state)] = int(n or 0)
    return records


def _oldest_unsent(db: Db) -> int | None:
    """The oldest hour with a record not yet settled."""
    row = db.execute(
        "SELECT MIN(hour) FROM saas_counts WHERE state = 'sealed' AND records > 0"
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def counts(db: Db, now: float) -> tuple[dict[str, int], dict[str, int], float | None]:
    """(records by state, customers by state, end of the oldest ended hour not yet sent).

    Reads the maintained counters and the open hours: its cost follows the customers of the
    open hours and the hours kept, never the store's history."""
    records = _state_counts(db)
    row = db.execute("SELECT COUNT(*) FROM saas_open WHERE tags = ''").fetchone()
    records["open"] = int(row[0]) if row else 0
    customers = dict.fromkeys(CUSTOMER_STATES, 0)
    for state, n in db.execute("SELECT state, COUNT(*) FROM saas_customers GROUP BY state"):
        customers[str(state)] = int(n)
    current = hour_of(now)
    first_open = db.execute("SELECT MIN(hour) FROM saas_open WHERE hour < ?", (current,)).fetchone()
    hours = [int(first_open[0])] if first_open and first_open[0] is not None else []
    unsent = _oldest_unsent(db)
    if unsent is not None:
        hours.append(unsent)
    return records, customers, (hour_start(min(hours) + 1) if hours else None)


def report(db: Db, now: float, policy: HourPolicy, limit: int = 500) -> dict[str, Any]:
    """Per customer/dimension/hour state (newest first, `limit` rows), totals, warnings.
    Totals come from the maintained counters (pruned hours included)."""
    policy = policy.using(BATCH_METER_USAGE)
    items: list[dict[str, Any]] = []
    totals: dict[str, dict[str, int]] = {}  # micro-units until the answer is built
    warnings: list[str] = []

    def add(dimension: str, state: str, quantity: int) -> None:
        t = totals.setdefault(dimension, {"accepted": 0, **dict.fromkeys(RECORD_STATES, 0)})
        t["accepted"] += quantity
        t[state] = t.get(state, 0) + quantity

    for dimension, state, quantity in db.execute(
        "SELECT dimension, 'open', SUM(quantity) FROM saas_open WHERE tags = '' "
        "GROUP BY dimension "
        "UNION ALL SELECT dimension, state, SUM(quantity) FROM saas_counts "
        "GROUP BY dimension, state HAVING SUM(records) <> 0"
    ):
        add(str(dimension), str(state), int(quantity or 0))
    for customer, dimension, hour, quantity in db.execute(
        "SELECT customer, dimension, hour, quantity FROM saas_open WHERE tags = '' "
        "ORDER BY hour DESC, customer, dimension LIMIT ?",
        (limit,),
    ):
        items.append(
            {
                "customer": customer,
                "dimension": dimension,
                "hour": iso_hour(int(hour)),
                "state": "open",
                "quantity": qty.to_json(int(quantity)),
                "seal_after": iso(policy.seal_due(int(hour))),
            }
        )
    for row in db.execute(
        "SELECT o.customer, o.dimension, o.hour, o.quantity, o.state, o.metering_record_id, "
        "o.last_code, o.last_error, o.deadline, o.zero, k.basis, k.used, k.entitled, k.covered, "
        "k.billed, k.term_end, k.why FROM saas_outbox o LEFT JOIN saas_contract_hours k "
        "ON k.customer = o.customer AND k.dimension = o.dimension AND k.hour = o.hour "
        "ORDER BY o.hour DESC, o.customer, o.dimension LIMIT ?",
        (max(0, limit - len(items)),),
    ):
        items.append(
            {
                "customer": row[0],
                "dimension": row[1],
                "hour": iso_hour(int(row[2])),
                "state": row[4],
                "quantity": qty.to_json(int(row[3])),
                "zero_record": bool(row[9]),
                "metering_record_id": row[5],
                "last_code": row[6],
                "last_error": row[7],
                "deadline": iso(float(row[8])),
                # A contract dimension: used, covered by the contract, billed (= quantity).
                "contract": None if row[10] is None else saas_contract.explain(tuple(row[10:])),
            }
        )
    # Unsent records whose window closes soon, from the counters: sealing sets a record's
    # deadline from its hour (HourPolicy.deadline), which never decreases from one hour to the
    # next (hours.first_hour_open), so "deadline < t" is "hour < h".
    closing = db.execute(
        "SELECT SUM(records), MIN(hour) FROM saas_counts WHERE state = 'sealed' AND records > 0 "
        "AND hour < ?",
        (policy.first_unexpired(now + policy.warn_before),),
    ).fetchone()
    if closing and closing[0] and int(closing[0]):
        warnings.append(
            f"{int(closing[0])} sealed records unsent; AWS's window closes from "
            f"{iso(policy.deadline(hour_start(int(closing[1]))))}"
        )
    records, customers, oldest = counts(db, now)
    for state, label in (
        ("conflict", "DuplicateRecord: AWS holds another quantity (never re-sent)"),
        (
            "expired",
            "expired unsent (past BatchMeterUsage's window: 24 h, or 06:00 UTC on the 1st "
            "for the closed month)",
        ),
        ("rejected", "rejected by AWS"),
        ("not_subscribed", "answered CustomerNotSubscribed (kept, not billed)"),
    ):
        if records.get(state):
            warnings.append(f"{records[state]} records {label}")
    for (customer,) in db.execute(
        "SELECT customer FROM saas_customers WHERE state = 'not_subscribed' ORDER BY customer "
        "LIMIT 20"
    ):
        warnings.append(f"customer {customer}: not subscribed (AWS CustomerNotSubscribed)")
    blind = db.execute(
        # Zero records bill nothing whole: not counted.
        "SELECT COUNT(*) FROM saas_contract_hours WHERE why = ? AND hour >= ? AND used > 0",
        (saas_contract.NEVER_READ, hour_of(now) - 48),
    ).fetchone()
    if blind and int(blind[0]):
        warnings.append(
            f"{int(blind[0])} records of contract dimensions in the last 48 hours billed every "
            "unit: the customer's entitlements were never read (GetEntitlements; see "
            "`contract.why` on each record)"
        )
    sending = db.execute("SELECT COUNT(*) FROM saas_batches WHERE state = 'sending'").fetchone()
    return {
        "now": iso(now),
        "records": items,
        "records_by_state": records,
        "customers_by_state": customers,
        "totals": {d: {st: qty.to_json(m) for st, m in t.items()} for d, t in totals.items()},
        "batches_sending": int(sending[0]) if sending else 0,
        "oldest_unsent_hour_end": iso(oldest) if oldest else None,
        "warnings": warnings,
    }


def prune(
    db: Db,
    now: float,
    keep_seconds: float = OUTBOX_KEEP,
    *,
    after: int | None = None,
    max_hours: int = PRUNE_HOURS,
) -> int | None:
    """Drop old per-record audit rows, idempotency keys, answered batches and settled outbox
    rows; each pruned outbox row is added to its hour's `saas_hour_summary` row first.

    Never touches a record still 'sealed' (unsent, or in a call that may be retried: a stored
    'sending' batch only ever holds 'sealed' records) nor `saas_sealed_hours`, which keeps a
    pruned hour from being sealed again. Prunes at most `max_hours` hours of outbox rows from
    `after` on: returns the hour to continue from (call again in another transaction), or None
    when done."""
    oldest = hour_of(now - keep_seconds)
    if after is None:
        db.execute("DELETE FROM saas_records WHERE hour < ?", (oldest,))
        db.execute("DELETE FROM saas_keys WHERE created_at < ?", (now - keep_seconds,))
        db.execute(
            "DELETE FROM saas_batches WHERE state <> 'sending' AND created_at < ?",
            (now - keep_seconds,),
        )
        db.execute(
            "DELETE FROM saas_hour_sending WHERE hour < ?",
            (hour_of(now) - SENDING_KEEP_HOURS,),
        )
        saas_contract.prune(db, now, keep_seconds)
        saas_events.prune(db, now)  # lifecycle rows: their own horizons, bounded batches
    row = db.execute(
        "SELECT MIN(hour) FROM saas_outbox WHERE hour >= ?", (after or -(2**62),)
    ).fetchone()
    if row is None or row[0] is None or int(row[0]) >= oldest:
        return None
    first = int(row[0])
    end = min(oldest, first + max_hours)
    settled = ", ".join(f"'{s}'" for s in SETTLED_STATES)
    db.execute(
        "INSERT INTO saas_hour_summary (hour, dimension, state, records, quantity, zero_records) "  # noqa: S608  # nosec B608 # constant states; values are bound
        "SELECT hour, dimension, state, COUNT(*), SUM(quantity), SUM(zero) FROM saas_outbox "
        f"WHERE hour >= ? AND hour < ? AND state IN ({settled}) GROUP BY hour, dimension, state "
        "ON CONFLICT (hour, dimension, state) DO UPDATE SET "
        "records = saas_hour_summary.records + excluded.records, "
        "quantity = saas_hour_summary.quantity + excluded.quantity, "
        "zero_records = saas_hour_summary.zero_records + excluded.zero_records",
        (first, end),
    )
    db.execute(
        f"DELETE FROM saas_outbox WHERE hour >= ? AND hour < ? AND state IN ({settled})",  # noqa: S608  # nosec B608 # constant states; values are bound
        (first, end),
    )
    # Their counters (exactly the rows just deleted) fold into hour -1, the pruned past.
    db.execute(
        "INSERT INTO saas_counts (hour, dimension, state, records, quantity) "  # noqa: S608  # nosec B608 # constant states; values are bound
        "SELECT -1, dimension, state, SUM(records), SUM(quantity) FROM saas_counts "
        f"WHERE hour >= ? AND hour < ? AND state IN ({settled}) GROUP BY dimension, state "
        "ON CONFLICT (hour, dimension, state) DO UPDATE SET "
        "records = saas_counts.records + excluded.records, "
        "quantity = saas_counts.quantity + excluded.quantity",
        (first, end),
    )
    db.execute(
        f"DELETE FROM saas_counts WHERE hour >= ? AND hour < ? AND (state IN ({settled}) "  # noqa: S608  # nosec B608 # constant states; values are bound
        "OR records = 0)",  # a state left by every record of the hour (e.g. 'sealed')
        (first, end),
    )
    return end if end < oldest else None


def hour_summary(db: Db, since: int) -> list[dict[str, Any]]:
    """The audit of pruned hours from `since` on."""
    return [
        {
            "hour": iso_hour(int(h)),
            "dimension": str(d),
            "state": str(s),
            "records": int(r),
            "quantity": qty.to_json(int(q)),
            "zero_records": int(z),
        }
        for h, d, s, r, q, z in db.execute(
            "SELECT hour, dimension, state, records, quantity, zero_records FROM "
            "saas_hour_summary WHERE hour >= ? ORDER BY hour, dimension, state",
            (since,),
        )
    ]


# -- sending headroom ---------------------------------------------------------------------

TRACK_HOURS = 24  # a store met for the first time: its last day of sealed hours is tracked


def track_sending(db: Db, now: float) -> None:
    """Note newly sealed hours (with the backlog they found) and the hours whose last record
    has since been settled. Leader only; reads the backlog through `saas_outbox_unsent`."""
    last = db.execute("SELECT MAX(hour) FROM saas_hour_sending").fetchone()
    start = hour_of(now) - TRACK_HOURS
    if last and last[0] is not None:
        start = max(start, int(last[0]) + 1)
    for hour, sealed_at, records in db.execute(
        "SELECT hour, sealed_at, records FROM saas_sealed_hours WHERE hour >= ? ORDER BY hour",
        (start,),
    ).fetchall():
        backlog = db.execute(
            "SELECT SUM(records) FROM saas_counts WHERE state = 'sealed' AND hour < ?", (hour,)
        ).fetchone()
        db.execute(
            "INSERT INTO saas_hour_sending (hour, sealed_at, records, backlog_before) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (hour) DO NOTHING",
            (int(hour), float(sealed_at), int(records), int(backlog[0] or 0) if backlog else 0),
        )
    for hour, sealed_at in db.execute(
        "SELECT hour, sealed_at FROM saas_hour_sending WHERE finished_at IS NULL"
    ).fetchall():
        left = db.execute(
            "SELECT SUM(records) FROM saas_counts WHERE state = 'sealed' AND hour = ?", (hour,)
        ).fetchone()
        if left and left[0]:
            continue
        done = db.execute("SELECT MAX(done_at) FROM saas_outbox WHERE hour = ?", (hour,)).fetchone()
        finished = float(done[0]) if done and done[0] is not None else float(sealed_at)
        db.execute(
            "UPDATE saas_hour_sending SET finished_at = ? WHERE hour = ?",
            (max(finished, float(sealed_at)), hour),
        )


SendingFacts = tuple[list[HourSending], int, int | None]


def sending_facts(db: Db, now: float) -> SendingFacts:
    """(the last day's sealed hours, records sealed-unsent, the oldest unsent hour)."""
    hours = [
        HourSending(int(h), float(s), int(r), int(b), None if f is None else float(f))
        for h, s, r, b, f in db.execute(
            "SELECT hour, sealed_at, records, backlog_before, finished_at FROM saas_hour_sending "
            "WHERE hour >= ? ORDER BY hour",
            (hour_of(now) - TRACK_HOURS,),
        )
    ]
    row = db.execute("SELECT SUM(records) FROM saas_counts WHERE state = 'sealed'").fetchone()
    backlog = int(row[0]) if row and row[0] is not None else 0
    return hours, backlog, _oldest_unsent(db)


BatchCall = Callable[[dict[str, Any]], dict[str, Any]]
