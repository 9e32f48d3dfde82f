"""The SaaS lifecycle queue (SQS): long-poll ReceiveMessage, DeleteMessage. Nothing else.

A message is deleted only after the store committed what it said (or kept it as a dead letter):
a crash in between makes SQS deliver it again after its visibility timeout, and the store, which
keeps every applied event id, applies it once (sidecar/usage/saas_events.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.aws.errors import ErrorInfo

SERVICE = "sqs"
ENDPOINT_ENV = "AWS_ENDPOINT_URL_SQS"
WAIT_SECONDS = 20  # SQS's longest long poll (ReceiveMessage WaitTimeSeconds: 0-20)
MAX_MESSAGES = 10  # ReceiveMessage MaxNumberOfMessages: 1-10


@dataclass(frozen=True)
class Message:
    id: str
    receipt: str
    body: str
    sent_at: float | None  # SentTimestamp, seconds
    receives: int  # ApproximateReceiveCount


class QueueError(Exception):
    """The queue could not be reached or refused the call (retried by the consumer)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class EventQueue:
    """One SQS queue, through a botocore client (its own retries off: the consumer retries)."""

    def __init__(self, url: str, region: str, *, wait_seconds: int = WAIT_SECONDS) -> None:
        import botocore.session
        from botocore.config import Config

        # A long poll holds the connection for up to wait_seconds: the read timeout outlasts it.
        config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=5.0,
            read_timeout=wait_seconds + 10.0,
            user_agent_extra="marketplace-sidecar",
        )
        self.url = url
        self.wait_seconds = max(0, min(WAIT_SECONDS, wait_seconds))
        self._client: Any = botocore.session.get_session().create_client(
            SERVICE, region_name=region, config=config
        )

    def receive(self) -> list[Message]:
        try:
            answer = self._client.receive_message(
                QueueUrl=self.url,
                MaxNumberOfMessages=MAX_MESSAGES,
                WaitTimeSeconds=self.wait_seconds,
                MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
            )
        except Exception as exc:
            raise _queue_error(exc) from None
        out = []
        for m in answer.get("Messages") or []:
            attrs = m.get("Attributes") or {}
            sent = attrs.get("SentTimestamp")
            out.append(
                Message(
                    id=str(m.get("MessageId")),
                    receipt=str(m.get("ReceiptHandle")),
                    body=str(m.get("Body") or ""),
                    sent_at=int(str(sent)) / 1000.0 if str(sent or "").isdigit() else None,
                    receives=int(str(attrs.get("ApproximateReceiveCount") or 1)),
                )
            )
        return out

    def delete(self, message: Message) -> None:
        try:
            self._client.delete_message(QueueUrl=self.url, ReceiptHandle=message.receipt)
        except Exception as exc:
            raise _queue_error(exc) from None


def _queue_error(exc: Exception) -> QueueError:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        return QueueError(str(error.get("Code") or "Error"), str(error.get("Message") or "")[:300])
    info = getattr(exc, "info", None)
    if isinstance(info, ErrorInfo):
        return QueueError(info.code, info.message)
    return QueueError(type(exc).__name__, str(exc)[:300])
