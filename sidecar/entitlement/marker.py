"""Remembering, for the life of the pod, that its first RegisterUsage call was sent.

AWS checks the subscription only on a pod's first call. If that call's answer is lost (a read
timeout, a reset, or the sidecar killed while it was in flight), the next call is the pod's
second, and AWS answers it with a token whatever the subscription. That cannot be undone, but
it can be known: `first-call.sent` is created (exclusively, fsynced) before the first request
leaves, and `first-call.answered` once an answer decided the first registration. A restarted
sidecar that finds the first without the second knows an answer may have been lost.

Files are opened with O_NOFOLLOW and never followed into other files; anything odd found in
their place (a symlink, a FIFO, junk) counts as "sent, answer unknown": the cautious reading.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

SENT = "first-call.sent"
ANSWERED = "first-call.answered"
MAX_BYTES = 4096


class FirstCall(enum.Enum):
    UNSENT = "unsent"  # no first call left this pod yet
    SENT = "sent"  # a first call may have reached AWS; its answer is unknown
    ANSWERED = "answered"  # the first registration was decided by AWS's answer
    LOST = "lost"  # decided, but by a later call: the first answer was lost


class FirstCallMarker:
    """The marker files in the pod-lifetime state directory (no directory: nothing persists)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def status(self) -> FirstCall:
        if self.directory is None:
            return FirstCall.UNSENT
        answered = _read_json(self.directory / ANSWERED)
        if isinstance(answered, dict) and isinstance(answered.get("first_answer_lost"), bool):
            return FirstCall.LOST if answered["first_answer_lost"] else FirstCall.ANSWERED
        try:
            os.lstat(self.directory / SENT)
        except FileNotFoundError:
            if answered is not None:
                log.error("first_call_marker_unreadable", extra={"file": ANSWERED})
                return FirstCall.SENT
            return FirstCall.UNSENT
        return FirstCall.SENT

    def mark_sent(self) -> None:
        """Called before the first request leaves. Raises OSError when it cannot be recorded."""
        if self.directory is not None:
            _create(self.directory, SENT, {"sent": True})

    def unmark_sent(self) -> None:
        """The request surely never left (DNS, refused or timed-out connect): nothing was sent."""
        if self.directory is None:
            return
        try:
            os.unlink(self.directory / SENT)
            _fsync_dir(self.directory)
        except FileNotFoundError:
            pass
        except OSError as exc:  # the cautious reading stays: a later restart warns
            log.warning("first_call_marker_not_cleared", extra={"detail": str(exc)})

    def mark_answered(self, lost: bool) -> None:
        if self.directory is None:
            return
        try:
            _create(self.directory, ANSWERED, {"first_answer_lost": lost})
        except OSError as exc:  # a restart then reads "answer unknown": cautious, not unsafe
            log.error("first_call_marker_not_saved", extra={"detail": str(exc)})


def _create(directory: Path, name: str, doc: dict[str, bool]) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(directory / name, flags, 0o600)
    except FileExistsError:
        return  # written before (by this or an earlier sidecar in the pod): first one stands
    try:
        os.write(fd, json.dumps(doc).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> object:
    """The file's JSON; None when absent; "" when present but not a small regular JSON file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError:  # a symlink (ELOOP) or worse
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_BYTES:
            return ""
        data = os.read(fd, MAX_BYTES + 1)
    except OSError:
        return ""
    finally:
        os.close(fd)
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return ""
