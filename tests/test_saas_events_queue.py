"""The lifecycle queue against moto's SQS in server mode on loopback (real queue semantics:
visibility timeout, redelivery, delete, long polling), through sidecar.aws.sqs.EventQueue and
SaasService.consume; the store is SQLite or a real PostgreSQL."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from sidecar.aws.sqs import EventQueue, Message
from sidecar.core.clock import SystemClock
from sidecar.usage.db import open_store
from sidecar.usage.saas import SAAS_SCHEMA, SaasService
from tests.helpers import free_port
from tests.test_saas_ledger import account
from tests.test_saas_lifecycle import eb, sns
from tests.test_saas_service import Aws, Killed, make_service

REGION = "us-east-1"


class Moto:
    """moto's server on a loopback port of our choosing (it can be started after a client)."""

    def __init__(self, port: int) -> None:
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer

        self.port = port
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.stop()


@pytest.fixture
def sqs_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    port = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    yield port


@pytest.fixture
def moto(sqs_env: int) -> Iterator[Moto]:
    server = Moto(sqs_env)
    yield server
    server.close()


def new_queue(moto_url: str, visibility: int = 1) -> tuple[str, Any]:
    client = boto3.client("sqs", region_name=REGION, endpoint_url=moto_url)
    url = client.create_queue(
        QueueName=f"events-{uuid.uuid4().hex[:8]}",
        Attributes={"VisibilityTimeout": str(visibility)},
    )["QueueUrl"]
    return url, client


def left(client: Any, url: str) -> int:
    attrs = client.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


def wait_for(what: Callable[[], bool], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def service(store_dir: Path | None = None, url: str | None = None) -> SaasService:
    clock = SystemClock()
    store = open_store(SAAS_SCHEMA, state_dir=store_dir, database_url=url)
    return make_service(store, Aws(clock), clock, backoff_base=0.05, backoff_cap=0.5)  # type: ignore[arg-type]


@contextlib.contextmanager
def consuming(svc: SaasService, queue: Any) -> Iterator[threading.Event]:
    stop = threading.Event()
    t = threading.Thread(target=svc.consume, args=(queue, stop), daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join(timeout=30)
        assert not t.is_alive(), "the consumer did not stop"


def events(svc: SaasService) -> int:
    return int(
        svc.store.read(lambda db: db.execute("SELECT COUNT(*) FROM saas_events").fetchone()[0])
    )


class CrashOnDelete:
    """The process dies after the store committed the event, before DeleteMessage."""

    def __init__(self, queue: EventQueue) -> None:
        self.queue = queue

    def receive(self) -> list[Message]:
        return self.queue.receive()

    def delete(self, message: Message) -> None:
        raise Killed


def test_a_message_redelivered_after_a_crash_between_apply_and_delete_is_applied_once(
    moto: Moto, tmp_path: Path
) -> None:
    url, client = new_queue(moto.url)
    client.send_message(QueueUrl=url, MessageBody=eb("License Deprovisioned", 1, time.time()))
    svc = service(tmp_path)
    queue = EventQueue(url, REGION, wait_seconds=1)
    with pytest.raises(Killed):
        svc.consume(CrashOnDelete(queue), threading.Event())
    assert events(svc) == 1
    assert left(client, url) == 1  # not deleted: SQS gives it again after the visibility timeout
    svc.store.close()
    again = service(tmp_path)  # the restarted sidecar
    with consuming(again, queue):
        wait_for(lambda: left(client, url) == 0, 20, "the redelivered message was not deleted")
    # Seen again (more than once if a slow delete let the visibility timeout lapse), never
    # applied again.
    assert again.counters().lifecycle["duplicate"] >= 1
    assert again.counters().lifecycle["applied"] == 0
    assert events(again) == 1
    changes = again.store.read(
        lambda db: db.execute("SELECT COUNT(*) FROM saas_changes").fetchone()
    )
    assert int(changes[0]) == 1
    again.store.close()


def test_a_poison_message_is_kept_alerted_and_deleted_never_blocking_the_queue(
    moto: Moto, tmp_path: Path
) -> None:
    url, client = new_queue(moto.url)
    client.send_message(QueueUrl=url, MessageBody="{not json" + "x" * 100_000)
    client.send_message(QueueUrl=url, MessageBody=eb("Purchase Agreement Created", 2, time.time()))
    svc = service(tmp_path)
    with consuming(svc, EventQueue(url, REGION, wait_seconds=1)):
        wait_for(lambda: left(client, url) == 0, 20, "the queue was not emptied")
        wait_for(lambda: events(svc) == 1, 10, "the good event behind the poison was not applied")
    status, letters = svc.dead_letters()
    assert status == 200 and letters["total"] == 1
    assert "not JSON" in letters["dead_letters"][0]["reason"]
    assert letters["dead_letters"][0]["bytes"] == 100_009
    assert letters["dead_letters"][0]["truncated"] is True
    kept = svc.store.read(lambda db: db.execute("SELECT body FROM saas_dead_letters").fetchone()[0])
    assert str(kept).startswith("{not json") and len(str(kept)) == 64 * 1024  # capped
    counters = svc.counters()
    assert counters.lifecycle["dead_letter"] == 1 and counters.alerts["dead_letter"] == 1
    svc.store.close()


def test_the_queue_unreachable_then_back(sqs_env: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{sqs_env}/123456789012/events-later"
    svc = service(tmp_path)
    with consuming(svc, EventQueue(url, REGION, wait_seconds=1)):
        wait_for(lambda: svc.counters().lifecycle["queue_error"] >= 2, 20, "no retry seen")
        server = Moto(sqs_env)  # the queue comes back (same address)
        try:
            client = boto3.client("sqs", region_name=REGION, endpoint_url=server.url)
            client.create_queue(QueueName="events-later", Attributes={"VisibilityTimeout": "1"})
            client.send_message(
                QueueUrl=url, MessageBody=sns("subscribe-success", "c-1", time.time())
            )
            wait_for(
                lambda: events(svc) == 1, 30, "the event sent after the outage was not applied"
            )
            wait_for(lambda: left(client, url) == 0, 20, "not deleted")
        finally:
            server.close()
    svc.store.close()


def test_three_replicas_on_postgresql_consume_one_queue_and_apply_each_event_once(
    moto: Moto, pg_url: str
) -> None:
    url, client = new_queue(moto.url, visibility=2)
    bodies = [eb("Purchase Agreement Created", i, time.time() - 100 + i) for i in range(12)]
    bodies += [sns("subscribe-success", f"c-{i}", time.time()) for i in range(6)]
    for text in bodies + bodies[:6]:  # six delivered twice, as SNS and EventBridge may
        client.send_message(QueueUrl=url, MessageBody=text)
    fleet = [service(url=pg_url) for _ in range(3)]
    with contextlib.ExitStack() as stack:
        for svc in fleet:
            stack.enter_context(consuming(svc, EventQueue(url, REGION, wait_seconds=1)))
        wait_for(lambda: left(client, url) == 0, 60, "the fleet did not empty the queue")
    applied = sum(s.counters().lifecycle["applied"] for s in fleet)
    duplicates = sum(s.counters().lifecycle["duplicate"] for s in fleet)
    # Each event applied once by the fleet; every second copy (and any redelivery of a message
    # whose visibility timeout lapsed on a loaded machine) seen as a duplicate.
    assert applied == len(bodies) and duplicates >= 6
    assert events(fleet[0]) == len(bodies)
    cursor, feed = 0, []
    while True:
        _, page = fleet[1].changes(cursor, 0)
        if not page["changes"]:
            break
        feed += page["changes"]
        cursor = int(page["cursor"])
    assert {c["subject"] for c in feed} == {account(i) for i in range(12)} | {
        f"ci:c-{i}" for i in range(6)
    }
    for svc in fleet:
        svc.store.close()


class DownStore:
    """The real store, reported unavailable until `up` is set (as a database outage looks to
    the consumer: `available()` says why)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.up = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def available(self) -> tuple[bool, str | None]:
        return (True, None) if self.up.is_set() else (False, "database down (test)")


def test_nothing_is_received_while_the_store_is_down(moto: Moto, tmp_path: Path) -> None:
    """Each receive counts towards the queue's redrive limit: a store outage must not push
    events to the SQS dead-letter queue by receiving them again and again."""
    url, client = new_queue(moto.url)
    client.send_message(QueueUrl=url, MessageBody=eb("License Deprovisioned", 3, time.time()))
    svc = service(tmp_path)
    down = DownStore(svc.store)
    svc.store = down
    received: list[int] = []

    class Counting(EventQueue):
        def receive(self) -> list[Message]:
            got = super().receive()
            received.extend(m.receives for m in got)
            return got

    with consuming(svc, Counting(url, REGION, wait_seconds=1)):
        wait_for(lambda: svc.counters().lifecycle["store_error"] >= 3, 20, "no outage seen")
        assert received == []
        down.up.set()
        wait_for(lambda: left(client, url) == 0, 20, "not applied after the outage")
    assert received == [1] and events(svc) == 1
    down.store.close()
