"""Remembering AWS's entitlement verdict for the life of the pod.

AWS raises CustomerNotEntitledException and PlatformNotSupportedException only on a pod's
first RegisterUsage call. If the sidecar container restarts (a failed startupProbe does that),
its next "first" call would succeed and hide the verdict. So the verdict is written to a
pod-lifetime directory (an emptyDir) and a restarted sidecar honours it without calling AWS.

Whoever shares that directory may plant anything there, so the file is treated as hostile:
read without following symlinks, only if it is a small regular file, and anything that does
not parse into a verdict of the expected shape counts as a refusal ("unreadable verdict"),
never as "no verdict". Written atomically: an exclusive temp file with a unique name (a planted
symlink is never followed), fsync, rename, directory fsync.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from sidecar.aws.errors import ErrorInfo
from sidecar.core.files import UnsafeFileError, read_small_file

log = logging.getLogger(__name__)

FILENAME = "verdict.json"
REMEMBERED_KINDS = frozenset({"entitlement", "platform"})
# A genuine record is a few hundred bytes; the cap keeps a planted file from costing memory.
MAX_VERDICT_BYTES = 64 * 1024
_MESSAGE_CHARS = 500


class VerdictStore:
    def __init__(self, directory: Path, product_code: str) -> None:
        self.path = directory / FILENAME
        self.product_code = product_code

    def save(self, error: ErrorInfo) -> None:
        if error.kind not in REMEMBERED_KINDS:
            return
        doc = {"product_code": self.product_code, "error": error.to_json()}
        data = json.dumps(doc).encode()
        directory = self.path.parent
        tmp = directory / f".{FILENAME}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=False) as f:
                    f.write(data)
                    f.flush()
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)  # replaces a planted verdict.json symlink, never its target
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            log.error("verdict_not_saved", extra={"path": str(self.path), "detail": str(exc)})
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def load(self) -> ErrorInfo | None:
        """The remembered refusal; None only when no verdict file exists. Never raises."""
        try:
            raw = read_small_file(self.path, MAX_VERDICT_BYTES, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except (OSError, UnsafeFileError) as exc:
            return self._unreadable(f"{exc}")
        try:
            return self._parse(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return self._unreadable(f"{type(exc).__name__}: {str(exc)[:200]}")

    def _parse(self, raw: bytes) -> ErrorInfo | None:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if not isinstance(doc.get("product_code"), str):
            raise ValueError("product_code is not a string")
        if doc["product_code"] != self.product_code:
            return None  # a verdict for another product code: the configuration changed
        e = doc.get("error")
        if not isinstance(e, dict):
            raise ValueError("error is not an object")
        fields = {name: _text(e, name) for name in ("code", "message", "hint", "kind")}
        if fields["kind"] not in REMEMBERED_KINDS:
            raise ValueError(f"kind must be one of {sorted(REMEMBERED_KINDS)}")
        request_id = e.get("request_id")
        if request_id is not None and not isinstance(request_id, str):
            raise ValueError("request_id is not a string")
        return ErrorInfo(
            code=fields["code"],
            message=f"recorded earlier in this pod: {fields['message'][:_MESSAGE_CHARS]}",
            hint=fields["hint"][:_MESSAGE_CHARS],
            kind=fields["kind"],
            retryable=False,
            request_id=request_id,
        )

    def _unreadable(self, detail: str) -> ErrorInfo:
        # A damaged or planted record must not unlock anything: treat it as a refusal.
        log.error("verdict_unreadable", extra={"path": str(self.path), "detail": detail})
        return ErrorInfo(
            "VerdictUnreadable",
            f"{self.path} is unreadable ({detail})",
            "delete the pod",
            "entitlement",
            False,
        )


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise ValueError(f"error.{name} is not a string")
    return value
