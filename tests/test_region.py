"""Region resolution, with ECS task metadata and IMDSv2 served from loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from sidecar.aws.region import RegionNotFoundError, region_from_task, resolve_region
from sidecar.emulator.service import Emulator
from tests.helpers import Launch
from tests.metadata_fake import FakeMetadata


@pytest.fixture
def metadata() -> Iterator[FakeMetadata]:
    server = FakeMetadata()
    yield server
    server.close()


def test_env_wins_in_order() -> None:
    assert resolve_region({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-east-2"}) == (
        "eu-west-1",
        "AWS_REGION",
    )
    assert resolve_region({"AWS_DEFAULT_REGION": "us-east-2"}) == (
        "us-east-2",
        "AWS_DEFAULT_REGION",
    )


def test_ecs_task_metadata(metadata: FakeMetadata) -> None:
    metadata.task = {
        "TaskARN": "arn:aws:ecs:eu-central-1:123456789012:task/c/abc",
        "AvailabilityZone": "eu-central-1b",
    }
    env = {
        "ECS_CONTAINER_METADATA_URI_V4": metadata.url + "/v4",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
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


def test_imdsv2_uses_a_session_token(metadata: FakeMetadata) -> None:
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": metadata.url}
    assert resolve_region(env) == ("ap-southeast-2", "IMDSv2")
    assert metadata.seen[0][0] == "PUT" and metadata.seen[0][2] == "60"
    assert metadata.seen[1] == ("GET", "/latest/meta-data/placement/region", "imds-token")


def test_nothing_found_names_what_was_tried(metadata: FakeMetadata) -> None:
    env = {
        "ECS_CONTAINER_METADATA_URI_V4": metadata.url + "/missing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.raises(RegionNotFoundError, match=r"ECS task metadata.*set AWS_REGION"):
        resolve_region(env)


def test_message_and_hint_name_the_same_sources(metadata: FakeMetadata) -> None:
    env = {"ECS_CONTAINER_METADATA_URI_V4": metadata.url + "/missing"}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    with pytest.raises(RegionNotFoundError) as caught:
        resolve_region(env)
    info = caught.value.info
    tried = "AWS_REGION, AWS_DEFAULT_REGION, ECS task metadata"
    assert info.message == f"no AWS region found (tried {tried})"
    assert f"(tried: {tried})" in info.hint and "IMDSv2" not in info.hint
    assert info.retryable  # a metadata lookup can fail transiently at pod start


def test_nothing_to_look_up_is_not_retried() -> None:
    with pytest.raises(RegionNotFoundError) as caught:
        resolve_region({"AWS_EC2_METADATA_DISABLED": "true"})
    info = caught.value.info
    assert not info.retryable and "ECS" not in info.message and "ECS" not in info.hint


def test_a_region_lookup_failing_at_start_is_retried_until_it_works(
    launch: Launch, emulator: Emulator, metadata: FakeMetadata
) -> None:
    metadata.task = {}  # task metadata without a region yet
    car = launch(
        AWS_REGION="",
        ECS_CONTAINER_METADATA_URI_V4=metadata.url + "/v4",
        AWS_EC2_METADATA_DISABLED="true",
    )
    doc = car.wait_for(lambda d: d["consecutive_failures"] >= 2)
    assert doc["state"] == "registering" and doc["error"]["code"] == "RegionNotFound"
    assert doc["error"]["retryable"] and "ECS task metadata" in doc["error"]["hint"]
    assert emulator.calls == []
    metadata.task = {"TaskARN": "arn:aws:ecs:us-east-1:123456789012:task/c/abc"}
    car.wait_for(lambda d: d["state"] == "entitled", timeout=10)
    car.stop()
    failed = [
        json.loads(line) for line in car.logs().splitlines() if '"event":"register_failed"' in line
    ]
    assert failed and failed[0]["hint"] == doc["error"]["hint"]
