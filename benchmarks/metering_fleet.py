"""A fleet's hourly MeterUsage against the per-account quota (AWS: 10 requests/s, all pods).

N pods run the sidecar's own pipeline in one process (UsageService -> MeteringGateway -> boto3
over HTTP, one SQLite store and one access key per pod) against the emulator's MeterUsage token
bucket. Every pod has usage on D dimensions in the hour that is ending; the clock starts a few
seconds before the hour ends. Reported: time from the end of the hour until every dimension-hour
is sent (against the floor N*D/rps and the spread window), MeterUsage calls per record (goal
<= 1.2), records expired (goal 0), and the busiest second against the quota.

To keep a run short, time is real and the window small: the load that matters is records per
(quota x spread). AWS's 10/s over the default 600 s spread takes 6,000 calls per window; here
2/s over 30 s takes 60, so N*D records here stand for 100*N*D records in one real account.

The pods are paced as a seller configures them: MARKETPLACE_FLEET_SIZE = --pods (unless
--no-fleet-size: the slots then come from the spread window) and MARKETPLACE_METER_CALLS_PER_SECOND
= --pace x the quota. Pods are named like a StatefulSet's (`fleet-0`, `fleet-1`, ...: one slot
each) or, with --names random, like a Deployment's (`fleet-7d9f8b6c5d-x2x9k`: hashed slots,
drawn with --seed). With --hours 2 or more the same pods send one hour after another (the clock
jumps to a few seconds before each next hour ends): the hours after the first show the slots the
pods settled on.

Usage: python benchmarks/metering_fleet.py [--pods 50] [--dims 4] [--rps 2] [--spread 30]
       [--names ordinal|random] [--pace 0.9] [--no-fleet-size] [--seed 7] [--hours 1]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import guard, guard_report, stand_in_env  # noqa: E402
from sidecar.aws.metering import MeteringGateway  # noqa: E402
from sidecar.emulator.service import Emulator, EmulatorConfig, EmulatorServer  # noqa: E402
from sidecar.usage.hours import HOUR, HourPolicy  # noqa: E402
from sidecar.usage.service import UsagePolicy, UsageService  # noqa: E402


class OffsetClock:
    """Real time shifted so that an hour ends `lead` seconds after the run starts."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.hour_end = 0.0

    def align(self, lead: float) -> None:
        """Jump (forward only) to `lead` seconds before the end of this clock's hour."""
        now = self.time()
        self.hour_end = (math.floor(now / HOUR) + 1) * HOUR
        self.offset += self.hour_end - lead - now

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        return stop.wait(max(0.0, seconds))


class PodGateway(MeteringGateway):
    """The sidecar's gateway with this pod's own access key (the emulator's pod identity)."""

    def __init__(self, url: str, pod: str) -> None:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(
            aws_access_key_id=pod,
            aws_secret_access_key="fleet",  # noqa: S106 - the emulator ignores it
            region_name="us-east-1",
        )
        self._client = session.client(
            "meteringmarketplace",
            endpoint_url=url,
            config=Config(
                retries={"mode": "standard", "total_max_attempts": 1},
                read_timeout=10,
                max_pool_connections=2,
            ),
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=50)
    ap.add_argument("--dims", type=int, default=4)
    ap.add_argument("--rps", type=float, default=2.0, help="the account's MeterUsage quota")
    ap.add_argument("--burst", type=int, default=1)
    ap.add_argument("--spread", type=float, default=30.0, help="send window after the hour")
    ap.add_argument("--margin", type=float, default=2.0, help="seal margin after the hour")
    ap.add_argument("--backoff-base", type=float, default=1.0)
    ap.add_argument("--backoff-cap", type=float, default=60.0)
    ap.add_argument("--names", choices=("ordinal", "random"), default="ordinal")
    ap.add_argument("--pace", type=float, default=0.9, help="the fleet's rate / the quota")
    ap.add_argument("--no-fleet-size", action="store_true")
    ap.add_argument("--seed", type=int, default=7, help="the random pod names' seed")
    ap.add_argument("--hours", type=int, default=1, help="hours in a row, the same pods")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)
    guard()

    emulator = Emulator(
        EmulatorConfig(meter_throttle_rps=args.rps, meter_throttle_burst=args.burst)
    )
    server = EmulatorServer(emulator).start()
    os.environ.update(stand_in_env(server.url))
    clock = OffsetClock()
    emulator.meter_clock = clock.time
    dims = tuple(f"dim{i}" for i in range(args.dims))
    base = Path(tempfile.mkdtemp())
    services: list[UsageService] = []
    names = random.Random(args.seed)
    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # a ReplicaSet's pod-name suffixes
    for i in range(args.pods):
        if args.names == "ordinal":
            pod_name = f"fleet-{i}"
        else:
            pod_name = "fleet-7d9f8b6c5d-" + "".join(names.choice(alphabet) for _ in range(5))
        state = base / f"pod{i}"
        state.mkdir()
        gateway = PodGateway(server.url, f"pod-{i}")
        services.append(
            UsageService(
                UsagePolicy(
                    "prod-fleet",
                    dims,
                    state,
                    entitlement_check="none",
                    backoff_base=args.backoff_base,
                    backoff_cap=args.backoff_cap,
                    hours=HourPolicy(seal_margin=args.margin, spread=args.spread),
                    max_sleep=1.0,
                    fleet_size=None if args.no_fleet_size else args.pods,
                    calls_per_second=args.pace * args.rps,
                    pod_name=pod_name,
                ),
                lambda g=gateway: g,  # type: ignore[misc]
                clock=clock,
                rng=random.Random(i).random,
            )
        )
    stop = threading.Event()
    threads = [threading.Thread(target=s.run, args=(stop,), daemon=True) for s in services]
    records = args.pods * args.dims
    floor = records / args.rps
    print(
        f"pods={args.pods} dims={args.dims} records={records} quota={args.rps:g}/s "
        f"burst={args.burst} spread={args.spread:g}s margin={args.margin:g}s"
    )
    print(
        f"pacing: {args.pace * args.rps:g} calls/s, fleet size "
        f"{'unset' if args.no_fleet_size else args.pods}, pod names {args.names}"
        + ("" if args.names == "ordinal" else f" (seed {args.seed})")
    )
    for hour in range(1, args.hours + 1):
        # The fleet's usage is in the hour that ends in three seconds: from the second hour
        # on, the clock jumps there (the pods keep the slots the hours before settled on).
        clock.align(lead=3.0)
        first_call = len(emulator.calls)
        for i, svc in enumerate(services):
            for d in dims:
                status, _ = svc.post(f'{{"dimension": "{d}", "quantity": {i + 1}}}'.encode())
                assert status == 202
        if hour == 1:
            for t in threads:
                t.start()
        hour_end = clock.hour_end
        deadline = hour_end + args.margin + args.spread * 3 + records / args.rps * 3 + 60
        states: Counter[str] = Counter()
        while clock.time() < deadline:
            time.sleep(0.5)
            states = Counter()
            for s in services:
                states.update(s.counters().hours_by_state)
            settled = states["sent"] + states["expired"] + states["conflict"] + states["rejected"]
            if settled >= records * hour:
                break
            if args.verbose:
                print(f"{clock.time() - hour_end:7.1f} s {dict(states)}", flush=True)
        done = clock.time() - hour_end
        calls = [c for c in emulator.calls[first_call:] if c["op"] == "MeterUsage"]
        throttled = sum(1 for c in calls if c["code"] == "ThrottlingException")
        per_second: Counter[int] = Counter(int(c["at"]) for c in calls if c["code"] == "ok")
        ledger: dict[str, Any] = emulator.ledger()
        print(f"-- hour {hour} of {args.hours} (load average {os.getloadavg()[0]:.1f})")
        print(f"{'measure':40} {'value':>9} {'goal':>9}")
        print(f"{'all sent, s after the hour ended':40} {done:9.1f}")
        print(f"{'floor N*D/quota (s)':40} {floor:9.1f} {1.25 * floor:>9.1f}")
        print(f"{'margin + spread window (s)':40} {args.margin + args.spread:9.1f}")
        print(
            f"{'records sent (AWS ledger), all hours':40} {len(ledger['records']):9d} "
            f"{records * hour:>9d}"
        )
        print(f"{'MeterUsage calls per record':40} {len(calls) / records:9.2f} {'<= 1.2':>9}")
        print(f"{'throttled calls':40} {throttled:9d}")
        print(f"{'records expired, all hours':40} {states['expired']:9d} {'0':>9}")
        duplicates = ledger["counts"].get("DuplicateRequestException", 0)
        print(f"{'DuplicateRequestException, all hours':40} {duplicates:9d} {'0':>9}")
        busiest = max(per_second.values()) if per_second else 0
        print(f"{'busiest second, accepted calls':40} {busiest:9d} {'<= quota+burst':>9}")
    stop.set()
    for t in threads:
        t.join(timeout=15)
    for s in services:
        s.close()
    server.shutdown()
    guard_report()


if __name__ == "__main__":
    main()
