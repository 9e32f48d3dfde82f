"""Sending one hour of SaaS usage: time against AWS's quota, and calls per record.

N customers (10,000; --quick 1,000) x 3 dimensions = 3N records in the last ended hour, posted
through three sidecars on PostgreSQL while this script holds the fleet's sender lock (so no
sidecar seals or sends yet). Then it lets go: a sidecar takes the sender role, seals the hour
and sends it with BatchMeterUsage, against the emulator throttled at AWS's quota of 10 calls
per second. Measured on the real clock (no test-only scaling), from the release to the last
record in the emulator's ledger.

Floor: the fewest calls (ceil(3N / 25), every batch full) at 10 per second. The sidecar paces
itself at 8 calls per second (SaasPolicy.calls_per_second, under the quota, so a
fleet is never throttled), so its best ratio is 1.25. Calls per record: calls made (throttled
ones included) over the fewest possible; goal <= 1.05 (batches full, no throttling, no resends).

Usage: python benchmarks/saas_send.py [--quick] [--customers 10000] [--sidecars 3]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from benchmarks import guard, guard_report  # noqa: E402
from sidecar.emulator.service import Emulator, EmulatorServer  # noqa: E402
from tests import loopback_guard  # noqa: E402
from tests.pg import PgServer  # noqa: E402
from tests.saas_kit import DIMS, HOUR, Car, Customer, Ops, saas_env, start_fleet  # noqa: E402

QUOTA = 10.0  # BatchMeterUsage calls per second (AWS's quota, the emulator's throttle)
BATCH = 25


def hold_sender_lock(url: str) -> Any:
    """A store of our own on the fleet's database, holding the sender role (its advisory
    lock) before any sidecar starts: none may lead until it is closed."""
    from sidecar.usage.db import open_store
    from sidecar.usage.saas import SAAS_SCHEMA

    store = open_store(SAAS_SCHEMA, state_dir=None, database_url=url)
    if not store.leading():
        raise SystemExit("could not take the sender role before the sidecars started")
    return store


def register(ops_url: str, n: int, threads: int = 4) -> list[Customer]:
    """N customers in the emulator (subscribed), over its operator endpoint."""
    out: list[Customer | None] = [None] * n

    def work(k: int) -> None:
        ops = Ops(ops_url)
        for i in range(k, n, threads):
            out[i] = ops.customer(i)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return [c for c in out if c is not None]


def load(cars: list[Car], customers: list[Customer], hour: int, threads: int = 3) -> int:
    """Every customer x dimension once, stamped inside `hour`; the units posted."""
    stamp = datetime.fromtimestamp(hour * HOUR + 1800, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    records: list[dict[str, Any]] = [
        {
            **c.fields(),
            "dimension": d,
            "quantity": 1 + (i * 7 + j) % 1000,
            "id": uuid.uuid4().hex,
            "timestamp": stamp,
        }
        for i, c in enumerate(customers)
        for j, d in enumerate(DIMS)
    ]
    chunks = [records[i : i + 1000] for i in range(0, len(records), 1000)]
    problems: list[str] = []

    def work(k: int) -> None:
        http = requests.Session()
        for n in range(k, len(chunks), threads):
            car = cars[n % len(cars)]
            try:
                resp = http.post(car.api + "/v1/usage", json=chunks[n], timeout=120)
            except requests.RequestException as exc:
                problems.append(f"{car.name}: {exc}")
                return
            if resp.status_code != 202:
                problems.append(f"{car.name}: {resp.status_code} {resp.text[:300]}")
                return
            for answer in resp.json()["records"]:
                if answer.get("carried_from") or answer["hour"] != stamp[:13] + ":00:00Z":
                    problems.append(f"counted in another hour: {answer}")
                    return

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if problems:
        raise SystemExit(f"loading the hour failed: {problems[:3]}")
    return sum(int(r["quantity"]) for r in records)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1,000 customers")
    ap.add_argument("--customers", type=int, default=10_000)
    ap.add_argument("--sidecars", type=int, default=3)
    args = ap.parse_args()
    n = 1000 if args.quick else args.customers
    guarded = loopback_guard.child_env(guard())
    load_before = os.getloadavg()
    pg = PgServer()
    server = EmulatorServer(Emulator(seed=1)).start()
    ops = Ops(server.url)
    ops.configure(batch_throttle_rps=QUOTA)
    cars: list[Car] = []
    try:
        url = pg.new_database()
        lock = hold_sender_lock(url)
        started = time.monotonic()
        customers = register(server.url, n)
        print(f"{n} customers registered in the emulator in {time.monotonic() - started:.1f} s")
        envs = [
            {
                **saas_env(
                    server.url, database_url=url, MARKETPLACE_ACCEPT_UNRESOLVED_CUSTOMERS="true"
                ),
                **guarded,
            }
            for _ in range(args.sidecars)
        ]
        cars = start_fleet(envs, Path(tempfile.mkdtemp(prefix="saas-send-")))
        if any(car.leader() for car in cars):
            raise SystemExit("a sidecar leads while the script holds the lock")
        # The last ended hour, once it may be sealed (its end plus the seal margin).
        hour = math.floor(time.time() / HOUR) - 1
        started = time.monotonic()
        units = load(cars, customers, hour)
        took = time.monotonic() - started
        records = n * len(DIMS)
        print(
            f"{records} records ({units} units) posted in {took:.1f} s "
            f"({records / took:.0f} records/s, 1,000 per request)"
        )
        if ops.ledger()["records"]:
            raise SystemExit("something was sent before the release")
        sealable = (hour + 1) * HOUR + 61.0  # the hour's end plus the seal margin
        if time.time() < sealable:
            time.sleep(sealable - time.time())
        released = time.time()
        lock.close()  # the session ends, and its advisory lock with it
        fewest = math.ceil(records / BATCH)
        deadline = time.monotonic() + fewest / QUOTA * 4 + 120
        first = last = None
        while time.monotonic() < deadline:
            ledger = ops.ledger()
            mine = [r for r in ledger["records"] if int(r["hour"]) == hour]
            if mine and first is None:
                first = time.time()
            if len(mine) >= records:
                last = time.time()
                break
            time.sleep(0.2)
        calls = ops.calls("BatchMeterUsage")
        if last is None or first is None:
            raise SystemExit(f"not all sent: {len(mine)} of {records}; counts {ledger['counts']}")
        billed = sum(int(r["quantity"]) for r in mine)
        throttled = sum(1 for c in calls if c.get("code") == "ThrottlingException")
        floor = fewest / QUOTA
        send = last - released
        print(f"load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")
        print(f"billed == posted            {billed == units} ({billed} units)")
        print(f"sender took over after      {first - released:.1f} s (first record billed)")
        print(f"hour sent in                {send:.1f} s (release to last record billed)")
        print(f"  of which sending          {last - first:.1f} s (first to last record billed)")
        print(f"floor (fewest calls @ 10/s) {floor:.1f} s")
        alone = (last - first) / floor
        print(f"ratio to floor              {send / floor:.2f} (sending alone {alone:.2f})")
        print(f"calls made / fewest         {len(calls)} / {fewest}  (throttled {throttled})")
        print(f"calls per record vs full    {len(calls) / fewest:.3f}  (goal <= 1.05)")
        print(f"duplicate_record            {ledger['counts'].get('duplicate_record', 0)}")
    finally:
        for car in cars:
            car.stop(timeout=30)
        server.shutdown()
        pg.close()
    guard_report()


if __name__ == "__main__":
    main()
