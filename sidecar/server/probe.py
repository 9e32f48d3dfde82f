"""`marketplace-sidecar probe`: exit 0 iff the sidecar answers 200. Stdlib only, so ECS health
checks and exec probes that run it every few seconds stay cheap (no boto3, no pydantic)."""

from __future__ import annotations

import contextlib
import http.client
import os
import sys
import threading

from sidecar.server.netaddr import connect_host, parse_hostport

DEFAULT_PROBE_LISTEN = "0.0.0.0:8788"
# How far a flooded API connection's thread steps back; nice +10 weighs ~1/10 of nice 0 in CFS.
API_THREAD_NICE = 10


def yield_to_probes(nice: int = API_THREAD_NICE) -> bool:
    """Lower the calling thread's CPU priority so the probe listener's threads run first.

    Kubelet kills a pod whose probes time out; when the product floods the API, every thread of
    the process competes for the same CPU quota and the probe waits its turn (benchmarks/
    throughput.py, on top of the API's CPU turn: flooded /healthz p99 ~6 ms with this, 9-10 ms
    without, `--sidecar-variants nonice`). On Linux a thread is a task of its own, so this
    touches only the caller; lowering a priority needs no privilege. Returns False where that
    is not possible (another OS, a sandbox forbidding it).
    """
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return False
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return True
    return False


def probe(path: str = "/readyz", address: str | None = None, timeout: float = 2.0) -> int:
    source = "--address" if address else "MARKETPLACE_PROBE_LISTEN"
    target = address or os.environ.get("MARKETPLACE_PROBE_LISTEN") or DEFAULT_PROBE_LISTEN
    try:
        host, port = parse_hostport(target)
    except ValueError as exc:
        print(f"probe: {source}: {exc}", file=sys.stderr)
        return 2
    conn = http.client.HTTPConnection(connect_host(host), port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read(2048).decode("utf-8", "replace")
    except OSError as exc:
        print(f"probe: sidecar not reachable at {target}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    print(body)
    return 0 if resp.status == 200 else 1
