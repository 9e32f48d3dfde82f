"""SaaS mode (issue 13): ResolveCustomer and BatchMeterUsage through the usage pipeline.

Every replica's sidecar accepts usage into the shared store (SQLite for one replica, the seller's
PostgreSQL for a fleet); exactly one of them, the one `store.leading()` says holds the sender
role, seals ended hours into one record per customer/dimension/hour and sends them in calls of
at most 25 records. AWS bills the first quantity it sees for a customer/dimension/hour, so the
summing happens before sending, and a stored call is only ever resent byte for byte.

CONTRACT (with the wiring branch):

    service = SaasService(policy, store, gateway_factory, clock=clock)
        # store = open_store(SAAS_SCHEMA, state_dir=..., database_url=...)
        # gateway_factory() -> SaasGateway (MeteringGateway: resolve_customer, batch_meter_usage)
    service.post(body) / resolve(body) / customers() / customer(key) -> (status, dict)
    service.report() -> dict; service.ready() -> (bool, why)
    service.run(stop); service.drain(budget_seconds); service.counters() -> SaasCounters
    service.close()  # closes the store
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.aws.errors import ErrorInfo
from sidecar.core.clock import Clock, SystemClock
from sidecar.core.ratelimit import TokenBucket
from sidecar.usage import saas_ledger
from sidecar.usage.db import Schema, StoreUnavailableError, UsageStore
from sidecar.usage.hours import HourPolicy, RetryPolicy, hour_of, iso_hour
from sidecar.usage.saas_ledger import Batch, IdConflictError, SealSpec, Settled
from sidecar.usage.validate import (
    CONTROL_RE,
    IDENTITIES,
    Limits,
    RejectedError,
    customer_key,
    parse_saas,
)

__all__ = [
    "SAAS_SCHEMA",
    "SaasCounters",
    "SaasGateway",
    "SaasPolicy",
    "SaasService",
]

log = logging.getLogger(__name__)

SAAS_SCHEMA = Schema(
    name="saas.sqlite3", version=1, sqlite=saas_ledger.DDL, postgresql=saas_ledger.DDL
)
RETRY_AFTER_SECONDS = 5
RESOLVE_DEADLINE = 10.0  # seconds of retrying throttling/5xx before answering 503
TOKEN_LIFETIME = 3600.0  # AWS: "about 1 hour" (another page says 4); the shorter is assumed
LEADER_RECHECK = 3.0  # a follower asks for the sender role this often
EXPIRED_HINT = "redeem the token as soon as the buyer's browser posts it"
# Whole-call refusals caused by one record in the call: bisect to find it.
RECORD_CODES = frozenset(
    {
        "TimestampOutOfBoundsException",
        "InvalidCustomerIdentifierException",
        "InvalidLicenseException",
        "InvalidUsageDimensionException",
        "InvalidTagException",
        "InvalidUsageAllocationsException",
        "ValidationException",
    }
)


class SaasGateway(Protocol):
    def resolve_customer(self, token: str) -> dict[str, Any]: ...
    def batch_meter_usage(self, request: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SaasPolicy:
    dimensions: tuple[str, ...]
    identity: str = "license"  # | "customer_identifier"
    product_code: str | None = None
    accept_unresolved: bool = False
    zero_records: bool = True
    drain_seconds: float = 20.0
    backoff_base: float = 2.0
    backoff_cap: float = 300.0
    hours: HourPolicy = field(default_factory=HourPolicy)
    future_skew: float = 300.0
    max_sleep: float = 30.0
    calls_per_second: float = 8.0  # under AWS's 10/s BatchMeterUsage quota, per fleet


@dataclass(frozen=True)
class SaasCounters:
    """Read at scrape time (metric names in the shared contract)."""

    units_accepted: dict[str, int]  # marketplace_usage_units_accepted_total{dimension}
    records_by_state: dict[str, int]  # marketplace_saas_records{state}
    customers_by_state: dict[str, int]  # marketplace_saas_customers{state}
    oldest_unsent_hour_age_seconds: float  # marketplace_saas_oldest_unsent_hour_age_seconds
    batch_calls: dict[str, int]  # marketplace_saas_batch_calls_total{result}
    leader: bool  # marketplace_saas_leader
    alerts: dict[str, int]  # events since start: not_subscribed, conflict, expired, rejected


def _info(exc: BaseException) -> ErrorInfo | None:
    info = getattr(exc, "info", None)
    return info if isinstance(info, ErrorInfo) else None


def _unavailable(exc: Exception) -> tuple[int, dict[str, Any]]:
    log.error("saas_store_unavailable", extra={"detail": str(exc)[:300]})
    return 503, {
        "error": "store_unavailable",
        "message": f"nothing was stored ({exc}); send it again later",
        "retry_after": RETRY_AFTER_SECONDS,
    }


class SaasService:
    SCHEMA: Schema = SAAS_SCHEMA

    def __init__(
        self,
        policy: SaasPolicy,
        store: UsageStore,
        gateway_factory: Callable[[], SaasGateway],
        *,
        clock: Clock | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not policy.dimensions:
            raise ValueError("at least one dimension is needed")
        if policy.identity not in IDENTITIES:
            raise ValueError(f"identity must be one of {', '.join(IDENTITIES)}")
        if policy.identity == "customer_identifier" and not policy.product_code:
            raise ValueError("identity customer_identifier needs a product code")
        if policy.calls_per_second <= 0:
            raise ValueError("calls_per_second must be > 0")
        self.policy = policy
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self._factory = gateway_factory
        self._gateway: SaasGateway | None = None
        self._gateway_lock = threading.Lock()
        self._rng = rng
        self._limits = Limits(policy.dimensions, future_skew=policy.future_skew)
        self._retry = RetryPolicy(policy.backoff_base, policy.backoff_cap)
        self._spec = SealSpec(policy.dimensions, policy.identity, policy.zero_records, policy.hours)
        # The request's ProductCode: only with CustomerIdentifier records (license records carry
        # their own identity; AWS: never both kinds in one request).
        self._product = policy.product_code if policy.identity == "customer_identifier" else None
        self._bucket = TokenBucket(policy.calls_per_second, 1.0, self.clock.monotonic())
        self._send_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._units: dict[str, int] = dict.fromkeys(policy.dimensions, 0)
        self._calls: dict[str, int] = {}
        self._alerts: dict[str, int] = dict.fromkeys(
            ("not_subscribed", "conflict", "expired", "rejected"), 0
        )
        self._failures = 0
        self._resume_at = 0.0
        self._leader = False
        self._pruned_hour = -1
        self._sealed_through = -1
        self._inflight_guard = threading.Lock()
        self._inflight: dict[str, tuple[threading.Lock, int]] = {}

    # -- the local API ---------------------------------------------------------------------

    def post(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """POST /v1/usage: 202 once committed, 200 for a repeat, 4xx for client mistakes."""
        now = self.clock.time()
        try:
            records = parse_saas(body, self._limits, now, self.policy.identity)
        except RejectedError as exc:
            return exc.status, exc.body()
        hp, accept = self.policy.hours, self.policy.accept_unresolved
        try:
            status, answers = self.store.write(
                lambda db: saas_ledger.ingest(db, records, now, hp, accept_unresolved=accept)
            )
        except RejectedError as exc:
            return exc.status, exc.body()
        except IdConflictError as exc:
            return 409, {"error": "id_conflict", "field": exc.field, "message": str(exc)}
        except StoreUnavailableError as exc:
            return _unavailable(exc)
        fresh = [a for a in answers if not a.get("repeat")]
        with self._count_lock:
            for a in fresh:
                self._units[a["dimension"]] = self._units.get(a["dimension"], 0) + a["quantity"]
        return status, {
            "accepted": len(fresh),
            "repeats": len(answers) - len(fresh),
            "records": answers,
        }

    def resolve(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """POST /v1/customers/resolve {"registration_token": ...}."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None
        token = doc.get("registration_token") if isinstance(doc, dict) else None
        if (
            not isinstance(token, str)
            or not 1 <= len(token) <= 8192
            or token.strip() != token
            or CONTROL_RE.search(token) is not None  # no real token has one: spare AWS the call
        ):
            return 400, {
                "error": "invalid_request",
                "field": "registration_token",
                "message": 'body must be {"registration_token": "<x-amzn-marketplace-token>"}: '
                "a non-empty string of at most 8192 characters, no control characters",
            }
        digest = hashlib.sha256(token.encode()).hexdigest()
        # One ResolveCustomer call per token at a time in this process: a buyer's reloads and a
        # browser's retries arrive together, and each would otherwise miss the store and call
        # AWS (whose quota they share with every other registration).
        with self._token_lock(digest):
            return self._resolve_token(token, digest)

    @contextlib.contextmanager
    def _token_lock(self, digest: str) -> Iterator[None]:
        with self._inflight_guard:
            lock, users = self._inflight.get(digest, (threading.Lock(), 0))
            self._inflight[digest] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._inflight_guard:
                lock, users = self._inflight[digest]
                if users <= 1:
                    del self._inflight[digest]
                else:
                    self._inflight[digest] = (lock, users - 1)

    def _resolve_token(self, token: str, digest: str) -> tuple[int, dict[str, Any]]:
        now = self.clock.time()
        try:
            known = self.store.read(lambda db: saas_ledger.customer_by_token(db, digest, now))
        except StoreUnavailableError as exc:
            return _unavailable(exc)
        if known is not None:
            return 200, {**known, "from_store": True}
        answer, failure = self._resolve_with_retries(token)
        if failure is not None:
            return failure
        assert answer is not None  # nosec B101 # narrowing: failure is None means an answer
        key = customer_key(
            self.policy.identity,
            answer.get("CustomerAWSAccountId"),
            answer.get("LicenseArn"),
            answer.get("CustomerIdentifier"),
        )
        if key is None:
            wanted = (
                "CustomerAWSAccountId and LicenseArn"
                if self.policy.identity == "license"
                else "CustomerIdentifier"
            )
            return 502, {
                "error": "identity_mismatch",
                "message": f"AWS's answer has no {wanted}, which MARKETPLACE_SAAS_IDENTITY="
                f"{self.policy.identity} needs; check that setting for this product",
            }
        code = answer.get("ProductCode")
        if self.policy.product_code and code != self.policy.product_code:
            return 400, {
                "error": "other_product",
                "field": "registration_token",
                "message": f"the token is for product {code}; this sidecar meters "
                f"{self.policy.product_code}",
            }
        resolved_at = self.clock.time()
        try:
            customer = self.store.write(
                lambda db: saas_ledger.save_customer(
                    db, key, answer, resolved_at, digest, resolved_at + TOKEN_LIFETIME
                )
            )
        except StoreUnavailableError as exc:
            return _unavailable(exc)
        log.info(
            "saas_customer_resolved", extra={"customer": key, "product_code": code or "unknown"}
        )
        return 200, {**customer, "from_store": False}

    def _resolve_with_retries(
        self, token: str
    ) -> tuple[dict[str, Any] | None, tuple[int, dict[str, Any]] | None]:
        started = self.clock.monotonic()
        failures = 0
        while True:
            try:
                return self._get_gateway().resolve_customer(token), None
            except Exception as exc:
                info = _info(exc)
                if info is None:
                    raise
            if info.code == "InvalidTokenException":
                return None, (
                    400,
                    {
                        "error": "invalid_token",
                        "field": "registration_token",
                        "message": "AWS does not know this registration token",
                    },
                )
            if info.code == "ExpiredTokenException":
                return None, (
                    410,
                    {
                        "error": "expired_token",
                        "field": "registration_token",
                        "message": "AWS says the registration token has expired "
                        "(the same code is used when the sidecar's own AWS "
                        "credentials have expired)",
                        "hint": EXPIRED_HINT,
                    },
                )
            if not info.retryable:
                log.error("saas_resolve_refused", extra={"code": info.code, "kind": info.kind})
                return None, (
                    502,
                    {
                        "error": "aws_refused",
                        "code": info.code,
                        "message": info.message,
                        "hint": info.hint,
                    },
                )
            failures += 1
            delay = self._retry.delay(failures, self._rng)
            if self.clock.monotonic() + delay - started > RESOLVE_DEADLINE:
                log.warning("saas_resolve_unavailable", extra={"code": info.code})
                return None, (
                    503,
                    {
                        "error": "aws_unavailable",
                        "code": info.code,
                        "message": f"ResolveCustomer kept failing ({info.code}); try again",
                        "retry_after": RETRY_AFTER_SECONDS,
                    },
                )
            self.clock.wait(threading.Event(), delay)

    def customers(self) -> tuple[int, dict[str, Any]]:
        """GET /v1/customers."""
        try:
            rows, total = self.store.read(saas_ledger.list_customers)
        except StoreUnavailableError as exc:
            return _unavailable(exc)
        return 200, {"customers": rows, "total": total}

    def customer(self, key: str) -> tuple[int, dict[str, Any]]:
        """GET /v1/customers/{id}: the ledger key, an AWS account id or a customer identifier.
        One match answers the customer; an account with several licenses answers them all."""
        if not 1 <= len(key) <= 2048:
            return 400, {"error": "invalid_request", "field": "id", "message": "1-2048 characters"}
        try:
            rows = self.store.read(lambda db: saas_ledger.find_customers(db, key))
        except StoreUnavailableError as exc:
            return _unavailable(exc)
        if not rows:
            return 404, {
                "error": "unknown_customer",
                "field": "id",
                "message": "no customer with this account id or identifier was resolved",
            }
        if len(rows) == 1:
            return 200, rows[0]
        return 200, {"customers": rows, "total": len(rows)}

    def report(self) -> dict[str, Any]:
        """GET /v1/usage."""
        now = self.clock.time()
        out = self.store.read(lambda db: saas_ledger.report(db, now, self.policy.hours))
        pause = self._resume_at - self.clock.monotonic()
        out["sending"] = {
            "leader": self._leader,
            "consecutive_failures": self._failures,
            "paused_for_seconds": round(pause, 1) if self._failures and pause > 0 else 0.0,
        }
        out["dimensions"] = list(self.policy.dimensions)
        out["identity"] = self.policy.identity
        return out

    def ready(self) -> tuple[bool, str | None]:
        return self.store.available()

    def counters(self) -> SaasCounters:
        now = self.clock.time()
        records, customers, oldest = self.store.read(lambda db: saas_ledger.counts(db, now))
        with self._count_lock:
            return SaasCounters(
                units_accepted=dict(self._units),
                records_by_state=records,
                customers_by_state=customers,
                oldest_unsent_hour_age_seconds=max(0.0, now - oldest) if oldest else 0.0,
                batch_calls=dict(self._calls),
                leader=self._leader,
                alerts=dict(self._alerts),
            )

    def close(self) -> None:
        self.store.close()

    # -- AWS -----------------------------------------------------------------------------

    def _get_gateway(self) -> SaasGateway:
        with self._gateway_lock:
            if self._gateway is None:
                self._gateway = self._factory()
            return self._gateway

    def _count(self, result: str) -> None:
        with self._count_lock:
            self._calls[result] = self._calls.get(result, 0) + 1

    def _alert(self, settled: Settled) -> None:
        with self._count_lock:
            self._alerts["not_subscribed"] += len(settled.not_subscribed)
            self._alerts["conflict"] += len(settled.conflicts)
            self._alerts["expired"] += len(settled.expired)
            self._alerts["rejected"] += len(settled.rejected)
        for customer in settled.not_subscribed:
            log.warning("saas_customer_not_subscribed", extra={"customer": customer})
        for customer, dimension, hour in settled.conflicts:
            log.error(
                "saas_duplicate_record",
                extra={"customer": customer, "dimension": dimension, "hour": iso_hour(hour)},
            )
        for state, keys in (("expired", settled.expired), ("rejected", settled.rejected)):
            for customer, dimension, hour in keys:
                log.error(
                    "saas_record_" + state,
                    extra={"customer": customer, "dimension": dimension, "hour": iso_hour(hour)},
                )

    def _call(self, batch: Batch, stop: threading.Event) -> bool:
        """One BatchMeterUsage call of a stored batch; its outcome stored. False = pause."""
        wait = self._bucket.take(self.clock.monotonic())
        while wait > 0:
            if self.clock.wait(stop, wait):
                return False
            wait = self._bucket.take(self.clock.monotonic())
        asked_at = self.clock.time()
        try:
            response: dict[str, Any] | None = self._get_gateway().batch_meter_usage(batch.request)
            info = None
        except Exception as exc:
            info = _info(exc)
            if info is None:
                raise
            response = None
        now = self.clock.time()
        if response is not None:
            settled = self.store.write(
                lambda db: saas_ledger.answer(db, batch.id, response, now, asked_at)
            )
            self._count("ok")
            self._failures = 0
            self._alert(settled)
            log.info(
                "saas_batch_sent",
                extra={
                    "records": batch.records,
                    "sent": settled.sent,
                    "unprocessed": settled.unprocessed,
                },
            )
            return True
        assert info is not None  # nosec B101 # narrowing: a call that failed has its error
        if info.code in RECORD_CODES and not info.retryable:
            settled = self.store.write(
                lambda db: saas_ledger.split(db, batch.id, now, self._product, code=info.code)
            )
            self._count("out_of_bounds" if info.code.startswith("Timestamp") else "refused")
            self._alert(settled)
            log.warning(
                "saas_batch_refused",
                extra={"code": info.code, "records": batch.records, "bisected": settled.split_into},
            )
            return True
        # Throttling, 5xx, network, configuration (IAM, credentials: fixable without a
        # restart): the same stored request again after a pause.
        self.store.write(lambda db: saas_ledger.failed(db, batch.id, info.code, now))
        self._count(
            "throttled"
            if info.code == "ThrottlingException"
            else "transient"
            if info.retryable
            else "error"
        )
        self._failures += 1
        delay = self._retry.delay(self._failures, self._rng)
        self._resume_at = self.clock.monotonic() + delay
        log.warning(
            "saas_batch_failed",
            extra={"code": info.code, "kind": info.kind, "retry_in": round(delay, 1)},
        )
        return False

    def _send(self, stop: threading.Event, budget_end: float | None = None) -> None:
        """Send what is sealed, one stored batch after another, until none is left, a failure
        pauses sending, `stop` is set or the budget (real seconds) is spent."""
        with self._send_lock:
            while not stop.is_set():
                if budget_end is not None and time.monotonic() >= budget_end:
                    return
                if self.clock.monotonic() < self._resume_at:
                    return
                now = self.clock.time()
                batch, settled = self.store.write(
                    functools.partial(saas_ledger.next_batch, now=now, product_code=self._product)
                )
                self._alert(settled)
                if batch is None:
                    return
                if not self._call(batch, stop):
                    return

    # -- the loop --------------------------------------------------------------------------

    def _seal(self, through: int) -> None:
        now = self.clock.time()
        _, first_open = self.store.read(saas_ledger.seal_status)
        if through <= self._sealed_through and (first_open is None or first_open > through):
            return  # nothing new: no usage to seal, and zero records were written already
        sealed = self.store.write(lambda db: saas_ledger.seal(db, through, now, self._spec))
        self._sealed_through = through
        for hour, records in sealed:
            log.info("saas_hour_sealed", extra={"hour": iso_hour(hour), "records": records})

    def tick(self, stop: threading.Event | None = None) -> None:
        """One pass as the leader: seal ended hours, send what is sealed."""
        stop = stop or threading.Event()
        now = self.clock.time()
        self._seal(self.policy.hours.sealable_through(now))
        self._send(stop)
        if hour_of(now) != self._pruned_hour:
            self._pruned_hour = hour_of(now)
            self.store.write(lambda db: saas_ledger.prune(db, now))

    def _is_leader(self) -> bool:
        try:
            leading = self.store.leading()
        except Exception as exc:  # a store that cannot tell makes us a follower, not a crash
            log.warning("saas_leader_check_failed", extra={"detail": str(exc)[:300]})
            leading = False
        if leading != self._leader:
            log.info("saas_leader" if leading else "saas_follower")
        self._leader = leading
        return leading

    def run(self, stop: threading.Event) -> None:
        """The leader seals and sends; the others re-check the sender role every few seconds."""
        while not stop.is_set():
            if not self._is_leader():
                self.clock.wait(stop, LEADER_RECHECK)
                continue
            try:
                self.tick(stop)
            except StoreUnavailableError as exc:
                log.warning("saas_store_unavailable", extra={"detail": str(exc)[:300]})
                self.clock.wait(stop, LEADER_RECHECK)
                continue
            except Exception:  # a bug must not end sending for the fleet: log, pause, go on
                log.exception("saas_loop_failed")
                self._failures += 1
                self._resume_at = self.clock.monotonic() + self._retry.delay(
                    self._failures, self._rng
                )
            self.clock.wait(stop, self._sleep())

    def _sleep(self) -> float:
        now = self.clock.time()
        hp = self.policy.hours
        wake = [now + self.policy.max_sleep, hp.seal_due(hp.sealable_through(now) + 1)]
        pause = self._resume_at - self.clock.monotonic()
        if pause > 0:
            wake.append(now + pause)
        return max(0.01, min(min(wake) - now, LEADER_RECHECK * 5))

    def drain(self, budget_seconds: float) -> None:
        """SIGTERM. Only the leader sends. On SQLite (one replica, maybe not coming back) the
        open hour is sealed too, as custom mode does; on PostgreSQL another replica takes over
        the sender role, so the open hour stays open for the fleet's later usage."""
        end = time.monotonic() + max(0.0, budget_seconds)
        if not self._is_leader():
            return
        now = self.clock.time()
        through = (
            hour_of(now)
            if self.store.backend == "sqlite"
            else self.policy.hours.sealable_through(now)
        )
        try:
            self._seal(through)
        except StoreUnavailableError as exc:
            log.error("saas_drain_seal_failed", extra={"detail": str(exc)[:300]})
            return
        self._failures, self._resume_at = 0, 0.0
        stop = threading.Event()
        while time.monotonic() < end:
            try:
                self._send(stop, budget_end=end)
            except StoreUnavailableError as exc:
                log.error("saas_drain_failed", extra={"detail": str(exc)[:300]})
                return
            left = self.store.read(lambda db: saas_ledger.counts(db, self.clock.time()))[0]
            if not left["sealed"]:
                return
            wait = min(self._resume_at - self.clock.monotonic(), end - time.monotonic())
            if wait > 0:
                self.clock.wait(stop, min(wait, 1.0))
        log.warning("saas_drain_incomplete")
