"""`python -m tests.worst_moment run`: the real sidecar, with one more stop signal delivered at
the worst instant.

Back-to-back signals hit the narrow window (a handler, or the main thread, inside
`threading.Event`'s lock) only now and then. This wrapper makes the timing certain and
changes nothing else: after the first SIGTERM/SIGINT reaches a handler, the next
`Event.set()` on the main thread raises one more SIGTERM to itself while it holds the event's
lock (`signal.raise_signal` runs the Python handler before it returns), which is exactly where
a second signal from kubelet could land. A handler that takes that lock never returns.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

_armed: bool | None = False  # None once the trap has fired
_original_signal = signal.signal


def _signal(sig: int, handler: Any) -> Any:
    """Install stop-signal handlers wrapped: the first call arms the trap."""
    if sig in (signal.SIGTERM, signal.SIGINT) and callable(handler):
        inner: Callable[..., Any] = handler

        def wrapped(signum: int, frame: Any) -> Any:
            global _armed
            if _armed is False:
                _armed = True
            return inner(signum, frame)

        wrapped.__wrapped__ = inner  # type: ignore[attr-defined]
        return _original_signal(sig, wrapped)
    return _original_signal(sig, handler)


def _set(self: threading.Event) -> None:
    """threading.Event.set, plus the signal at the worst instant (once)."""
    global _armed
    with self._cond:  # type: ignore[attr-defined]
        # get_ident, not current_thread(): a starting thread sets its own event before it is
        # registered, and current_thread() would register a dummy in its place.
        if _armed is True and threading.get_ident() == threading.main_thread().ident:
            _armed = None
            signal.raise_signal(signal.SIGTERM)
        self._flag = True  # type: ignore[attr-defined]
        self._cond.notify_all()  # type: ignore[attr-defined]


signal.signal = _signal  # type: ignore[assignment]
threading.Event.set = _set  # type: ignore[method-assign]

if __name__ == "__main__":
    from sidecar.cli import main

    sys.exit(main(sys.argv[1:]))
