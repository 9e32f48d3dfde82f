"""`marketplace-sidecar probe`: exit 0 iff the sidecar answers 200. Stdlib only, so ECS health
checks and exec probes that run it every few seconds stay cheap (no boto3, no pydantic)."""

from __future__ import annotations

import http.client
import os
import sys

from sidecar.server.netaddr import connect_host, parse_hostport

DEFAULT_PROBE_LISTEN = "0.0.0.0:8788"


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
