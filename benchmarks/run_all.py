"""`make bench`: every benchmark a seller or maintainer runs, each in a quick mode, one after the
other (never in parallel: they would share the cores), then one summary line each.

Each script prints its own figures as ratios to a floor measured in the same run, and ends
with the loopback guard's verdict (nothing may leave the machine). Quick modes are for a
first look on a laptop or CI runner: fewer and shorter rounds than the defaults, so ratios are
noisier; run a script alone with its defaults (see its docstring) for figures to publish.
Not run here: benchmarks/image.py (needs `make image` and buildah).

Usage: python benchmarks/run_all.py [--only NAME[,NAME...]]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (script, quick arguments, what it measures against which floor)
BENCHMARKS: list[tuple[str, list[str], str]] = [
    (
        "startup",
        ["--runs", "5", "--no-throughput"],
        "start -> first /readyz 200 and idle RSS vs `import boto3; client()` (seller install)",
    ),
    (
        "gate",
        ["--runs", "3"],
        "idle RSS and readiness with the pod-condition gate on/off vs the same floor",
    ),
    (
        "throughput",
        ["--quick"],
        "/v1/entitlement req/s (wrk if installed) and /healthz p99 while the API is flooded, "
        "vs a bare stdlib server",
    ),
    (
        "signal_window",
        ["--runs", "7"],
        "time exposed to dying by SIGTERM after spawn vs a bare Python installing a handler",
    ),
    (
        "fleet",
        ["--model", "--real-up-to", "100"],
        "fleet cold start vs RegisterUsage's 5/s: time to all entitled vs N/5 s, calls per pod "
        "(N = 20-1,000: real up to 100 pods, virtual time for all)",
    ),
    (
        "ingest",
        ["--seconds", "1", "--rounds", "2"],
        "POST /v1/usage records/s and p99 ack vs SQLite WAL, one fsync per record",
    ),
    (
        "metering_fleet",
        ["--pods", "10", "--dims", "2", "--spread", "10"],
        "a fleet's hourly MeterUsage vs the per-account quota: calls per record, time vs N*D/quota",
    ),
    (
        "crash_usage",
        ["--rounds", "4", "--clients", "4"],
        "kill -9 rounds while clients POST: AWS ledger == acknowledged (an audit, no floor)",
    ),
    (
        "saas_ingest",
        ["--quick"],
        "SaaS POST /v1/usage through 3 sidecars on PostgreSQL vs plain psycopg INSERTs of the "
        "same rows at the same concurrency",
    ),
    (
        "saas_send",
        ["--quick"],
        "time to bill one sealed hour (customers x 3 dimensions) vs records/25/10 s at "
        "BatchMeterUsage's 10/s quota, and calls per record",
    ),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated script names")
    args = ap.parse_args()
    only = {n for n in args.only.split(",") if n}
    results: list[tuple[str, int, float]] = []
    for name, quick, what in BENCHMARKS:
        if only and name not in only:
            continue
        cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *quick]
        print(f"\n=== {name}: {what}\n    {' '.join(cmd[1:])}", flush=True)
        started = time.monotonic()
        code = subprocess.run(cmd, cwd=ROOT).returncode
        results.append((name, code, time.monotonic() - started))
    print("\n=== summary (each script's own table above has the ratios and goals)")
    for name, code, took in results:
        print(f"  {name:15} {'ok' if code == 0 else f'FAILED (exit {code})':18} {took:6.0f} s")
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
