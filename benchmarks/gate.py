"""Idle RSS and start-up with the readiness gate on vs off (the gate imports the kubernetes
client). Loopback only: the emulator and a local HTTPS stand-in for the kube-apiserver.
The chart's default memory request/limit are set from these numbers.

Usage: python benchmarks/gate.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.startup import free_port, get_status, rss_kib, sidecar_env  # noqa: E402
from sidecar.emulator.service import Emulator, EmulatorServer  # noqa: E402
from tests.kube_fake import FakeApiServer  # noqa: E402

GATE = "aws-marketplace.amazonaws.com/entitled"


def one(url: str, pem: str, gate: FakeApiServer | None) -> tuple[float, int]:
    api, probe = free_port(), free_port()
    env = sidecar_env(url, pem, api, probe)
    if gate is not None:
        env.update(
            {
                "MARKETPLACE_READINESS_GATE": GATE,
                "MARKETPLACE_POD_NAME": "p",
                "MARKETPLACE_POD_NAMESPACE": "ns",
                "MARKETPLACE_SERVICEACCOUNT_DIR": str(gate.sa_dir),
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(gate.port),
            }
        )
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL
    )
    try:
        while get_status(probe, "/readyz") != 200:
            time.sleep(0.002)
        if gate is not None:
            while gate.condition("ns", "p", GATE) is None:
                time.sleep(0.002)
        ready = time.perf_counter() - started
        time.sleep(1.5)
        return ready, rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    emulator = EmulatorServer(Emulator()).start()
    pem = emulator.emulator.public_pem()
    with tempfile.TemporaryDirectory() as tmp:
        gate = FakeApiServer(Path(tmp))
        gate.add_pod("ns", "p")
        off = [one(emulator.url, pem, None) for _ in range(args.runs)]
        on = [one(emulator.url, pem, gate) for _ in range(args.runs)]
        gate.close()
    emulator.shutdown()
    t_off, t_on = statistics.median(t for t, _ in off), statistics.median(t for t, _ in on)
    r_off, r_on = statistics.median(r for _, r in off), statistics.median(r for _, r in on)
    print(f"{'measure':40} {'gate off':>9} {'gate on':>9} {'ratio':>7}")
    print(
        f"{'ready (s; gate on: condition patched)':40} {t_off:9.3f} {t_on:9.3f} {t_on / t_off:7.2f}"
    )
    print(f"{'idle RSS (MiB)':40} {r_off / 1024:9.1f} {r_on / 1024:9.1f} {r_on / r_off:7.2f}")


if __name__ == "__main__":
    main()
