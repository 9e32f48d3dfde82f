"""Local API throughput and probe latency of `marketplace-sidecar run`, as ratios to floors
measured in the same run on the same machine. Loopback only (the embedded emulator).

    1. `/v1/entitlement` req/s at 16 keep-alive connections vs a bare stdlib
       ThreadingHTTPServer (HTTP/1.1, Nagle off) serving a body of the same size.
       Goal >= 0.8x. Interleaved rounds (the order alternates), median of the ratios.
    2. `/healthz` p99 on the probe port, one fresh connection per probe (as kubelet does),
       while the API is flooded at 16 connections. Goal <= 10 ms. Floor: the bare server
       process with a second listener, probed the same way while its first is flooded
       (interleaved with the sidecar's rounds); the idle probe p99 is printed too.

Load generator: wrk when it is on PATH (the output says so), else a Python generator of two
processes, which shares the cores with the servers and understates the bare server.
Every process gets the benchmarks' stand-in environment and the loopback guard.
Usage: python benchmarks/throughput.py [--rounds 8] [--seconds 5] [--probe-rounds 4]
                                      [--baseline-root OTHER_CHECKOUT] [--quick] [--probe-only]
                                      [--switch-interval SECONDS]
  --quick: 3 rounds of 2 s, 2 probe rounds of 4 s (what `make bench` runs).
  --switch-interval: start the sidecar AND the bare floor with sys.setswitchinterval(SECONDS)
    (an experiment: how long a thread waiting for the GIL waits while others are busy).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import guard, guard_report, stand_in_env  # noqa: E402
from sidecar.emulator.service import Emulator, EmulatorServer  # noqa: E402
from tests import loopback_guard  # noqa: E402

CONNECTIONS = 16

BARE = """
import os, socket, sys, threading
if float(sys.argv[4]):
    sys.setswitchinterval(float(sys.argv[4]))
VARIANT = sys.argv[5]
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = b"x" * int(sys.argv[2])

class Bare(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

class Niced(Bare):
    def setup(self):
        # Linux: a thread is a task; lowering its own priority needs no privilege.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        super().setup()

# A second listener in the same process: the floor for a probe port beside a flooded API.
if "raw" in VARIANT:
    # One thread, blocking accept, one recv, a precomputed answer: no parsing, no thread per probe.
    ANSWER = (b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: 15\\r\\n"
              b"Connection: close\\r\\n\\r\\n" + b'{"status":"ok"}')
    listener = socket.create_server(("127.0.0.1", int(sys.argv[3])))

    def answer():
        while True:
            conn, _ = listener.accept()
            conn.recv(4096)
            conn.sendall(ANSWER)
            conn.close()
    threading.Thread(target=answer, daemon=True).start()
else:
    probe = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[3])), Bare)
    probe.daemon_threads = True
    threading.Thread(target=probe.serve_forever, daemon=True).start()
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Niced if "nice" in VARIANT else Bare)
server.daemon_threads = True
server.serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# `python -m sidecar run`, optionally with another GIL switch interval (an experiment).
SIDECAR = """
import sys
if float(sys.argv[1]):
    sys.setswitchinterval(float(sys.argv[1]))
from sidecar.server import api
if "nonice" in sys.argv[2]:
    # Experiment: the API's connection threads keep nice 0 (no yield_to_probes()).
    api.yield_to_probes = lambda: False
if "noturn" in sys.argv[2]:
    # Experiment: no CPU turn; every API connection thread contends for the GIL.
    init = api.LocalServer.__init__
    def no_turn(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.turn = None
    api.LocalServer.__init__ = no_turn
sys.argv = ["marketplace-sidecar", "run"]
from sidecar.cli import main
raise SystemExit(main())
"""


def fetch(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def wait_for(port: int, path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while fetch(port, path)[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server on {port} did not answer {path}")
        time.sleep(0.01)


# -- load generators -------------------------------------------------------------------------


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True)
    match = re.search(r"wrk \S+", out.stdout + out.stderr)
    return match.group(0) if match else "wrk"


def wrk_rps(wrk: str, port: int, path: str, seconds: float) -> float:
    out = subprocess.run(
        [
            wrk,
            "-t2",
            f"-c{CONNECTIONS}",
            f"-d{max(1, round(seconds))}s",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    if "Non-2xx" in out.stdout or "Socket errors" in out.stdout:
        raise RuntimeError(f"load against {path} saw errors:\n{out.stdout}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    if match is None:
        raise RuntimeError(f"unexpected wrk output:\n{out.stdout}")
    return float(match.group(1))


def _py_worker(port: int, path: str, conns: int, seconds: float, q: Any) -> None:
    count = [0] * conns
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while time.perf_counter() < stop:
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"{path} answered {r.status}")
            count[i] += 1
        c.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put(sum(count))


def py_rps(port: int, path: str, seconds: float) -> float:
    q: Any = mp.Queue()
    workers = [
        mp.Process(target=_py_worker, args=(port, path, CONNECTIONS // 2, seconds, q))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    total = sum(int(q.get()) for _ in workers)
    for w in workers:
        w.join()
    return total / seconds


# -- probe latency ---------------------------------------------------------------------------


def probe_latencies(port: int, seconds: float, gap: float = 0.01) -> list[float]:
    """Fresh-connection GET /healthz, one at a time; a failure counts as 1 s."""
    out = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        started = time.perf_counter()
        status, _ = fetch(port, "/healthz")
        out.append(time.perf_counter() - started if status == 200 else 1.0)
        time.sleep(gap)
    return out


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def start_sidecar(
    root: Path, emulator: EmulatorServer, switch: float, variant: str = "plain"
) -> tuple[subprocess.Popen[bytes], int, int]:
    api, probe = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SIDECAR, str(switch), variant],
        env=stand_in_env(
            emulator.url,
            MARKETPLACE_PRODUCT_CODE="bench-product",
            MARKETPLACE_PUBLIC_KEY=emulator.emulator.public_pem(),
            MARKETPLACE_LISTEN=f"127.0.0.1:{api}",
            MARKETPLACE_PROBE_LISTEN=f"127.0.0.1:{probe}",
            PYTHONPATH=loopback_guard.child_env(guard(), str(root))["PYTHONPATH"],
        ),
        cwd=root,
        stderr=subprocess.DEVNULL,
    )
    wait_for(probe, "/readyz", proc)
    return proc, api, probe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8, help="interleaved load rounds")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one load round")
    ap.add_argument("--probe-seconds", type=float, default=8.0, help="probe sampling per phase")
    ap.add_argument("--probe-rounds", type=int, default=4, help="interleaved flood rounds")
    ap.add_argument(
        "--baseline-root",
        type=Path,
        help="also measure the sidecar of this other checkout, interleaved (before/after)",
    )
    ap.add_argument("--quick", action="store_true", help="3x2 s rounds, 2x4 s probe rounds")
    ap.add_argument("--probe-only", action="store_true", help="skip the req/s rounds")
    ap.add_argument("--switch-interval", type=float, default=0.0, help="see the docstring")
    ap.add_argument(
        "--sidecar-variants",
        type=lambda v: [x for x in v.split(",") if x],
        default=[],
        help="experiments on the sidecar itself: nonice (its API threads stay at nice 0), "
        "noturn (no CPU turn on the API listener), nonice+noturn",
    )
    ap.add_argument(
        "--variants",
        type=lambda v: [x for x in v.split(",") if x],
        default=[],
        help="more floors: raw (one accept thread answering precomputed bytes), "
        "nice (the flooded listener's threads at nice +10), raw+nice",
    )
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.probe_rounds, args.probe_seconds = 3, 2.0, 2, 4.0
    if args.probe_only:
        args.rounds = 0
    guard()
    if args.switch_interval:
        print(f"experiment: sys.setswitchinterval({args.switch_interval}) in sidecar and floor")

    wrk = shutil.which("wrk")
    if wrk:
        print(f"load generator: {wrk_version(wrk)} -t2 -c{CONNECTIONS}, keep-alive")

        def rps(port: int, path: str) -> float:
            assert wrk is not None
            return wrk_rps(wrk, port, path, args.seconds)
    else:
        print(
            "load generator: Python (wrk not found on PATH; this generator shares the cores "
            "with the servers and understates the bare server)"
        )

        def rps(port: int, path: str) -> float:
            return py_rps(port, path, args.seconds)

    emulator = EmulatorServer(Emulator()).start()
    procs: list[subprocess.Popen[bytes]] = []
    # name -> (API port, probe port, path); "bare" is the floor.
    targets: dict[str, tuple[int, int, str]] = {}
    try:
        roots = [("sidecar", ROOT)]
        for variant in args.sidecar_variants:
            proc, api, probe = start_sidecar(ROOT, emulator, args.switch_interval, variant)
            procs.append(proc)
            targets[f"sidecar-{variant}"] = (api, probe, "/v1/entitlement")
        if args.baseline_root:
            roots.append(("baseline", args.baseline_root.resolve()))
        for name, root in roots:
            proc, api, probe = start_sidecar(root, emulator, args.switch_interval)
            procs.append(proc)
            targets[name] = (api, probe, "/v1/entitlement")
        status, body = fetch(targets["sidecar"][0], "/v1/entitlement")
        assert status == 200 and json.loads(body)["state"] == "entitled"
        for variant in ["plain", *args.variants]:
            bare_port, bare_probe = free_port(), free_port()
            bare = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    BARE,
                    str(bare_port),
                    str(len(body)),
                    str(bare_probe),
                    str(args.switch_interval),
                    variant,
                ],
                env=stand_in_env(emulator.url),
                stderr=subprocess.DEVNULL,
            )
            procs.append(bare)
            wait_for(bare_port, "/", bare)
            targets["bare" if variant == "plain" else f"bare-{variant}"] = (
                bare_port,
                bare_probe,
                "/",
            )
        print(f"body: {len(body)} bytes from every server")

        names = list(targets)
        got: dict[str, list[float]] = {n: [] for n in names}
        for i in range(args.rounds):  # rotate the order: load on a shared machine drifts
            for name in names[i % len(names) :] + names[: i % len(names)]:
                api, _, path = targets[name]
                got[name].append(rps(api, path))
            print(f"  round {i + 1}: " + "  ".join(f"{n} {got[n][-1]:7.0f}" for n in names))

        idle = probe_latencies(targets["sidecar"][1], args.probe_seconds)
        flooded: dict[str, list[float]] = {n: [] for n in names}
        for i in range(args.probe_rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                api, probe, path = targets[name]
                flooded[name] += _flooded_probes(wrk, api, probe, path, args.probe_seconds)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        emulator.shutdown()

    print()
    print(f"{'measure':44} {'value':>9} {'floor':>9} {'ratio':>6}  goal")
    others = [n for n in names if n != "bare"]
    for name in others if args.rounds else []:
        ratios = [c / b for c, b in zip(got[name], got["bare"], strict=True)]
        print(
            f"{name + ' /v1/entitlement req/s, 16 conns':44} {statistics.median(got[name]):9.0f} "
            f"{statistics.median(got['bare']):9.0f} {statistics.median(ratios):6.2f}  >= 0.8 "
            f"(median of rounds {min(ratios):.2f}-{max(ratios):.2f})"
        )
    for name in others:
        ours, floor = p99(flooded[name]), p99(flooded["bare"])
        print(
            f"{name + ' probe /healthz p99 ms, API flooded':44} {ours * 1e3:9.2f} "
            f"{floor * 1e3:9.2f} {ours / floor:6.2f}  <= 10 ms"
        )
    print(
        "  p50 flooded ms: "
        + ", ".join(f"{n} {statistics.median(flooded[n]) * 1e3:.2f}" for n in names)
        + f"; sidecar idle p50 {statistics.median(idle) * 1e3:.2f}, p99 {p99(idle) * 1e3:.2f}"
    )
    guard_report()


def _flooded_probes(
    wrk: str | None, api: int, probe: int, path: str, seconds: float
) -> list[float]:
    """Flood `api` for `seconds` + 2 while sampling `probe` in the middle."""
    flood_seconds = seconds + 2

    def flood() -> None:
        if wrk:
            wrk_rps(wrk, api, path, flood_seconds)
        else:
            py_rps(api, path, flood_seconds)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    time.sleep(1.0)
    samples = probe_latencies(probe, seconds)
    thread.join()
    return samples


if __name__ == "__main__":
    main()
