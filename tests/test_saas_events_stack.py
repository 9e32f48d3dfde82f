"""The events stack's EventBridge rule, run by moto's server-mode EventBridge against moto's SQS:
every SaaS event the emulator builds (the Seller Guide's detail-types) reaches the queue; the
other agreement events and other sources do not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import botocore.session
import pytest

from sidecar.emulator import saas_events
from tests.helpers import ROOT
from tests.moto_sqs import REGION, MotoSqs

STACK = ROOT / "manifests" / "saas-events" / "cloudformation.json"


@pytest.fixture(scope="module")
def bus() -> Iterator[tuple[MotoSqs, Any, str]]:
    sqs = MotoSqs()
    events: Any = botocore.session.get_session().create_client(
        "events",
        region_name=REGION,
        endpoint_url=sqs.url,
        aws_access_key_id="test",
        aws_secret_access_key="test",  # nosec B106 # moto checks none
    )
    pattern = json.loads(STACK.read_text())["Resources"]["Rule"]["Properties"]["EventPattern"]
    queue = sqs.queue()
    arn = sqs.client.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    events.put_rule(Name="marketplace-saas-events", EventPattern=json.dumps(pattern))
    events.put_targets(Rule="marketplace-saas-events", Targets=[{"Id": "queue", "Arn": arn}])
    yield sqs, events, queue
    events.close()
    sqs.close()


def put(events: Any, source: str, detail_type: str, detail: dict[str, Any]) -> None:
    answer = events.put_events(
        Entries=[{"Source": source, "DetailType": detail_type, "Detail": json.dumps(detail)}]
    )
    assert answer["FailedEntryCount"] == 0


def test_the_rule_routes_every_saas_event_and_nothing_else(bus: tuple[MotoSqs, Any, str]) -> None:
    sqs, events, queue = bus
    wanted = []
    for kind in saas_events.EVENTBRIDGE:
        roles = ("Manufacturer",) if kind.startswith("license") else saas_events.ROLES
        for role in roles:
            built = json.loads(
                saas_events.build(
                    {
                        "type": kind,
                        "role": role,
                        "product_code": "prod-x",
                        "customer_aws_account_id": "210987654321",
                    },
                    1_800_000_000.0,
                ).body
            )
            put(events, built["source"], built["detail-type"], built["detail"])
            wanted.append(built["detail-type"])
    # Not SaaS lifecycle events, or not AWS Marketplace's.
    put(events, "aws.agreement-marketplace", "Purchase Agreement Ending - Acceptor", {})
    put(events, "aws.marketplacecatalog", "Offer Released", {})
    put(events, "my.app", "License Deprovisioned - Manufacturer", {})
    got = sqs.bodies(queue, len(wanted) + 3, wait=1)
    assert sorted(d["detail-type"] for d in got) == sorted(wanted)
    assert all(d["source"] == "aws.agreement-marketplace" for d in got)
    assert len(wanted) == 8
