"""What contract mode's end-to-end tests share: a real `run` process, and the emulator's
License Manager test API. Each test module brings its own emulator fixture."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from tests.helpers import ROOT, free_port

SKU = "2205b290-19e6-4c76-9eea-377d6bf71a47"
SEATS = [{"name": "Seats", "unit": "Count", "value": 1}]
TIER = [{"name": "PremiumTier", "unit": "None"}]
# Fast retries, so a test sees a failed call retried within its deadlines.
FAST_RETRIES = {
    "MARKETPLACE_BACKOFF_BASE_SECONDS": "0.05",
    "MARKETPLACE_BACKOFF_CAP_SECONDS": "0.2",
}

LicenseApi = Callable[[str, dict[str, Any]], Any]


def license_api(url: str) -> LicenseApi:
    """POST to the emulator's License Manager test API, after resetting it."""

    def post(action: str, body: dict[str, Any]) -> Any:
        r = requests.post(f"{url}/_emulator/license/{action}", json=body, timeout=5)
        assert r.status_code == 200, r.text
        return r.json()

    post("reset", {})
    return post


class Pod:
    """One sidecar process; stderr goes to a file (DEBUG logs would fill a pipe)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.api_port, self.probe_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.probe = f"http://127.0.0.1:{self.probe_port}"
        self.log = log
        env = {
            "MARKETPLACE_MODE": "contract",
            "MARKETPLACE_LICENSE_PRODUCT_SKU": SKU,
            **FAST_RETRIES,
            **env,
            "MARKETPLACE_LISTEN": f"127.0.0.1:{self.api_port}",
            "MARKETPLACE_PROBE_LISTEN": f"127.0.0.1:{self.probe_port}",
        }
        self._err = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            text=True,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.logs()
            try:
                self.get("/healthz")
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("sidecar did not start")

    def get(self, path: str, *, probe: bool = False) -> requests.Response:
        return requests.get((self.probe if probe else self.api) + path, timeout=5)

    def doc(self) -> dict[str, Any]:
        body: dict[str, Any] = self.get("/v1/entitlement").json()
        return body

    def usage(self) -> dict[str, Any]:
        body: dict[str, Any] = self.get("/v1/usage").json()
        return body

    def post(self, records: list[dict[str, Any]]) -> requests.Response:
        return requests.post(self.api + "/v1/usage", json=records, timeout=5)

    def wait(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15
    ) -> dict[str, Any]:
        """The entitlement document once `predicate` holds for it."""
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            doc = self.doc()
            if predicate(doc):
                return doc
            time.sleep(0.05)
        raise AssertionError(f"not met in {timeout}s: {json.dumps(doc)[:800]}\n{self.logs()}")

    def until(self, what: Callable[[], bool], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what():
                return
            time.sleep(0.05)
        raise AssertionError(f"not met in {timeout}s: {json.dumps(self.doc())[:600]}")

    def state(self, want: str) -> None:
        self.wait(lambda doc: doc["state"] == want)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._err.close()

    def logs(self) -> str:
        return self.log.read_text()
