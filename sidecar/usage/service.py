"""The usage pipeline as one object the wiring (app.py) holds.

CONTRACT with the wiring (agreed with H6b; change only together):

    from sidecar.usage.service import UsageService, UsagePolicy, EntitlementResult, StoreError

    policy = UsagePolicy(
        product_code=settings.product_code,
        dimensions=settings.dimension_list,          # tuple[str, ...], 1..24
        state_dir=settings.state_dir,                # Path, required in custom mode
        entitlement_check=settings.entitlement_check,  # "meter_zero" | "dry_run" | "none"
                                                       # | "license" (contract mode: `gate`)
        check_dimension=settings.entitlement_dimension or None,  # meter_zero's dimension
        drain_seconds=settings.drain_seconds,
        entitlement_deadline=settings.register_deadline_seconds,
        backoff_base=settings.backoff_base_seconds, backoff_cap=settings.backoff_cap_seconds,
    )                                                 # other fields have defaults
    service = UsageService(policy, gateway_factory, clock=clock, on_entitlement=callback)
        # raises StoreError (a clear message, never a silent reset) when the store cannot be
        # opened: the wiring logs it and exits non-zero before binding.
        # gateway_factory: Callable[[], MeterGateway]; sidecar.aws.metering.MeteringGateway
        # satisfies MeterGateway (meter_usage(...)); it may raise GatewaySetupError-like
        # exceptions carrying `.info: ErrorInfo` (any exception with an `info` attribute).
        # clock: sidecar.core.clock.Clock; for tests only, sidecar.usage.hours.ScaledClock
        # (env MARKETPLACE_TEST_ONLY_TIME_SCALE, refused unless the metering endpoint is loopback).

    service.post(body: bytes) -> tuple[int, dict[str, Any]]
        # POST /v1/usage. 202 after fsync; 200 idempotent repeat; 400/409/413 client mistakes;
        # 503 with body["retry_after"] (seconds) when the store cannot write.
    service.report() -> dict[str, Any]           # GET /v1/usage
    service.check_entitlement(stop: threading.Event) -> EntitlementResult   # blocking, retries
        # "license" (contract with consumption): the injected `gate(stop)` answers instead
        #   (entitled | refused | unavailable); nothing is sent, not even at drain, until it
        #   answered "entitled"
        # EntitlementResult.outcome: "entitled" | "permitted" (dry_run: permission only)
        #   | "refused" (final; .error: ErrorInfo; remembered in the store across restarts)
        #   | "unavailable" (retryable errors until the deadline; .error) | "skipped" (none)
        # on_entitlement(result) is called with outcome "retrying" (.error) after each
        # retryable failure at start, and later if an hourly send learns a refusal
        # (dry_run/none modes: CustomerNotEntitledException on the pod's first real call).
    service.run(stop: threading.Event) -> None     # sealing/sending loop; run in a thread
    service.drain(budget_seconds: float) -> None   # SIGTERM: seal partial hour, send pending
    service.close() -> None                        # stop the writer thread, close the store
    service.counters() -> UsageCounters            # for metrics, read at scrape time:
        # .units_accepted: dict[dimension, int]; .hours_by_state: dict[state, int];
        # .oldest_unsent_age_seconds: float; .send_attempts: dict[(result, code), int]
        # states: open, sealed, sent, conflict, expired, rejected
"""

from __future__ import annotations

import functools
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from sidecar.aws.errors import STATE_DIR_UNWRITABLE, ErrorInfo, classify, clock_skew
from sidecar.core import quantity as qty
from sidecar.core.clock import Clock, SystemClock
from sidecar.usage import ledger
from sidecar.usage.db import INTAKE_WAIT, StoreOutcomeUnknownError
from sidecar.usage.hours import (
    CONFLICT,
    EXPIRED,
    RETRY,
    SENT,
    HourPolicy,
    RetryPolicy,
    decide,
    hour_of,
    iso,
    iso_hour,
)
from sidecar.usage.intake import IdConflictError, accepted
from sidecar.usage.ledger import Pending
from sidecar.usage.pacing import (
    DEFAULT_CALLS_PER_SECOND,
    Slots,
    frame_slots,
    home_slot,
    is_ordinal,
    ordinal,
)
from sidecar.usage.store import Store, StoreError, StoreUnavailableError
from sidecar.usage.validate import Limits, RejectedError, parse
from sidecar.usage.volume import Guard, Reading, VolumeFullError, check, measure

__all__ = [
    "EntitlementResult",
    "MeterGateway",
    "StoreError",
    "UsageCounters",
    "UsagePolicy",
    "UsageService",
]

log = logging.getLogger(__name__)

REMEMBERED_KINDS = frozenset({"entitlement", "platform"})
RETRY_AFTER_SECONDS = 5
TIMESTAMP_REFUSED = "TimestampOutOfBoundsException"
THROTTLED = "ThrottlingException"
# A paced send may leave this much before its slot (timer and float rounding); sooner, it
# would land in the previous slot, on another pod's call.
SLOT_EARLY = 0.001


class MeterGateway(Protocol):
    def meter_usage(self, request: dict[str, Any], dry_run: bool = False) -> str: ...


@dataclass(frozen=True)
class UsagePolicy:
    product_code: str
    dimensions: tuple[str, ...]
    state_dir: Path
    entitlement_check: str = "meter_zero"
    drain_seconds: float = 20.0
    entitlement_deadline: float = 3600.0
    backoff_base: float = 2.0
    backoff_cap: float = 300.0
    hours: HourPolicy = field(default_factory=HourPolicy)
    future_skew: float = 300.0
    max_sleep: float = 30.0  # the loop looks at the store at least this often
    # meter_zero's dimension: one the seller published for the start check and never posts
    # usage to, so the check locks no usage dimension's first hour. None: the first dimension.
    check_dimension: str | None = None

    @property
    def usage_dimensions(self) -> tuple[str, ...]:
        """The dimensions that take usage (all but a dedicated check dimension)."""
        return tuple(d for d in self.dimensions if d != self.check_dimension)

    volume_bytes: int | None = None  # the state volume's size limit (the emptyDir's sizeLimit)
    # Hourly sends are paced in slots (sidecar.usage.pacing): the pods sending MeterUsage with
    # this account and region (None: as many as fit `hours.spread`), the fleet's calls per
    # second, and this pod's name (its slot; empty: the host name, the pod's name in Kubernetes).
    fleet_size: int | None = None
    calls_per_second: float = DEFAULT_CALLS_PER_SECOND
    pod_name: str = ""
    pod_index: int | None = None  # a StatefulSet pod's ordinal (its pod-index label)


@dataclass(frozen=True)
class EntitlementResult:
    """`outcome`: entitled | permitted | refused | unavailable | skipped, or retrying (one
    retryable failure at start, reported while the check goes on; see the contract)."""

    outcome: str
    error: ErrorInfo | None = None
    record_id: str | None = None
    remembered: bool = False


@dataclass(frozen=True)
class UsageCounters:
    # units (micro-units / 1,000,000: Prometheus values are floats; the ledger stays exact)
    units_accepted: dict[str, float]
    hours_by_state: dict[str, int]
    oldest_unsent_age_seconds: float
    send_attempts: dict[tuple[str, str], int]
    # units counted in an hour that has not started: a drain cannot send them (AWS refuses
    # future timestamps), so they are lost if the pod ends before that hour does
    future_hour_units: dict[str, float] = field(default_factory=dict)
    # units still unsent when a drain ended (kept in the store; lost if the pod goes)
    unsent_at_exit: dict[str, float] = field(default_factory=dict)
    volume_used_bytes: int = 0
    volume_limit_bytes: int = 0
    refused_volume_full: int = 0


def _units(micros: dict[str, int]) -> dict[str, float]:
    """Micro-units to the units a metric shows."""
    return {d: m / qty.SCALE for d, m in micros.items()}


def request_quantity(request: dict[str, Any]) -> int | str:
    """A stored MeterUsage request's quantity, for logs: the decimal field, or the integer one
    of a request sealed before decimals (resent as stored)."""
    if "UsageQuantityAsDecimal" in request:
        return qty.to_json(qty.parse(str(request["UsageQuantityAsDecimal"])))
    return int(request.get("UsageQuantity", 0))


def _store_unwritable(exc: StoreUnavailableError) -> ErrorInfo:
    """The state dir refused a write (full, read-only): retried; freeing space heals it."""
    return ErrorInfo(
        STATE_DIR_UNWRITABLE,
        f"the usage store cannot write: {exc}"[:500],
        "free space on the state volume (MARKETPLACE_STATE_DIR) or make it writable; "
        "retried with backoff, nothing acknowledged is lost",
        "transient",
        True,
    )


def _no_spread() -> float:
    return 0.0


def _fleet_too_small(found: int | None, slots: int, fleet_size: int | None) -> str | None:
    """A StatefulSet ordinal past the frame: the fleet is larger than the frame, and this pod
    shares its slot with a lower ordinal's every hour. Known from the ordinal alone: said."""
    if found is None or found < slots:
        return None
    size = (
        f"MARKETPLACE_FLEET_SIZE={fleet_size}"
        if fleet_size is not None
        else f"MARKETPLACE_FLEET_SIZE unset ({slots} slots fit the spread window)"
    )
    return (
        f"fleet_size_too_small: this pod's StatefulSet ordinal {found} is past the frame's "
        f"{slots} slots ({size}): it shares slot {found % slots} with ordinal "
        f"{found % slots} and one of them is throttled every hour; set MARKETPLACE_FLEET_SIZE "
        "to the number of pods sending MeterUsage with this account and region"
    )


def _info(exc: BaseException) -> ErrorInfo | None:
    info = getattr(exc, "info", None)
    return info if isinstance(info, ErrorInfo) else None


class UsageService:
    def __init__(
        self,
        policy: UsagePolicy,
        gateway_factory: Callable[[], MeterGateway],
        *,
        clock: Clock | None = None,
        rng: Callable[[], float] = random.random,
        on_entitlement: Callable[[EntitlementResult], None] | None = None,
        gate: Callable[[threading.Event], EntitlementResult] | None = None,
    ) -> None:
        if not policy.usage_dimensions:
            raise ValueError("at least one usage dimension is needed")
        if policy.check_dimension is not None and policy.check_dimension not in policy.dimensions:
            raise ValueError("the check dimension must be one of the dimensions")
        if (policy.entitlement_check == "license") != (gate is not None):
            raise ValueError('entitlement_check "license" and a gate go together')
        self.policy = policy
        self._gate = gate
        # Contract with consumption: False until the license gate opened (no MeterUsage at all
        # before, not even at drain). The other checks keep their own behaviour: always True.
        self.sending_open = gate is None
        self.clock: Clock = clock or SystemClock()
        self.store = Store(policy.state_dir, volume_bytes=policy.volume_bytes)
        self._factory = gateway_factory
        self._gateway: MeterGateway | None = None
        self._rng = rng
        self._on_entitlement = on_entitlement
        self._limits = Limits(policy.usage_dimensions, future_skew=policy.future_skew)
        self._retry = RetryPolicy(policy.backoff_base, policy.backoff_cap)
        self._send_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._units: dict[str, int] = dict.fromkeys(policy.usage_dimensions, 0)  # micro-units
        self._unsent_at_exit: dict[str, int] = {}  # micro-units
        self._store_error: str | None = None  # the loop's last store failure, until a pass works
        self._attempts: dict[tuple[str, str], int] = {}
        self._failures = 0  # consecutive failed sends: all sending pauses after a failure
        self._resume_at = 0.0  # clock.monotonic() when sending may resume
        self._warned: set[tuple[str, int]] = set()
        self._pruned_hour = -1
        self._refused = False
        self._volume: Reading | None = None  # the last reading (readyz and warnings read it)
        self._volume_refusals = 0
        self._guard = Guard()  # when a write measures the volume (at most once a second)
        self._slots = Slots(
            policy.calls_per_second,
            frame_slots(
                policy.fleet_size,
                policy.hours.spread,
                policy.calls_per_second,
                len(policy.usage_dimensions),
            ),
        )
        name = policy.pod_name or socket.gethostname()
        self._home = home_slot(name, self._slots.slots, policy.pod_index)
        self._own_slot = is_ordinal(name, policy.pod_index)  # a StatefulSet's: no other pod's
        self._fleet_warning = _fleet_too_small(
            ordinal(name, policy.pod_index), self._slots.slots, policy.fleet_size
        )
        if self._fleet_warning:
            log.warning("fleet_size_too_small", extra={"detail": self._fleet_warning})
        self._not_before: int | None = None  # the slot index the next paced send waits for
        self._throttles = 0  # consecutive ThrottlingExceptions of paced sends
        self._held = 0  # paced sends in a row that went through in this pod's slot
        self._closing_at = float("inf")  # the earliest deadline of the hours found due
        self._measure_volume()

    # -- the local API ---------------------------------------------------------------------

    def post(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """POST /v1/usage: 202 once durable, 200 for a repeat, 4xx for client mistakes."""
        now = self.clock.time()
        try:
            records = parse(body, self._limits, now)
        except RejectedError as exc:
            return exc.status, exc.body()
        policy = self.policy.hours

        def job(c: Any) -> tuple[int, list[dict[str, Any]]]:
            out = ledger.ingest(c, records, now, policy)
            mono = self.clock.monotonic()
            if out[0] == 202 and self._guard.due(mono, len(body)):
                # something new, maybe near the limit: measured with it, rolled back if over
                found = self._reading(c)
                self._guard.measured(found, mono)
                self._volume = check(found)
            return out

        before = self._volume
        try:
            status, answers = self.store.write(job, timeout=INTAKE_WAIT)
        except VolumeFullError as exc:
            self._volume = exc.reading
            with self._count_lock:
                self._volume_refusals += 1
            if before is None or not before.refusing:  # once per episode, not per POST
                log.error("usage_refused_volume_full", extra={"detail": str(exc)})
            return 503, {
                "error": "state_volume_full",
                "message": f"usage was not stored: {exc}; send it again later",
                "retry_after": RETRY_AFTER_SECONDS,
            }
        except RejectedError as exc:
            return exc.status, exc.body()
        except IdConflictError as exc:
            return 409, exc.body()
        except StoreOutcomeUnknownError as exc:
            log.error("usage_outcome_unknown", extra={"detail": str(exc)})
            return 503, {
                "error": "store_outcome_unknown",
                "message": f"the usage may or may not have been stored ({exc}); send it again "
                "with the same id, which counts it once either way (without an id it may count "
                "twice)",
                "retry_after": RETRY_AFTER_SECONDS,
            }
        except StoreUnavailableError as exc:
            log.error("usage_not_stored", extra={"detail": str(exc)})
            return 503, {
                "error": "store_unavailable",
                "message": f"usage was not stored, and none of it will be ({exc}); send it "
                "again later",
                "retry_after": RETRY_AFTER_SECONDS,
            }
        return accepted(status, answers, self._units, self._count_lock)

    def report(self) -> dict[str, Any]:
        """GET /v1/usage."""
        now = self.clock.time()
        out = self.store.read(lambda c: ledger.report(c, now, self.policy.hours))
        pause = self._resume_at - self.clock.monotonic()
        out["sending"] = {
            "consecutive_failures": self._failures,
            "paused_for_seconds": round(pause, 1) if self._failures and pause > 0 else 0.0,
            "store_error": self._store_error,
        }
        if self._store_error is not None:
            out["warnings"].append(f"usage store cannot write: {self._store_error}")
        if not self.sending_open:
            out["warnings"].append(
                "usage_held: no license checked out yet; usage is stored and sent only once "
                "License Manager allows the license (GET /v1/entitlement)"
            )
        out["dimensions"] = list(self.policy.usage_dimensions)
        out["entitlement_check"] = self.policy.entitlement_check
        if self.policy.entitlement_check == "meter_zero":
            out["check_dimension"] = self._check_dimension
        reading = self._measure_volume()
        if reading is not None:
            out["state_volume"] = reading.to_json()
        out["warnings"] = [*self.notices(), *out["warnings"]]
        return out

    def notices(self) -> list[str]:
        """Warnings from memory (for /readyz): the state volume's last reading."""
        reading = self._volume
        warning = reading.warning() if reading is not None else None
        return [w for w in (self._fleet_warning, warning) if w]

    def _reading(self, c: Any) -> Reading:
        return measure(
            c,
            self.store.directory,
            self.store.schema.name,
            self.policy.volume_bytes,
            "MARKETPLACE_STATE_VOLUME_BYTES",
        )

    def _measure_volume(self) -> Reading | None:
        """A fresh reading from a read snapshot; the last one when that fails."""
        try:
            mono = self.clock.monotonic()
            self._volume = self.store.read(self._reading)
            self._guard.measured(self._volume, mono)
        except (OSError, StoreUnavailableError) as exc:
            log.warning("state_volume_unreadable", extra={"detail": str(exc)[:300]})
        return self._volume

    def counters(self) -> UsageCounters:
        now = self.clock.time()

        def read(c: Any) -> tuple[dict[str, int], float | None, dict[str, int]]:
            return (
                ledger.hours_by_state(c),
                ledger.oldest_unsent_end(c, now),
                ledger.future_hour_units(c, now),
            )

        by_state, oldest_end, future = self.store.read(read)
        volume = self._measure_volume()
        with self._count_lock:
            return UsageCounters(
                units_accepted=_units(self._units),
                hours_by_state=by_state,
                oldest_unsent_age_seconds=max(0.0, now - oldest_end) if oldest_end else 0.0,
                send_attempts=dict(self._attempts),
                future_hour_units=_units(future),
                unsent_at_exit=_units(self._unsent_at_exit),
                volume_used_bytes=volume.used if volume else 0,
                volume_limit_bytes=volume.limit if volume else 0,
                refused_volume_full=self._volume_refusals,
            )

    @property
    def _check_dimension(self) -> str:
        return self.policy.check_dimension or self.policy.dimensions[0]

    def close(self) -> None:
        self.store.close()

    # -- AWS -----------------------------------------------------------------------------

    def _get_gateway(self) -> MeterGateway:
        if self._gateway is None:
            self._gateway = self._factory()
        return self._gateway

    def _call(
        self, request: dict[str, Any], dry_run: bool = False
    ) -> tuple[str | None, ErrorInfo | None]:
        """(MeteringRecordId, None) or (None, error); anything else is a bug and propagates."""
        try:
            return self._get_gateway().meter_usage(request, dry_run), None
        except Exception as exc:
            info = _info(exc)
            if info is None:
                raise
            return None, info

    def _count(self, result: str, code: str) -> None:
        with self._count_lock:
            key = (result, code)
            self._attempts[key] = self._attempts.get(key, 0) + 1

    def _send(self, p: Pending, *, notify: bool = True) -> tuple[str, str | None, ErrorInfo | None]:
        """One attempt for one sealed hour; its outcome is stored before returning."""
        record_id, info = self._call(p.request)
        outcome = decide(info.code if info else None, info.retryable if info else False)
        now = self.clock.time()
        if outcome == EXPIRED and now < p.deadline:
            # Inside our own window AWS still refused the timestamp: one of the two clocks is
            # off (ours ahead, most likely). Keep the exact request and try again; it expires
            # at the deadline like any other unsent hour.
            outcome = RETRY
        state = "sealed" if outcome == RETRY else outcome
        self.store.write(
            lambda c: ledger.finish(
                c,
                p.dimension,
                p.hour,
                state,
                now,
                record_id=record_id,
                code=info.code if info else None,
                error=info.message if info else None,
            )
        )
        self._count(outcome, info.code if info else "ok")
        where = {
            "dimension": p.dimension,
            "hour": iso_hour(p.hour),
            "quantity": request_quantity(p.request),
        }
        if info is None:
            self._failures = 0
            log.info("usage_sent", extra={**where, "metering_record_id": record_id})
        elif outcome == RETRY:
            self._failures += 1
            delay = self._retry.delay(self._failures, self._rng)
            self._resume_at = self.clock.monotonic() + delay
            log.warning(
                "usage_send_failed",
                extra={**where, "code": info.code, "kind": info.kind, "retry_in": round(delay, 1)},
            )
        else:
            self._failures = 0
            log.error(
                "usage_" + outcome, extra={**where, "code": info.code, "detail": info.message}
            )
            if info.kind in REMEMBERED_KINDS:
                self._refuse(info, notify)
        return outcome, record_id, info

    def _refuse(self, info: ErrorInfo, notify: bool = True) -> None:
        """AWS's entitlement verdict: remembered in the store (it is given only once per pod)."""
        self.store.write(lambda c: ledger.save_verdict(c, info.to_json()))
        if notify and not self._refused and self._on_entitlement is not None:
            self._on_entitlement(EntitlementResult("refused", info))
        self._refused = True

    # -- entitlement at start --------------------------------------------------------------

    def check_entitlement(self, stop: threading.Event | None = None) -> EntitlementResult:
        """The configured start-up check, with retries of transient errors until the deadline."""
        stop = stop or threading.Event()
        mode = self.policy.entitlement_check
        if mode == "none":
            return EntitlementResult("skipped")
        if self._gate is not None:
            # The license is this pod's entitlement, checked out at every start: a MeterUsage
            # refusal remembered from an earlier container does not outrank it (and a start
            # check by MeterUsage would bill nothing the license has not already said).
            result = self._gate(stop)
            self.sending_open = result.outcome == "entitled"
            return result
        remembered = self.store.read(ledger.load_verdict)
        if remembered is not None:
            self._refused = True
            info = ErrorInfo(
                code=str(remembered["code"]),
                message=f"recorded earlier in this pod: {remembered['message']}",
                hint=str(remembered["hint"]),
                kind=str(remembered["kind"]),
                retryable=False,
                request_id=remembered.get("request_id"),
            )
            return EntitlementResult("refused", info, remembered=True)
        if mode == "dry_run":
            return self._dry_run(stop)
        return self._meter_zero(stop)

    def _retrying(
        self, stop: threading.Event, attempt: Callable[[], tuple[str | None, ErrorInfo | None]]
    ) -> tuple[str | None, ErrorInfo | None]:
        """Retry retryable errors with backoff until the deadline; each failure is reported
        (`on_entitlement` with outcome "retrying"), so `/v1/entitlement` shows the error and the
        consecutive failures while the pod is not ready, as hourly mode does."""
        started = self.clock.monotonic()
        failures = 0
        while True:
            record_id, info = attempt()
            if info is None or not info.retryable:
                return record_id, info
            failures += 1
            if self._on_entitlement is not None:
                self._on_entitlement(EntitlementResult("retrying", info))
            delay = self._retry.delay(failures, self._rng)
            if self.clock.monotonic() + delay - started > self.policy.entitlement_deadline:
                return None, info
            log.warning(
                "entitlement_check_retry",
                extra={
                    "code": info.code,
                    "kind": info.kind,
                    "failures": failures,
                    "retry_in": round(delay, 1),
                },
            )
            if self.clock.wait(stop, delay):
                return None, info

    def _meter_zero(self, stop: threading.Event) -> EntitlementResult:
        dimension = self._check_dimension
        claim: ledger.Claim | None = None
        outcome = RETRY

        def take(c: Any) -> ledger.Claim:
            return ledger.claim_entitlement(
                c, dimension, self.clock.time(), self.policy.hours, self.policy.product_code
            )

        def attempt() -> tuple[str | None, ErrorInfo | None]:
            nonlocal outcome, claim
            try:
                if claim is None:
                    claim = self.store.write(take)
                if claim.already or claim.pending is None:
                    return None, None
                with self._send_lock:
                    outcome, record_id, info = self._send(claim.pending, notify=False)
            except StoreUnavailableError as exc:  # a full state volume heals when space is freed
                log.error("usage_store_unavailable", extra={"detail": str(exc)[:300]})
                outcome = RETRY
                return None, _store_unwritable(exc)
            if outcome == RETRY and info is not None and info.code == TIMESTAMP_REFUSED:
                # Refused inside our own six-hour window: AWS sees the timestamp in its
                # future, so this clock is ahead of AWS's. Not a refusal: retried, and
                # healed once the clocks agree (the request is kept byte for byte).
                info = clock_skew(
                    f"AWS refused the start check's timestamp "
                    f"{iso(claim.pending.request['Timestamp'])} ({info.code}: "
                    f"{info.message}); this machine's clock is probably ahead of AWS's"
                )
            return record_id, info

        record_id, info = self._retrying(stop, attempt)
        self._failures, self._resume_at = 0, 0.0
        if claim is not None and claim.already:
            return EntitlementResult("entitled", remembered=True)
        if claim is not None and claim.pending is None:
            return EntitlementResult(
                "refused",
                classify("EntitlementRecordUnusable", "this hour's entitlement record was refused"),
            )
        if outcome in (SENT, CONFLICT):
            log.info(
                "entitlement_checked",
                extra={
                    "mode": "meter_zero",
                    "dimension": dimension,
                    "metering_record_id": record_id,
                },
            )
            return EntitlementResult("entitled", record_id=record_id)
        if info is not None and (info.retryable or outcome == EXPIRED):
            return EntitlementResult("unavailable", info)
        if info is not None and info.code == "InvalidUsageDimensionException":
            info = replace(
                info,
                hint=f"the start check's dimension {dimension!r} is not published for this "
                "product; MARKETPLACE_ENTITLEMENT_DIMENSION (or the first of "
                "MARKETPLACE_DIMENSIONS) must be an API name from the AWS Marketplace "
                "Management Portal",
            )
        if info is not None and info.kind in REMEMBERED_KINDS:
            self._refused = True
        return EntitlementResult("refused", info)

    def _dry_run(self, stop: threading.Event) -> EntitlementResult:
        for dimension in self.policy.dimensions:
            request = {
                "ProductCode": self.policy.product_code,
                "Timestamp": int(self.clock.time()),
                "UsageDimension": dimension,
                "UsageQuantityAsDecimal": "0",
            }
            _, info = self._retrying(stop, lambda r=request: self._call(r, dry_run=True))  # type: ignore[misc]
            self._count("dry_run", info.code if info else "ok")
            if info is not None:
                if info.retryable:
                    return EntitlementResult("unavailable", info)
                if info.kind in REMEMBERED_KINDS:
                    self._refuse(info)
                return EntitlementResult("refused", info)
        return EntitlementResult("permitted")

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Seal ended hours, send what is due, expire what AWS would refuse; until `stop`."""
        try:  # build the AWS client now, not at the first send of the hour (seconds of imports)
            with self._send_lock:
                self._get_gateway()
        except Exception as exc:
            log.warning("usage_gateway_not_ready", extra={"detail": str(exc)[:300]})
        store_failures = 0
        while not stop.is_set():
            try:
                self.tick(self.clock.time())
                sleep = self._sleep(self.clock.time())
            except StoreUnavailableError as exc:
                # A full or read-only state volume: nothing is lost (an hour's state changes in
                # one transaction, a sealed request is resent byte for byte), so wait and try
                # again; freeing space heals it. SaaS mode's loop does the same.
                store_failures += 1
                sleep = min(self._retry.delay(store_failures, self._rng), self.policy.max_sleep)
                self._store_error = str(exc)[:300]
                log.error(
                    "usage_loop_store_unavailable",
                    extra={
                        "detail": self._store_error,
                        "failures": store_failures,
                        "retry_in": round(sleep, 1),
                    },
                )
            else:
                if store_failures:
                    log.info("usage_loop_store_recovered", extra={"failures": store_failures})
                store_failures, self._store_error = 0, None
            if self.clock.wait(stop, sleep):
                return

    def tick(self, now: float) -> None:
        """One pass of the loop at wall time `now`."""
        hp = self.policy.hours
        through = hp.sealable_through(now)
        first_open = self.store.read(ledger.next_open_hour)
        if first_open is not None and first_open <= through:
            # Sent from the seal on, in this pod's slots: the slots spread the fleet.
            sealed = self.store.write(
                lambda c: ledger.seal(c, through, now, hp, self.policy.product_code, _no_spread)
            )
            for dimension, hour in sealed:
                log.info("usage_sealed", extra={"dimension": dimension, "hour": iso_hour(hour)})
        self._send_due(now, ignore_spread=False)
        if hour_of(now) != self._pruned_hour:  # once an hour, again next pass if it failed
            self.store.write(lambda c: ledger.prune(c, now))
            self._pruned_hour = hour_of(now)
        before = self._volume
        after = self._measure_volume()
        if after is not None and after.warning() and (before is None or not before.warning()):
            log.warning("state_volume_filling", extra={"detail": after.warning()})

    def _send_due(
        self, now: float, *, ignore_spread: bool, budget_end: float | None = None
    ) -> None:
        horizon = None if ignore_spread else now
        with self._send_lock:
            pending = self.store.read(lambda c: ledger.due(c, horizon))
            self._closing_at = min((p.deadline for p in pending), default=float("inf"))
            for p in pending:
                now = self.clock.time()
                if budget_end is not None and time.monotonic() >= budget_end:
                    return
                if p.deadline < now:
                    expired = self.store.write(functools.partial(ledger.expire_overdue, now=now))
                    for dimension, hour in expired:
                        self._count(EXPIRED, "window")
                        log.error(
                            "usage_expired", extra={"dimension": dimension, "hour": iso_hour(hour)}
                        )
                    continue
                if (
                    p.deadline - now < self.policy.hours.warn_before
                    and (p.dimension, p.hour) not in self._warned
                ):
                    self._warned.add((p.dimension, p.hour))
                    log.warning(
                        "usage_window_closing",
                        extra={
                            "dimension": p.dimension,
                            "hour": iso_hour(p.hour),
                            "deadline": iso(p.deadline),
                        },
                    )
                if self.clock.monotonic() < self._resume_at:
                    return
                if ignore_spread or p.deadline - now < self.policy.hours.warn_before:
                    # A drain, or a backlog whose window is closing (the pod was down for
                    # hours): at once, not one record per frame; throttles back off.
                    if self._send(p)[0] == RETRY:
                        return
                    continue
                slot = self._slots.next_index(self._home, now, self._not_before)
                if self._slots.at(slot) > now + SLOT_EARLY:
                    return  # `_sleep` wakes the loop at this pod's next slot; never early
                outcome, _, info = self._send(p)
                self._paced(slot, outcome, info)
                return  # one record per frame: the next waits for this pod's next slot

    def _paced(self, slot: int, outcome: str, info: ErrorInfo | None) -> None:
        """After a paced send in `slot`: the next one waits for this pod's slot in the next
        frame; after a throttle, for the slot `Slots.after_throttle` picks, whose place in
        the frame becomes this pod's own."""
        if outcome == RETRY and info is not None and info.code == THROTTLED:
            self._throttles += 1
            self._resume_at = self.clock.monotonic()  # the slot is the backoff
            index = self._slots.after_throttle(
                slot, self._throttles, self._own_slot, self.clock.time(), self._rng, self._held
            )
            if index % self._slots.slots != self._home:
                self._held = 0  # a new slot, not held yet
            self._home = index % self._slots.slots
            self._not_before = index
            over = self._throttles - self._slots.slots
            if over > 0:
                # Throttled in more slots in a row than the frame has: not a shared slot but a
                # quota in use elsewhere (another product of the account). A short frame (a
                # pod alone: 1/rate s) would retry at the full rate: back off as from any
                # other retryable error, then send in the slot.
                self._resume_at += self._retry.delay(over, self._rng)
            return
        if outcome != RETRY:
            self._throttles = 0
            self._held += 1
        self._not_before = slot + 1

    def _sleep(self, now: float) -> float:
        hp = self.policy.hours
        wake = [now + self.policy.max_sleep]
        first_open = self.store.read(ledger.next_open_hour)
        if first_open is not None:
            wake.append(hp.seal_due(first_open))
        after = self.store.read(ledger.next_send_after)
        if after is not None:
            at = max(after, now + (self._resume_at - self.clock.monotonic()))
            if at < self._closing_at - hp.warn_before:  # paced, see `_send_due`
                at = self._slots.at(self._slots.next_index(self._home, at, self._not_before))
            wake.append(at)
        return max(0.01, min(wake) - now)

    def drain(self, budget_seconds: float) -> None:
        """SIGTERM: seal the open hours (the partial one too) and send all pending within the
        budget (real seconds); what is left stays in the store for the next start, and each
        (dimension, hour) still unsent is logged with its quantity: it is lost if the pod goes."""
        end = time.monotonic() + max(0.0, budget_seconds)
        now = self.clock.time()
        hp = self.policy.hours
        if not self.sending_open:
            # Never licensed in this process: nothing goes to MeterUsage. The open hours stay
            # open (sealed by the next container once its license is checked out, or expired
            # there if that comes too late) and every unit is logged as unsent.
            log.warning("usage_held_at_exit", extra={"reason": "no license checked out"})
            self._report_unsent()
            return
        try:
            sealed = self.store.write(
                lambda c: ledger.seal(
                    c, hour_of(now), now, hp, self.policy.product_code, self._rng, send_now=True
                )
            )
        except StoreUnavailableError as exc:
            log.error("drain_seal_failed", extra={"detail": str(exc)})
        else:
            log.info(
                "draining_usage", extra={"sealed": len(sealed), "budget_seconds": budget_seconds}
            )
            self._failures, self._resume_at = 0, 0.0
            try:
                self._drain_sends(end)
            except StoreUnavailableError as exc:
                log.error("drain_store_unavailable", extra={"detail": str(exc)})
        self._report_unsent()

    def _drain_sends(self, end: float) -> None:
        while time.monotonic() < end:
            if not self.store.read(lambda c: ledger.due(c, None)):
                return
            self._send_due(self.clock.time(), ignore_spread=True, budget_end=end)
            wait = min(self._resume_at - self.clock.monotonic(), end - time.monotonic())
            if wait > 0:
                self.clock.wait(threading.Event(), min(wait, 1.0))

    def _report_unsent(self) -> None:
        """Log (and count) every acknowledged unit the drain could not send: usage carried
        into an hour that has not started (AWS refuses future timestamps), late POSTs, and
        hours AWS did not accept in time. Kept in the store: a restarted container sends it;
        a deleted pod loses it."""
        now = self.clock.time()
        left = self.store.read(lambda c: ledger.unsent(c))
        current = hour_of(now)
        for dimension, hour, micros, state in left:
            reason = "future_hour" if state == "open" and hour > current else "not_sent"
            log.warning(
                "usage_unsent_at_exit",
                extra={
                    "dimension": dimension,
                    "hour": iso_hour(hour),
                    "quantity": qty.to_json(micros),
                    "state": state,
                    "reason": reason,
                },
            )
            with self._count_lock:
                self._unsent_at_exit[dimension] = self._unsent_at_exit.get(dimension, 0) + micros
        if left:
            log.warning(
                "drain_incomplete",
                extra={
                    "unsent_hours": len(left),
                    "unsent_units": qty.to_json(sum(q for _, _, q, _ in left)),
                    "detail": "kept in the state dir: sent by a restarted container, lost if "
                    "the pod ends",
                },
            )
