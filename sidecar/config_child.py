"""`run` validates its settings in a forked child, so that the daemon never imports pydantic.

pydantic, pydantic-settings and the asyncio they pull in stay resident once imported (~9 MiB,
a fifth of the sidecar's idle memory) although the settings are checked once, at start. The
child imports them, checks `os.environ` exactly as the other commands do in-process, sends
the field values (or the problem lines) back through a pipe as JSON and leaves with
`os._exit`. Meanwhile the parent imports what it needs anyway (botocore, cryptography).

Light on purpose: the parent imports this module before anything heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

TYPE_CHECKING = False  # not typing's: see sidecar/cli.py
if TYPE_CHECKING:
    from sidecar.config import Settings

# Standard modules the validation imports that the daemon imports too (botocore, urllib3,
# prometheus_client): measured with -X importtime. A module missing here costs CPU twice; one
# the daemon does not need would cost memory: keep it to modules the daemon holds at idle.
_SHARED = (
    "concurrent.futures",
    "decimal",
    "email.message",
    "importlib.metadata",
    "logging",
    "secrets",
    "ssl",
    "tempfile",
    "uuid",
)
_CRASHED = 70  # the child's exit code when validation itself raised


class Check:
    """The validation under way; `result()` returns the settings or raises ConfigError."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd = fd
        self._status: int | None = None

    def result(self) -> Settings:
        from sidecar.config import ConfigError, settings_from

        chunks = []
        try:
            while chunk := os.read(self._fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(self._fd)
        status = self._reap()
        try:
            answer = json.loads(b"".join(chunks))
        except ValueError:
            answer = None
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and isinstance(answer, dict):
            if "problems" in answer:
                raise ConfigError([str(p) for p in answer["problems"]])
            return settings_from(answer["values"], answer["explicit"])
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            how = f"was killed by signal {sig} ({signal.Signals(sig).name})"
        elif isinstance(answer, dict) and "crash" in answer:
            how = f"failed: {answer['crash']}"
        else:
            how = f"exited with code {os.waitstatus_to_exitcode(status)}"
        raise ConfigError(
            [
                f"the configuration check (process {self.pid}) {how} before it finished; "
                "nothing was started"
            ]
        )

    @property
    def stopped(self) -> bool:
        """The child died of SIGTERM or SIGINT: a stop sent to the group, not a config error."""
        status = self._status
        return (
            status is not None
            and os.WIFSIGNALED(status)
            and os.WTERMSIG(status) in (signal.SIGTERM, signal.SIGINT)
        )

    def close(self) -> None:
        """Kill and reap the child if `result` was never called (an error in the parent)."""
        if self._status is None:
            with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped: fine
                os.kill(self.pid, signal.SIGKILL)
            os.close(self._fd)
            self._reap()

    def _reap(self) -> int:
        if self._status is None:
            self._status = os.waitpid(self.pid, 0)[1]
        return self._status


class InProcess:
    """Where fork is unavailable or threads exist: validate here, pydantic and all."""

    pid = None
    stopped = False

    def result(self) -> Settings:
        from sidecar.config_validate import validate

        return validate()

    def close(self) -> None:
        pass


def _single_threaded() -> bool:
    """fork() copies only the calling thread: a lock held by another stays held in the child."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        threading = sys.modules.get("threading")
        return threading is None or threading.active_count() == 1


def start() -> Check | InProcess:
    """Fork the validating child; it runs while the caller imports what it needs."""
    if not hasattr(os, "fork") or not _single_threaded():
        return InProcess()
    # Both processes need these: imported once, before the fork, they cost CPU once (~80 ms
    # for sidecar.config, ~80 ms for the standard modules that pydantic and botocore share).
    import importlib

    import sidecar.config  # noqa: F401

    for name in _SHARED:
        importlib.import_module(name)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - measured by the parent's tests, not coverage
        os.close(r)
        _child(w)
    os.close(w)
    return Check(pid, r)


def _child(w: int) -> None:
    """Never returns: the child must not run the parent's code (atexit, finally, the daemon)."""
    code = 0
    try:
        # A SIGTERM meant for the parent's group ends the child at once; the parent's own
        # handler (EarlyStop) decides what the parent does.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        from sidecar.config import ConfigError, scrub_url_secret, settings_json

        try:
            from sidecar.config_validate import validate

            answer: dict[str, object] = settings_json(validate())
        except ConfigError as exc:
            answer = {"problems": exc.problems}
        except Exception as exc:  # reported by the parent as a config error, exit 2
            code = _CRASHED
            url = os.environ.get("MARKETPLACE_USAGE_DATABASE_URL")
            answer = {"crash": scrub_url_secret(f"{type(exc).__name__}: {exc}", url)[:300]}
        data = memoryview(json.dumps(answer).encode())
        while data:
            data = data[os.write(w, data) :]
    except BaseException:
        code = _CRASHED
    finally:
        os._exit(code)
