"""Two replicas on SQLite: each keeps and sends its own count, AWS keeps the first and answers
DuplicateRecord to the other. The sidecar that gets it says, in its alert log and in /readyz,
that a second sender is the likely cause and what to set (issue: the guard covered only the
chart's sample Deployment)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import pytest

from sidecar.server.api import Router
from sidecar.usage.db import open_store
from sidecar.usage.hours import hour_of, hour_start
from sidecar.usage.saas import SAAS_SCHEMA, SECOND_SENDER_HINT
from tests.helpers import ManualClock
from tests.test_saas_service import Aws, body, make_service


def test_duplicate_records_on_sqlite_name_a_second_sender(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    clock.t = hour_start(hour_of(clock.t)) + 600.0
    aws = Aws(clock)  # one AWS account, seen by both replicas
    aws.tokens["t0"] = 0
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        store = open_store(SAAS_SCHEMA, state_dir=tmp_path / name, database_url=None)
        replicas.append(make_service(store, aws, clock))
    first, second = replicas
    for quantity, svc in zip((5, 7), replicas, strict=True):
        assert svc.resolve(json.dumps({"registration_token": "t0"}).encode())[0] == 200
        assert svc.post(body(0, "seats", quantity))[0] == 202
    probe = Router(
        None, lambda: None, listener="probe", readiness=second.ready, notices=second.notices
    )
    assert "warnings" not in probe.handle("GET", "/readyz", b"").body
    clock.t = hour_start(hour_of(clock.t) + 1) + 120
    first.tick()
    with caplog.at_level(logging.ERROR):
        second.tick()
    assert second.counters().alerts["conflict"] == 1
    (record,) = [r for r in caplog.records if r.getMessage() == "saas_duplicate_record"]
    assert record.__dict__["likely_cause"] == SECOND_SENDER_HINT
    for text in ("second sender", "ONE replica", "MARKETPLACE_USAGE_DATABASE_URL"):
        assert text in SECOND_SENDER_HINT
    # Still ready (the store writes, probes must not flap), and /readyz says why, on both
    # listeners (the probe listener: the warning's name only).
    shown: list[tuple[Literal["probe", "api"], str]] = [
        ("probe", "second_sender"),
        ("api", "second_sender: " + SECOND_SENDER_HINT),
    ]
    for listener, text in shown:
        router = Router(
            None, lambda: None, listener=listener, readiness=second.ready, notices=second.notices
        )
        reply = router.handle("GET", "/readyz", b"")
        assert reply.status == 200, reply.body
        assert reply.body == {"ready": True, "state": "ready", "warnings": [text]}
    assert first.ready() == (True, None)
    assert first.notices() == []  # the first sender was billed: nothing to say
    for svc in replicas:
        svc.close()
