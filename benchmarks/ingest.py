"""Durable ingest: POST /v1/usage throughput and acknowledgement latency, against a floor.

The floor, measured in the same run on the same disk: SQLite in WAL mode with
synchronous=FULL, one INSERT per transaction (so one fsync per record), with 1 and with 16
threads each on its own connection. The sidecar's path is `UsageService.post` (JSON parsing,
validation, idempotency keys, hour bucketing) through its single writer thread, which commits
every pending request in one transaction. Goals: >= 2x the floor at 16 clients, p99 ack latency
<= 25 ms. Rounds alternate floor and sidecar; ratios are medians over rounds.

Usage: python benchmarks/ingest.py [--seconds 3] [--rounds 3] [--dir PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.usage.service import UsagePolicy, UsageService  # noqa: E402


def _drive(clients: int, seconds: float, one: Callable[[int], None]) -> tuple[float, list[float]]:
    """Run `one(client)` in a loop on `clients` threads; (records per second, latencies)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = threading.Event()
    go = threading.Barrier(clients + 1)

    def loop(i: int) -> None:
        go.wait()
        while not stop.is_set():
            started = time.perf_counter()
            one(i)
            latencies[i].append(time.perf_counter() - started)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    flat = [x for per in latencies for x in per]
    return len(flat) / elapsed, flat


def floor(directory: Path, clients: int, seconds: float) -> tuple[float, list[float]]:
    path = directory / f"floor-{uuid.uuid4().hex}.sqlite3"
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE records (id TEXT, dimension TEXT, quantity INTEGER, at REAL)")
    setup.close()
    conns = []
    for _ in range(clients):
        c = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        c.execute("PRAGMA synchronous=FULL")
        conns.append(c)

    def one(i: int) -> None:
        c = conns[i]
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO records VALUES (?, 'scans', 1, ?)", (uuid.uuid4().hex, time.time()))
        c.execute("COMMIT")

    out = _drive(clients, seconds, one)
    for c in conns:
        c.close()
    return out


def sidecar(
    directory: Path, clients: int, seconds: float
) -> tuple[float, list[float], float, float]:
    """(records/s, latencies, POSTs per commit, CPU seconds per POST): the CPU is this whole
    process's (the client threads' `json.dumps` and `uuid4` included, the same for any code
    under test), which moves much less with the machine's load than the rates do."""
    state = directory / f"state-{uuid.uuid4().hex}"
    state.mkdir()
    svc = UsageService(
        UsagePolicy("prod-bench", ("scans", "users"), state, entitlement_check="none"),
        lambda: None,  # type: ignore[arg-type,return-value]  # never sends here
    )

    def one(i: int) -> None:
        body = json.dumps({"dimension": "scans", "quantity": 1, "id": uuid.uuid4().hex})
        status, _ = svc.post(body.encode())
        assert status == 202, status

    cpu = time.process_time()
    rate, lat = _drive(clients, seconds, one)
    cpu = (time.process_time() - cpu) / max(1, len(lat))
    per_commit = svc.store.stats.jobs / max(1, svc.store.stats.commits)
    svc.close()
    return rate, lat, per_commit, cpu


def p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * (len(values) - 1))] if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="a directory on the disk to measure")
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)
    base = Path(tempfile.mkdtemp(dir=args.dir))
    print(f"disk: {base}  rounds: {args.rounds} x {args.seconds:g} s")
    print(
        f"{'clients':>7} {'floor rec/s':>12} {'sidecar rec/s':>14} {'ratio':>6} "
        f"{'floor p99 ms':>13} {'sidecar p99 ms':>15} {'req/commit':>10} {'CPU ms/POST':>11}"
    )
    for clients in (1, 16):
        ratios, rows = [], []
        cpus: list[float] = []
        for _ in range(args.rounds):
            f_rate, f_lat = floor(base, clients, args.seconds)
            s_rate, s_lat, per_commit, cpu = sidecar(base, clients, args.seconds)
            ratios.append(s_rate / f_rate)
            rows.append((f_rate, s_rate, p99(f_lat), p99(s_lat), per_commit))
            cpus.append(cpu)
        med = statistics.median(ratios)
        f_rate, s_rate, f_p99, s_p99, per_commit = sorted(rows, key=lambda r: r[1] / r[0])[
            len(rows) // 2
        ]
        print(
            f"{clients:7d} {f_rate:12.0f} {s_rate:14.0f} {med:6.2f} "
            f"{f_p99 * 1000:13.1f} {s_p99 * 1000:15.1f} {per_commit:10.1f} "
            f"{statistics.median(cpus) * 1000:11.3f}"
        )
    print("goals at 16 clients: ratio >= 2.0, sidecar p99 <= 25 ms")


if __name__ == "__main__":
    main()
