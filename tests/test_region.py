"""Region resolution, with ECS task metadata and IMDSv2 served from loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any, ClassVar

import pytest

from sidecar.region import RegionNotFoundError, region_from_task, resolve_region


class _Metadata(BaseHTTPRequestHandler):
    task: ClassVar[dict[str, Any]] = {}
    seen: ClassVar[list[tuple[str, str, str | None]]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        self.seen.append(
            ("PUT", self.path, self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"))
        )
        self._reply(200, b"imds-token")

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, self.headers.get("X-aws-ec2-metadata-token")))
        if self.path == "/v4/task":
            self._reply(200, json.dumps(self.task).encode())
        elif self.path == "/latest/meta-data/placement/region":
            ok = self.headers.get("X-aws-ec2-metadata-token") == "imds-token"
            self._reply(200 if ok else 401, b"ap-southeast-2")
        else:
            self._reply(404, b"")


@pytest.fixture
def metadata() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    Thread(target=server.serve_forever, daemon=True).start()
    _Metadata.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_env_wins_in_order() -> None:
    assert resolve_region({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-east-2"}) == (
        "eu-west-1",
        "AWS_REGION",
    )
    assert resolve_region({"AWS_DEFAULT_REGION": "us-east-2"}) == (
        "us-east-2",
        "AWS_DEFAULT_REGION",
    )


def test_ecs_task_metadata(metadata: str) -> None:
    _Metadata.task = {
        "TaskARN": "arn:aws:ecs:eu-central-1:123456789012:task/c/abc",
        "AvailabilityZone": "eu-central-1b",
    }
    env = {"ECS_CONTAINER_METADATA_URI_V4": metadata + "/v4", "AWS_EC2_METADATA_DISABLED": "true"}
    assert resolve_region(env) == ("eu-central-1", "ECS task metadata")


def test_region_from_task_handles_local_zones_and_junk() -> None:
    assert region_from_task({"AvailabilityZone": "us-west-2-lax-1a"}) is None
    assert (
        region_from_task(
            {"TaskARN": "arn:aws:ecs:us-west-2:1:task/x", "AvailabilityZone": "us-west-2-lax-1a"}
        )
        == "us-west-2"
    )
    assert region_from_task({"AvailabilityZone": "sa-east-1c"}) == "sa-east-1"
    assert region_from_task({"TaskARN": 5}) is None


def test_imdsv2_uses_a_session_token(metadata: str) -> None:
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": metadata}
    assert resolve_region(env) == ("ap-southeast-2", "IMDSv2")
    assert _Metadata.seen[0][0] == "PUT" and _Metadata.seen[0][2] == "60"
    assert _Metadata.seen[1] == ("GET", "/latest/meta-data/placement/region", "imds-token")


def test_nothing_found_names_what_was_tried(metadata: str) -> None:
    env = {
        "ECS_CONTAINER_METADATA_URI_V4": metadata + "/missing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.raises(RegionNotFoundError, match=r"ECS task metadata.*set AWS_REGION"):
        resolve_region(env)
