"""Remembering AWS's entitlement verdict for the life of the pod.

AWS raises CustomerNotEntitledException and PlatformNotSupportedException only on a pod's
first RegisterUsage call. If the sidecar container restarts (a failed startupProbe does that),
its next "first" call would succeed and hide the verdict. So the verdict is written to a
pod-lifetime directory (an emptyDir) and a restarted sidecar honours it without calling AWS.
Written atomically: temp file, fsync, rename, directory fsync.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from sidecar.aws.errors import ErrorInfo

log = logging.getLogger(__name__)

FILENAME = "verdict.json"
REMEMBERED_KINDS = frozenset({"entitlement", "platform"})


class VerdictStore:
    def __init__(self, directory: Path, product_code: str) -> None:
        self.path = directory / FILENAME
        self.product_code = product_code

    def save(self, error: ErrorInfo) -> None:
        if error.kind not in REMEMBERED_KINDS:
            return
        doc = {"product_code": self.product_code, "error": error.to_json()}
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("verdict_not_saved", extra={"path": str(self.path), "detail": str(exc)})

    def load(self) -> ErrorInfo | None:
        try:
            doc = json.loads(self.path.read_text())
            if doc["product_code"] != self.product_code:
                return None
            e = doc["error"]
            return ErrorInfo(
                code=str(e["code"]),
                message=f"recorded earlier in this pod: {e['message']}",
                hint=str(e["hint"]),
                kind=str(e["kind"]),
                retryable=False,
                request_id=e.get("request_id"),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A damaged record must not unlock anything: treat it as a refusal.
            log.error("verdict_unreadable", extra={"path": str(self.path), "detail": str(exc)})
            return ErrorInfo(
                "VerdictUnreadable",
                f"{self.path} is damaged",
                "delete the pod",
                "entitlement",
                False,
            )
