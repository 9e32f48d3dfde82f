"""The SaaS lifecycle in the store (schema 4): events applied once, customer states, entitlements,
the change feed, dead letters, the final-window seal. Pure apart from the `Db`; every function runs
inside one store transaction, the same statements on SQLite and PostgreSQL.

Why each event is applied once by a fleet: its id is the primary key of `saas_events`, inserted
first in the transaction that applies it (ON CONFLICT DO NOTHING RETURNING): a replica that
receives it again (SQS redelivers, EventBridge and SNS deliver twice) finds it taken and changes
nothing. Ids are kept EVENTS_KEEP, past any redelivery, and each subject's newest for good
(`prune`). Out of order: each subject keeps the time of the event that set its state; an older one
never overrides a newer state (`lifecycle.newer`).

Why the change cursor never skips a change: every transaction that appends to `saas_changes`
takes CHANGES_LOCK first (exclusive, to its end), so the sequence numbers commit in order; a
reader that saw seq N never later finds a smaller one committed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.usage import lifecycle, saas_contract
from sidecar.usage.db import Db, Lock
from sidecar.usage.hours import hour_of, iso
from sidecar.usage.lifecycle import Event
from sidecar.usage.store import dumps

if TYPE_CHECKING:
    from sidecar.usage.saas_ledger import SealSpec

CHANGES_LOCK = 0x5AA50014
# Declared to the store (taken first, in key order, with every other lock of the transaction:
# no deadlock with intake's locks in a group commit).
CHANGES_LOCKS: tuple[Lock, ...] = ((CHANGES_LOCK, True),)
DEAD_LETTER_MAX = 64 * 1024  # characters of a poison message's body kept
# The final window's last minutes are kept for sending: usage is refused from then on, and the
# customer's remaining open usage is sealed then (docs/saas-lifecycle.md).
FINAL_MARGIN = 600.0
LEFT_STATES = ("pending_unsubscribe", "unsubscribed", "subscribe_failed")
NO_EVENT = "GetEntitlements"  # `last_event` of a row no lifecycle event has set yet
# How much earlier than the end of an agreement the creation of the one replacing it may be
# dated and still win over it (a renewal's two events are sent together).
RENEWAL_SKEW = 3600.0
# `saas_events.outcome` of an event applied whose GetEntitlements answer is not stored yet.
REFRESH_DUE = "refresh_due"
# A read still failing this long after its event is retried no more (a week of
# `saas_entitlements_still_due` warnings went before).
REFRESH_GIVE_UP = 7 * 86400.0
FIRST_READ_GRACE = 60.0  # a resolve's own read is left alone this long
# Retention (docs/saas-lifecycle.md#retention), pruned by the leader's prune pass (`prune`).
# An event's id must outlive every redelivery of its message: SQS keeps a message at most
# 14 days (MessageRetentionPeriod, 60 s to 1,209,600 s) and EventBridge retries a target at
# most 24 h (MaximumEventAgeInSeconds <= 86,400); 30 days leaves room for clocks and outages.
EVENTS_KEEP = 30 * 86400.0
CHANGES_KEEP = 30 * 86400.0  # change-feed rows; an older cursor is told to resynchronise
DEAD_LETTERS_KEEP = 90 * 86400.0  # and at most DEAD_LETTERS_MAX, the newest
DEAD_LETTERS_MAX = 1000  # 64 KiB bodies: at most ~64 MiB
PRUNE_BATCH = 5000  # rows of each table per prune pass (one transaction)
# `saas_changes.subject` of the row left in place of the newest pruned one: its seq is the
# cursor below which changes are no longer kept (no account id or 'ci:' subject is empty).
PRUNED = ""

_COMMON = """
-- One row per buyer the lifecycle events name (`subject`: the account id, or 'ci:' and the
-- CustomerIdentifier for the SNS topics). state_time: the time of the event that set `state`.
CREATE TABLE saas_lifecycle (
    subject TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    state_time DOUBLE PRECISION NOT NULL,
    event_time DOUBLE PRECISION NOT NULL,
    left_at DOUBLE PRECISION,
    final_window_end DOUBLE PRECISION,
    agreement_id TEXT,
    license_arn TEXT,
    product_code TEXT,
    offer_id TEXT,
    free_trial INTEGER,
    last_event TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    entitlements_at DOUBLE PRECISION
);
-- Every event applied, by its id: the same id again changes nothing.
CREATE TABLE saas_events (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    event_time DOUBLE PRECISION NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX saas_events_by_applied ON saas_events (applied_at);
-- Messages that could not be parsed: kept (body capped), never lost, never retried.
CREATE TABLE saas_dead_letters (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    error TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL
);
-- The contract's entitlements, as GetEntitlements last answered for the subject.
CREATE TABLE saas_entitlements (
    subject TEXT NOT NULL,
    dimension TEXT NOT NULL,
    value TEXT NOT NULL,
    expiration DOUBLE PRECISION,
    learned_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (subject, dimension)
);
-- Hours of one customer sealed early (final window): its later usage goes to the next hour.
CREATE TABLE saas_customer_seals (
    customer TEXT NOT NULL,
    hour BIGINT NOT NULL,
    sealed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (customer, hour)
);
"""
MIGRATION_4 = (
    _COMMON
    + "CREATE TABLE saas_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, subject TEXT NOT NULL, "
    "at DOUBLE PRECISION NOT NULL);\n",
    _COMMON + "CREATE TABLE saas_changes (seq BIGSERIAL PRIMARY KEY, subject TEXT NOT NULL, "
    "at DOUBLE PRECISION NOT NULL);\n",
)


@dataclass(frozen=True)
class Applied:
    """What applying one event did."""

    duplicate: bool = False  # its id was applied before (by any replica)
    changed: bool = False  # the subject's state or facts changed
    stale: bool = False  # older than the state known: facts kept, state untouched
    refresh: bool = False  # GetEntitlements is due for the subject
    final: bool = False  # a final metering window opened


def apply(db: Db, event: Event, now: float) -> Applied:
    """Apply one parsed event, once for the fleet."""
    db.lock(CHANGES_LOCK)
    took = db.execute(
        "INSERT INTO saas_events (id, kind, subject, event_time, applied_at, outcome) "
        "VALUES (?, ?, ?, ?, ?, 'applied') ON CONFLICT (id) DO NOTHING RETURNING id",
        (event.id, event.kind, event.subject, event.time, now),
    ).fetchone()
    if took is None:
        # A redelivery after a crash between this event's commit and its GetEntitlements (or
        # a read that failed): the read is still due, whoever applied the event.
        due = db.execute("SELECT outcome FROM saas_events WHERE id = ?", (event.id,)).fetchone()
        return Applied(duplicate=True, refresh=due is not None and due[0] == REFRESH_DUE)
    row = db.execute(
        "SELECT state, state_time, event_time, agreement_id FROM saas_lifecycle WHERE subject = ?",
        (event.subject,),
    ).fetchone()
    target = event.state
    known_state = None if row is None else str(row[0])
    known_time = None if row is None else float(row[1])
    moves = target is not None and lifecycle.newer(event.time, target, known_time, known_state)
    facts_newer = row is None or event.time >= float(row[2])
    other = (
        row is not None
        and row[3] is not None
        and event.agreement_id is not None
        and event.agreement_id != str(row[3])
    )
    if (
        other
        and event.kind == "ended"
        and known_state == "subscribed"
        and known_time is not None
        and event.time <= known_time + RENEWAL_SKEW
    ):
        # A renewal or replacement: AWS sends `Created` for the new agreement and `Ended` for
        # the one it replaces, at the same second or nearly, in either order. The buyer's
        # current agreement is another one: this end changes neither its state nor its facts.
        # Only near that creation: a later end of another agreement is a departure (the
        # cancellation of a renewal whose own events come after it; SQS keeps no order).
        moves = facts_newer = False
    elif (
        other
        and event.kind == "created"
        and known_state == "pending_unsubscribe"
        and known_time is not None
        and event.time >= known_time - RENEWAL_SKEW
    ):
        # The same pair, the end applied first: the new agreement's creation wins.
        moves = facts_newer = True
    if row is None:
        # An amendment or license update implies a contract, but dates no state: time 0 lets
        # any state event (an Ended delivered late among them) set it.
        state = target or "subscribed"
        db.execute(
            "INSERT INTO saas_lifecycle (subject, state, state_time, event_time, agreement_id, "
            "license_arn, product_code, offer_id, free_trial, last_event, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event.subject,
                state,
                event.time if target else 0.0,
                event.time,
                event.agreement_id,
                event.license_arn,
                event.product_code,
                event.offer_id,
                event.free_trial,
                event.detail_type,
                now,
            ),
        )
    elif facts_newer:
        db.execute(
            "UPDATE saas_lifecycle SET event_time = ?, agreement_id = COALESCE(?, agreement_id), "
            "license_arn = COALESCE(?, license_arn), product_code = COALESCE(?, product_code), "
            "offer_id = COALESCE(?, offer_id), free_trial = COALESCE(?, free_trial), "
            "last_event = ?, updated_at = ? WHERE subject = ?",
            (
                event.time,
                event.agreement_id,
                event.license_arn,
                event.product_code,
                event.offer_id,
                event.free_trial,
                event.detail_type,
                now,
                event.subject,
            ),
        )
    if moves and target is not None:
        _move(db, event, target, now)
    earlier = row is not None and not moves and _window_from_pending(db, event, now)
    stale = row is not None and not moves and not facts_newer and not earlier
    if stale:
        db.execute("UPDATE saas_events SET outcome = 'stale' WHERE id = ?", (event.id,))
    changed = row is None or moves or facts_newer or earlier
    if changed:
        db.execute("INSERT INTO saas_changes (subject, at) VALUES (?, ?)", (event.subject, now))
    refresh = event.kind in lifecycle.REFRESH and not stale and target != "unsubscribed"
    if refresh:
        # Done only when GetEntitlements' answer is stored (`set_entitlements`): a failed read,
        # or a crash before it, leaves it due (`due_refreshes`), never forgotten.
        db.execute("UPDATE saas_events SET outcome = ? WHERE id = ?", (REFRESH_DUE, event.id))
    return Applied(
        changed=changed,
        stale=stale,
        refresh=refresh,
        final=(moves and event.kind in lifecycle.FINAL) or earlier,
    )


def _window_from_pending(db: Db, event: Event, now: float) -> bool:
    """An unsubscribe-pending delivered after its unsubscribe-success (SQS keeps no order):
    too old to set the state, but the final window counts from it (AWS's, which closes an hour
    after it), not from the success. Only for the same departure: no subscription between."""
    if event.kind != "unsubscribe_pending" or event.time < now - EVENTS_KEEP:
        # Older than the events kept: a subscribe between it and the departure may have been
        # pruned (`prune`), so the check below could not see it; its window is long over.
        return False
    end = event.time + lifecycle.FINAL_WINDOW
    return (
        db.execute(
            "UPDATE saas_lifecycle SET left_at = ?, final_window_end = ?, updated_at = ? "
            "WHERE subject = ? AND state IN ('pending_unsubscribe', 'unsubscribed') "
            "AND left_at > ? AND NOT EXISTS (SELECT 1 FROM saas_events e "
            "WHERE e.subject = saas_lifecycle.subject "
            "AND e.kind IN ('created', 'subscribe_success') "
            "AND e.event_time > ? AND e.event_time <= saas_lifecycle.left_at) RETURNING subject",
            (event.time, end, now, event.subject, event.time, event.time),
        ).fetchone()
        is not None
    )


def _move(db: Db, event: Event, state: str, now: float) -> None:
    if state == "subscribed":  # (re)subscribed: no window, no departure
        db.execute(
            "UPDATE saas_lifecycle SET state = ?, state_time = ?, left_at = NULL, "
            "final_window_end = NULL, left_license = NULL, updated_at = ? WHERE subject = ?",
            (state, event.time, now, event.subject),
        )
    elif event.kind == "unsubscribe_success":  # the window of unsubscribe-pending, if seen
        end = event.time + lifecycle.FINAL_WINDOW
        db.execute(
            "UPDATE saas_lifecycle SET state = ?, state_time = ?, left_at = COALESCE(left_at, ?), "
            "final_window_end = COALESCE(final_window_end, ?), updated_at = ? WHERE subject = ?",
            (state, event.time, event.time, end, now, event.subject),
        )
    elif event.kind in lifecycle.FINAL:
        # The license it names leaves (`left_license`), or the whole subject when it names
        # none; a second license leaving while one is gone: both, so the whole subject.
        end, gone = event.time + lifecycle.FINAL_WINDOW, lifecycle.license_id(event.license_arn)
        db.execute(
            "UPDATE saas_lifecycle SET left_license = CASE WHEN left_at IS NOT NULL "
            "AND state IN ('pending_unsubscribe', 'unsubscribed') "
            "AND (left_license IS NULL OR left_license <> ?) THEN NULL ELSE ? END, "
            "state = ?, state_time = ?, left_at = ?, final_window_end = ?, updated_at = ? "
            "WHERE subject = ?",
            (gone, gone, state, event.time, event.time, end, now, event.subject),
        )
    elif state == "subscribe_failed":
        # Never subscribed: nothing to meter; usage is refused from now on.
        db.execute(
            "UPDATE saas_lifecycle SET state = ?, state_time = ?, "
            "left_at = COALESCE(left_at, ?), final_window_end = COALESCE(final_window_end, ?), "
            "updated_at = ? WHERE subject = ?",
            (state, event.time, event.time, event.time, now, event.subject),
        )
    else:  # pending_unsubscribe from an agreement's end: metering goes on until deprovisioning
        db.execute(
            "UPDATE saas_lifecycle SET state = ?, state_time = ?, updated_at = ? WHERE subject = ?",
            (state, event.time, now, event.subject),
        )


def dead_letter(db: Db, message_id: str, body: str, error: str, now: float) -> bool:
    """Keep a message that could not be parsed (once per SQS message id)."""
    took = db.execute(
        "INSERT INTO saas_dead_letters (id, body, bytes, error, received_at) VALUES "
        "(?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING RETURNING id",
        (message_id, body[:DEAD_LETTER_MAX], len(body.encode()), error[:500], now),
    ).fetchone()
    return took is not None


def dead_letters(db: Db, limit: int = 20, offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
    """The dead letters kept, newest first (without their bodies: `dead_letter_of` has it)."""
    total = db.execute("SELECT COUNT(*) FROM saas_dead_letters").fetchone()
    # The body is read only where it may have been cut (to compare its size with `bytes`).
    rows = db.execute(
        "SELECT id, bytes, error, received_at, CASE WHEN LENGTH(body) >= ? THEN body END "
        "FROM saas_dead_letters ORDER BY received_at DESC, id LIMIT ? OFFSET ?",
        (DEAD_LETTER_MAX, limit, offset),
    ).fetchall()
    return int(total[0]) if total else 0, [_letter(r) for r in rows]


def dead_letter_of(db: Db, message_id: str) -> dict[str, Any] | None:
    """One dead letter by its SQS message id, with the body as kept (up to DEAD_LETTER_MAX
    characters: `truncated` says whether that is all of it)."""
    row = db.execute(
        "SELECT id, bytes, error, received_at, body, body FROM saas_dead_letters WHERE id = ?",
        (message_id,),
    ).fetchone()
    return None if row is None else {**_letter(row), "body": str(row[5])}


def _letter(row: Sequence[Any]) -> dict[str, Any]:
    # A poison message is deleted from the queue once kept: it is seen once (a redelivery of
    # the same message id, after a failed delete, adds nothing), so `received_at` is when.
    return {
        "message_id": row[0],
        "bytes": int(row[1]),
        "reason": row[2],
        "received_at": iso(float(row[3])),
        # Cut at DEAD_LETTER_MAX characters: only a body kept that long can have been cut.
        "truncated": row[4] is not None and len(str(row[4]).encode()) < int(row[1]),
    }


def due_refreshes(db: Db, now: float, limit: int = 20) -> list[str]:
    """Subjects with an event whose GetEntitlements read is still due (it failed, or its
    process died before it), oldest first; events applied in the last REFRESH_GIVE_UP seconds
    only (the applied_at index bounds the scan over events kept EVENTS_KEEP). Then accounts
    resolved whose first read never answered."""
    due = [
        str(s)
        for (s,) in db.execute(
            "SELECT subject FROM saas_events WHERE applied_at >= ? AND outcome = ? "
            "GROUP BY subject ORDER BY MIN(applied_at) LIMIT ?",
            (now - REFRESH_GIVE_UP, REFRESH_DUE, limit),
        )
    ]
    # Buyers resolved whose first read (a thread at resolve) never stored an answer: their
    # contract would bill every unit. Not the last minute's: that read may be under way.
    return due + [
        str(a)
        for (a,) in db.execute(
            "SELECT c.account_id FROM saas_customers c LEFT JOIN saas_lifecycle l "
            "ON l.subject = c.account_id WHERE c.account_id IS NOT NULL "
            "AND l.entitlements_at IS NULL AND c.resolved_at >= ? AND c.resolved_at < ? "
            "GROUP BY c.account_id ORDER BY MIN(c.resolved_at) LIMIT ?",
            (now - REFRESH_GIVE_UP, now - FIRST_READ_GRACE, limit),
        )
        if str(a) not in due
    ]


def refresh_ids(db: Db, subject: str) -> list[str]:
    """The subject's events waiting for a read, taken before GetEntitlements is called: a read
    settles these only (an event applied meanwhile may be newer than the answer)."""
    return [
        str(i)
        for (i,) in db.execute(
            "SELECT id FROM saas_events WHERE subject = ? AND outcome = ?", (subject, REFRESH_DUE)
        )
    ]


def settle_refreshes(db: Db, ids: Sequence[str]) -> None:
    """These events' reads are done (answered, or there is no account to read for)."""
    for i in range(0, len(ids), 500):
        chunk = list(ids[i : i + 500])
        db.execute(
            "UPDATE saas_events SET outcome = 'applied' WHERE outcome = ? AND id IN ("  # noqa: S608  # nosec B608 # placeholders only; values are bound
            + ", ".join(["?"] * len(chunk))
            + ")",
            [REFRESH_DUE, *chunk],
        )


def set_entitlements(
    db: Db,
    subject: str,
    entitlements: Sequence[dict[str, Any]],
    now: float,
    done: Sequence[str] = (),
    read_at: float | None = None,
) -> bool:
    """Replace the subject's entitlements with GetEntitlements' answer; True if they changed.
    `done`: the events (`refresh_ids`) whose read this answer is. `read_at`: when the call
    was made (default `now`): an answer from a call made before the one stored last (a slow
    read, on any replica) is older news and replaces nothing."""
    db.lock(CHANGES_LOCK)
    read_at = now if read_at is None else read_at
    stored = db.execute(
        "SELECT entitlements_at FROM saas_lifecycle WHERE subject = ?", (subject,)
    ).fetchone()
    if stored is not None and stored[0] is not None and read_at < float(stored[0]) <= now:
        # `done` stays due: read again a minute later (`due_refreshes`), so a replica whose
        # clock runs behind another's cannot lose an event's read this way. A stored read
        # dated after `now` came from a clock running ahead of this one: which answer is
        # newer cannot be told, and this one (just taken) is stored, as before stamps were
        # compared; else that replica's one read would freeze the buyer's entitlements.
        return False
    settle_refreshes(db, done)
    before = {
        (str(d), str(v), None if e is None else float(e), None if k is None else str(k))
        for d, v, e, k in db.execute(
            "SELECT dimension, value, expiration, kind FROM saas_entitlements WHERE subject = ?",
            (subject,),
        )
    }
    # One value per dimension (a dimension listed twice: concurrent agreements, or a renewal
    # next to the term it replaces): the one that lasts longest (no expiration: for good), so
    # an expiring term kept instead of its renewal never leaves the dimension uncovered from
    # its expiry on; of equal ones the last listed (a set would follow the hash order).
    last: dict[str, tuple[str, str, Any, Any]] = {}
    for e in entitlements:
        dimension, expiration = str(e["dimension"]), e.get("expiration")
        kept = last.get(dimension)
        if kept is None or _lasting(expiration) >= _lasting(kept[2]):
            last[dimension] = (dimension, dumps(e["value"]), expiration, e.get("kind"))
    after = set(last.values())
    # A buyer seen first by resolving (no event yet): a row to hang the entitlements on, whose
    # time 0 lets any event set its state (`enrich` shows the resolved state meanwhile).
    db.execute(
        "INSERT INTO saas_lifecycle (subject, state, state_time, event_time, last_event, "
        "updated_at) VALUES (?, 'subscribed', 0, 0, ?, ?) ON CONFLICT (subject) DO NOTHING",
        (subject, NO_EVENT, now),
    )
    db.execute(
        "UPDATE saas_lifecycle SET entitlements_at = ? WHERE subject = ?", (read_at, subject)
    )
    if before == after:
        return False
    db.execute("DELETE FROM saas_entitlements WHERE subject = ?", (subject,))
    for dimension, value, expiration, kind in sorted(after, key=lambda t: t[0]):
        db.execute(
            "INSERT INTO saas_entitlements (subject, dimension, value, expiration, learned_at, "
            "kind) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (subject, dimension) DO UPDATE SET "
            "value = excluded.value, expiration = excluded.expiration, "
            "learned_at = excluded.learned_at, kind = excluded.kind",
            (subject, dimension, value, expiration, now, kind),
        )
    db.execute("INSERT INTO saas_changes (subject, at) VALUES (?, ?)", (subject, now))
    return True


def _lasting(expiration: Any) -> float:
    return float("inf") if expiration is None else float(expiration)


def subjects_of(account_id: str | None, customer_identifier: str | None) -> list[str]:
    out = [account_id] if account_id else []
    if customer_identifier:
        out.append(f"ci:{customer_identifier}")
    return out


def _subject_json(db: Db, subject: str) -> dict[str, Any] | None:
    row = db.execute(
        "SELECT state, state_time, left_at, final_window_end, agreement_id, license_arn, "
        "product_code, offer_id, free_trial, last_event, updated_at, entitlements_at, "
        "left_license FROM saas_lifecycle WHERE subject = ?",
        (subject,),
    ).fetchone()
    if row is None:
        return None
    return {
        "subject": subject,
        "state": row[0],
        "state_since": iso(float(row[1])),
        "left_at": None if row[2] is None else iso(float(row[2])),
        "final_window_end": None if row[3] is None else iso(float(row[3])),
        "left_license": row[12],
        "agreement_id": row[4],
        "license_arn": row[5],
        "product_code": row[6],
        "offer_id": row[7],
        "free_trial": None if row[8] is None else bool(row[8]),
        "last_event": row[9],
        "learned_at": iso(float(row[10])),
        "entitlements_learned_at": None if row[11] is None else iso(float(row[11])),
        "entitlements": [
            {
                "dimension": d,
                "value": json.loads(str(v)),
                "expiration": None if e is None else iso(float(e)),
                "learned_at": iso(float(at)),
            }
            for d, v, e, at in db.execute(
                "SELECT dimension, value, expiration, learned_at FROM saas_entitlements "
                "WHERE subject = ? ORDER BY dimension",
                (subject,),
            )
        ],
    }


def enrich(db: Db, customer: dict[str, Any]) -> dict[str, Any]:
    """A customer row (saas_ledger._customer_json) with what the lifecycle events told: the
    newest of its subjects' states, else what resolving and metering told."""
    found = [
        s
        for s in (
            _subject_json(db, subject)
            for subject in subjects_of(
                customer.get("customer_aws_account_id"), customer.get("customer_identifier")
            )
        )
        if s is not None
    ]
    found.sort(key=lambda s: s["state_since"], reverse=True)
    life = found[0] if found else None
    mine, gone = customer.get("license_arn"), (life or {}).get("left_license")
    if gone and mine and not str(mine).endswith(gone) and life and life["state"] in LEFT_STATES:
        # Another license of the account left (`license_left`): not this customer's state.
        state = "unsubscribed" if customer.get("state") == "not_subscribed" else "subscribed"
    elif life is not None and life["last_event"] != NO_EVENT:
        state = life["state"]
    else:
        state = "unsubscribed" if customer.get("state") == "not_subscribed" else "subscribed"
    return {
        **customer,
        "subscription": state,
        "lifecycle": life,
        "contract_hours": saas_contract.customer_hours(db, str(customer.get("customer", ""))),
        "agreement_id": customer.get("agreement_id") or (life or {}).get("agreement_id"),
    }


def changes(db: Db, since: int, limit: int = 200) -> tuple[int, list[dict[str, Any]]]:
    """Subjects changed after cursor `since` (the newest state of each), and the next cursor."""
    rows = db.execute(
        "SELECT seq, subject FROM saas_changes WHERE seq > ? ORDER BY seq LIMIT ?",
        (since, limit),
    ).fetchall()
    if not rows:
        top = db.execute("SELECT MAX(seq) FROM saas_changes").fetchone()
        last = int(top[0]) if top and top[0] is not None else 0
        return max(since, last) if since <= last else last, []
    out: dict[str, dict[str, Any]] = {}
    for seq, subject in rows:
        out.pop(str(subject), None)
        info = _subject_json(db, str(subject)) or {"subject": str(subject)}
        customers = [
            str(c)
            for (c,) in db.execute(
                "SELECT customer FROM saas_customers WHERE account_id = ? "
                "OR 'ci:' || customer_identifier = ? ORDER BY customer",
                (str(subject), str(subject)),
            )
        ]
        out[str(subject)] = {"seq": int(seq), **info, "customers": customers}
    return int(rows[-1][0]), list(out.values())


def pruned_through(db: Db) -> int | None:
    """The cursor at or below which changes were pruned (None: none were). A `since` below it
    may have missed changes: the reader must resynchronise, never be answered a gap."""
    row = db.execute("SELECT seq, subject FROM saas_changes ORDER BY seq LIMIT 1").fetchone()
    return int(row[0]) if row is not None and str(row[1]) == PRUNED else None


def changes_or_resync(db: Db, since: int) -> tuple[int | None, tuple[int, list[dict[str, Any]]]]:
    """(None, `changes`), or, when changes after `since` were pruned, (the cursor pruned
    through, (the newest cursor, [])): one snapshot, so that cursor misses nothing later."""
    pruned = pruned_through(db)
    if pruned is None or since >= pruned:
        return None, changes(db, since)
    top = db.execute("SELECT MAX(seq) FROM saas_changes").fetchone()
    return pruned, (int(top[0]) if top and top[0] is not None else pruned, [])


def prune(db: Db, now: float, batch: int = PRUNE_BATCH) -> dict[str, int]:
    """Leader only, inside the prune pass: at most `batch` rows of each table go -> rows
    deleted per table. Kept: every event applied in the last EVENTS_KEEP seconds (a
    redelivery is still a duplicate) and each subject's newest event (as new as its state's
    facts) for good; change-feed rows of the last CHANGES_KEEP seconds (a prefix of the
    cursor goes, its newest row left as the PRUNED mark); dead letters of the last
    DEAD_LETTERS_KEEP seconds, DEAD_LETTERS_MAX at most. Customer states and entitlements are
    one row per buyer and dimension: never pruned (a returning buyer's contract is read)."""
    events = db.execute(
        "DELETE FROM saas_events WHERE id IN (SELECT e.id FROM saas_events e "
        "JOIN saas_lifecycle l ON l.subject = e.subject "
        "WHERE e.applied_at < ? AND e.event_time < l.event_time ORDER BY e.applied_at LIMIT ?) "
        "RETURNING id",
        (now - EVENTS_KEEP, batch),
    ).fetchall()
    # The oldest rows by cursor, up to the first one still kept: `at` is each writer's clock,
    # so only a prefix goes and `pruned_through` is exact.
    through = None
    for seq, at in db.execute(
        "SELECT seq, at FROM saas_changes ORDER BY seq LIMIT ?", (batch + 1,)
    ).fetchall():
        if float(at) >= now - CHANGES_KEEP:
            break
        through = int(seq)
    changes = 0
    if through is not None:
        changes = len(
            db.execute(
                "DELETE FROM saas_changes WHERE seq < ? RETURNING seq", (through,)
            ).fetchall()
        )
        db.execute("UPDATE saas_changes SET subject = ? WHERE seq = ?", (PRUNED, through))
    letters = db.execute(
        "DELETE FROM saas_dead_letters WHERE id IN (SELECT id FROM saas_dead_letters "
        "WHERE received_at < ? ORDER BY received_at LIMIT ?) RETURNING id",
        (now - DEAD_LETTERS_KEEP, batch),
    ).fetchall()
    extra = db.execute(
        "DELETE FROM saas_dead_letters WHERE id IN (SELECT id FROM saas_dead_letters "
        "ORDER BY received_at DESC, id LIMIT ? OFFSET ?) RETURNING id",
        (batch, DEAD_LETTERS_MAX),
    ).fetchall()
    return {"events": len(events), "changes": changes, "dead_letters": len(letters) + len(extra)}


# -- metering follows the lifecycle -------------------------------------------------------


def license_left(c: str = "c") -> str:
    """A condition: the lifecycle row `l` speaks for customer `c` (saas_customers). A departure
    that named a license (`left_license`, its `l-...` id) only for that license's customers;
    one that named none, or a customer whose license is not known, for every customer of the
    subject, as the state itself does. One condition on the row already joined: no statement
    and no index more on intake's path. (A license id holds no `%` or `_`.)"""
    return (
        f"(l.left_license IS NULL OR {c}.license_arn IS NULL "
        f"OR {c}.license_arn LIKE '%' || l.left_license)"
    )


def refused(
    lives: Sequence[tuple[str, str, float, float | None]], now: float
) -> dict[str, tuple[str, float]]:
    """From (customer, state, state time, final window end) rows (several subjects may name one
    customer: the newest state counts): the customers whose final window has closed, less
    FINAL_MARGIN -> (state, window end). Usage for them is refused at intake."""
    newest: dict[str, tuple[str, float, float | None]] = {}
    for customer, state, at, end in lives:
        known = newest.get(customer)
        if known is None or at > known[1]:
            newest[customer] = (state, at, end)
    return {
        c: (state, end)
        for c, (state, _, end) in newest.items()
        if state in LEFT_STATES and end is not None and now >= end - FINAL_MARGIN
    }


def final_seal(db: Db, now: float, spec: SealSpec) -> list[tuple[str, int, int]]:
    """Leader only. Seal, for each customer inside a final window, its open usage at once (the
    open hour too, before that hour ends, unless the window's last pass falls in that same
    hour), and once more in the window's last FINAL_MARGIN for what came after:
    [(customer, hour, records)]. Takes SEAL_LOCK exclusively, as `seal` does,
    so no intake of that customer's hour is in flight (see `saas_ledger.ingest`)."""
    from sidecar.usage.saas_ledger import (
        SEAL_LOCK,
        open_totals,
        seal_records,
    )  # it imports this module

    db.lock(SEAL_LOCK)
    out: list[tuple[str, int, int]] = []
    rows = db.execute(
        "SELECT c.customer, l.left_at, l.final_window_end FROM saas_customers c "  # noqa: S608  # nosec B608 # constant text; values are bound
        "JOIN saas_lifecycle l ON (l.subject = c.account_id "
        "OR l.subject = 'ci:' || c.customer_identifier) AND " + license_left() + " "
        "WHERE l.final_window_end IS NOT NULL AND l.left_at IS NOT NULL "
        "AND (l.final_window_end > ? OR l.updated_at > ?) "
        "AND l.state IN ('pending_unsubscribe', 'unsubscribed') ORDER BY c.customer",
        # A window learned after it closed (the queue down for hours) is recent by when it was
        # learned: its buyer's open usage is still sealed at once.
        (now - 2 * lifecycle.FINAL_WINDOW, now - 2 * lifecycle.FINAL_WINDOW),
    ).fetchall()
    current = hour_of(now)
    for customer, left_at, end in rows:
        customer = str(customer)
        sealed_since = db.execute(
            "SELECT MAX(sealed_at) FROM saas_customer_seals WHERE customer = ?", (customer,)
        ).fetchone()
        first_done = (
            sealed_since
            and sealed_since[0] is not None
            and float(sealed_since[0]) >= float(left_at)
        )
        last_pass = float(end) - FINAL_MARGIN
        if first_done and now < last_pass:
            continue
        through = current
        if now < last_pass and hour_of(last_pass) == current:
            # The window's last pass falls in this very hour (the buyer left early in it):
            # sealed now, this hour's later usage would go to the next hour, which cannot be
            # sent before it starts (late in the window, or after it). The last pass seals it,
            # once intake for the buyer is closed.
            through = current - 1
        totals: dict[int, list[tuple[str, str, str, int]]] = {}  # with the tag sets' parts
        for dimension, hour, tags, quantity in db.execute(
            "SELECT dimension, hour, tags, quantity FROM saas_open WHERE customer = ? "
            "AND hour <= ? ORDER BY hour, dimension",
            (customer, through),
        ).fetchall():
            totals.setdefault(int(hour), []).append(
                (customer, str(dimension), str(tags), int(quantity))
            )
        if not totals and first_done:
            continue
        if not totals:  # nothing open: note the first pass so the second waits for its time
            totals = {}
            db.execute(
                "INSERT INTO saas_customer_seals (customer, hour, sealed_at) VALUES (?, ?, ?) "
                "ON CONFLICT (customer, hour) DO UPDATE SET sealed_at = excluded.sealed_at",
                (customer, -1, now),
            )
            continue
        for hour, dims in totals.items():
            used, parts = open_totals(dims)
            seal_records(db, hour, now, spec, used, parts=parts)
            db.execute("DELETE FROM saas_open WHERE customer = ? AND hour = ?", (customer, hour))
            db.execute(
                "INSERT INTO saas_customer_seals (customer, hour, sealed_at) VALUES (?, ?, ?) "
                "ON CONFLICT (customer, hour) DO UPDATE SET sealed_at = excluded.sealed_at",
                (customer, hour, now),
            )
            out.append((customer, hour, len(used)))
    return out


def left_customers_sql() -> str:
    """A condition on `saas_customers` (unaliased) true for customers who left before the
    hour whose end is the bound parameter: no zero-usage record for them."""
    return (
        "NOT EXISTS (SELECT 1 FROM saas_lifecycle l WHERE (l.subject = saas_customers.account_id "  # noqa: S608  # nosec B608 # constant text
        "OR l.subject = 'ci:' || saas_customers.customer_identifier) "
        "AND " + license_left("saas_customers") + " "
        "AND l.left_at IS NOT NULL AND l.left_at < ?)"
    )


def product_of(db: Db, subject: str) -> str | None:
    """The product code a license event named for the subject, if any."""
    row = db.execute(
        "SELECT product_code FROM saas_lifecycle WHERE subject = ?", (subject,)
    ).fetchone()
    return str(row[0]) if row and row[0] else None
