"""The emulator's MeterUsage, driven by unmodified boto3 over HTTP: AWS's hour rules per pod."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.test_emulator import client, code_of

NOW = 1_800_000_000.0
HOUR0 = (int(NOW) // 3600) * 3600


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@pytest.fixture
def meter(emulator: Emulator) -> Emulator:
    emulator.meter_clock = lambda: HOUR0 + 2 * 3600 + 100
    return emulator


def usage(c: Any, **over: Any) -> Any:
    params: dict[str, Any] = {
        "ProductCode": "prod-abc",
        "Timestamp": at(HOUR0 + 10),
        "UsageDimension": "scans",
        "UsageQuantity": 5,
    }
    params.update(over)
    return c.meter_usage(**params)


def test_one_record_per_pod_dimension_and_hour(
    emulator_server: EmulatorServer, meter: Emulator
) -> None:
    c = client(emulator_server, "pod-m1")
    first = usage(c)["MeteringRecordId"]
    # identical after rounding to the hour: idempotent, same record
    assert usage(c, Timestamp=at(HOUR0 + 3000))["MeteringRecordId"] == first
    assert code_of(lambda: usage(c, UsageQuantity=6)) == "DuplicateRequestException"
    # the next hour, another dimension and another pod are separate records
    assert usage(c, Timestamp=at(HOUR0 + 3600))["MeteringRecordId"] != first
    assert usage(c, UsageDimension="users")["MeteringRecordId"] != first
    assert usage(client(emulator_server, "pod-m2"), UsageQuantity=7)["MeteringRecordId"] != first
    ledger = meter.ledger()
    assert len(ledger["records"]) == 4
    assert ledger["counts"]["DuplicateRequestException"] == 1


def test_client_token_reuse_with_other_parameters_is_a_conflict(
    emulator_server: EmulatorServer, meter: Emulator
) -> None:
    c = client(emulator_server, "pod-m3")
    rid = usage(c, ClientToken="tok-1")["MeteringRecordId"]
    assert usage(c, ClientToken="tok-1")["MeteringRecordId"] == rid
    assert (
        code_of(lambda: usage(c, ClientToken="tok-1", UsageDimension="users"))
        == "IdempotencyConflictException"
    )


def test_the_six_hour_window_and_the_future_limit(
    emulator_server: EmulatorServer, meter: Emulator
) -> None:
    c = client(emulator_server, "pod-m4")
    now = HOUR0 + 2 * 3600 + 100
    assert (
        code_of(lambda: usage(c, Timestamp=at(now - 6 * 3600 - 1)))
        == "TimestampOutOfBoundsException"
    )
    assert usage(c, Timestamp=at(now - 6 * 3600 + 60))
    assert code_of(lambda: usage(c, Timestamp=at(now + 301))) == "TimestampOutOfBoundsException"


def test_published_dimensions_allocations_and_tags(
    emulator_server: EmulatorServer, meter: Emulator
) -> None:
    meter.reconfigure({"dimensions": ["scans"]})
    c = client(emulator_server, "pod-m5")
    assert code_of(lambda: usage(c, UsageDimension="gb")) == "InvalidUsageDimensionException"

    def alloc(q: int, **tags: str) -> dict[str, Any]:
        return {
            "AllocatedUsageQuantity": q,
            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
        }

    assert (
        code_of(lambda: usage(c, UsageAllocations=[alloc(4, team="a")]))
        == "InvalidUsageAllocationsException"
    )
    assert (
        code_of(lambda: usage(c, UsageAllocations=[alloc(2, team="a"), alloc(3, team="a")]))
        == "InvalidUsageAllocationsException"
    )
    six = {f"k{i}": "v" for i in range(6)}
    assert code_of(lambda: usage(c, UsageAllocations=[alloc(5, **six)])) == "InvalidTagException"
    assert (
        code_of(lambda: usage(c, UsageAllocations=[alloc(5, team="a?")])) == "InvalidTagException"
    )
    assert usage(c, UsageAllocations=[alloc(2, team="a"), alloc(3, team="b")])["MeteringRecordId"]


def test_dry_run_and_entitlement_only_on_a_pods_first_real_call(
    emulator_server: EmulatorServer, meter: Emulator
) -> None:
    meter.reconfigure({"entitled": False})
    c = client(emulator_server, "pod-m6")
    assert usage(c, DryRun=True)["MeteringRecordId"] == "DryRunOperation"  # not a first call
    assert code_of(lambda: usage(c)) == "CustomerNotEntitledException"
    assert usage(c)["MeteringRecordId"]  # AWS refuses only the first call
    meter.reconfigure({"dry_run_answer": "error"})
    assert code_of(lambda: usage(c, DryRun=True)) == "DryRunOperation"
    assert meter.ledger()["counts"] == {"recorded": 1}


def test_throttle_faults_for_one_operation_and_recorded_then_reset(
    emulator_server: EmulatorServer, meter: Emulator
) -> None:
    c = client(emulator_server, "pod-m7")
    meter.reconfigure({"meter_throttle_rps": 1.0, "meter_throttle_burst": 1})
    usage(c)
    assert code_of(lambda: usage(c, UsageDimension="users")) == "ThrottlingException"
    meter.reconfigure(
        {
            "meter_throttle_rps": None,
            "faults": [{"error": "RecordedThenReset", "first": 1, "op": "MeterUsage"}],
        }
    )
    c.register_usage(ProductCode="prod-abc", PublicKeyVersion=1)  # other operations are not hit
    with pytest.raises(Exception, match="Connection"):
        usage(c, UsageDimension="gb")
    assert any(r["dimension"] == "gb" for r in meter.ledger()["records"])  # recorded all the same
    doc = requests.get(emulator_server.url + "/_emulator/ledger", timeout=5).json()
    assert {r["dimension"] for r in doc["records"]} == {"scans", "gb"}


def test_the_test_only_time_scale_runs_the_meter_clock_fast(emulator: Emulator) -> None:
    origin = time.time()
    emulator.reconfigure({"time_scale": 3600.0, "time_origin": origin})
    time.sleep(0.01)
    assert emulator.now() - origin >= 30
