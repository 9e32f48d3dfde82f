"""SaaS ledger fixtures shared by the service, lifecycle and license-departure tests (registered
from conftest.py): one definition each, so a change to how a store is opened reaches them all.

The hour clock is `saas_clock` here, not `clock`: conftest's `clock` is the custom-mode usage
clock. A module that wants it under the short name binds it once (`clock = saas_clock`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.usage.db import UsageStore, open_store
from sidecar.usage.hours import hour_of, hour_start
from sidecar.usage.saas import SAAS_SCHEMA
from tests.helpers import ManualClock


@pytest.fixture
def saas_clock() -> ManualClock:
    """Ten minutes into an hour: far from both hour edges, so a test moves it on purpose."""
    c = ManualClock()
    c.t = hour_start(hour_of(c.t)) + 600.0
    return c


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], UsageStore]]:
    """Opens SaaS stores on the same state: each test runs on SQLite and on PostgreSQL."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    opened: list[UsageStore] = []

    def make() -> UsageStore:
        s = open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url)
        opened.append(s)
        return s

    yield make
    for s in opened:
        with contextlib.suppress(Exception):  # closed by the test already
            s.close()
