"""Start-up, memory and API throughput of `marketplace-sidecar run`, each as a ratio to a floor
measured in the same run on the same machine, in the install a seller runs
(`pip install -c constraints.txt .` in a fresh virtualenv, see benchmarks/__init__.py).
Loopback only: the embedded emulator, every subprocess (floors included) in the same stand-in
environment, and the loopback guard on (the run fails if anything tried to leave the machine).

    floor 1: python -c "import boto3; boto3.client('meteringmarketplace', ...)"  (time, RSS)
    floor 2: a bare stdlib ThreadingHTTPServer answering a 5-key JSON object      (requests/s)

Floor 1 and the sidecar alternate run by run (interleaved), medians of each.
Goals (issue #14): start -> first /readyz 200 <= 1.5x floor 1; idle RSS <= 1.3x floor 1;
/v1/entitlement at 16 keep-alive connections >= 0.8x floor 2.
Usage: python benchmarks/startup.py [--runs 11] [--seconds 2] [--rounds 5] [--python PATH]
       [--no-throughput]   (--python: measure that interpreter's install instead of building one)
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    describe_install,
    guard,
    guard_report,
    seller_python,
    stand_in_env,
)
from sidecar.emulator.service import Emulator, EmulatorServer  # noqa: E402

FLOOR = (
    "import boto3, time; boto3.client('meteringmarketplace', region_name='us-east-1'); "
    "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])"
)
# Not the source tree: `python -m` puts the working directory first on sys.path.
WORKDIR = tempfile.gettempdir()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def floor_run(python: Path, url: str) -> tuple[float, int]:
    env = stand_in_env(url)
    started = time.perf_counter()
    out = subprocess.run(
        [str(python), "-c", FLOOR], capture_output=True, text=True, check=True, env=env, cwd=WORKDIR
    )
    return time.perf_counter() - started, int(out.stdout.strip())


def sidecar_env(url: str, pem: str, api: int, probe: int) -> dict[str, str]:
    return stand_in_env(
        url,
        MARKETPLACE_PRODUCT_CODE="bench-product",
        MARKETPLACE_PUBLIC_KEY=pem,
        MARKETPLACE_LISTEN=f"127.0.0.1:{api}",
        MARKETPLACE_PROBE_LISTEN=f"127.0.0.1:{probe}",
    )


def get_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def sidecar_run(
    python: Path, url: str, pem: str, extra: dict[str, str] | None = None
) -> tuple[float, int, subprocess.Popen[bytes], int]:
    api, probe = free_port(), free_port()
    env = sidecar_env(url, pem, api, probe)
    env.update(extra or {})
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(python), "-m", "sidecar", "run"], env=env, cwd=WORKDIR, stderr=subprocess.DEVNULL
    )
    while get_status(probe, "/readyz") != 200:
        if proc.poll() is not None:
            raise RuntimeError("sidecar exited")
        time.sleep(0.002)
    ready = time.perf_counter() - started
    time.sleep(1.0)
    return ready, rss_kib(proc.pid), proc, api


def startup_rows(
    python: Path, url: str, pem: str, runs: int
) -> list[tuple[str, float, float, float, str]]:
    """Floor and sidecar alternate (which goes first flips each run): drift hits both alike."""
    floors, cars = [], []
    for i in range(runs):
        for which in ("floor", "car") if i % 2 == 0 else ("car", "floor"):
            if which == "floor":
                floors.append(floor_run(python, url))
            else:
                ready, rss, proc, _ = sidecar_run(python, url, pem)
                proc.terminate()
                proc.wait()
                cars.append((ready, rss))
    floor_t = statistics.median(t for t, _ in floors)
    floor_rss = statistics.median(r for _, r in floors)
    car_t = statistics.median(t for t, _ in cars)
    car_rss = statistics.median(r for _, r in cars)
    return [
        ("start -> /readyz 200 (s)", car_t, floor_t, car_t / floor_t, "<= 1.5"),
        ("idle RSS (MiB)", car_rss / 1024, floor_rss / 1024, car_rss / floor_rss, "<= 1.3"),
    ]


class _Bare(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    body = json.dumps({"state": "entitled", "entitled": True, "a": 1, "b": 2, "c": 3}).encode()

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def _serve_bare(port: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Bare)
    server.daemon_threads = True
    server.serve_forever()


def _load_worker(port: int, path: str, conns: int, seconds: float, q: Any) -> None:
    count = [0] * conns
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while time.perf_counter() < stop:
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            assert r.status == 200
            count[i] += 1
        c.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put(sum(count))


def throughput(port: int, path: str, seconds: float, procs: int = 2, conns: int = 16) -> float:
    q: Any = mp.Queue()
    workers = [
        mp.Process(target=_load_worker, args=(port, path, conns // procs, seconds, q))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    total = sum(int(q.get()) for _ in workers)
    for w in workers:
        w.join()
    return total / seconds


def throughput_rows(
    python: Path, url: str, pem: str, seconds: float, rounds_n: int
) -> list[tuple[str, float, float, float, str]]:
    bare_port = free_port()
    bare = mp.Process(target=_serve_bare, args=(bare_port,), daemon=True)
    bare.start()
    while get_status(bare_port, "/") != 200:
        time.sleep(0.01)
    _, _, proc, api = sidecar_run(python, url, pem)
    # Interleave short rounds and take the median ratio: load on a shared machine drifts.
    rounds = [
        (throughput(bare_port, "/", seconds), throughput(api, "/v1/entitlement", seconds))
        for _ in range(rounds_n)
    ]
    bare.terminate()
    proc.terminate()
    proc.wait()
    bare_rps = statistics.median(b for b, _ in rounds)
    car_rps = statistics.median(c for _, c in rounds)
    rps_ratio = statistics.median(c / b for b, c in rounds)
    return [("/v1/entitlement req/s, 16 conns", car_rps, bare_rps, rps_ratio, ">= 0.8")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11, help="interleaved start-up runs of each")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one load round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved load rounds")
    ap.add_argument("--python", type=Path, help="measure this interpreter's install")
    ap.add_argument("--no-throughput", action="store_true", help="start-up and memory only")
    args = ap.parse_args()

    guard()
    python = args.python or seller_python()
    describe_install(
        python,
        "given with --python" if args.python else "pip install -c constraints.txt . (no extras)",
    )
    emulator = EmulatorServer(Emulator()).start()
    pem = emulator.emulator.public_pem()
    rows = startup_rows(python, emulator.url, pem, args.runs)
    if not args.no_throughput:
        rows += throughput_rows(python, emulator.url, pem, args.seconds, args.rounds)
    emulator.shutdown()
    print(f"{'measure':34} {'sidecar':>10} {'floor':>10} {'ratio':>7}  goal")
    for name, ours, floor, ratio, goal in rows:
        print(f"{name:34} {ours:10.3f} {floor:10.3f} {ratio:7.2f}  {goal}")
    guard_report()


if __name__ == "__main__":
    main()
