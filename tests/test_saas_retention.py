"""The lifecycle tables are pruned by the leader's prune pass (docs/saas-lifecycle.md#retention):
events past SQS's longest redelivery (each buyer's newest kept), change-feed rows past their
horizon (an older cursor is told to resynchronise), dead letters by age and count. SQLite and a
real PostgreSQL; the clock is a ManualClock moved by days."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.usage import saas_events
from sidecar.usage.db import UsageStore, open_store
from sidecar.usage.saas import SAAS_SCHEMA, SaasService
from tests.helpers import ManualClock
from tests.saas_fixtures import saas_clock
from tests.test_saas_ledger import account
from tests.test_saas_lifecycle import eb, sns
from tests.test_saas_service import Aws, make_service

DAY = 86400.0
# The retention docs/saas-lifecycle.md#retention states (saas_events' constants).
EVENTS_KEEP = CHANGES_KEEP = 30 * DAY
DEAD_LETTERS_KEEP, DEAD_LETTERS_MAX = 90 * DAY, 1000


clock = saas_clock  # the SaaS hour clock (tests/saas_fixtures.py); `backend` is there too


def agreement(kind: str, i: int, name: str, t: float, eid: str) -> str:
    doc = json.loads(eb(kind, i, t, eid=eid))
    doc["detail"]["agreement"]["id"] = name
    return json.dumps(doc)


def ids(svc: SaasService, table: str) -> set[str]:
    rows = svc.store.read(lambda db: db.execute(f"SELECT id FROM {table}").fetchall())  # noqa: S608  # nosec B608 # test table names
    return {str(r[0]) for r in rows}


def state_of(svc: SaasService, i: int) -> tuple[str, str]:
    row = svc.store.read(
        lambda db: db.execute(
            "SELECT state, agreement_id FROM saas_lifecycle WHERE subject = ?", (account(i),)
        ).fetchone()
    )
    return str(row[0]), str(row[1])


def test_old_events_go_each_buyers_newest_and_recent_ones_stay(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """Every event id was kept for good: `saas_events` grew by one row per event for the life
    of the product. Kept: the last EVENTS_KEEP seconds (SQS redelivers for up to 14 days) and
    each buyer's newest event."""
    svc = make_service(backend(), Aws(clock), clock)
    t0 = clock.t
    assert svc.handle_message("m1", agreement("Purchase Agreement Created", 1, "a1", t0, "e1"))
    assert svc.handle_message("m2", agreement("Purchase Agreement Amended", 1, "a1", t0 + 60, "e2"))
    assert svc.handle_message("m3", agreement("Purchase Agreement Created", 2, "a2", t0, "e3"))
    clock.t += EVENTS_KEEP - DAY  # inside the window: nothing goes
    svc.tick()
    assert ids(svc, "saas_events") == {"e1", "e2", "e3"}
    clock.t += 2 * DAY
    assert svc.handle_message("m4", agreement("Purchase Agreement Created", 3, "a3", clock.t, "e4"))
    svc.tick()
    # e1: buyer 1's older event, past the window. e2 and e3: each buyer's newest, kept.
    assert ids(svc, "saas_events") == {"e2", "e3", "e4"}
    assert state_of(svc, 1) == ("subscribed", "a1")


def test_a_redelivery_inside_the_window_is_still_a_duplicate(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    svc = make_service(backend(), Aws(clock), clock)
    created = agreement("Purchase Agreement Created", 1, "a1", clock.t, "e1")
    assert svc.handle_message("m1", created) == "applied"
    ended = agreement("Purchase Agreement Ended", 1, "a1", clock.t + 60, "e2")
    assert svc.handle_message("m2", ended) == "applied"
    clock.t += 14 * DAY + 3600  # SQS's longest retention, and EventBridge's day of retries
    svc.tick()
    assert svc.handle_message("m1", created) == "duplicate"
    assert svc.handle_message("m2", ended) == "duplicate"
    clock.t += EVENTS_KEEP
    svc.tick()
    assert ids(svc, "saas_events") == {"e2"}  # the newest stays for good
    assert svc.handle_message("m2", ended) == "duplicate"
    # A pruned event sent again by hand (no queue keeps one this long) is older than the state
    # it helped set: it changes nothing.
    assert svc.handle_message("m1", created) == "stale"
    assert state_of(svc, 1) == ("pending_unsubscribe", "a1")


@pytest.mark.parametrize("ended_first", [True, False])
def test_the_renewal_rule_still_works_after_pruning(
    backend: Callable[[], UsageStore], clock: ManualClock, ended_first: bool
) -> None:
    """The renewal rule reads the buyer's row (agreement, state time), not old events: a
    renewal a year on keeps the buyer subscribed though the creation it renews is pruned."""
    svc = make_service(backend(), Aws(clock), clock)
    t0 = clock.t
    svc.handle_message("c", agreement("Purchase Agreement Created", 1, "agmt-old", t0, "c-old"))
    svc.handle_message("a", agreement("Purchase Agreement Amended", 1, "agmt-old", t0 + 9, "am"))
    clock.t += 365 * DAY
    svc.tick()
    assert "c-old" not in ids(svc, "saas_events")
    created = agreement("Purchase Agreement Created", 1, "agmt-new", clock.t, "c-new")
    ended = agreement("Purchase Agreement Ended", 1, "agmt-old", clock.t, "e-old")
    for mid, text in [("e", ended), ("n", created)][:: 1 if ended_first else -1]:
        svc.handle_message(mid, text)
    assert state_of(svc, 1) == ("subscribed", "agmt-new")


def feed(svc: SaasService, since: int) -> tuple[int, dict[str, Any]]:
    return svc.changes(since, 0)


def test_a_cursor_older_than_the_feed_keeps_is_told_to_resynchronise(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """Change-feed rows were never pruned. Pruned now past CHANGES_KEEP, a cursor from before
    is answered 410 `cursor_expired` with the cursor to go on from after listing every
    customer: never a 200 that silently skips the pruned changes."""
    svc = make_service(backend(), Aws(clock), clock)
    svc.handle_message("1", agreement("Purchase Agreement Created", 1, "a1", clock.t, "e1"))
    first = int(feed(svc, 0)[1]["cursor"])
    svc.handle_message("2", agreement("Purchase Agreement Created", 2, "a2", clock.t, "e2"))
    old = int(feed(svc, first)[1]["cursor"])
    clock.t += CHANGES_KEEP + DAY
    svc.handle_message("3", agreement("Purchase Agreement Created", 3, "a3", clock.t, "e3"))
    assert [c["subject"] for c in feed(svc, 0)[1]["changes"]] == [account(i) for i in (1, 2, 3)]
    svc.tick()
    for since in (0, first, old - 1):
        status, doc = feed(svc, since)
        assert status == 410, doc
        assert doc["error"] == "cursor_expired" and doc["field"] == "since"
        assert "GET /v1/customers" in doc["message"]
        resume = int(doc["cursor"])
    # The cursor of the last change kept before the horizon has seen everything pruned.
    status, doc = feed(svc, old)
    assert status == 200 and [c["subject"] for c in doc["changes"]] == [account(3)]
    # The resync cursor is the newest: the list read after it plus the feed from it miss nothing.
    status, doc = feed(svc, resume)
    assert status == 200 and doc["changes"] == []
    svc.handle_message("4", agreement("Purchase Agreement Ended", 1, "a1", clock.t, "e4"))
    status, doc = feed(svc, resume)
    assert status == 200 and [c["subject"] for c in doc["changes"]] == [account(1)]
    # Pruned again a horizon later: the mark moves on, one row, never a second one.
    clock.t += CHANGES_KEEP + DAY
    svc.tick()
    assert feed(svc, resume)[0] == 410
    marks = svc.store.read(
        lambda db: db.execute("SELECT COUNT(*) FROM saas_changes WHERE subject = ''").fetchone()
    )
    assert int(marks[0]) == 1


def test_a_feed_never_pruned_answers_every_cursor(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    svc = make_service(backend(), Aws(clock), clock)
    svc.tick()
    assert feed(svc, 0) == (200, {"cursor": "0", "changes": []})
    svc.handle_message("1", agreement("Purchase Agreement Created", 1, "a1", clock.t, "e1"))
    clock.t += DAY
    svc.tick()
    assert [c["subject"] for c in feed(svc, 0)[1]["changes"]] == [account(1)]


def test_dead_letters_are_bounded_by_age_and_count(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    svc = make_service(backend(), Aws(clock), clock)
    old = clock.t
    svc.store.write(lambda db: saas_events.dead_letter(db, "old", "not json", "body", old))
    clock.t += DEAD_LETTERS_KEEP + DAY
    extra = 5
    svc.store.write(
        lambda db: [
            saas_events.dead_letter(db, f"d{n:05d}", "x", "body", clock.t + n)
            for n in range(DEAD_LETTERS_MAX + extra)
        ]
    )
    svc.tick()
    status, doc = svc.dead_letters(limit=1)
    assert status == 200 and doc["total"] == DEAD_LETTERS_MAX
    kept = ids(svc, "saas_dead_letters")
    assert "old" not in kept and not {f"d{n:05d}" for n in range(extra)} & kept  # the oldest
    assert f"d{DEAD_LETTERS_MAX + extra - 1:05d}" in kept  # the newest


def test_each_pass_prunes_a_bounded_batch(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """A first prune of a long history holds the writer for one batch per table, not all."""
    svc = make_service(backend(), Aws(clock), clock)
    for n in range(7):
        svc.handle_message(
            f"m{n}", agreement("Purchase Agreement Amended", 1, "a1", clock.t + n, f"e{n}")
        )
    clock.t += EVENTS_KEEP + DAY
    done = svc.store.write(lambda db: saas_events.prune(db, clock.t, batch=2))
    assert done == {"events": 2, "changes": 2, "dead_letters": 0}
    assert ids(svc, "saas_events") == {f"e{n}" for n in range(2, 7)}
    for _ in range(3):
        svc.store.write(lambda db: saas_events.prune(db, clock.t, batch=2))
    assert ids(svc, "saas_events") == {"e6"}
    assert feed(svc, 0)[0] == 410


def test_the_resync_answer_over_http_and_through_the_client(
    tmp_path: Path, clock: ManualClock
) -> None:
    """What a poller sees: a 410 in the API's problem shape naming `since`, with the cursor to
    go on from; the Python client raises CustomerError `cursor_expired`."""
    import requests
    from marketplace_sidecar_client import CustomerError, customer_changes

    from sidecar.server.api import API_LIMITS, LocalServer, Router

    svc = make_service(open_store(SAAS_SCHEMA, state_dir=tmp_path), Aws(clock), clock)
    svc.handle_message("1", agreement("Purchase Agreement Created", 1, "a1", clock.t, "e1"))
    clock.t += CHANGES_KEEP + DAY
    svc.handle_message("2", agreement("Purchase Agreement Created", 2, "a2", clock.t, "e2"))
    svc.tick()
    router = Router(None, lambda: None, saas=svc, readiness=lambda: (True, None))
    server = LocalServer(("127.0.0.1", 0), router, API_LIMITS, name="api")
    server.serve_in_thread("api")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        r = requests.get(f"{base}/v1/customers/changes?since=0", timeout=10)
        assert r.status_code == 410, r.text
        doc = r.json()
        assert doc["error"]["code"] == "cursor_expired" and doc["error"]["field"] == "since"
        with pytest.raises(CustomerError) as expired:
            customer_changes("0", url=base)
        assert expired.value.reason == "cursor_expired"
        assert doc["cursor"] in str(expired.value)
        page = customer_changes(doc["cursor"], url=base)
        assert page["changes"] == [] and page["cursor"] == doc["cursor"]
    finally:
        server.shutdown()
        server.server_close()
        svc.store.close()


def test_a_late_unsubscribe_pending_does_not_reopen_a_departure_before_a_pruned_subscribe(
    backend: Callable[[], UsageStore], clock: ManualClock
) -> None:
    """An `unsubscribe-pending` applied late (its dead letter sent again by hand, as the docs
    advise) moves the final window back to its time only if no subscribe came between: that
    check reads the buyer's subscribe events. Pruned with the rest, the check passed, and the
    buyer who left now got a final window that closed 40 days ago (usage refused at once)."""
    svc = make_service(backend(), Aws(clock), clock)
    t0 = clock.t
    assert svc.handle_message("s1", sns("subscribe-success", "cust-9", t0, eid="e1"))
    late = sns("unsubscribe-pending", "cust-9", t0 + 100, eid="e2")  # dead-lettered back then
    assert svc.handle_message("s3", sns("subscribe-success", "cust-9", t0 + 200, eid="e3"))
    clock.t += 40 * DAY
    now = clock.t
    assert svc.handle_message("s4", sns("unsubscribe-pending", "cust-9", now, eid="e4"))
    svc.tick()
    assert "e1" not in ids(svc, "saas_events")  # pruning went on
    assert svc.handle_message("s2", late) == "stale"
    row = svc.store.read(
        lambda db: db.execute(
            "SELECT left_at, final_window_end FROM saas_lifecycle WHERE subject = 'ci:cust-9'"
        ).fetchone()
    )
    assert (float(row[0]), float(row[1])) == (now + 0.123, now + 0.123 + 3600.0)  # SNS: ms
