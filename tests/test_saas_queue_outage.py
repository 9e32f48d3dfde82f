"""The lifecycle queue unreachable for what the sidecar sees as an hour: its address first
accepts connections and never answers (a blackhole in front of moto's SQS), then refuses them,
then comes back. The service runs on the fast clock (sidecar.usage.hours.ScaledClock), so the
hour passes in seconds while the SQS client's socket timeouts stay real.

What a seller would notice if it broke: a consumer wedged on a call that never answers, an
outage that /readyz does not name, events queued meanwhile lost or applied twice, and a buyer
whose final window closed during the outage billed silently or not at all."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from sidecar.aws.sqs import EventQueue
from sidecar.ops.metrics import Metrics
from sidecar.usage.db import open_store
from sidecar.usage.hours import ScaledClock
from sidecar.usage.lifecycle import FINAL_WINDOW
from sidecar.usage.saas import SAAS_SCHEMA, SaasService
from tests.helpers import free_port
from tests.relay import Gate
from tests.test_saas_ledger import account, key, license_arn
from tests.test_saas_lifecycle import eb
from tests.test_saas_service import Aws, make_service

REGION = "us-east-1"
SCALE = 240.0  # one simulated hour in 15 real seconds
LAG = 3 * 3600.0  # the simulated clock starts this far behind the real one (see `clock`)


def wait_for(what: Callable[[], Any], timeout: float, why: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, why
        time.sleep(0.02)
    return got


@pytest.fixture
def clock() -> ScaledClock:
    """The fast clock, behind the real one for the whole test: events dated on it are never
    "from the future" against moto's SentTimestamp (real time), as AWS's own are not."""
    now = time.time()
    return ScaledClock(SCALE, now + LAG / (SCALE - 1))


@pytest.fixture
def moto_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any, Gate]]:
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    gate = Gate(port, free_port())
    # The sidecar's SQS client goes through the gate; the test's own client straight to moto.
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", gate.url)
    client = boto3.client("sqs", region_name=REGION, endpoint_url=f"http://{host}:{port}")
    url = client.create_queue(
        QueueName=f"events-{uuid.uuid4().hex[:8]}", Attributes={"VisibilityTimeout": "2"}
    )["QueueUrl"]
    try:
        yield url, client, gate
    finally:
        gate.close()
        server.stop()


def resolved(svc: SaasService, aws: Aws, i: int) -> None:
    aws.tokens[f"tok-{i}"] = i
    status, _ = svc.resolve(json.dumps({"registration_token": f"tok-{i}"}).encode())
    assert status == 200


def usage(svc: SaasService, i: int, quantity: int, rid: str) -> tuple[int, dict[str, Any]]:
    doc = {
        "customer_aws_account_id": account(i),
        "license_arn": license_arn(i),
        "dimension": "seats",
        "quantity": quantity,
        "id": rid,
    }
    return svc.post(json.dumps(doc).encode())


def waiting(client: Any, url: str) -> int:
    """Messages on the queue, visible or not (received, not deleted)."""
    attrs = client.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


def count(svc: SaasService, sql: str) -> int:
    return int(svc.store.read(lambda db: db.execute(sql).fetchone())[0])


@contextlib.contextmanager
def consuming(svc: SaasService, queue: EventQueue) -> Iterator[threading.Thread]:
    stop = threading.Event()
    t = threading.Thread(target=svc.consume, args=(queue, stop), daemon=True)
    t.start()
    try:
        yield t
    finally:
        stop.set()
        # Bounded: a receive in flight ends within its read timeout (wait + 10 s).
        t.join(timeout=30)
        assert not t.is_alive(), "the consumer did not stop"


@pytest.mark.slow  # about 30 s: a blackholed receive ends on its real 11 s read timeout
def test_an_hour_of_blackholed_then_refused_queue_is_seen_survived_and_caught_up(
    moto_gate: tuple[str, Any, Gate],
    clock: ScaledClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, client, gate = moto_gate
    aws = Aws(clock)  # type: ignore[arg-type]  # AWS's clock is the fast one too
    store = open_store(SAAS_SCHEMA, state_dir=tmp_path)
    svc: SaasService = make_service(store, aws, clock)  # type: ignore[arg-type]
    for i in (1, 2):
        resolved(svc, aws, i)
    assert usage(svc, 1, 5, "before")[0] == 202
    queue = EventQueue(url, REGION, wait_seconds=1)  # read timeout: 11 real seconds
    caplog.set_level(logging.INFO, logger="sidecar")
    with consuming(svc, queue):
        client.send_message(
            QueueUrl=url, MessageBody=eb("Purchase Agreement Created", 2, clock.time())
        )
        wait_for(lambda: count(svc, "SELECT COUNT(*) FROM saas_events") == 1, 20, "not consumed")
        wait_for(lambda: waiting(client, url) == 0, 20, "not deleted")
        assert not [n for n in svc.notices() if n.startswith("events_queue_unreachable")]

        # 1. The address accepts and never answers. The receive in flight is bounded by the
        # client's read timeout: failures are counted, the consumer tries again.
        gate.set("blackhole")
        left = clock.time()
        wait_for(lambda: gate.accepted["blackhole"] >= 1, 20, "the blackhole saw no receive")
        # AWS deprovisions buyer 1 while the sidecar cannot hear it; the event is sent twice.
        deprovisioned = clock.time()
        event = eb("License Deprovisioned", 1, deprovisioned, eid="deprov-1")
        for _ in range(2):
            client.send_message(QueueUrl=url, MessageBody=event)
        client.send_message(
            QueueUrl=url, MessageBody=eb("Purchase Agreement Created", 3, clock.time())
        )
        # A second connection to the blackhole: the first call ended on its own read timeout
        # (the gate closes nothing while it stays a blackhole) and the consumer tried again.
        wait_for(
            lambda: gate.accepted["blackhole"] >= 2,
            40,
            "a receive on a blackholed address never ended: the consumer is wedged",
        )
        assert svc.counters().lifecycle["queue_error"] >= 1
        notice = wait_for(
            lambda: [n for n in svc.notices() if n.startswith("events_queue_unreachable")],
            30,
            "/readyz does not say the queue is unreachable",
        )
        assert "since" in notice[0], notice
        # Usage keeps being taken (the sidecar does not know buyer 1 left): it is durable.
        assert usage(svc, 1, 7, "during")[0] == 202

        # 2. Then nothing listens: refused at once, retried with backoff (capped), not wedged.
        gate.set("refuse")
        errors = svc.counters().lifecycle["queue_error"]
        wait_for(
            lambda: svc.counters().lifecycle["queue_error"] >= errors + 3,
            30,
            "no retries while refused",
        )
        # The outage lasts past buyer 1's final window, as the sidecar's clock sees it.
        wait_for(lambda: clock.time() > deprovisioned + FINAL_WINDOW + 120, 60, "clock")
        assert clock.time() - left >= 3600.0
        # AWS (as the emulator plays it): records sent after the final window are refused.
        aws.unsubscribed.add(key(1))
        assert count(svc, "SELECT COUNT(*) FROM saas_events") == 1  # nothing heard meanwhile

        # 3. The queue comes back: each event queued meanwhile is applied once.
        outage = clock.time() - left
        gate.set("pass")
        print(f"outage {outage / 60:.0f} simulated minutes")  # docs/saas-lifecycle.md (-s)
        wait_for(
            lambda: count(svc, "SELECT COUNT(*) FROM saas_events") == 3,
            30,
            "the backlog was not applied",
        )
        wait_for(
            lambda: not [n for n in svc.notices() if n.startswith("events_queue_unreachable")],
            10,
            "notice stuck",
        )
        wait_for(
            lambda: (
                int(
                    client.get_queue_attributes(
                        QueueUrl=url,
                        AttributeNames=[
                            "ApproximateNumberOfMessages",
                            "ApproximateNumberOfMessagesNotVisible",
                        ],
                    )["Attributes"]["ApproximateNumberOfMessages"]
                )
                == 0
            ),
            20,
            "not deleted",
        )
    lifecycle = svc.counters().lifecycle
    assert lifecycle["applied"] == 3 and lifecycle["duplicate"] >= 1, lifecycle
    # The window that closed while the queue was unreachable is said, counted and logged.
    assert lifecycle["final_window_missed"] == 1, lifecycle
    metrics = Metrics(None, frozenset())
    metrics.watch_saas(svc.counters, frozenset({"seats"}))
    assert "marketplace_saas_final_windows_missed_total 1.0" in metrics.render().decode()
    missed = [r for r in caplog.records if r.getMessage() == "saas_final_window_missed"]
    assert len(missed) == 1 and missed[0].levelno == logging.ERROR
    buyer = svc.customer(account(1))[1]
    assert buyer["subscription"] == "unsubscribed"
    # Intake refuses buyer 1 now, naming its state; buyer 2 is untouched.
    status, refused = usage(svc, 1, 1, "after")
    assert status == 400 and "unsubscribed" in json.dumps(refused), refused
    assert usage(svc, 2, 1, "other")[0] == 202
    # The leader's next pass seals and sends buyer 1's usage at once; AWS refuses it after the
    # window: kept as not_subscribed (nothing lost, nothing billed twice), alerted.
    svc.tick()
    states = svc.store.read(
        lambda db: db.execute(
            "SELECT state, SUM(quantity) FROM saas_outbox WHERE customer = ? GROUP BY state",
            (key(1),),
        ).fetchall()
    )
    assert {str(s): int(q) for s, q in states} == {"not_subscribed": 12_000_000}, states
    still_open = svc.store.read(
        lambda db: db.execute(
            "SELECT COUNT(*) FROM saas_open WHERE customer = ?", (key(1),)
        ).fetchone()[0]
    )
    assert still_open == 0
    assert svc.counters().alerts["not_subscribed"] >= 1
    store.close()
