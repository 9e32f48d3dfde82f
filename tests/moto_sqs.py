"""moto's SQS in server mode on loopback: a real queue (visibility timeout, redelivery, delete,
long polling) that no one here wrote, for the SaaS lifecycle tests."""

from __future__ import annotations

import json
import uuid
from typing import Any

import botocore.session
from botocore.config import Config

REGION = "us-east-1"


class MotoSqs:
    def __init__(self) -> None:
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.client: Any = botocore.session.get_session().create_client(
            "sqs",
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id="test",
            aws_secret_access_key="test",  # nosec B106 # moto checks none
            config=Config(retries={"total_max_attempts": 1}),
        )

    def queue(self, name: str | None = None, **attributes: str) -> str:
        """A new queue's URL (a fresh name per call unless given)."""
        name = name or f"saas-events-{uuid.uuid4().hex[:8]}"
        return str(self.client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])

    def receive(self, queue_url: str, n: int = 10, wait: int = 1) -> list[dict[str, Any]]:
        """Take up to n messages (they become invisible for the queue's visibility timeout)."""
        resp = self.client.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=n,
            WaitTimeSeconds=wait,
            AttributeNames=["All"],
        )
        return list(resp.get("Messages", []))

    def bodies(self, queue_url: str, want: int, wait: int = 2) -> list[dict[str, Any]]:
        """Receive and delete until `want` messages came (or a receive came back empty)."""
        found: list[dict[str, Any]] = []
        while len(found) < want:
            got = self.receive(queue_url, min(10, want - len(found)), wait)
            if not got:
                break
            for m in got:
                found.append(json.loads(m["Body"]))
                self.client.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
        return found

    def visible(self, queue_url: str) -> int:
        attrs = self.client.get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"])

    def close(self) -> None:
        self.client.close()
        self._server.stop()
