"""Hostile quantities at the edges of what one record, one POST and one hour may hold.

Each test here failed on the code it was written against; the docstring says how.
"""

from __future__ import annotations

import json
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
        [item(0, DIMS[0], qty.MAX_TEXT, id=f"big-{i}") for i in range(1000)], now  # type: ignore[arg-type]
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
    one = records([item(0, DIMS[0], qty.MAX_TEXT, id="big-0")], now)  # type: ignore[arg-type]
    status, answers = store.write(
        lambda db: L.ingest(db, one, now, HP, accept_unresolved=False),
        locks=L.ingest_locks(one),
    )
    assert status == 202 and answers[0]["quantity"] == qty.MAX_TEXT
    assert json.dumps(answers)  # plain JSON
