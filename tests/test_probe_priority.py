"""`yield_to_probes`: a flooded API thread steps back so probe threads get the CPU first.

The latency effect is a timing goal and lives in benchmarks/throughput.py (`--sidecar-variants
nonice` runs the sidecar without it, beside the sidecar with it); here only what must hold on
any Linux machine: the caller's thread alone is lowered, and a thread already lower is left
alone (raising a priority would need a privilege)."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Literal

import pytest

from sidecar.server.probe import API_THREAD_NICE, yield_to_probes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")


def _in_thread(before: int | None = None) -> tuple[bool, int, int]:
    """Run yield_to_probes in a fresh thread: (returned, nice before, nice after)."""
    out: list[tuple[bool, int, int]] = []

    def work() -> None:
        tid = threading.get_native_id()
        if before is not None:
            os.setpriority(os.PRIO_PROCESS, tid, before)
        start = os.getpriority(os.PRIO_PROCESS, tid)
        ok = yield_to_probes()
        out.append((ok, start, os.getpriority(os.PRIO_PROCESS, tid)))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return out[0]


def test_lowers_only_the_calling_thread() -> None:
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if main_before >= API_THREAD_NICE:
        pytest.fail(f"the test runs at nice {main_before}: cannot observe a change")
    ok, start, after = _in_thread()
    assert ok and start == main_before
    assert after == API_THREAD_NICE
    # The process's other threads (here: the test's) keep their priority.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_a_thread_already_lower_is_left_alone() -> None:
    ok, start, after = _in_thread(before=API_THREAD_NICE + 5)
    assert ok and start == after == API_THREAD_NICE + 5


def _nice_threads() -> int:
    """Threads of this process running at the API threads' nice value."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            if os.getpriority(os.PRIO_PROCESS, int(task)) == API_THREAD_NICE:
                count += 1
        except OSError:  # the thread ended meanwhile
            continue
    return count


def _reading(server: Any) -> int:
    """Connections of `server` whose thread has a request's first bytes in."""
    from sidecar.server.api import Phase

    with server._lock:
        return sum(conn.phase is Phase.READING for conn in server._conns.values())


def test_api_connections_step_back_and_probe_connections_do_not() -> None:
    """The wiring: an API connection's thread is lowered, a probe connection's is not."""
    import socket
    import time

    from sidecar.server.api import API_LIMITS, PROBE_LIMITS, LocalServer, Router

    names: tuple[Literal["api", "probe"], ...] = ("api", "probe")
    servers = {
        name: LocalServer(
            ("127.0.0.1", 0),
            Router(None, lambda: None, listener=name, readiness=lambda: (True, None)),
            limits,
            name=name,
        )
        for name, limits in zip(names, (API_LIMITS, PROBE_LIMITS), strict=True)
    }
    for server in servers.values():
        server.serve_in_thread(server.name)
    held: list[socket.socket] = []

    def hold(name: Literal["api", "probe"]) -> int:
        """Open a connection that stays in its request (half a request line); once the server's
        thread for it is reading that request (so past the point where it steps back, or not),
        the number of nice threads."""
        server = servers[name]
        sock = socket.create_connection(("127.0.0.1", int(server.server_address[1])), timeout=5)
        sock.sendall(b"GET /hea")
        held.append(sock)
        want = sum(s.getpeername() == sock.getpeername() for s in held)  # this server's share
        end = time.monotonic() + 30  # a loaded machine may take its time; a deadline, not a nap
        while _reading(server) < want:
            assert time.monotonic() < end, f"the {name} server never read the request"
            time.sleep(0.02)
        return _nice_threads()

    try:
        before = _nice_threads()
        assert hold("probe") == before
        assert hold("api") == before + 1
        assert hold("probe") == before + 1
    finally:
        for sock in held:
            sock.close()
        for server in servers.values():
            server.shutdown()
            server.server_close()
