"""Helpers for the usage tests: a UsageService on a real store, talking to the emulator through
the real boto3 gateway over loopback HTTP."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from sidecar.aws.metering import MeteringGateway
from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.usage.hours import HourPolicy
from sidecar.usage.service import UsagePolicy, UsageService
from tests.helpers import ManualClock

DIMS = ("scans", "users")


def aws_env(monkeypatch: pytest.MonkeyPatch, server: EmulatorServer, pod: str) -> None:
    """boto3 reaches only the emulator; the access key id names the pod."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_MARKETPLACE_METERING", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", pod)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")


def service(
    state: Path,
    clock: ManualClock,
    *,
    check: str = "none",
    rng: Any = None,
    hours: HourPolicy | None = None,
    dimensions: tuple[str, ...] = DIMS,
    on_entitlement: Any = None,
    **over: Any,
) -> UsageService:
    policy = UsagePolicy(
        product_code="prod-abc",
        dimensions=dimensions,
        state_dir=state,
        entitlement_check=check,
        backoff_base=over.pop("backoff_base", 2.0),
        backoff_cap=over.pop("backoff_cap", 300.0),
        hours=hours or HourPolicy(seal_margin=60, spread=600),
        **over,
    )
    return UsageService(
        policy,
        lambda: MeteringGateway("us-east-1", 5.0),
        clock=clock,
        rng=rng or (lambda: 0.5),
        on_entitlement=on_entitlement,
    )


def post(svc: UsageService, doc: Any) -> tuple[int, dict[str, Any]]:
    return svc.post(json.dumps(doc).encode())


def ledger_totals(emulator: Emulator) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in emulator.ledger()["records"]:
        out[rec["dimension"]] = out.get(rec["dimension"], 0) + rec["quantity"]
    return out


def run_for(svc: UsageService, clock: ManualClock, seconds: float) -> None:
    """Run the loop on the manual clock until `seconds` of its time have passed."""
    stop = threading.Event()
    end = clock.t + seconds
    original = clock.wait

    def wait(ev: threading.Event, s: float) -> bool:
        original(ev, s)
        if clock.t >= end:
            stop.set()
        return stop.is_set()

    clock.wait = wait  # type: ignore[method-assign,assignment]
    try:
        svc.run(stop)
    finally:
        clock.wait = original  # type: ignore[method-assign]


__all__ = ["DIMS", "Emulator", "EmulatorServer", "ManualClock"]
