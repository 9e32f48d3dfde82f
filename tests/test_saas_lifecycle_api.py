"""End to end: the real `run` process in saas mode with MARKETPLACE_SAAS_EVENTS_QUEUE_URL on
moto's SQS server, the emulator over HTTP for ResolveCustomer and BatchMeterUsage. A buyer who
subscribes and is deprovisioned is seen by the backend through the change feed within seconds;
every answer is checked against the shipped OpenAPI document."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from marketplace_sidecar_client import CustomerError, customer_changes, get_customer

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.test_saas_api import check, issue, resolve, saas_car
from tests.test_saas_events_queue import REGION, Moto, new_queue
from tests.test_saas_ledger import license_arn
from tests.test_saas_lifecycle import eb

__all__ = ["saas_car"]  # the fixture, used by name

ACCOUNT = "111122223333"


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[Moto]:
    from tests.helpers import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    server = Moto(free_port())
    yield server
    server.close()


def event(i_account: str, kind: str, t: float) -> str:
    return eb(kind, 0, t).replace("100000000000", i_account)


def test_a_buyer_leaving_is_seen_through_the_change_feed_and_metered_until_the_window(
    saas_car: Any, emulator: Emulator, emulator_server: EmulatorServer, moto: Moto, tmp_path: Path
) -> None:
    url, client = new_queue(moto.url, visibility=5)
    car = saas_car(
        MARKETPLACE_STATE_DIR=str(tmp_path),
        AWS_ENDPOINT_URL_MARKETPLACE_ENTITLEMENT_SERVICE=emulator_server.url,
        MARKETPLACE_SAAS_EVENTS_QUEUE_URL=url,
        AWS_ENDPOINT_URL_SQS=moto.url,
        AWS_REGION=REGION,
    )
    buyer = issue(emulator, customer_aws_account_id=ACCOUNT)
    assert resolve(car, buyer["registration_token"]).status_code == 200
    one = car.get(f"/v1/customers/{ACCOUNT}")
    check("/v1/customers/{id}", "GET", one)
    assert one.json()["subscription"] == "subscribed" and one.json()["lifecycle"] is None

    first = car.get("/v1/customers/changes?since=0")
    check("/v1/customers/changes", "GET", first)
    cursor = first.json()["cursor"]
    sent = time.monotonic()
    # The buyer's own license leaves (a departure names the license it ends).
    gone = event(ACCOUNT, "License Deprovisioned", time.time())
    client.send_message(
        QueueUrl=url, MessageBody=gone.replace(license_arn(0), buyer["license_arn"])
    )
    seen: list[dict[str, Any]] = []
    while not seen and time.monotonic() - sent < 60:
        # The product's client, as a backend would wait for news.
        page = customer_changes(cursor, wait=5, url=car.api)
        seen, cursor = page["changes"], page["cursor"]
    took = time.monotonic() - sent
    print(f"feed latency {took:.2f} s")  # docs/saas-lifecycle.md quotes it (pytest -s)
    # Seen at all, through one long poll after another (the latency is a figure, not a test:
    # a loaded machine may take longer than the 0.13-0.29 s the docs quote).
    assert seen and seen[0]["state"] == "unsubscribed" and seen[0]["customers"], (seen, took)
    one = car.get(f"/v1/customers/{ACCOUNT}")
    check("/v1/customers/{id}", "GET", one)
    assert one.json()["subscription"] == "unsubscribed"
    assert get_customer(ACCOUNT, url=car.api)["subscription"] == "unsubscribed"
    with pytest.raises(CustomerError) as unknown:
        get_customer("999988887777", url=car.api)
    assert unknown.value.reason == "unknown_customer"
    with pytest.raises(CustomerError) as bad:
        customer_changes("-1", url=car.api)
    assert bad.value.reason == "invalid"
    r = requests.get(f"{car.api}/v1/customers/changes?since={cursor}&wait=0.2", timeout=10)
    check("/v1/customers/changes", "GET", r)
    assert r.json()["changes"] == [] and r.json()["cursor"] == cursor
    listed = car.get("/v1/customers")
    check("/v1/customers", "GET", listed)
    assert listed.json()["customers"][0]["lifecycle"]["final_window_end"]
    # Inside the final window the usage is still taken (and billed)
    record = {
        "customer_aws_account_id": ACCOUNT,
        "license_arn": buyer["license_arn"],
        "dimension": "users",
        "quantity": 2,
    }
    r = requests.post(car.api + "/v1/usage", json=record, timeout=10)
    check("/v1/usage", "POST", r)
    assert r.status_code == 202, r.text
    # A client mistake in the feed's query is a 400 naming it.
    for query, named in (("since=-1", "since"), ("wait=99", "wait"), ("x=1", "x")):
        bad = car.get(f"/v1/customers/changes?{query}")
        check("/v1/customers/changes", "GET", bad)
        assert bad.status_code == 400 and named in bad.json()["error"]["message"], bad.text
    metrics = car.get("/metrics", probe=True).text
    assert 'marketplace_saas_lifecycle_messages_total{outcome="applied"} 1.0' in metrics
    attrs = boto3.client("sqs", region_name=REGION, endpoint_url=moto.url).get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
    )
    assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "0"
    assert car.stop() == 0


def test_contract_entitlements_follow_license_updates_through_the_emulator(
    saas_car: Any,
    emulator: Emulator,
    emulator_server: EmulatorServer,
    moto: Moto,
    tmp_path: Path,
) -> None:
    """The emulator's events API puts a License Updated on the queue; the sidecar asks the
    emulator's GetEntitlements over HTTP and the backend sees the contract, then its downgrade."""
    server = emulator_server.url
    url, _ = new_queue(moto.url, visibility=5)
    car = saas_car(
        MARKETPLACE_STATE_DIR=str(tmp_path),
        MARKETPLACE_SAAS_EVENTS_QUEUE_URL=url,
        AWS_ENDPOINT_URL_SQS=moto.url,
        AWS_ENDPOINT_URL_MARKETPLACE_ENTITLEMENT_SERVICE=server,
        AWS_REGION=REGION,
    )
    account = "444455556666"
    buyer = issue(emulator, customer_aws_account_id=account)
    product = resolve(car, buyer["registration_token"]).json()["product_code"]

    def contract(seats: int) -> None:
        body = {
            "product_code": product,
            "customer_aws_account_id": account,
            "entitlements": [{"dimension": "users", "integer": seats, "expiration": 1_900_000_000}],
        }
        r = requests.post(server + "/_emulator/entitlements", json=body, timeout=5)
        assert r.status_code == 200, r.text

    def license_updated() -> None:
        spec = {
            "type": "license-updated",
            "product_code": product,
            "customer_aws_account_id": account,
            "license_arn": buyer["license_arn"],
            "queue_url": url,
        }
        r = requests.post(server + "/_emulator/saas/events", json=spec, timeout=10)
        assert r.status_code == 200, r.text

    def seats_seen(expected: int) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            doc = car.get(f"/v1/customers/{account}").json()
            got = [e["value"] for e in (doc.get("lifecycle") or {}).get("entitlements", [])]
            if got == [expected]:
                check("/v1/customers/{id}", "GET", car.get(f"/v1/customers/{account}"))
                return
            time.sleep(0.1)
        raise AssertionError(f"entitlements never showed {expected} users: {doc}")

    contract(20)
    license_updated()
    seats_seen(20)
    contract(5)  # the buyer's contract is amended down
    license_updated()
    seats_seen(5)
    assert car.stop() == 0


def test_dead_letters_are_read_through_the_api_and_the_client(
    saas_car: Any, emulator_server: EmulatorServer, moto: Moto, tmp_path: Path
) -> None:
    """A poison message on the queue: the operator finds it (why, when, its size), reads its
    body and can send it again, all without database access; never on the probe listener."""
    from marketplace_sidecar_client import dead_letters, get_dead_letter

    url, client = new_queue(moto.url, visibility=5)
    car = saas_car(
        MARKETPLACE_STATE_DIR=str(tmp_path),
        AWS_ENDPOINT_URL_MARKETPLACE_ENTITLEMENT_SERVICE=emulator_server.url,
        MARKETPLACE_SAAS_EVENTS_QUEUE_URL=url,
        AWS_ENDPOINT_URL_SQS=moto.url,
        AWS_REGION=REGION,
    )
    empty = car.get("/v1/saas/dead-letters")
    check("/v1/saas/dead-letters", "GET", empty)
    assert empty.json() == {"total": 0, "dead_letters": []}
    poison = '{"source": "aws.agreement-marketplace", "detail-type": "Seat Count Changed"}'
    sent = client.send_message(QueueUrl=url, MessageBody=poison)["MessageId"]
    big = "{not json " + "é" * 70_000  # kept cut at 65,536 characters
    sent_big = client.send_message(QueueUrl=url, MessageBody=big)["MessageId"]
    deadline = time.monotonic() + 30
    while dead_letters(url=car.api)["total"] < 2:
        assert time.monotonic() < deadline, "the poison messages never showed"
        time.sleep(0.1)
    listed = car.get("/v1/saas/dead-letters?limit=100")
    check("/v1/saas/dead-letters", "GET", listed)
    by_id = {d["message_id"]: d for d in listed.json()["dead_letters"]}
    assert set(by_id) == {sent, sent_big}
    assert "Seat Count Changed" in by_id[sent]["reason"] and by_id[sent]["truncated"] is False
    assert by_id[sent_big]["truncated"] is True
    assert by_id[sent_big]["bytes"] == len(big.encode())
    assert all("body" not in d for d in by_id.values())  # the list stays small
    one = car.get(f"/v1/saas/dead-letters/{sent}")
    check("/v1/saas/dead-letters/{id}", "GET", one)
    assert one.json()["body"] == poison and one.json()["received_at"]
    assert get_dead_letter(sent_big, url=car.api)["body"] == big[: 64 * 1024]
    page = dead_letters(limit=1, offset=1, url=car.api)
    assert page["total"] == 2 and len(page["dead_letters"]) == 1
    with pytest.raises(CustomerError) as unknown:
        get_dead_letter("no-such-message", url=car.api)
    assert unknown.value.reason == "unknown_dead_letter"
    gone = car.get("/v1/saas/dead-letters/no-such-message")
    check("/v1/saas/dead-letters/{id}", "GET", gone)
    assert gone.status_code == 404
    # Client mistakes are a 400 naming the parameter, never a 500.
    for query, named in (
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=²", "limit"),
        ("offset=-1", "offset"),
        ("offset=1e3", "offset"),
        ("since=1", "since"),
        ("limit", "limit"),
        ("%zz", "query"),
    ):
        bad = car.get(f"/v1/saas/dead-letters?{query}")
        check("/v1/saas/dead-letters", "GET", bad)
        assert bad.status_code == 400 and named in bad.json()["error"]["message"], (query, bad.text)
    for raw in ("%ff", "a" * 101, "%0a"):
        bad = car.get(f"/v1/saas/dead-letters/{raw}")
        check("/v1/saas/dead-letters/{id}", "GET", bad)
        assert bad.status_code == 400, (raw, bad.text)
    # Bodies may name buyers: the probe listener (all interfaces) has no such route.
    assert car.get("/v1/saas/dead-letters", probe=True).status_code == 404
    assert car.get(f"/v1/saas/dead-letters/{sent}", probe=True).status_code == 404
    # Acting on one: its body, sent to the queue again, is dead-lettered again (nothing lost).
    client.send_message(QueueUrl=url, MessageBody=get_dead_letter(sent, url=car.api)["body"])
    while dead_letters(url=car.api)["total"] < 3:
        assert time.monotonic() < deadline + 30, "the resent message never showed"
        time.sleep(0.1)
    metrics = car.get("/metrics", probe=True).text
    assert 'marketplace_saas_lifecycle_messages_total{outcome="dead_letter"} 3.0' in metrics
    assert 'path="/v1/saas/dead-letters/{id}",status="200"' in metrics  # one series, any id
    assert car.stop() == 0
