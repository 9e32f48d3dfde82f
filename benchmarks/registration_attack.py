"""The registration page under attack, measured: the figures in docs/registration-page.md.

One run of tests/test_registration_attack.py's scenario with the numbers printed: from 127.0.0.2,
64 silent connections kept open (reopened as the page cuts them) and `--flooders` threads posting
junk tokens; ResolveCustomer throttled by the emulator (`--resolve-rps`); 20 buyers from their
own addresses; the product posting 75 usage records to the sidecar (one at a time, 0.1 s apart).
Then the same usage load while `--direct` threads post junk straight to the sidecar's resolve.
Loopback only. Usage: python benchmarks/registration_attack.py [--flooders 4] [--direct 80]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import guard, guard_report  # noqa: E402
from sidecar.emulator.service import Emulator, EmulatorServer  # noqa: E402
from tests.helpers import loopback_env, start_sidecar  # noqa: E402
from tests.test_registration_attack import Attack, _form_post, _usage  # noqa: E402
from tests.test_saas_registration import load_example  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flooders", type=int, default=4)
    ap.add_argument("--direct", type=int, default=80)
    ap.add_argument("--resolve-rps", type=float, default=4.0)
    args = ap.parse_args()
    guard()
    emulator = Emulator()
    server = EmulatorServer(emulator).start()
    emulator.reconfigure({"resolve_throttle_rps": args.resolve_rps, "resolve_throttle_burst": 4})
    state = tempfile.mkdtemp(prefix="bench-registration-")
    car = start_sidecar(
        loopback_env(
            server.url,
            MARKETPLACE_MODE="saas",
            MARKETPLACE_DIMENSIONS="users",
            MARKETPLACE_STATE_DIR=state,
            MARKETPLACE_ACCEPT_UNRESOLVED_CUSTOMERS="true",
            MARKETPLACE_THROTTLE_SCHEDULE_SECONDS="",
            MARKETPLACE_PRODUCT_CODE="",
        )
    )
    page = load_example().RegistrationServer(("127.0.0.1", 0), car.api)
    threading.Thread(target=page.serve_forever, args=(0.1,), daemon=True).start()
    port = page.server_address[1]
    buyers = [
        emulator.saas_customer({"customer_aws_account_id": str(300_000_000_000 + i)})
        for i in range(20)
    ]
    timed: list[tuple[int, float]] = []

    def buyer(i: int) -> None:
        started = time.monotonic()
        status = _form_post(port, f"127.0.1.{i + 1}", buyers[i]["registration_token"])
        timed.append((status, time.monotonic() - started))

    try:
        with Attack(port, flooders=args.flooders) as attack, ThreadPoolExecutor(4) as pool:
            time.sleep(2.0)
            usage = pool.submit(_usage, car, 75)
            list(pool.map(buyer, range(len(buyers))))
            statuses, lat = usage.result(timeout=120)
        ok = sum(1 for s, _ in timed if s == 200)
        waits = [t for _, t in timed]
        print(
            f"page attack: buyers registered {ok}/{len(buyers)} on the first try; "
            f"buyer latency p50 {statistics.median(waits):.2f} s, max {max(waits):.2f} s"
        )
        print(
            f"  usage 202: {statuses.count(202)}/{len(statuses)}; latency p50 "
            f"{statistics.median(lat) * 1000:.0f} ms, p99 {_pct(lat, 0.99) * 1000:.0f} ms, "
            f"max {max(lat) * 1000:.0f} ms"
        )
        print(
            f"  attacker: {attack.reopened} connections opened, {page.evicted} evicted by the "
            f"page, junk form posts answered {dict(sorted(attack.junk.items()))}"
        )
        print(
            f"  ResolveCustomer calls on the emulator: "
            f"{sum(1 for c in emulator.calls if c.get('op') == 'ResolveCustomer')}"
        )

        stop = threading.Event()
        answers: dict[int, int] = {}
        lock = threading.Lock()

        def flood() -> None:
            import requests

            http = requests.Session()
            while not stop.is_set():
                try:
                    code = http.post(
                        car.api + "/v1/customers/resolve",
                        json={"registration_token": "junk-" + uuid.uuid4().hex},
                        timeout=30,
                    ).status_code
                except requests.RequestException:
                    code = 0
                with lock:
                    answers[code] = answers.get(code, 0) + 1

        emulator.reconfigure({"resolve_throttle_rps": 0.5, "resolve_throttle_burst": 1})
        threads = [threading.Thread(target=flood, daemon=True) for _ in range(args.direct)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        statuses, lat = _usage(car, 75)
        stop.set()
        for t in threads:
            t.join(timeout=40)
        print(
            f"direct flood ({args.direct} threads on /v1/customers/resolve): usage 202 "
            f"{statuses.count(202)}/{len(statuses)}; p50 {statistics.median(lat) * 1000:.0f} ms, "
            f"p99 {_pct(lat, 0.99) * 1000:.0f} ms; resolve answers {dict(sorted(answers.items()))}"
        )
    finally:
        page.shutdown()
        page.server_close()
        car.stop()
        server.shutdown()
    guard_report()


if __name__ == "__main__":
    main()
