"""How long after spawn `marketplace-sidecar run` is exposed to dying by SIGTERM, as a ratio to a
floor measured in the same run: a bare Python that installs a SIGTERM handler as its first line.

Until a handler is installed, SIGTERM kills the process by the signal (exit -15). The time is
from `Popen` returning to the kernel reporting SIGTERM as caught (`SigCgt` in /proc/PID/status).
Goal (issue #10, item 14): the sidecar's window <= 1.5x the floor (before the fix it included
the pydantic, cryptography and boto3 imports: several times the floor). Linux only; loopback only.
Usage: python benchmarks/signal_window.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import guard_report, stand_in_env  # noqa: E402

SIGTERM_BIT = 1 << 14
# Short sleeps: a signal landing just before a long sleep() would be handled only after it.
FLOOR = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "while True: time.sleep(0.05)"
)


def caught(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & SIGTERM_BIT)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def window(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while proc.poll() is None and not caught(proc.pid):
            time.sleep(0.0005)
        out.append(time.monotonic() - start)
        proc.terminate()
        proc.wait(timeout=15)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = stand_in_env(
            "http://127.0.0.1:9",
            MARKETPLACE_PRODUCT_CODE="prod-abc",
            MARKETPLACE_PUBLIC_KEY=pem.decode(),
            MARKETPLACE_LISTEN=f"127.0.0.1:{free_port()}",
            MARKETPLACE_PROBE_LISTEN=f"127.0.0.1:{free_port()}",
            HOME=tmp,
        )
        env["PYTHONPATH"] += os.pathsep + str(ROOT)
        floor, car = [], []
        for _ in range(args.runs):  # interleaved, so load changes hit both alike
            floor += window([sys.executable, "-c", FLOOR], env, 1)
            car += window([sys.executable, "-m", "sidecar", "run"], env, 1)
    f, c = statistics.median(floor), statistics.median(car)
    print(f"floor (bare python, handler first): median {f * 1000:.0f} ms")
    print(f"sidecar run (handler in place):     median {c * 1000:.0f} ms")
    print(f"ratio {c / f:.2f} (goal <= 1.5): {'met' if c / f <= 1.5 else 'missed'}")
    guard_report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
