"""Fleet cold start: N pods register at once against RegisterUsage's 5 requests/s per account.

For each N, N registration clients run the sidecar's own code (Registrar -> MeteringGateway ->
botocore over HTTP) in one process, against the emulator's token-bucket throttle (5 rps, burst
5), on loopback (the loopback guard is on). Reports the time until all are entitled against
the goal 1.25 x N/5 s + 5 s, calls per pod (goal < 3) and give-ups (goal 0).
--model adds the same policy in virtual time (the real ThrottleSchedule and TokenBucket, no
HTTP): seconds instead of minutes, several seeds, to check the real runs are not luck.
--fleet-size (MARKETPLACE_FLEET_SIZE): auto (default) adds, after the adaptive rows, rows with
the hint equal to each N, and model rows with a wrong hint (N/2 and 2N: what a mistake costs);
a number adds rows with that hint for every N; '' shows the adaptive rows only.

Usage: python benchmarks/fleet.py [--pods 20,50,100,200,500,1000] [--schedule ''|25,40,43]
       [--fleet-size auto|N|''] [--model] [--seeds 5] [--rps 5] [--real-up-to N]
A real run takes about 1.25 x N/5 s (1,000 pods: over 4 minutes, 1,000 threads and botocore
clients in one process); --real-up-to N keeps the real runs to N pods and fewer and shows the
larger sizes in the model only (what `make bench` does: real up to 100, model up to 1,000).
"""

from __future__ import annotations

import argparse
import functools
import heapq
import logging
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.serialization import load_pem_public_key  # noqa: E402

from benchmarks import guard, guard_report, stand_in_env  # noqa: E402
from sidecar.aws.metering import MeteringGateway  # noqa: E402
from sidecar.config import parse_schedule  # noqa: E402
from sidecar.core.backoff import ThrottleSchedule  # noqa: E402
from sidecar.core.clock import SystemClock  # noqa: E402
from sidecar.core.ratelimit import TokenBucket  # noqa: E402
from sidecar.emulator.service import Emulator, EmulatorConfig, EmulatorServer  # noqa: E402
from sidecar.entitlement.registrar import Policy, Registrar  # noqa: E402
from sidecar.entitlement.state import Entitlement, State  # noqa: E402

Row = tuple[float, float, int]  # all entitled after (s), calls per pod, give-ups


def _same(gateway: MeteringGateway) -> MeteringGateway:
    return gateway


def real(pods: int, schedule: ThrottleSchedule, rps: float, burst: int) -> Row:
    emulator = Emulator(EmulatorConfig(throttle_rps=rps, throttle_burst=burst))
    server = EmulatorServer(emulator).start()
    os.environ.update(stand_in_env(server.url))
    key = load_pem_public_key(emulator.public_pem().encode())
    policy = Policy(
        product_code="fleet-product",
        public_key_version=1,
        keys={1: key},  # type: ignore[dict-item]
        throttle=schedule,
    )
    stop = threading.Event()
    registrars = []
    for _ in range(pods):  # one gateway (botocore client) per pod, created before the clock
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
    emulator.reconfigure({"throttle_rps": rps, "throttle_burst": burst})
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
    entitled = sum(r.machine.snapshot().state is State.ENTITLED for r in registrars)
    calls = len(emulator.calls)
    server.shutdown()
    return max(done_at) - started, calls / pods, pods - entitled


def model(pods: int, schedule: ThrottleSchedule, rps: float, burst: int, seed: int) -> Row:
    """The same policy and token bucket in virtual time (no HTTP, no threads)."""
    rng = random.Random(seed)
    bucket = TokenBucket(rps, burst, 0.0)
    due = [(0.0, p, 0) for p in range(pods)]
    heapq.heapify(due)
    calls = done = 0
    last = 0.0
    while due:
        now, p, throttles = heapq.heappop(due)
        calls += 1
        if bucket.take(now) == 0.0:
            done, last = done + 1, max(last, now)
            continue
        delay = schedule.delay(throttles + 1, 0.0, now, rng.random)
        if now + delay <= Policy.deadline:
            heapq.heappush(due, (now + delay, p, throttles + 1))
    return last, calls / pods, pods - done


def verdict(pods: int, rps: float, row: Row) -> str:
    took, calls, gave_up = row
    goal = 1.25 * pods / rps + 5
    misses = [
        what
        for what, ok in (("time", took <= goal), ("calls", calls < 3), ("give-ups", gave_up == 0))
        if not ok
    ]
    return "met" if not misses else "missed: " + ", ".join(misses)


def hints(arg: str, pods: int) -> list[tuple[str, int | None, bool]]:
    """(label, MARKETPLACE_FLEET_SIZE, also run for real) for `pods`: adaptive first."""
    rows: list[tuple[str, int | None, bool]] = [("none", None, True)]
    if arg == "auto":
        rows.append(("N", pods, True))
        rows.append(("N/2", max(1, pods // 2), False))  # wrong hints: model only
        rows.append(("2N", 2 * pods, False))
    elif arg:
        rows.append((arg, int(arg), True))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", default="20,50,100,200,500,1000")
    ap.add_argument("--rps", type=float, default=5.0)
    ap.add_argument("--burst", type=int, default=5)
    ap.add_argument("--schedule", default="", help="fixed slots, e.g. 25,40,43 (default adaptive)")
    ap.add_argument(
        "--fleet-size",
        default="auto",
        help="MARKETPLACE_FLEET_SIZE rows: auto (hint = each N, plus N/2 and 2N in the model), "
        "a number, or '' (adaptive only)",
    )
    ap.add_argument("--model", action="store_true", help="add virtual-time rows (5 seeds)")
    ap.add_argument("--seeds", type=int, default=5, help="model runs per row (worst time shown)")
    ap.add_argument(
        "--real-up-to", type=int, default=0, help="real runs only up to this many pods (0: all)"
    )
    args = ap.parse_args()
    if args.fleet_size not in ("", "auto") and not (
        args.fleet_size.isascii() and args.fleet_size.isdigit() and int(args.fleet_size) >= 1
    ):
        ap.error("--fleet-size: auto, a whole number of pods (>= 1), or ''")
    if args.schedule and args.fleet_size:
        ap.error("--schedule and --fleet-size exclude each other (as the settings do)")
    logging.disable(logging.CRITICAL)  # hundreds of pods' retry warnings are not the report
    guard()
    edges = parse_schedule(args.schedule) if args.schedule else ()
    sizes = [int(n) for n in args.pods.split(",")]
    name = args.schedule or "adaptive"
    print(f"rps={args.rps:g} burst={args.burst} schedule={name} fleet-size={args.fleet_size!r}")
    print(
        f"{'run':7} {'hint':>5} {'pods':>5} {'goal (s)':>9} {'entitled after':>15} {'ratio':>6} "
        f"{'calls/pod':>10} {'give-ups':>9}  verdict"
    )
    for kind in range(len(hints(args.fleet_size, 1))):  # adaptive rows first, then each hint
        for pods in sizes:
            label, hint, real_too = hints(args.fleet_size, pods)[kind]
            run_rows(args, pods, label, ThrottleSchedule(edges, fleet=hint), real_too)
    guard_report()


def run_rows(
    args: argparse.Namespace, pods: int, label: str, schedule: ThrottleSchedule, real_too: bool
) -> None:
    goal = 1.25 * pods / args.rps + 5
    rows: list[tuple[str, Row]] = []
    if args.model or not real_too:
        seeds = [model(pods, schedule, args.rps, args.burst, seed) for seed in range(args.seeds)]
        worst = (
            max(r[0] for r in seeds),
            statistics.mean(r[1] for r in seeds),
            sum(r[2] for r in seeds),
        )
        rows.append(("model", worst))
    if real_too and (not args.real_up_to or pods <= args.real_up_to):
        rows.append(("real", real(pods, schedule, args.rps, args.burst)))
    elif real_too and not args.model:
        print(f"real    {label:>5} {pods:5d}  not run (more than --real-up-to {args.real_up_to})")
    for kind, row in rows:
        took, calls, gave_up = row
        print(
            f"{kind:7} {label:>5} {pods:5d} {goal:9.1f} {took:15.1f} "
            f"{took / (pods / args.rps):6.2f} {calls:10.2f} {gave_up:9d}  "
            f"{verdict(pods, args.rps, row)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
