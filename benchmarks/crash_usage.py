"""The crash test at benchmark size: more kill -9 rounds and clients than CI runs.

Same procedure and audit as tests/test_crash_usage.py (real `run` processes, random SIGKILLs
while clients POST, emulator latency and recorded-then-reset faults, a final drain): the
emulator's ledger must equal the acknowledged quantities, one record at most per
dimension-hour, no DuplicateRequestException.

Usage: python benchmarks/crash_usage.py [--rounds 30] [--clients 8] [--seed 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import guard, guard_report  # noqa: E402
from sidecar.emulator.service import Emulator, EmulatorServer  # noqa: E402
from tests.test_crash_usage import check, run_rounds  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    guard()
    server = EmulatorServer(Emulator(seed=args.seed)).start()
    started = time.monotonic()
    book, report = run_rounds(
        server, server.emulator, Path(tempfile.mkdtemp()), args.rounds, args.clients, args.seed
    )
    ledger = check(server.emulator, book, report)
    counts = ledger["counts"]
    print(f"rounds={args.rounds} clients={args.clients} seed={args.seed}")
    print(f"acknowledged records      {len(book.acked)}")
    print(f"acknowledged units        {sum(book.totals().values())}")
    print(f"dimension-hours sent      {len(ledger['records'])}")
    repeats = counts.get("idempotent_repeat", 0) + counts.get("token_repeat", 0)
    print(f"idempotent resends        {repeats}")
    print(f"DuplicateRequestException {counts.get('DuplicateRequestException', 0)}")
    states = report["hours_by_state"]
    print(f"hours expired / conflict  {states['expired']} / {states['conflict']}")
    print(f"ledger == acknowledged    yes ({time.monotonic() - started:.0f} s)")
    server.shutdown()
    guard_report()


if __name__ == "__main__":
    main()
