"""Opt-in mirrors of the entitlement into Kubernetes, on the sidecar's own pod:

- the readiness-gate condition (`pods/status` patch), so the pod is Ready only while entitled;
- Events on state changes, so `kubectl describe pod` shows "NotEntitled: <AWS code> — <hint>".

The kubernetes client is imported here only, and only when a mirror is configured. Each mirror
polls the state machine, applies what changed, and on failure logs once per distinct cause with
a fix hint, reports it in /v1/entitlement, retries with backoff, and never stops the sidecar.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from sidecar.core.backoff import Backoff
from sidecar.core.clock import Clock
from sidecar.entitlement.state import Snapshot, State

log = logging.getLogger(__name__)

REASONS = {
    State.REGISTERING: "Registering",
    State.ENTITLED: "Entitled",
    State.DEGRADED: "Degraded",
    State.NOT_ENTITLED: "NotEntitled",
}
POLL_SECONDS = 0.5
COMPONENT = "marketplace-sidecar"
# The chart projects the pod's metadata.uid (downward API) next to the token, so recording an
# Event needs no `get pods` permission.
POD_UID_FILE = "pod-uid"
UID_RE = re.compile(r"[0-9a-fA-F-]{1,64}")  # fullmatch: `$` takes "x\n"


def desired(snap: Snapshot) -> tuple[str, str, str]:
    """(status, reason, message) the condition should show for this snapshot."""
    status = "True" if snap.entitled else "False"
    if snap.error is not None:
        message = f"{snap.error.code}: {snap.error.hint}"
    else:
        message = f"AWS Marketplace entitlement: {snap.state.value}"
    return status, REASONS[snap.state], message[:500]


def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


def condition(condition_type: str, want: tuple[str, str, str], now: float) -> dict[str, str]:
    status, reason, message = want
    return {
        "type": condition_type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastProbeTime": _stamp(now),
        "lastTransitionTime": _stamp(now),
    }


def event(pod: str, namespace: str, uid: str | None, snap: Snapshot, now: float) -> dict[str, Any]:
    """A core/v1 Event on the pod: Normal when entitled, Warning otherwise."""
    involved: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": pod,
        "namespace": namespace,
    }
    if uid:
        involved["uid"] = uid
    if snap.error is not None:
        message = f"{snap.error.code} — {snap.error.hint}"
    else:
        message = f"AWS Marketplace entitlement: {snap.state.value}"
    return {
        "metadata": {"generateName": f"{pod}.", "namespace": namespace},
        "involvedObject": involved,
        "reason": REASONS[snap.state],
        "message": message[:1000],
        "type": "Normal" if snap.state is State.ENTITLED else "Warning",
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": pod,
        "firstTimestamp": _stamp(now),
        "lastTimestamp": _stamp(now),
        "count": 1,
    }


def hint_for(status: int | None, what: str) -> str:
    if status == 403:
        return (
            f"forbidden: the pod's service account needs a Role allowing {what} (the Helm "
            "chart creates it when readinessGate.enabled or events.enabled is true)"
        )
    if status == 404:
        return (
            "pod not found: check MARKETPLACE_POD_NAME / MARKETPLACE_POD_NAMESPACE (downward API)"
        )
    if status == 401:
        return "unauthorized: the service-account token is missing or not mounted"
    return "the Kubernetes API is unreachable or failing; retrying"


@dataclass(frozen=True)
class MirrorStatus:
    applied: str | None = None
    error: str | None = None
    failures: int = 0


def pod_uid(serviceaccount_dir: Path) -> str | None:
    """The pod UID from the projected downward-API file; None if absent or not a UID.

    Read with O_NOFOLLOW | O_NONBLOCK and a small cap: a FIFO or a huge file cannot hang or
    bloat the sidecar.
    """
    try:
        fd = os.open(serviceaccount_dir / POD_UID_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        raw = os.read(fd, 128)
    except OSError:
        return None
    finally:
        os.close(fd)
    text = raw.decode("ascii", "replace").strip()
    return text if UID_RE.fullmatch(text) else None


def _lazy_package(name: str, folder: Path) -> ModuleType:
    """Register package `name` without running its __init__.py; a name that file would import
    (`from x.y import Name`) is imported from its own module on first access instead."""
    import importlib
    import re
    import sys
    import types

    init = (folder / "__init__.py").read_text(encoding="utf-8")
    where = {n: m for m, n in re.findall(r"^from ([\w.]+) import (\w+)\s*$", init, re.M)}
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    package.__package__ = name

    def resolve(attr: str) -> Any:
        if attr not in where:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(where[attr]), attr)
        setattr(package, attr, value)
        return value

    package.__getattr__ = resolve  # type: ignore[method-assign]
    sys.modules[name] = package
    parent, _, leaf = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], leaf, package)
    return package


def _kubernetes_client() -> Any:
    """`kubernetes.client`, loading only what the mirrors touch.

    `from kubernetes import client` runs package __init__ files that import all ~60 API classes,
    ~800 models, dynamic, watch, stream and utils (about +36 MiB; benchmarks/gate.py). The same
    library is used here, its packages registered lazily: CoreV1Api and the few models its
    responses are read into load on first use.
    """
    import importlib.util
    import sys

    if "kubernetes" in sys.modules:  # already imported (fully or by us): use it
        return importlib.import_module("kubernetes.client")
    spec = importlib.util.find_spec("kubernetes")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the kubernetes client is not installed", name="kubernetes")
    root = Path(next(iter(spec.submodule_search_locations)))
    _lazy_package("kubernetes", root)
    for sub in ("client", "client/api", "client/models", "config"):
        _lazy_package("kubernetes." + sub.replace("/", "."), root / sub)
    return sys.modules["kubernetes.client"]


def core_v1(serviceaccount_dir: Path) -> Any:
    """In-cluster client: `KUBERNETES_SERVICE_HOST/PORT` and the projected token and CA."""
    client = _kubernetes_client()
    from kubernetes.config.incluster_config import InClusterConfigLoader

    cfg = client.Configuration()
    InClusterConfigLoader(
        token_filename=str(serviceaccount_dir / "token"),
        cert_filename=str(serviceaccount_dir / "ca.crt"),
    ).load_and_set(cfg)
    return client.CoreV1Api(client.ApiClient(cfg))


class Mirror:
    """Poll the state; when `key(snapshot)` changes, `apply(snapshot)`; back off on failure."""

    def __init__(
        self,
        name: str,
        rbac: str,
        key: Callable[[Snapshot], Hashable],
        apply: Callable[[Snapshot], str],
        snapshot: Callable[[], Snapshot],
        clock: Clock,
        stop: threading.Event,
        rng: Callable[[], float],
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self._rbac = rbac
        self._key = key
        self._apply = apply
        self._snapshot = snapshot
        self._clock = clock
        self._stop = stop
        self._rng = rng
        self._backoff = backoff or Backoff(base=1.0, cap=60.0)
        self.status = MirrorStatus()
        self._logged: set[str] = set()

    def run(self) -> None:
        applied: Hashable = None
        retry_at = 0.0
        while not self._stop.is_set():
            snap = self._snapshot()
            key = self._key(snap)
            now = self._clock.monotonic()
            if key != applied and now >= retry_at:
                try:
                    label = self._apply(snap)
                except Exception as exc:  # never let a mirror take the sidecar down
                    retry_at = now + self._failed(exc)
                else:
                    applied = key
                    self.status = MirrorStatus(label)
                    log.info(f"{self.name}_applied", extra={"value": label})
            if self._clock.wait(self._stop, POLL_SECONDS):
                return

    def _failed(self, exc: Exception) -> float:
        status = getattr(exc, "status", None)
        hint = hint_for(status if isinstance(status, int) else None, self._rbac)
        failures = self.status.failures + 1
        self.status = MirrorStatus(self.status.applied, hint, failures)
        cause = f"{status}:{type(exc).__name__}"
        if cause not in self._logged:  # once per distinct cause, not once per retry
            self._logged.add(cause)
            log.error(
                f"{self.name}_failed",
                extra={"http_status": status, "detail": type(exc).__name__, "hint": hint},
            )
        return self._backoff.ceiling(failures) * (0.5 + 0.5 * self._rng())


class KubeTarget:
    """The sidecar's own pod, reached through one lazily created client."""

    def __init__(self, pod: str, namespace: str, serviceaccount_dir: Path, clock: Clock) -> None:
        self.pod, self.namespace = pod, namespace
        self._sa_dir = serviceaccount_dir
        self._clock = clock
        self._api: Any = None
        self._uid: str | None = None
        self._lock = threading.Lock()

    def api(self) -> Any:
        with self._lock:
            if self._api is None:
                self._api = core_v1(self._sa_dir)
            return self._api

    def patch_condition(self, condition_type: str, snap: Snapshot) -> str:
        want = desired(snap)
        self.api().patch_namespaced_pod_status(
            self.pod,
            self.namespace,
            {"status": {"conditions": [condition(condition_type, want, self._clock.time())]}},
        )
        return want[0]

    def record_event(self, snap: Snapshot) -> str:
        if self._uid is None:
            self._uid = pod_uid(self._sa_dir)
            if self._uid is None:
                self._uid = ""  # warn once; the Event still names the pod
                log.warning(
                    "events_pod_uid_missing",
                    extra={
                        "detail": f"{self._sa_dir / POD_UID_FILE} is missing or not a UID",
                        "hint": "project metadata.uid there (downward API), as the Helm chart "
                        "does; without it `kubectl describe pod` may not list the Events",
                    },
                )
        body = event(self.pod, self.namespace, self._uid, snap, self._clock.time())
        self.api().create_namespaced_event(self.namespace, body)
        return str(body["reason"])
