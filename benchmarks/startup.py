"""Start-up, memory and API throughput of `marketplace-sidecar run`, each as a ratio to a floor
measured in the same run on the same machine. Loopback only (the embedded emulator).

    floor 1: python -c "import boto3; boto3.client('meteringmarketplace', ...)"  (time, RSS)
    floor 2: a bare stdlib ThreadingHTTPServer answering a 5-key JSON object      (requests/s)

Goals (issue #2): start -> first /readyz 200 <= 1.5x floor 1; idle RSS <= 1.3x floor 1;
/v1/entitlement at 16 keep-alive connections >= 0.8x floor 2.
Usage: python benchmarks/startup.py [--runs 7] [--seconds 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.emulator.service import Emulator, EmulatorServer  # noqa: E402

FLOOR = (
    "import boto3, time; boto3.client('meteringmarketplace', region_name='us-east-1'); "
    "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])"
)


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


def floor_run() -> tuple[float, int]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", FLOOR], capture_output=True, text=True, check=True)
    return time.perf_counter() - started, int(out.stdout.strip())


def sidecar_env(url: str, pem: str, api: int, probe: int) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "AWS_ENDPOINT_URL_MARKETPLACE_METERING": url,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MARKETPLACE_PRODUCT_CODE": "bench-product",
        "MARKETPLACE_PUBLIC_KEY": pem,
        "MARKETPLACE_LISTEN": f"127.0.0.1:{api}",
        "MARKETPLACE_PROBE_LISTEN": f"127.0.0.1:{probe}",
    }


def get_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def sidecar_run(url: str, pem: str) -> tuple[float, int, subprocess.Popen[bytes], int]:
    api, probe = free_port(), free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"],
        env=sidecar_env(url, pem, api, probe),
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    while get_status(probe, "/readyz") != 200:
        if proc.poll() is not None:
            raise RuntimeError("sidecar exited")
        time.sleep(0.002)
    ready = time.perf_counter() - started
    time.sleep(1.0)
    return ready, rss_kib(proc.pid), proc, api


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one load round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved load rounds")
    args = ap.parse_args()

    emulator = EmulatorServer(Emulator()).start()
    pem = emulator.emulator.public_pem()
    floors = [floor_run() for _ in range(args.runs)]
    cars = []
    for _ in range(args.runs):
        ready, rss, proc, api = sidecar_run(emulator.url, pem)
        cars.append((ready, rss))
        proc.terminate()
        proc.wait()
    floor_t = statistics.median(t for t, _ in floors)
    floor_rss = statistics.median(r for _, r in floors)
    car_t = statistics.median(t for t, _ in cars)
    car_rss = statistics.median(r for _, r in cars)

    bare_port = free_port()
    bare = mp.Process(target=_serve_bare, args=(bare_port,), daemon=True)
    bare.start()
    while get_status(bare_port, "/") != 200:
        time.sleep(0.01)
    _, _, proc, api = sidecar_run(emulator.url, pem)
    # Interleave short rounds and take the median ratio: load on a shared machine drifts.
    rounds = [
        (throughput(bare_port, "/", args.seconds), throughput(api, "/v1/entitlement", args.seconds))
        for _ in range(args.rounds)
    ]
    bare.terminate()
    proc.terminate()
    proc.wait()
    bare_rps = statistics.median(b for b, _ in rounds)
    car_rps = statistics.median(c for _, c in rounds)
    rps_ratio = statistics.median(c / b for b, c in rounds)

    rows = [
        ("start -> /readyz 200 (s)", car_t, floor_t, car_t / floor_t, "<= 1.5"),
        ("idle RSS (MiB)", car_rss / 1024, floor_rss / 1024, car_rss / floor_rss, "<= 1.3"),
        ("/v1/entitlement req/s, 16 conns", car_rps, bare_rps, rps_ratio, ">= 0.8"),
    ]
    print(f"{'measure':34} {'sidecar':>10} {'floor':>10} {'ratio':>7}  goal")
    for name, ours, floor, ratio, goal in rows:
        print(f"{name:34} {ours:10.3f} {floor:10.3f} {ratio:7.2f}  {goal}")
    emulator.shutdown()


if __name__ == "__main__":
    main()
