"""Idle RSS and start-up with the readiness gate on vs off (the gate loads the kubernetes
client), each also as a ratio to floor 1 of benchmarks/startup.py measured in the same run.
Measured in the install a seller runs with the gate: `pip install -c constraints.txt
'.[kubernetes]'` in a fresh virtualenv (not the dev install, whose kubernetes_validate is
pulled in by kubernetes.dynamic). Loopback only: the emulator, a local HTTPS stand-in for the
kube-apiserver, the same stand-in environment for every process, the loopback guard on.
The chart's default memory request/limit are set from these numbers.

Goals (issue #14): idle RSS <= 1.3x floor 1 with the gate off, <= 1.9x with it on.
Usage: python benchmarks/gate.py [--runs 7] [--python PATH]
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

from benchmarks import describe_install, guard, guard_report, seller_python  # noqa: E402
from benchmarks.startup import (  # noqa: E402
    WORKDIR,
    floor_run,
    free_port,
    get_status,
    rss_kib,
    sidecar_env,
)
from sidecar.emulator.service import Emulator, EmulatorServer  # noqa: E402
from tests.kube_fake import FakeApiServer  # noqa: E402

GATE = "aws-marketplace.amazonaws.com/entitled"


def one(python: Path, url: str, pem: str, gate: FakeApiServer | None) -> tuple[float, int]:
    api, probe = free_port(), free_port()
    env = sidecar_env(url, pem, api, probe)
    if gate is not None:
        gate.add_pod("ns", "p")  # a fresh pod: no condition yet
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
        [str(python), "-m", "sidecar", "run"], env=env, cwd=WORKDIR, stderr=subprocess.DEVNULL
    )
    try:
        while get_status(probe, "/readyz") != 200:
            if proc.poll() is not None:
                raise RuntimeError("sidecar exited")
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
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--python", type=Path, help="measure this interpreter's install")
    args = ap.parse_args()
    guard()
    python = args.python or seller_python("kubernetes")
    describe_install(
        python,
        "given with --python"
        if args.python
        else "pip install -c constraints.txt '.[kubernetes]' (no dev extras)",
    )
    emulator = EmulatorServer(Emulator()).start()
    pem = emulator.emulator.public_pem()
    floors, off, on = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        gate = FakeApiServer(Path(tmp))
        for i in range(args.runs):  # interleaved, the order rotating run by run
            steps = ["floor", "off", "on"]
            for step in steps[i % 3 :] + steps[: i % 3]:
                if step == "floor":
                    floors.append(floor_run(python, emulator.url))
                elif step == "off":
                    off.append(one(python, emulator.url, pem, None))
                else:
                    on.append(one(python, emulator.url, pem, gate))
        gate.close()
    emulator.shutdown()
    f_t, f_r = statistics.median(t for t, _ in floors), statistics.median(r for _, r in floors)
    t_off, t_on = statistics.median(t for t, _ in off), statistics.median(t for t, _ in on)
    r_off, r_on = statistics.median(r for _, r in off), statistics.median(r for _, r in on)
    print(f"{'measure':38} {'floor 1':>8} {'gate off':>9} {'gate on':>9}  on/off  goal")
    print(
        f"{'ready (s; on: condition patched)':38} {f_t:8.3f} {t_off:9.3f} {t_on:9.3f} "
        f"{t_on / t_off:7.2f}"
    )
    print(f"{'  ratio to floor 1':38} {'':8} {t_off / f_t:9.2f} {t_on / f_t:9.2f}")
    print(
        f"{'idle RSS (MiB)':38} {f_r / 1024:8.1f} {r_off / 1024:9.1f} {r_on / 1024:9.1f} "
        f"{r_on / r_off:7.2f}"
    )
    print(
        f"{'  ratio to floor 1':38} {'':8} {r_off / f_r:9.2f} {r_on / f_r:9.2f}"
        "          off <= 1.3, on <= 1.9"
    )
    guard_report()


if __name__ == "__main__":
    main()
