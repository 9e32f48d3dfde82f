"""SIGTERM/SIGINT as a flag and a wake-up byte: a handler that takes no lock.

Python runs a signal handler on the main thread between two bytecodes, even inside another
handler or inside a `with lock:` block of that thread. A handler that calls
`threading.Event.set()` takes the event's lock: a second signal landing while the first
handler (or the main thread's own `Event.wait`) holds it waits for ever on its own thread.
Kubelet, ECS, shells and test harnesses do signal twice. So the handler only stores a flag;
`signal.set_wakeup_fd` writes the signal's number to a pipe that `wait` selects on, and the
caller does whatever takes locks (setting events, draining) outside any handler.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Install with `install()`; `wait(timeout)` is True once a stop signal arrived."""

    def __init__(self) -> None:
        self.requested = False
        self._numbers = frozenset(int(s) for s in STOP_SIGNALS)
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)  # set_wakeup_fd requires it; a full pipe drops bytes
        self.installed = False

    def _handler(self, signum: int, frame: object) -> None:
        self.requested = True  # an attribute store: no lock, safe to re-enter

    @classmethod
    def install(cls) -> StopSignals:
        """Handlers for SIGTERM and SIGINT. Off the main thread nothing is installed (whoever
        embeds us owns the signals) and `wait` only sleeps."""
        stop = cls()
        try:
            signal.set_wakeup_fd(stop._w, warn_on_full_buffer=False)
        except ValueError:
            return stop
        for sig in STOP_SIGNALS:
            signal.signal(sig, stop._handler)
        stop.installed = True
        return stop

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` seconds or until a stop signal; True once one arrived."""
        if not self.requested:
            ready, _, _ = select.select([self._r], [], [], timeout)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    if self._numbers.intersection(os.read(self._r, 512)):
                        self.requested = True
        return self.requested

    def close(self) -> None:
        """Stop writing wake-up bytes. The handlers stay: a late signal during the exit is
        absorbed (a default handler would turn the clean exit 0 into death by SIGTERM)."""
        if self.installed:
            signal.set_wakeup_fd(-1)
            self.installed = False
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
