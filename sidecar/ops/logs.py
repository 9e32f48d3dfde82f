"""One JSON object per log line (or `key=value` text for humans). Messages are event names;
details travel as `extra={...}` fields. Callers never pass tokens or keys, only fingerprints."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "event": record.getMessage(),
        "logger": record.name,
    }
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_") and value is not None:
            out[key] = value
    if record.exc_info and record.exc_info[0] is not None:
        out["exception"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        f = _fields(record)
        head = f"{f.pop('ts')} {f.pop('level'):7} {f.pop('event')}"
        f.pop("logger")
        return " ".join([head, *(f"{k}={v}" for k, v in f.items())])


def setup(fmt: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
