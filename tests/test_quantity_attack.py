"""Hostile quantities at the edges of what one record, one POST and one hour may hold.

Each test here failed on the code it was written against; the docstring says how.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.core import quantity as qty
from sidecar.usage import saas_ledger as L  # noqa: N812
from sidecar.usage.db import UsageStore, open_store
from sidecar.usage.saas import SAAS_SCHEMA
from sidecar.usage.validate import RejectedError
from tests.test_saas_intake import item, records
from tests.test_saas_ledger import DIMS, HP, T0, resolve


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UsageStore]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    s = open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url)
    yield s
    s.close()


def test_a_saas_post_summing_past_what_a_counter_holds_is_a_400_naming_the_record(
    store: UsageStore,
) -> None:
    """1,000 records of the largest quantity for one customer, dimension and hour add up to
    1e19 micro-units, more than a 64-bit column holds. The hour's sum was handed to the
    database before the range check: SQLite raised OverflowError (a 500 to a client mistake)
    and PostgreSQL `bigint out of range`. It is a 400 naming the second record, nothing kept."""
    resolve(store, range(1))
    now = T0 + 100
    recs = records(
        [{**item(0, DIMS[0], 1, id=f"big-{i}"), "quantity": qty.MAX_TEXT} for i in range(1000)], now
    )
    with pytest.raises(RejectedError) as caught:
        store.write(
            lambda db: L.ingest(db, recs, now, HP, accept_unresolved=False),
            locks=L.ingest_locks(recs),
        )
    assert caught.value.status == 400
    assert caught.value.problems[0].field == "records[1].quantity"
    assert qty.MAX_TEXT in caught.value.problems[0].message
    # Nothing of the POST was kept: the same ids with one record's worth are fresh.
    one = records([{**item(0, DIMS[0], 1, id="big-0"), "quantity": qty.MAX_TEXT}], now)
    status, answers = store.write(
        lambda db: L.ingest(db, one, now, HP, accept_unresolved=False),
        locks=L.ingest_locks(one),
    )
    assert status == 202 and answers[0]["quantity"] == qty.MAX_TEXT
    assert json.dumps(answers)  # plain JSON


def test_an_old_replicas_write_in_flight_during_the_upgrade_is_scaled_not_kept_as_micro_units(
    pg_url: str,
) -> None:
    """A rolling upgrade: an integer-sidecar replica's intake transaction has added 7 units for
    a new (customer, dimension, hour) and not committed yet when a new replica migrates the
    database. The migration scaled `saas_open` BEFORE creating the guard, so its UPDATE did not
    see the uncommitted row; its CREATE TRIGGER then waited for the old transaction, which
    committed its 7, and the total held 7 micro-units: 7 units billed as 0.000007. The
    migration now takes the tables' locks first: the old transaction commits before the
    scaling (its 7 become 7,000,000), and any later statement of it waits and is refused."""
    import threading

    import psycopg

    from tests.test_quantity_migration import LEGACY

    with psycopg.connect(pg_url, autocommit=True) as pg:
        pg.execute((LEGACY / "saas_postgresql.sql").read_text().encode())
    who = "333333333333/arn:aws:license-manager::333333333333:license:l-333333333333"
    old = psycopg.connect(pg_url)  # the old replica: no session settings, one transaction
    old.execute(
        "INSERT INTO saas_open (customer, dimension, hour, quantity) VALUES "
        "(%s, 'scans', 500000, 7) ON CONFLICT (customer, dimension, hour) DO UPDATE SET "
        "quantity = saas_open.quantity + excluded.quantity",
        (who,),
    )
    opened: list[UsageStore] = []
    upgrade = threading.Thread(
        target=lambda: opened.append(open_store(SAAS_SCHEMA, database_url=pg_url)), daemon=True
    )
    upgrade.start()
    try:
        with psycopg.connect(pg_url, autocommit=True) as watch:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the migration waits for the old transaction
                row = watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND NOT granted"
                ).fetchone()
                if row and int(row[0]) > 0:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the migration never waited for the old replica's transaction")
            later: list[BaseException | None] = []

            def old_again() -> None:  # another old replica's POST, queued behind the upgrade
                try:
                    with psycopg.connect(pg_url, autocommit=True) as other:
                        other.execute(
                            "INSERT INTO saas_open (customer, dimension, hour, quantity) "
                            "VALUES (%s, 'users', 500000, 5)",
                            (who,),
                        )
                    later.append(None)
                except psycopg.Error as exc:
                    later.append(exc)

            queued = threading.Thread(target=old_again, daemon=True)
            queued.start()
            while time.monotonic() < deadline:
                row = watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND NOT granted"
                ).fetchone()
                if row and int(row[0]) > 1:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the second old write never queued")
        old.commit()
        upgrade.join(60)
        queued.join(60)
        assert len(later) == 1 and isinstance(later[0], psycopg.errors.RaiseException)
        assert opened, "the upgrade did not finish"
        store = opened[0]
        rows = store.read(
            lambda db: db.execute(
                "SELECT quantity FROM saas_open WHERE customer = ? AND hour = 500000", (who,)
            ).fetchall()
        )
        assert [int(q) for (q,) in rows] == [7 * qty.SCALE]
    finally:
        old.close()
        for s in opened:
            s.close()


@pytest.mark.parametrize(
    "number",
    [
        b"1" + b"0" * 5000,  # past Python's 4,300-digit limit for int()
        b"-" + b"9" * 900_000,  # a megabyte of digits, no fraction
        b"99999999999999999999",  # 20 digits: fits no field, read exactly
    ],
)
def test_a_whole_number_too_long_for_any_quantity_is_a_400_naming_quantity(number: bytes) -> None:
    """A JSON integer of more than 4,300 digits made `json.loads` fail, so the answer said the
    body was not JSON (field `body`) although it was, and named no field. It names the
    quantity, like the same number with a fraction (tests/test_usage_validate.py)."""
    from sidecar.usage.validate import Limits, parse

    for body in (
        b'{"dimension": "scans", "quantity": ' + number + b"}",
        b'{"dimension": "scans", "quantity": 1, "allocations": [{"quantity": '
        + number
        + b', "tags": {"a": "b"}}]}',
    ):
        with pytest.raises(RejectedError) as caught:
            parse(body, Limits(("scans",)), T0)
        assert caught.value.status == 400
        assert caught.value.body()["field"] in ("quantity", "allocations[0].quantity")


def test_an_old_replicas_seal_in_flight_during_the_upgrade_is_waited_for_not_deadlocked(
    pg_url: str,
) -> None:
    """The older sidecar's seal writes the outbox, then deletes the sealed totals. The upgrade
    takes its locks in that order, so it waits for the seal instead of holding the totals the
    seal needs next (a deadlock: PostgreSQL aborts one of them, failing the new replica's
    start or the old seal). Both finish; the sealed whole units are scaled with the rest."""
    import threading

    import psycopg

    from tests.test_quantity_migration import LEGACY

    with psycopg.connect(pg_url, autocommit=True) as pg:
        pg.execute((LEGACY / "saas_postgresql.sql").read_text().encode())
    who = "333333333333/arn:aws:license-manager::333333333333:license:l-333333333333"
    old = psycopg.connect(pg_url)
    old.execute(
        "INSERT INTO saas_outbox (customer, dimension, hour, quantity, zero, record, state, "
        "sealed_at, deadline) VALUES (%s, 'scans', 400000, 5, 0, '{}', 'sealed', 0, 0)",
        (who,),
    )
    opened: list[UsageStore] = []
    failed: list[BaseException] = []

    def upgrade() -> None:
        try:
            opened.append(open_store(SAAS_SCHEMA, database_url=pg_url))
        except BaseException as exc:  # reported by the assertion below
            failed.append(exc)

    thread = threading.Thread(target=upgrade, daemon=True)
    thread.start()
    try:
        with psycopg.connect(pg_url, autocommit=True) as watch:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                row = watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND NOT granted"
                ).fetchone()
                if row and int(row[0]) > 0:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the migration never waited for the old seal")
        old.execute("DELETE FROM saas_open WHERE hour = 400000")  # the seal's next statement
        old.commit()
        thread.join(60)
        assert not failed and opened, failed
        rows = opened[0].read(
            lambda db: db.execute(
                "SELECT quantity FROM saas_outbox WHERE customer = ? AND hour = 400000", (who,)
            ).fetchall()
        )
        assert [int(q) for (q,) in rows] == [5 * qty.SCALE]
    finally:
        old.close()
        for s in opened:
            s.close()
