"""`doctor`'s SaaS events checks against moto's server-mode SQS and the emulator's Entitlement
Service: the queue reachable, ReceiveMessage allowed without taking a message, GetEntitlements
allowed for an account no buyer has."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from sidecar.aws.entitlement import ENDPOINT_ENV
from sidecar.doctor import FAIL, OK, WARN, Check, check_saas_events
from sidecar.emulator.service import Emulator, EmulatorServer
from tests.moto_sqs import MotoSqs

PRODUCT = "prod-saas-doctor"


@pytest.fixture(scope="module")
def sqs() -> Iterator[MotoSqs]:
    server = MotoSqs()
    yield server
    server.close()


@pytest.fixture
def env(
    sqs: MotoSqs,
    emulator_server: EmulatorServer,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", sqs.url)
    monkeypatch.setenv(ENDPOINT_ENV, emulator_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def with_dlq(sqs: MotoSqs) -> str:
    dlq = sqs.queue()
    arn = sqs.client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return sqs.queue(RedrivePolicy=json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": 5}))


def test_an_empty_queue_with_a_dead_letter_queue_passes_every_check(
    env: None, sqs: MotoSqs
) -> None:
    checks = by_name(check_saas_events(with_dlq(sqs), PRODUCT))
    assert checks["events queue"].mark == OK
    assert checks["events queue"].detail == "reachable, 0 message(s) waiting"
    assert checks["ReceiveMessage permission"] == Check(OK, "ReceiveMessage permission", "allowed")
    assert checks["GetEntitlements permission"].mark == OK
    assert "events dead-letter queue" not in checks


def test_waiting_messages_are_never_received_by_doctor(env: None, sqs: MotoSqs) -> None:
    """A message waiting: doctor skips the receive (a warning) so the message's receive count
    stays 0: the first real receive sees ApproximateReceiveCount 1."""
    queue = sqs.queue()
    sqs.client.send_message(QueueUrl=queue, MessageBody='{"action": "subscribe-success"}')
    checks = by_name(check_saas_events(queue, PRODUCT))
    assert checks["events queue"].detail == "reachable, 1 message(s) waiting"
    assert checks["ReceiveMessage permission"].mark == WARN
    assert "not verified" in checks["ReceiveMessage permission"].detail
    assert checks["events dead-letter queue"].mark == WARN  # this queue has no redrive policy
    (message,) = sqs.receive(queue, 1, wait=1)
    assert message["Attributes"]["ApproximateReceiveCount"] == "1"


def test_a_queue_that_does_not_exist_fails_naming_the_setting(env: None, sqs: MotoSqs) -> None:
    (check,) = check_saas_events(f"{sqs.url}/123456789012/no-such-queue", PRODUCT)
    assert check.mark == FAIL and check.name == "events queue"
    assert "MARKETPLACE_SAAS_EVENTS_QUEUE_URL" in check.fix


def test_an_unreachable_queue_fails(env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{port}")
    (check,) = check_saas_events(
        "https://sqs.us-east-1.amazonaws.com/123456789012/marketplace-saas-events", PRODUCT
    )
    assert check.mark == FAIL and check.detail.startswith("unreachable: ")


def test_get_entitlements_refused_or_unchecked(
    env: None, sqs: MotoSqs, emulator_server: EmulatorServer
) -> None:
    requests.post(
        emulator_server.url + "/_emulator/entitlements/config",
        json={"faults": [{"error": "AccessDeniedException", "first": 1}]},
        timeout=5,
    ).raise_for_status()
    queue = with_dlq(sqs)
    denied = by_name(check_saas_events(queue, PRODUCT))["GetEntitlements permission"]
    assert denied.mark == FAIL and denied.detail.startswith("AccessDeniedException")
    unchecked = by_name(check_saas_events(queue, None))["GetEntitlements permission"]
    assert unchecked.mark == WARN and "product code" in unchecked.detail
    calls: list[dict[str, Any]] = requests.get(
        emulator_server.url + "/_emulator/entitlements", timeout=5
    ).json()["calls"]
    assert [c["filter"] for c in calls] == [{"CUSTOMER_AWS_ACCOUNT_ID": ["000000000000"]}]
