"""What contracts with consumption cost the hourly seal (issue 23).

N customers (default 3,000), each with a stored contract (users: 10 an hour, api_calls: a pool
of 100) and usage in both dimensions, are sealed twice from the same start: without
MARKETPLACE_SAAS_CONTRACT_DIMENSIONS (every unit) and with `users:hour,api_calls:term`. Prints
each seal's wall time (the seal lock is held that long: intake waits behind it) and checks the
billed quantities (12 used -> 2 and 0). SQLite by default, a private PostgreSQL server with --pg.
With --idle no customer has usage and the hour is sealed with zero records: what explaining a
zero record of a contract dimension costs.

Usage: python benchmarks/saas_contract_seal.py [--customers 3000] [--pg] [--idle]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.usage import saas_ledger as L  # noqa: E402, N812
from sidecar.usage.db import Db, open_store  # noqa: E402
from sidecar.usage.hours import HourPolicy, hour_of  # noqa: E402
from sidecar.usage.overage import Basis  # noqa: E402
from sidecar.usage.saas import SAAS_SCHEMA  # noqa: E402

DIMS = ("users", "api_calls")
CONTRACT = (("users", Basis.HOUR), ("api_calls", Basis.TERM))


def fill(db: Db, n: int, hour: int, idle: bool = False) -> None:
    accounts = [f"{300000000000 + i}" for i in range(n)]
    db.executemany(
        "INSERT INTO saas_customers (customer, account_id, state, state_since, resolved_at) "
        "VALUES (?, ?, 'active', 0, 0)",
        [(f"{a}/l", a) for a in accounts],
    )
    db.executemany(
        "INSERT INTO saas_lifecycle (subject, state, state_time, event_time, last_event, "
        "updated_at, entitlements_at) VALUES (?, 'subscribed', 0, 0, 'GetEntitlements', 0, 0)",
        [(a,) for a in accounts],
    )
    db.executemany(
        "INSERT INTO saas_entitlements (subject, dimension, value, expiration, learned_at, kind) "
        "VALUES (?, ?, ?, NULL, 0, 'integer')",
        [(a, d, v) for a in accounts for d, v in (("users", "10"), ("api_calls", "100"))],
    )
    if idle:  # only this hour to seal: the one before is sealed
        db.execute(
            "INSERT INTO saas_sealed_hours (hour, sealed_at, records) VALUES (?, 0, 0)",
            (hour - 1,),
        )
        return
    db.executemany(
        "INSERT INTO saas_open (customer, dimension, hour, quantity) VALUES (?, ?, ?, ?)",
        [(f"{a}/l", d, hour, 12_000_000) for a in accounts for d in DIMS],
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=3000)
    ap.add_argument("--pg", action="store_true", help="a private PostgreSQL server (tests.pg)")
    ap.add_argument("--idle", action="store_true", help="no usage: zero records only")
    args = ap.parse_args()
    server = None
    if args.pg:
        from tests.pg import PgServer

        server = PgServer()
    now = time.time()
    hour = hour_of(now) - 1
    try:
        for contract in ((), CONTRACT):
            with tempfile.TemporaryDirectory() as tmp:
                url = server.new_database() if server else None
                store = open_store(SAAS_SCHEMA, state_dir=Path(tmp), database_url=url)
                store.write(lambda db: fill(db, args.customers, hour, args.idle))
                spec = L.SealSpec(DIMS, "license", args.idle, HourPolicy(seal_margin=60), contract)
                t = time.perf_counter()
                store.write(
                    functools.partial(L.seal, through=hour, now=now, spec=spec), locks=L.SEAL_LOCKS
                )
                took = time.perf_counter() - t
                billed = store.read(
                    lambda db: sorted(
                        {
                            (str(d), int(q))
                            for d, q in db.execute("SELECT dimension, quantity FROM saas_outbox")
                        }
                    )
                )
                store.close()
            label = "contract" if contract else "every unit"
            print(f"{store.backend} {label}: {2 * args.customers} records sealed in {took:.2f} s")
            want = (
                [("api_calls", 0), ("users", 0)]
                if args.idle
                else [("api_calls", 12_000_000), ("users", 12_000_000)]
                if not contract
                else [("api_calls", 0), ("users", 2_000_000)]
            )
            if billed != want:
                print(f"FAIL: billed {billed}, expected {want}")
                return 1
    finally:
        if server:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
