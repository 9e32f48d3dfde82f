"""Image costs, run inside the built image (`make image` first):

- the size the sidecar adds on top of the base (its virtualenv), against the 120 MB goal;
- `marketplace-sidecar probe` wall time (it runs every few seconds in every task), as a ratio
  to `python3 -c pass` in the same image and run (goal: well under 0.3 s).

Usage: python benchmarks/image.py [IMAGE]
"""

from __future__ import annotations

import json
import subprocess
import sys

IMAGE = sys.argv[1] if len(sys.argv) > 1 else "localhost/marketplace-sidecar:ci"
BUILDAH = ["buildah", "--storage-driver", "vfs"]
TIMER = r"""
import json, statistics, subprocess, time
def median(cmd, n=15):
    runs = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)
print(json.dumps({
    "floor": median(["python3", "-c", "pass"]),
    "probe": median(["marketplace-sidecar", "probe", "--address", "127.0.0.1:9"]),
}))
"""


def main() -> None:
    name = subprocess.run(
        [*BUILDAH, "from", "--quiet", IMAGE], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        run = [*BUILDAH, "run", "--isolation", "chroot", name, "--"]
        size = subprocess.run(
            [*run, "du", "-sk", "/opt/sidecar"], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        times = json.loads(
            subprocess.run(
                [*run, "python3", "-c", TIMER], capture_output=True, text=True, check=True
            ).stdout
        )
    finally:
        subprocess.run([*BUILDAH, "rm", name], capture_output=True, check=False)
    mb = int(size) / 1024
    print(f"{'measure':40} {'value':>9} {'floor/goal':>11} {'ratio':>7}")
    print(f"{'size added by the sidecar (MiB)':40} {mb:9.1f} {120:11.1f} {mb / 120:7.2f}")
    print(
        f"{'probe wall time (s) vs python3 -c pass':40} {times['probe']:9.3f} "
        f"{times['floor']:11.3f} {times['probe'] / times['floor']:7.2f}"
    )


if __name__ == "__main__":
    main()
