"""Time as an injected dependency, so retry and schedule logic is testable without sleeping."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (token `iat`, API timestamps)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (deadlines, rate limits)."""

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Sleep up to `seconds`; return True at once if `stop` is (or becomes) set."""


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        return stop.wait(max(0.0, seconds))
