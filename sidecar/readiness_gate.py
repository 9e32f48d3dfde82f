"""Opt-in: mirror the entitlement into the pod's readiness-gate condition, so the pod is Ready
only while entitled, whatever the product's own probes say.

The kubernetes client is imported here only, and only when the gate is configured. The pod's
RBAC must allow `patch` on `pods/status` (the chart's Role does). A failed patch is logged once
per distinct cause with a fix hint, shown in /v1/entitlement, retried with backoff, and never
stops the sidecar.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.backoff import Backoff
from sidecar.clock import Clock
from sidecar.state import Snapshot, State

log = logging.getLogger(__name__)

REASONS = {
    State.REGISTERING: "Registering",
    State.ENTITLED: "Entitled",
    State.DEGRADED: "Degraded",
    State.NOT_ENTITLED: "NotEntitled",
}
POLL_SECONDS = 0.5


def desired(snap: Snapshot) -> tuple[str, str, str]:
    """(status, reason, message) the condition should show for this snapshot."""
    status = "True" if snap.entitled else "False"
    if snap.error is not None:
        message = f"{snap.error.code}: {snap.error.hint}"
    else:
        message = f"AWS Marketplace entitlement: {snap.state.value}"
    return status, REASONS[snap.state], message[:500]


def condition(condition_type: str, want: tuple[str, str, str], now: float) -> dict[str, str]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    status, reason, message = want
    return {
        "type": condition_type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastProbeTime": stamp,
        "lastTransitionTime": stamp,
    }


def hint_for(status: int | None) -> str:
    if status == 403:
        return (
            "forbidden: the pod's service account needs a Role allowing patch on pods/status "
            "(the Helm chart creates it with readinessGate.enabled=true)"
        )
    if status == 404:
        return (
            "pod not found: check MARKETPLACE_POD_NAME / MARKETPLACE_POD_NAMESPACE (downward API)"
        )
    if status == 401:
        return "unauthorized: the service-account token is missing or not mounted"
    return "the Kubernetes API is unreachable or failing; retrying"


@dataclass(frozen=True)
class GateStatus:
    condition_type: str
    applied: str | None = None  # "True" / "False" once a patch succeeded
    error: str | None = None
    failures: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "condition_type": self.condition_type,
            "applied_status": self.applied,
            "error": self.error,
            "consecutive_failures": self.failures,
        }


def kubernetes_patcher(
    pod: str, namespace: str, serviceaccount_dir: Path
) -> Callable[[dict[str, str]], None]:
    """In-cluster client; `KUBERNETES_SERVICE_HOST/PORT` and the mounted token and CA."""
    from kubernetes import client
    from kubernetes.config.incluster_config import InClusterConfigLoader

    cfg = client.Configuration()
    InClusterConfigLoader(
        token_filename=str(serviceaccount_dir / "token"),
        cert_filename=str(serviceaccount_dir / "ca.crt"),
    ).load_and_set(cfg)
    api = client.CoreV1Api(client.ApiClient(cfg))

    def patch(cond: dict[str, str]) -> None:
        api.patch_namespaced_pod_status(pod, namespace, {"status": {"conditions": [cond]}})

    return patch


class ReadinessGate:
    def __init__(
        self,
        condition_type: str,
        snapshot: Callable[[], Snapshot],
        patcher: Callable[[], Callable[[dict[str, str]], None]],
        clock: Clock,
        stop: threading.Event,
        rng: Callable[[], float],
        backoff: Backoff | None = None,
    ) -> None:
        self._type = condition_type
        self._snapshot = snapshot
        self._make_patcher = patcher
        self._clock = clock
        self._stop = stop
        self._rng = rng
        self._backoff = backoff or Backoff(base=1.0, cap=60.0)
        self._status = GateStatus(condition_type)
        self._logged: set[str] = set()

    @property
    def status(self) -> GateStatus:
        return self._status

    def run(self) -> None:
        patch: Callable[[dict[str, str]], None] | None = None
        applied: tuple[str, str, str] | None = None
        retry_at = 0.0
        while not self._stop.is_set():
            want = desired(self._snapshot())
            now = self._clock.monotonic()
            if want != applied and now >= retry_at:
                try:
                    patch = patch or self._make_patcher()
                    patch(condition(self._type, want, self._clock.time()))
                except Exception as exc:  # never let the gate take the sidecar down
                    retry_at = now + self._failed(exc)
                else:
                    applied = want
                    self._status = GateStatus(self._type, want[0])
                    log.info(
                        "readiness_gate_patched",
                        extra={"condition": self._type, "status": want[0], "reason": want[1]},
                    )
            if self._clock.wait(self._stop, POLL_SECONDS):
                return

    def _failed(self, exc: Exception) -> float:
        status = getattr(exc, "status", None)
        hint = hint_for(status if isinstance(status, int) else None)
        failures = self._status.failures + 1
        self._status = GateStatus(self._type, self._status.applied, hint, failures)
        key = f"{status}:{type(exc).__name__}"
        if key not in self._logged:  # once per distinct cause, not once per retry
            self._logged.add(key)
            log.error(
                "readiness_gate_failed",
                extra={"http_status": status, "detail": type(exc).__name__, "hint": hint},
            )
        return self._backoff.ceiling(failures) * (0.5 + 0.5 * self._rng())
