"""SaaS ingest on PostgreSQL: three sidecars' POST /v1/usage throughput, against a floor.

The floor, measured in the same run on the same PostgreSQL server (fsync on): the same rows
(customer account and license, dimension, quantity, id, time), each a plain INSERT committed on
its own (autocommit) through psycopg, from the same number of client threads, each with its own
connection. The sidecar's path: HTTP on loopback to one of three `marketplace-sidecar run`
processes in SaaS mode (round robin over the clients), JSON parsing, validation, the resolved-
customer check, the idempotency key, hour bucketing, then each sidecar's writer commits every
pending request in one transaction (group commit). Both acknowledge only once committed. The
clients are threads of this process on the same machine as the server and the sidecars; the
sidecars' clients each hold one keep-alive `http.client` connection, about as cheap per request
as the floor's psycopg clients (with `requests` they cost eight times as much CPU, on the same
two cores as what they measure).

Rounds alternate floor and sidecars; the ratio is the median over rounds. Only acknowledged
requests count (202); any other answer or a dropped connection is listed as a failure.

The issue's goal (docs/saas-capacity.md): with 16 clients, 1-record and 25-record POSTs each
at least 0.5x the floor, p99 acknowledgement at most 50 ms.

`--sqlite`: one sidecar on its own SQLite store (a single replica), against plain INSERTs of the
same rows into a SQLite WAL file, one transaction (one fsync) per request.

Usage: python benchmarks/saas_ingest.py [--quick] [--seconds 4] [--rounds 3] [--clients 1,16]
                                        [--batch 1,25] [--sqlite]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import guard, guard_report  # noqa: E402
from sidecar.emulator.service import Emulator, EmulatorServer  # noqa: E402
from tests import loopback_guard  # noqa: E402
from tests.pg import PgServer  # noqa: E402
from tests.saas_kit import (  # noqa: E402
    DIMS,
    Car,
    Customer,
    Ops,
    resolve,
    saas_env,
    start_fleet,
)

FLOOR_DDL = (
    "CREATE TABLE floor_usage (id TEXT PRIMARY KEY, account TEXT NOT NULL, license TEXT NOT NULL,"
    " dimension TEXT NOT NULL, quantity BIGINT NOT NULL, received_at DOUBLE PRECISION NOT NULL)"
)


def _drive(
    clients: int, seconds: float, one: Callable[[int], str | None]
) -> tuple[float, list[float], Counter[str]]:
    """Run `one(client)` in a loop on `clients` threads. `one` returns None when its records
    were acknowledged, else what went wrong. (acknowledged requests per second, their
    latencies, failures by kind)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: Counter[str] = Counter()
    stop = threading.Event()
    go = threading.Barrier(clients + 1)

    def loop(i: int) -> None:
        go.wait()
        while not stop.is_set():
            started = time.perf_counter()
            try:
                problem = one(i)
            except Exception as exc:  # a dropped connection, a database error: counted
                problem = type(exc).__name__
            if problem is None:
                latencies[i].append(time.perf_counter() - started)
            else:
                failures[problem] += 1

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
    return len(flat) / elapsed, flat, failures


def _rows(customers: list[Customer], rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [
        {
            **c.fields(),
            "dimension": rng.choice(DIMS),
            "quantity": rng.randint(1, 100),
            "id": uuid.uuid4().hex,
        }
        for c in (rng.choice(customers) for _ in range(n))
    ]


def floor(
    url: str, customers: list[Customer], clients: int, seconds: float, batch: int
) -> tuple[float, list[float], Counter[str]]:
    import psycopg

    conns = [psycopg.connect(url, autocommit=True) for _ in range(clients)]
    rngs = [random.Random(i) for i in range(clients)]  # test data

    def one(i: int) -> str | None:
        rows = _rows(customers, rngs[i], batch)
        params = [
            (
                r["id"],
                r["customer_aws_account_id"],
                r["license_arn"],
                r["dimension"],
                r["quantity"],
                time.time(),
            )
            for r in rows
        ]
        conn = conns[i]
        if batch == 1:
            conn.execute("INSERT INTO floor_usage VALUES (%s, %s, %s, %s, %s, %s)", params[0])
            return None
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany("INSERT INTO floor_usage VALUES (%s, %s, %s, %s, %s, %s)", params)
        return None

    out = _drive(clients, seconds, one)
    for c in conns:
        c.close()
    return out


def sqlite_floor(
    directory: Path, customers: list[Customer], clients: int, seconds: float, batch: int
) -> tuple[float, list[float], Counter[str]]:
    """The same rows as plain INSERTs into a SQLite WAL file, one transaction per request
    (synchronous=FULL: one fsync per commit), each client its own connection."""
    import sqlite3

    path = directory / f"floor-{uuid.uuid4().hex}.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute(FLOOR_DDL)
    conns = []
    for _ in range(clients):
        c = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        c.execute("PRAGMA synchronous=FULL")
        conns.append(c)
    rngs = [random.Random(i) for i in range(clients)]  # test data

    def one(i: int) -> str | None:
        rows = [
            (
                r["id"],
                r["customer_aws_account_id"],
                r["license_arn"],
                r["dimension"],
                r["quantity"],
                time.time(),
            )
            for r in _rows(customers, rngs[i], batch)
        ]
        c = conns[i]
        c.execute("BEGIN IMMEDIATE")
        c.executemany("INSERT INTO floor_usage VALUES (?, ?, ?, ?, ?, ?)", rows)
        c.execute("COMMIT")
        return None

    out = _drive(clients, seconds, one)
    for c in conns:
        c.close()
    return out


def sidecars(
    cars: list[Car], customers: list[Customer], clients: int, seconds: float, batch: int
) -> tuple[float, list[float], Counter[str]]:
    """The clients: one keep-alive `http.client` connection each (Nagle off, as the sidecar
    has it), the body encoded by `json.dumps`. `requests` cost the clients about 1 ms of CPU per
    POST, eight times what psycopg costs the floor's clients on the same cores; measured with it,
    the ratio said as much about the client library as about the sidecar."""
    conns: list[http.client.HTTPConnection | None] = [None] * clients
    rngs = [random.Random(100 + i) for i in range(clients)]  # test data
    headers = {"Content-Type": "application/json"}

    def one(i: int) -> str | None:
        rows = _rows(customers, rngs[i], batch)
        body = json.dumps(rows if batch > 1 else rows[0]).encode()
        conn = conns[i]
        if conn is None:
            car = urlsplit(cars[i % len(cars)].api)
            conn = conns[i] = http.client.HTTPConnection(str(car.hostname), car.port, timeout=30)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn.request("POST", "/v1/usage", body, headers)
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conns[i] = None
            raise
        if resp.will_close:
            conn.close()
            conns[i] = None
        return None if resp.status == 202 else f"HTTP {resp.status}"

    try:
        return _drive(clients, seconds, one)
    finally:
        for c in conns:
            if c is not None:
                c.close()


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU time of each of these processes still running (Linux /proc): under a
    load that moves the rates, what a request costs in CPU moves much less."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `_cpu_seconds`, by the processes seen both times."""
    both = before.keys() & after.keys()
    return sum(after[p] - before[p] for p in both) if both else float("nan")


def _children(parents: list[int]) -> list[int]:
    """The processes whose parent is one of `parents` (a postmaster's backends)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) in parents:
                out.append(int(stat.parent.name))
    return out


def _postmaster(data: Path) -> list[int]:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return [int((data / "postmaster.pid").read_text().split()[0])]
    return []


def p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * (len(values) - 1))] if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one short round at 16 clients")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", default="1,16", help="comma-separated client thread counts")
    ap.add_argument(
        "--batch", default="1,25", help="comma-separated records per request / transaction"
    )
    ap.add_argument("--customers", type=int, default=50)
    ap.add_argument("--sidecars", type=int, default=3)
    ap.add_argument(
        "--sqlite",
        action="store_true",
        help="one sidecar on its own SQLite store; floor: SQLite WAL INSERTs, fsync per commit",
    )
    args = ap.parse_args()
    if args.sqlite:
        args.sidecars = 1
    if args.quick:
        args.seconds, args.rounds, args.clients = 2.0, 1, "16"
    counts = [int(c) for c in args.clients.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    guarded = loopback_guard.child_env(guard())
    load = os.getloadavg()
    pg = PgServer()
    server = EmulatorServer(Emulator(seed=1)).start()
    logs = Path(tempfile.mkdtemp(prefix="saas-ingest-"))
    cars: list[Car] = []
    try:
        url = pg.new_database()
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(FLOOR_DDL)
        ops = Ops(server.url)
        customers = [ops.customer(i) for i in range(args.customers)]
        store: dict[str, Any] = {"database_url": url}
        if args.sqlite:
            store = {"state_dir": logs / "state"}
            store["state_dir"].mkdir()
        envs = [{**saas_env(server.url, **store), **guarded} for _ in range(args.sidecars)]
        cars = start_fleet(envs, logs)
        for i, cust in enumerate(customers):
            resolve(cars[i % len(cars)], cust)
        where = "SQLite (WAL)" if args.sqlite else f"PostgreSQL {pg.bin.parent.name}"
        print(
            f"{where}, {args.sidecars} sidecar(s), "
            f"{args.customers} customers; rounds: {args.rounds} x {args.seconds:g} s; "
            f"load average before: {load[0]:.2f} ({os.cpu_count()} CPUs)"
        )
        print(
            f"{'records':>7} {'clients':>7} {'floor rec/s':>12} {'sidecars rec/s':>15} "
            f"{'ratio':>6} {'floor p99 ms':>13} {'sidecars p99 ms':>16} "
            f"{'CPU ms/POST: sidecars':>21} {'postgres':>8}  failed requests"
        )
        for batch, clients in ((b, c) for b in batches for c in counts):
            ratios, rows = [], []
            cpu_car: list[float] = []
            cpu_pg: list[float] = []
            failed: Counter[str] = Counter()
            for _ in range(args.rounds):
                if args.sqlite:
                    f_rate, f_lat, f_fail = sqlite_floor(
                        logs, customers, clients, args.seconds, batch
                    )
                else:
                    f_rate, f_lat, f_fail = floor(url, customers, clients, args.seconds, batch)
                cars_pids = [car.proc.pid for car in cars]
                pg_pids = [] if args.sqlite else _children(_postmaster(pg.data))
                cpu0 = _cpu_seconds(cars_pids), _cpu_seconds(pg_pids)
                s_rate, s_lat, s_fail = sidecars(cars, customers, clients, args.seconds, batch)
                cpu1 = _cpu_seconds(cars_pids), _cpu_seconds(pg_pids)
                done = max(1.0, s_rate * args.seconds)  # requests (approximately: the rate's)
                cpu_car.append(_spent(cpu0[0], cpu1[0]) / done)
                cpu_pg.append(_spent(cpu0[1], cpu1[1]) / done)
                failed.update({f"floor {k}": v for k, v in f_fail.items()})
                failed.update({f"sidecars {k}": v for k, v in s_fail.items()})
                ratios.append(s_rate / f_rate)
                rows.append((f_rate * batch, s_rate * batch, p99(f_lat), p99(s_lat)))
            med = statistics.median(ratios)
            f_rate, s_rate, f_p99, s_p99 = sorted(rows, key=lambda r: r[1] / r[0])[len(rows) // 2]
            print(
                f"{batch:7d} {clients:7d} {f_rate:12.0f} {s_rate:15.0f} {med:6.2f} "
                f"{f_p99 * 1000:13.1f} {s_p99 * 1000:16.1f} "
                f"{statistics.median(cpu_car) * 1000:21.2f} {statistics.median(cpu_pg) * 1000:8.2f}"
                f"  {dict(failed) or 'none'}"
            )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        for car in cars:
            car.stop(timeout=10)
        server.shutdown()
        pg.close()
    guard_report()


if __name__ == "__main__":
    main()
