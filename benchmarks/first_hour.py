"""Short-lived custom-mode pods: how much usage the start check costs, and how a clock ahead of
AWS's at start heals.

1. Loss: pods with a given lifetime start at random points of an hour, run `meter_zero`, report
   one unit per minute on each of two dimensions, and drain (SIGTERM) at the end of their life.
   Counted: units acknowledged vs units the emulator (AWS) recorded, with the default check
   (first dimension) and with a dedicated check dimension (MARKETPLACE_ENTITLEMENT_DIMENSION).
2. Clock: the pod's clock is ahead of AWS's by more than AWS's future tolerance for a while,
   then the clocks agree: MeterUsage calls made meanwhile, and the time from agreement to
   `entitled`, with the default backoff (base 1 s, cap 60 s).

Real UsageService, real SQLite store, boto3 over loopback HTTP to the embedded emulator; time is
a manual clock (no sleeping). Usage: python benchmarks/first_hour.py [--pods 20] [--seed 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import guard, guard_report  # noqa: E402
from sidecar.aws.metering import MeteringGateway  # noqa: E402
from sidecar.emulator.service import Emulator, EmulatorServer  # noqa: E402
from sidecar.usage.hours import HOUR, hour_start  # noqa: E402
from sidecar.usage.service import UsagePolicy, UsageService  # noqa: E402
from tests.helpers import NOW, ManualClock  # noqa: E402

DIMS = ("scans", "users")


def pod(
    server: EmulatorServer, name: str, clock: ManualClock, check_dimension: str | None
) -> UsageService:
    os.environ["AWS_ACCESS_KEY_ID"] = name  # the emulator's pod identity
    dims = (*DIMS, check_dimension) if check_dimension else DIMS
    policy = UsagePolicy(
        product_code="prod-abc",
        dimensions=dims,
        state_dir=Path(tempfile.mkdtemp(prefix="first-hour-")),
        check_dimension=check_dimension,
        backoff_base=1.0,
        backoff_cap=60.0,
    )
    return UsageService(policy, lambda: MeteringGateway("us-east-1", 5.0), clock=clock)


def loss(server: EmulatorServer, minutes: int, pods: int, rng: random.Random) -> dict[str, int]:
    out = {"acked": 0, "default_billed": 0, "check_billed": 0, "default_pods_losing": 0}
    for i in range(pods):
        offset = rng.random() * HOUR
        for check in (None, "entitlement_check"):
            clock = ManualClock()
            clock.t = hour_start(int(NOW // HOUR) + 10) + offset
            server.emulator.meter_clock = lambda c=clock: c.t
            name = f"loss-{minutes}-{i}-{check or 'default'}"
            svc = pod(server, name, clock, check)
            assert svc.check_entitlement(threading.Event()).outcome == "entitled"
            acked = 0
            for _ in range(minutes):
                for dim in DIMS:
                    status, _ = svc.post(f'{{"dimension": "{dim}", "quantity": 1}}'.encode())
                    assert status == 202
                    acked += 1
                clock.t += 60
                clock.mono += 60
            svc.drain(20.0)
            svc.close()
            billed = sum(
                r["quantity"] for r in server.emulator.ledger()["records"] if r["pod"] == name
            )
            if check is None:
                out["acked"] += acked
                out["default_billed"] += billed
                out["default_pods_losing"] += billed < acked
            else:
                out["check_billed"] += billed
    return out


def clock_heal(
    server: EmulatorServer, ahead: float, fixed_after: float | None
) -> tuple[str, int, float]:
    """(outcome, MeterUsage calls, seconds from start to the outcome); the pod's clock is
    `ahead` of AWS's until `fixed_after` seconds (None: never)."""
    clock = ManualClock()
    skew = [ahead]
    server.emulator.meter_clock = lambda: clock.t - skew[0]
    server.emulator.calls.clear()
    svc = pod(server, f"clock-{ahead}-{fixed_after}", clock, None)
    original = clock.wait

    def wait(stop: threading.Event, seconds: float) -> bool:
        result = original(stop, seconds)
        if fixed_after is not None and clock.mono >= fixed_after:
            skew[0] = 0.0
        return result

    clock.wait = wait  # type: ignore[method-assign]
    result = svc.check_entitlement(threading.Event())
    svc.close()
    server.emulator.meter_clock = None
    calls = sum(1 for c in server.emulator.calls if c["op"] == "MeterUsage")
    return result.outcome, calls, clock.mono


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    guard()
    logging.disable(logging.CRITICAL)  # the sidecar's own lines; the figures are printed
    server = EmulatorServer(Emulator(seed=args.seed)).start()
    os.environ.update(
        {
            "AWS_ENDPOINT_URL_MARKETPLACE_METERING": server.url,
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }
    )
    rng = random.Random(args.seed)
    print(f"pods per lifetime: {args.pods}, 2 dimensions, 1 unit/min each, drain at exit")
    print("lifetime  acked  billed(default)  pods losing  billed(check dimension)")
    for minutes in (5, 15, 30, 45, 59):
        r = loss(server, minutes, args.pods, rng)
        print(
            f"{minutes:>4} min {r['acked']:>7} {r['default_billed']:>9} "
            f"({100 * r['default_billed'] / r['acked']:.0f}%) {r['default_pods_losing']:>6}/"
            f"{args.pods} {r['check_billed']:>12}"
        )
    print("AWS future tolerance 300 s (the emulator's; AWS's is undocumented), deadline 3600 s")
    print("clock ahead  clock fixed after  outcome      MeterUsage calls  after")
    for ahead, fixed in ((600.0, None), (3600.0, 1800.0), (7200.0, None)):
        outcome, calls, took = clock_heal(server, ahead, fixed)
        shown = "never" if fixed is None else f"{fixed:.0f} s"
        print(f"{ahead:>8.0f} s {shown:>12}       {outcome:<12} {calls:>8} {took:>14.0f} s")
    server.shutdown()
    guard_report()


if __name__ == "__main__":
    main()
