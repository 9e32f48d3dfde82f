"""SaaS contracts with consumption at sealing (schema 5): the part of a customer's hour that the
contract does not cover, computed in the sealing transaction and kept for the seller to explain
an invoice. Pure apart from the `Db`; the arithmetic is sidecar.usage.overage's.

AWS: "For SaaS contracts, you only meter for usage beyond a customer's contract entitlements"
(Seller Guide, "Configuring metering for usage with SaaS subscriptions"). AWS does not net the
contract, so for a dimension the seller names as covered (MARKETPLACE_SAAS_CONTRACT_DIMENSIONS)
the sealed record carries only the billable part, 0 when covered (still one record an hour).

Why the numbers are exact and current: sealing (`saas_ledger.seal`, `saas_events.final_seal`)
holds SEAL_LOCK exclusively and runs on the leader only, so the entitlements read here are the
ones committed before the seal (a downgrade learned before sealing applies to that hour), and a
term pool's earlier draws (`saas_contract_hours.covered`) are all committed and none is being
written: nothing else writes that table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from sidecar.core import quantity as qty
from sidecar.usage.db import Db, insert_new
from sidecar.usage.hours import hour_of, iso, iso_hour
from sidecar.usage.overage import Basis, Billable, Entitlement, billable, entitled_micros

NEVER_READ = "entitlements never read: every unit"

MIGRATION_5_DDL = """
-- Which EntitlementValue member GetEntitlements set (integer, double, boolean, string): a
-- DoubleValue's exact text and a StringValue look alike in `value`. NULL: learned before.
ALTER TABLE saas_entitlements ADD COLUMN kind TEXT;
-- The license a departure named (its `l-...` id): the final window and the refusal after it
-- apply to that license's customers only. NULL: to every customer of the subject.
ALTER TABLE saas_lifecycle ADD COLUMN left_license TEXT;
-- One row per sealed (customer, dimension, hour) of a dimension covered by the contract
-- (MARKETPLACE_SAAS_CONTRACT_DIMENSIONS): what was used, what the contract covered and what the
-- outbox record bills (micro-units; `entitled` as decimal text: a DoubleValue may exceed BIGINT).
-- Kept KEEP_SECONDS (two invoice months) after the hour, a term pool's rows as long after its
-- term (term_end: the entitlement's expiration; -1 when it has none: kept).
CREATE TABLE saas_contract_hours (
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    basis TEXT NOT NULL,
    used BIGINT NOT NULL,
    entitled TEXT,
    covered BIGINT NOT NULL,
    billed BIGINT NOT NULL,
    term_end DOUBLE PRECISION NOT NULL,
    why TEXT NOT NULL,
    sealed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (customer, dimension, hour)
);
CREATE INDEX saas_contract_hours_by_term ON saas_contract_hours (customer, dimension, term_end);
CREATE INDEX saas_contract_hours_hourly ON saas_contract_hours (hour) WHERE basis = 'hour';
CREATE INDEX saas_contract_hours_ended ON saas_contract_hours (term_end)
    WHERE basis = 'term' AND term_end <> -1;
CREATE INDEX saas_contract_hours_unused ON saas_contract_hours (hour) WHERE used = 0;
"""
# PostgreSQL is shared by a fleet, and a replica of the schema-4 sidecar still running during a
# rollout never looks at the schema version again: while it leads, its seal would bill every
# unit of a contract dimension (it knows no contract) and explain nothing. Its seals are refused
# instead (the error logged by its seal pass, retried; sealing waits until a replica of this
# sidecar leads): every session of this sidecar sets `sidecar.contract_seal`
# (pgstore.SESSION_OPTIONS). Its intake is left alone: usage it accepts is sealed by the new
# code. Created first: CREATE TRIGGER waits for an old seal already writing the outbox, which
# commits as the hours sealed before the upgrade did, and no later one slips past it. Triggers
# fire in name order: schema 3's first, so an older sidecar still hears about micro-units.
_GUARD_V5_POSTGRESQL = """
CREATE FUNCTION saas_contract_seal_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('sidecar.contract_seal', true) IS DISTINCT FROM 'net' THEN
        RAISE EXCEPTION USING MESSAGE = 'this usage database bills contract dimensions net of '
            || 'the contract (schema 5): a sidecar older than that must not seal hours in it; '
            || 'upgrade every replica';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER saas_outbox_v5_seal_guard BEFORE INSERT ON saas_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION saas_contract_seal_guard();
"""
MIGRATION_5 = (MIGRATION_5_DDL, _GUARD_V5_POSTGRESQL + MIGRATION_5_DDL)
NO_TERM = -1.0
KEEP_SECONDS = 62 * 86400.0  # a seller explains last month's invoice from these rows


def prune(db: Db, now: float, unused_seconds: float) -> None:
    """Drop explanations older than KEEP_SECONDS: hourly ones by their hour, a pool's once its
    term ended that long ago (before, the pool still draws on them); those of hours without
    usage (zero records: nothing billed, nothing drawn) after `unused_seconds`, with the outbox's
    record, so an idle fleet does not keep a row per customer and hour for two months."""
    db.execute(
        "DELETE FROM saas_contract_hours WHERE used = 0 AND hour < ?",
        (hour_of(now - unused_seconds),),
    )
    db.execute(
        "DELETE FROM saas_contract_hours WHERE basis = 'hour' AND hour < ?",
        (hour_of(now - KEEP_SECONDS),),
    )
    db.execute(
        "DELETE FROM saas_contract_hours WHERE basis = 'term' AND term_end <> -1 AND term_end < ?",
        (now - KEEP_SECONDS,),
    )


CHUNK = 500  # customers per IN list
HOUR_COLUMNS = (
    "customer",
    "dimension",
    "hour",
    "basis",
    "used",
    "entitled",
    "covered",
    "billed",
    "term_end",
    "why",
    "sealed_at",
)


def _entitlements(db: Db, customers: Sequence[str]) -> dict[str, list[Entitlement]]:
    """Each customer's entitlements as stored; a customer GetEntitlements never answered for is
    absent. Its subjects (its account; 'ci:' and its CustomerIdentifier) hold the same contract:
    the one read last counts, they are never added up. One query per CHUNK customers."""
    found: dict[str, tuple[float, str]] = {}
    rows: dict[tuple[str, str], list[Entitlement]] = {}
    for i in range(0, len(customers), CHUNK):
        chunk = customers[i : i + CHUNK]
        marks = ", ".join(["?"] * len(chunk))
        # Two equality joins, not one OR: each can use saas_lifecycle's key.
        for c, subject, at, d, v, e, k in db.execute(
            "SELECT c.customer, l.subject, l.entitlements_at, e.dimension, e.value, "  # noqa: S608  # nosec B608 # placeholders only; values are bound
            "e.expiration, e.kind FROM saas_customers c JOIN saas_lifecycle l "
            "ON l.subject = c.account_id "
            "LEFT JOIN saas_entitlements e ON e.subject = l.subject "
            f"WHERE l.entitlements_at IS NOT NULL AND c.customer IN ({marks}) "
            "UNION ALL SELECT c.customer, l.subject, l.entitlements_at, e.dimension, e.value, "
            "e.expiration, e.kind FROM saas_customers c JOIN saas_lifecycle l "
            "ON l.subject = 'ci:' || c.customer_identifier "
            "LEFT JOIN saas_entitlements e ON e.subject = l.subject "
            f"WHERE l.entitlements_at IS NOT NULL AND c.customer IN ({marks})",
            [*chunk, *chunk],
        ):
            customer, subject, learned = str(c), str(subject), float(at)
            best = found.get(customer)
            if best is None or (learned, best[1]) > (best[0], subject):  # newest; then smallest
                found[customer] = (learned, subject)
            listed = rows.setdefault((customer, subject), [])
            if d is not None:
                listed.append(
                    Entitlement(str(d), value_of(str(v), None if k is None else str(k)), _float(e))
                )
    return {c: rows[(c, subject)] for c, (_, subject) in found.items()}


def _drawn(db: Db, customers: Sequence[str], hour: int) -> dict[tuple[str, str, float], int]:
    """What each term pool of these customers covered in the hours sealed before."""
    out: dict[tuple[str, str, float], int] = {}
    for i in range(0, len(customers), CHUNK):
        chunk = customers[i : i + CHUNK]
        for c, d, end, n in db.execute(
            "SELECT customer, dimension, term_end, SUM(covered) FROM saas_contract_hours "  # noqa: S608  # nosec B608 # placeholders only; values are bound
            "WHERE basis = 'term' AND hour <> ? AND customer IN ("
            + ", ".join(["?"] * len(chunk))
            + ") GROUP BY customer, dimension, term_end",
            [hour, *chunk],
        ):
            out[(str(c), str(d), float(end))] = int(n or 0)
    return out


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def value_of(stored: str, kind: str | None) -> int | Decimal | bool | str | None:
    """A stored value (JSON) as overage.Entitlement takes it: a DoubleValue as an exact Decimal.
    Learned before schema 5 (kind NULL): a decimal text is taken as the DoubleValue it was
    stored from (entitlement.exact_value), a StringValue on a quantity dimension being unlikely."""
    value = json.loads(stored)
    if isinstance(value, str) and kind in ("double", None):
        try:
            number = Decimal(value)
        except InvalidOperation:
            return value
        return number if number.is_finite() else value
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    return None


def charge_hour(
    db: Db,
    contract: Mapping[str, Basis],
    hour: int,
    used: Mapping[tuple[str, str], int],
    now: float,
) -> dict[tuple[str, str], int]:
    """The quantity to seal for each (customer, dimension) of `hour` whose usage totals
    `used[...]`: the part its contract does not cover for a contract dimension, else all of it.
    For each contract dimension the row that explains it is written, in the caller's sealing
    transaction, before the outbox rows; an hour already explained keeps its row (its record is
    never resealed)."""
    out = dict(used)
    keys = sorted(k for k in used if contract.get(k[1], Basis.ALL) is not Basis.ALL)
    if not keys:
        return out
    customers = sorted({c for c, _ in keys})
    book = _entitlements(db, customers)
    drawn = _drawn(db, customers, hour) if any(contract[d] is Basis.TERM for _, d in keys) else {}
    rows = []
    for customer, dimension in keys:
        basis = contract[dimension]
        ents = book.get(customer)
        entitled = None if ents is None else entitled_micros(ents, dimension, hour)
        term_end = NO_TERM
        before = 0
        if basis is Basis.TERM and entitled is not None and ents is not None:
            term_end = _term_end(ents, dimension, hour)
            before = drawn.get((customer, dimension, term_end), 0)
        total = used[(customer, dimension)]
        got: Billable = billable(total, entitled, basis, used_before_micros=before)
        out[(customer, dimension)] = got.quantity_micros
        rows.append(
            (
                customer,
                dimension,
                hour,
                basis.value,
                total,
                None if entitled is None else str(entitled),
                got.covered_micros,
                got.quantity_micros,
                term_end,
                NEVER_READ if ents is None else got.why,
                now,
            )
        )
    insert_new(db, "saas_contract_hours", HOUR_COLUMNS, "customer, dimension, hour", rows)
    return out


def _term_end(ents: list[Entitlement], dimension: str, hour: int) -> float:
    """The pool's term: the latest expiration among the entitlements valid at the hour (a
    renewal has a new expiration, so a new pool; an amendment keeps it). NO_TERM: none."""
    ends = [
        e.expiration
        for e in ents
        if e.dimension == dimension and entitled_micros([e], dimension, hour) is not None
    ]
    known = [e for e in ends if e is not None]
    return max(known) if known and len(known) == len(ends) else NO_TERM


def explain(row: tuple[Any, ...]) -> dict[str, Any]:
    """One saas_contract_hours row (basis .. why) as GET /v1/usage and the customer show it."""
    basis, used, entitled, covered, billed, term_end, why = row
    return {
        "basis": str(basis),
        "used": qty.to_json(int(used)),
        "entitled": None if entitled is None else qty.to_json(int(entitled)),
        "covered": qty.to_json(int(covered)),
        "billed": qty.to_json(int(billed)),
        "term_end": None if float(term_end) == NO_TERM else iso(float(term_end)),
        "why": str(why),
    }


def customer_hours(db: Db, customer: str, limit: int = 48) -> list[dict[str, Any]]:
    """The customer's newest contract hours (GET /v1/customers/{id})."""
    return [
        {"dimension": str(r[0]), "hour": iso_hour(int(r[1])), **explain(tuple(r[2:]))}
        for r in db.execute(
            "SELECT dimension, hour, basis, used, entitled, covered, billed, term_end, why "
            "FROM saas_contract_hours WHERE customer = ? ORDER BY hour DESC, dimension LIMIT ?",
            (customer, limit),
        )
    ]
