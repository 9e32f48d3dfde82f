"""Fleet cold start: N pods register at once against RegisterUsage's 5 requests/s per account.

N registration clients run the sidecar's own code (Registrar -> MeteringGateway -> boto3 over
HTTP) in one process, against the emulator's token-bucket throttle (5 rps, burst 5). Reports
the time until all are entitled against the floor N/5 s, calls per client, and give-ups.
Goals at N = 200: 0 give-ups, all entitled within 1.25x the floor, < 3 calls per client.

Usage: python benchmarks/fleet.py [--pods 200] [--rps 5] [--schedule 25,40,43]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.serialization import load_pem_public_key  # noqa: E402

from sidecar.aws.metering import MeteringGateway  # noqa: E402
from sidecar.config import parse_schedule  # noqa: E402
from sidecar.core.backoff import ThrottleSchedule  # noqa: E402
from sidecar.core.clock import SystemClock  # noqa: E402
from sidecar.emulator.service import Emulator, EmulatorConfig, EmulatorServer  # noqa: E402
from sidecar.entitlement.registrar import Policy, Registrar  # noqa: E402
from sidecar.entitlement.state import Entitlement, State  # noqa: E402


def _same(gateway: MeteringGateway) -> MeteringGateway:
    return gateway


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=200)
    ap.add_argument("--rps", type=float, default=5.0)
    ap.add_argument("--burst", type=int, default=5)
    ap.add_argument("--schedule", default="25,40,43")
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)  # 200 pods' retry warnings are not the report

    emulator = Emulator(EmulatorConfig(throttle_rps=args.rps, throttle_burst=args.burst))
    server = EmulatorServer(emulator).start()
    os.environ.update(
        {
            "AWS_ENDPOINT_URL_MARKETPLACE_METERING": server.url,
            "AWS_ACCESS_KEY_ID": "fleet",
            "AWS_SECRET_ACCESS_KEY": "fleet",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    key = load_pem_public_key(emulator.public_pem().encode())
    policy = Policy(
        product_code="fleet-product",
        public_key_version=1,
        keys={1: key},  # type: ignore[dict-item]
        throttle=ThrottleSchedule(parse_schedule(args.schedule)),
    )
    stop = threading.Event()
    registrars = []
    for _ in range(args.pods):  # one gateway (boto3 client) per pod, created before the clock
        gateway = MeteringGateway("us-east-1", timeout=10.0)
        registrars.append(
            Registrar(
                policy,
                functools.partial(_same, gateway),
                Entitlement(),
                SystemClock(),
                random.Random().random,
                stop,
            )
        )
    emulator.reset()
    emulator.reconfigure({"throttle_rps": args.rps, "throttle_burst": args.burst})
    done_at: list[float] = []
    lock = threading.Lock()
    go = threading.Event()

    def pod(reg: Registrar) -> None:
        go.wait()
        reg.first_registration()
        with lock:
            done_at.append(time.monotonic())

    threads = [threading.Thread(target=pod, args=(r,), daemon=True) for r in registrars]
    for t in threads:
        t.start()
    started = time.monotonic()
    go.set()
    for t in threads:
        t.join()
    elapsed = max(done_at) - started
    entitled = sum(r.machine.snapshot().state is State.ENTITLED for r in registrars)
    calls = len(emulator.calls)
    floor = args.pods / args.rps
    server.shutdown()
    print(f"pods={args.pods} rps={args.rps:g} burst={args.burst} schedule={args.schedule}")
    print(f"{'measure':34} {'value':>9} {'goal':>9}")
    print(f"{'all entitled after (s)':34} {elapsed:9.1f}")
    print(f"{'floor N/rps (s)':34} {floor:9.1f}")
    print(f"{'ratio to floor':34} {elapsed / floor:9.2f} {'<= 1.25':>9}")
    print(f"{'calls per client':34} {calls / args.pods:9.2f} {'< 3':>9}")
    print(f"{'give-ups':34} {args.pods - entitled:9d} {'0':>9}")


if __name__ == "__main__":
    main()
