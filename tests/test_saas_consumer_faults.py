"""The lifecycle consumer against faults nobody planned for, on moto's SQS in server mode
(loopback): a message whose handling raises (a parser bug, a store error of an unexpected
type) must not end the consumer. The message stays on the queue, SQS gives it again, and after
the queue's maxReceiveCount its redrive policy moves it to the SQS dead-letter queue."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

import boto3
import pytest

from sidecar.aws.sqs import EventQueue
from sidecar.usage import lifecycle
from sidecar.usage.db import UsageStore, open_store
from sidecar.usage.hours import HourPolicy
from sidecar.usage.saas import SAAS_SCHEMA, SaasPolicy, SaasService
from tests.helpers import ManualClock
from tests.test_saas_events_queue import (  # noqa: F401
    REGION,
    Moto,
    consuming,
    events,
    left,
    moto,
    service,
    sqs_env,
    wait_for,
)
from tests.test_saas_ledger import DIMS
from tests.test_saas_lifecycle import eb, stamp
from tests.test_saas_service import Aws, make_service

SECRET = "cust-do-not-log-7f3a"


def hostile(t: float) -> str:
    """An SNS notification whose `action` is an object: lifecycle.parse raised TypeError
    (unhashable) on it, not EventError, and the exception ended the consumer thread. The parser
    now refuses it (a dead letter); `parser_bug` stands in for the next such bug."""
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "Message": json.dumps(
                {"action": {"token": SECRET}, "customer-identifier": SECRET, "product-code": "p"}
            ),
            "Timestamp": stamp(t).replace("Z", ".000Z"),
        }
    )


def queue_with_redrive(moto_url: str, receives: int) -> tuple[str, str, Any]:
    client = boto3.client("sqs", region_name=REGION, endpoint_url=moto_url)
    name = f"events-{uuid.uuid4().hex[:8]}"
    dlq = client.create_queue(QueueName=name + "-dlq")["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    url = client.create_queue(
        QueueName=name,
        Attributes={
            "VisibilityTimeout": "1",
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": arn, "maxReceiveCount": str(receives)}
            ),
        },
    )["QueueUrl"]
    return url, dlq, client


@pytest.fixture
def parser_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parser bug nobody has found yet: the real parser, raising TypeError on the messages
    that carry SECRET, as it did on an object `action` before that was refused."""
    real = lifecycle.parse

    def parse(body: str, received_at: float) -> lifecycle.Event:
        if SECRET in body:
            raise TypeError("unhashable type: 'dict'")
        return real(body, received_at)

    monkeypatch.setattr(lifecycle, "parse", parse)


def test_an_object_action_is_a_dead_letter_that_does_not_repeat_it(tmp_path: Path) -> None:
    svc = service(tmp_path)
    assert svc.handle_message("m", hostile(time.time())) == "dead_letter"
    status, doc = svc.dead_letters()
    assert status == 200 and SECRET not in json.dumps(doc)
    assert "action" in json.dumps(doc)
    svc.store.close()


@pytest.mark.usefixtures("parser_bug")
def test_a_message_the_consumer_fails_on_stays_queued_until_sqs_dead_letters_it(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, dlq, client = queue_with_redrive(moto.url, receives=3)
    client.send_message(QueueUrl=url, MessageBody=hostile(time.time()))
    client.send_message(QueueUrl=url, MessageBody=eb("Purchase Agreement Created", 2, time.time()))
    svc = service(tmp_path)
    caplog.set_level(logging.INFO)
    with consuming(svc, EventQueue(url, REGION, wait_seconds=1)):
        wait_for(lambda: events(svc) == 1, 20, "the event behind the failing one not applied")
        wait_for(lambda: left(client, dlq) == 1, 30, "SQS never dead-lettered the message")
        wait_for(lambda: left(client, url) == 0, 20, "the queue was not emptied")
        # Still consuming after it: a later event is applied.
        client.send_message(QueueUrl=url, MessageBody=eb("License Deprovisioned", 3, time.time()))
        wait_for(lambda: events(svc) == 2, 20, "the consumer stopped after the failures")
    counters = svc.counters().lifecycle
    assert counters["consumer_error"] == 3  # each receive, never deleted by the sidecar
    assert counters["applied"] == 2 and counters["dead_letter"] == 0
    warning = [n for n in svc.notices() if n.startswith("events_consumer_failing:")]
    assert warning and "TypeError" in warning[0] and "3 lifecycle messages" in warning[0]
    logged = [r for r in caplog.records if r.getMessage() == "saas_lifecycle_consumer_error"]
    assert len(logged) == 3 and all(r.levelno == logging.ERROR for r in logged)
    # Neither the body nor anything in it is logged (it may carry a token or a buyer's id).
    # The sidecar's own records: botocore's DEBUG lines (on when an earlier test in the worker
    # turned them on) carry the test's own SendMessage bodies, which are not the sidecar's logs.
    ours = [r for r in caplog.records if r.name.split(".")[0] == "sidecar"]
    assert any(r.getMessage() == "saas_lifecycle_consumer_error" for r in ours)
    assert SECRET not in " ".join(str(vars(r)) for r in ours)
    svc.store.close()


class OddStore:
    """The real store, whose writes raise an error type the consumer was never written for
    (sqlite3's own, as a damaged file raises it) until `fails` runs out."""

    def __init__(self, store: Any, fails: int) -> None:
        self.store, self.fails = store, fails

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def write(self, fn: Any, **kw: Any) -> Any:
        if self.fails > 0:
            self.fails -= 1
            raise sqlite3.DatabaseError("database disk image is malformed")
        return self.store.write(fn, **kw)


def test_a_store_error_nobody_expected_is_retried_not_the_end_of_events(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
) -> None:
    url, dlq, client = queue_with_redrive(moto.url, receives=5)
    client.send_message(QueueUrl=url, MessageBody=eb("License Deprovisioned", 4, time.time()))
    svc = service(tmp_path)
    real = svc.store
    svc.store = cast(UsageStore, OddStore(real, fails=2))
    with consuming(svc, EventQueue(url, REGION, wait_seconds=1)):
        wait_for(lambda: events(svc) == 1, 30, "not applied once the store wrote again")
        wait_for(lambda: left(client, url) == 0, 20, "not deleted once applied")
    assert svc.counters().lifecycle["consumer_error"] == 2
    assert left(client, dlq) == 0
    real.close()


@pytest.mark.usefixtures("parser_bug")
def test_the_warning_names_the_failure_and_goes_an_hour_after_the_last(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Deterministic: a ManualClock whose first wait (the backoff after the failure) stops the
    consumer; /readyz's warning is there, then gone an hour later."""
    url, _, client = queue_with_redrive(moto.url, receives=5)
    clock = ManualClock(stop_after_waits=1)
    client.send_message(QueueUrl=url, MessageBody=hostile(clock.t))
    svc = make_service(open_store(SAAS_SCHEMA, state_dir=tmp_path), Aws(clock), clock)
    svc.consume(EventQueue(url, REGION, wait_seconds=1), threading.Event())
    assert clock.waits and clock.waits[0] > 0  # it backed off
    assert left(client, url) == 1  # not deleted
    assert any(n.startswith("events_consumer_failing: 1 ") for n in svc.notices())
    clock.t += 3600  # CONSUMER_ERROR_NOTICE
    assert not any(n.startswith("events_consumer_failing") for n in svc.notices())
    svc.store.close()


def test_an_odd_entitlements_answer_while_the_queue_is_down_does_not_end_the_consumer(
    sqs_env: int,  # noqa: F811
    tmp_path: Path,
) -> None:
    """While the queue is unreachable the consumer still retries due entitlement reads. An
    answer without `dimension` raised KeyError out of that retry and ended the consumer: once
    the queue came back, no event was applied any more."""
    clock = ManualClock(stop_after_waits=3)
    policy = SaasPolicy(dimensions=DIMS, hours=HourPolicy(seal_margin=60, spread=0))
    svc = SaasService(
        policy,
        open_store(SAAS_SCHEMA, state_dir=tmp_path),
        lambda: Aws(clock),
        clock=clock,
        rng=lambda: 0.5,
        entitlements=lambda product, account: [{"value": 5}],  # no "dimension"
    )
    due: list[str] = []  # read later: the event stays due in the store
    assert svc.handle_message("m", eb("License Updated", 5, clock.t - 60), reads=due) == "applied"
    url = f"http://127.0.0.1:{sqs_env}/123456789012/events-nowhere"  # nothing listens
    svc.consume(EventQueue(url, REGION, wait_seconds=1), threading.Event())
    assert len(clock.waits) == 3  # it went on to the third backoff instead of dying
    counters = svc.counters().lifecycle
    assert counters["queue_error"] == 3 and counters["consumer_error"] >= 1
    svc.store.close()


class Batches:
    """The real queue, noting how many messages each receive gave."""

    def __init__(self, queue: EventQueue) -> None:
        self.queue, self.sizes = queue, list[int]()

    def receive(self) -> list[Any]:
        got = self.queue.receive()
        self.sizes.append(len(got))
        return got

    def delete(self, message: Any) -> None:
        self.queue.delete(message)


@pytest.mark.usefixtures("parser_bug")
def test_failing_messages_do_not_hold_back_the_events_behind_them_in_their_batch(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Head of line: a receive of three messages the consumer fails on, then a deprovisioning
    (its buyer has one hour to be billed). The backoff came before each next message (up to
    60 s each, past the batch's visibility timeout); now the batch is handled first and the
    backoff comes once, before the next receive. Deterministic: the ManualClock's first wait
    stops the consumer, so whatever is applied was applied before any backoff."""
    url, _, client = queue_with_redrive(moto.url, receives=5)
    clock = ManualClock(stop_after_waits=1)
    for _ in range(3):
        client.send_message(QueueUrl=url, MessageBody=hostile(clock.t))
    client.send_message(QueueUrl=url, MessageBody=eb("License Deprovisioned", 5, time.time()))
    svc = make_service(open_store(SAAS_SCHEMA, state_dir=tmp_path), Aws(clock), clock)
    queue = Batches(EventQueue(url, REGION, wait_seconds=1))
    svc.consume(queue, threading.Event())
    assert queue.sizes[:1] == [4]  # one receive gave all four (moto: as the queue holds them)
    assert events(svc) == 1  # the deprovisioning, before any backoff
    # The batch went on without a pause; the next receive gave the three alone, and only then
    # (every message failing) did it back off.
    assert svc.counters().lifecycle["consumer_error"] in (3, 6)
    assert len(clock.waits) == 1 and clock.waits[0] > 0
    assert left(client, url) == 3  # the failing ones stay queued for the redrive policy
    svc.store.close()
