"""`yield_to_probes`: a flooded API thread steps back so probe threads get the CPU first.

The latency effect is a timing goal and lives in benchmarks/throughput.py (`--sidecar-variants
nice`); here only what must hold on any Linux machine: the caller's thread alone is lowered,
and a thread already lower is left alone (raising a priority would need a privilege)."""

from __future__ import annotations

import os
import sys
import threading

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
