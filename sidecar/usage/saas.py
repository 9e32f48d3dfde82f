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
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.aws.errors import ErrorInfo
from sidecar.core import quantity as qty
from sidecar.core.clock import Clock, SystemClock
from sidecar.core.ratelimit import TokenBucket
from sidecar.usage import lifecycle, saas_contract, saas_events, saas_ledger
from sidecar.usage.db import (
    INTAKE_WAIT,
    Schema,
    StoreBusyError,
    StoreOutcomeUnknownError,
    StoreUnavailableError,
    UsageStore,
)
from sidecar.usage.headroom import Headroom, headroom
from sidecar.usage.hours import (
    BATCH_METER_USAGE,
    BATCH_WINDOW,
    HourPolicy,
    RetryPolicy,
    hour_of,
    hour_start,
    iso,
    iso_hour,
)
from sidecar.usage.intake import IdConflictError, accepted
from sidecar.usage.overage import Basis
from sidecar.usage.saas_ledger import (
    DIMENSION_CODE,
    TIMESTAMP_CODE,
    Batch,
    SealSpec,
    Settled,
)
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
    name="saas.sqlite3",
    version=6,
    sqlite=saas_ledger.DDL
    + saas_ledger.MIGRATION_2[0]
    + saas_ledger.MIGRATION_3[0]
    + saas_events.MIGRATION_4[0]
    + saas_contract.MIGRATION_5[0]
    + saas_ledger.MIGRATION_6[0],
    postgresql=saas_ledger.DDL
    + saas_ledger.MIGRATION_2[1]
    + saas_ledger.MIGRATION_3[1]
    + saas_events.MIGRATION_4[1]
    + saas_contract.MIGRATION_5[1]
    + saas_ledger.MIGRATION_6[1],
    migrations={
        2: saas_ledger.MIGRATION_2,
        3: saas_ledger.MIGRATION_3,
        4: saas_events.MIGRATION_4,
        5: saas_contract.MIGRATION_5,
        6: saas_ledger.MIGRATION_6,
    },
)
HEADROOM_TTL = 10.0  # seconds a computed headroom serves /readyz and scrapes
RETRY_AFTER_SECONDS = 5
RESOLVE_DEADLINE = 10.0  # seconds of retrying throttling/5xx before answering 503
TOKEN_LIFETIME = 3600.0  # AWS: "about 1 hour" (another page says 4); the shorter is assumed
LEADER_RECHECK = 3.0  # a follower asks for the sender role this often
SEAL_RETRY = 1.0  # seconds between seal tries while the seal lock is busy
EXPIRED_HINT = "redeem the token as soon as the buyer's browser posts it"
# DuplicateRecord with a store no other replica can see: a second sender is the likely cause.
SECOND_SENDER_HINT = (
    "DuplicateRecord on the SQLite store: most likely a second sender (another replica with its "
    "own SQLite store sends its own count; AWS keeps the first). Run ONE replica, or give the "
    "fleet one PostgreSQL store: MARKETPLACE_USAGE_DATABASE_URL (Helm: "
    "metering.saas.database.existingSecret)"
)
CLOCK_HINT = "Synchronise the node clock (NTP, Amazon Time Sync Service); 'doctor' shows the skew"
QUARANTINE_HINT = (
    "Publish the dimension in the AWS Marketplace Management Portal or correct "
    "MARKETPLACE_DIMENSIONS (API names), then restart the sending sidecar: held records still "
    "inside AWS's window are sent then"
)
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


EntitlementReader = Callable[[str, str], list[dict[str, Any]]]  # (product code, account id)
LIFECYCLE_OUTCOMES = (
    "applied",
    "duplicate",
    "stale",
    "dead_letter",
    "queue_error",
    "store_error",
    "consumer_error",  # an exception nobody expected: the message stays on the queue
)
# A message failing so (a bug, an odd store or AWS answer) shows in /readyz's warnings this
# long after the last one: it comes back after its visibility timeout, until the queue's
# maxReceiveCount moves it to the SQS dead-letter queue.
CONSUMER_ERROR_NOTICE = 3600.0
QUEUE_BACKOFF_CAP = 60.0  # seconds between ReceiveMessage tries while the queue is unreachable
CHANGES_WAIT_MAX = 20.0  # the longest long poll of GET /v1/customers/changes
CHANGES_POLL = 0.5  # how often a long poll looks at the store (other replicas' changes)
# A GetEntitlements read that failed (or whose process died) is tried again after this, by the
# consumer of any replica, doubling to REFRESH_RETRY_MAX while it keeps failing.
REFRESH_RETRY = 60.0
REFRESH_RETRY_MAX = 900.0
REFRESH_BATCH = 20  # reads per retry pass, at most
REFRESH_SCAN = 500  # due subjects considered per pass, to pick the least recently tried
# The consumer starts no entitlements read after this many seconds of a pass (its reads then
# retries), so a hanging Entitlement Service holds events back by this plus one read timeout.
READ_PASS = 20.0


class EventSource(Protocol):
    """The lifecycle queue (sidecar.aws.sqs.EventQueue)."""

    def receive(self) -> list[Any]: ...  # Message: id, receipt, body, sent_at, receives
    def delete(self, message: Any) -> None: ...


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
    # Dimensions covered by the customers' contracts, and how (saas_contract; config's
    # MARKETPLACE_SAAS_CONTRACT_DIMENSIONS): only usage above the contract is billed.
    contract: tuple[tuple[str, Basis], ...] = ()

    def __post_init__(self) -> None:
        # SaaS sends with BatchMeterUsage: its hours follow that API's window (24 h, cut at
        # 06:00 UTC on the 1st for the closed month), whatever policy the caller built.
        object.__setattr__(self, "hours", self.hours.using(BATCH_METER_USAGE))


@dataclass(frozen=True)
class SaasCounters:
    """Read at scrape time (metric names in the shared contract)."""

    units_accepted: dict[str, float]  # marketplace_usage_units_accepted_total{dimension}
    records_by_state: dict[str, int]  # marketplace_saas_records{state}
    customers_by_state: dict[str, int]  # marketplace_saas_customers{state}
    oldest_unsent_hour_age_seconds: float  # marketplace_saas_oldest_unsent_hour_age_seconds
    batch_calls: dict[str, int]  # marketplace_saas_batch_calls_total{result}
    leader: bool  # marketplace_saas_leader
    # events since start: not_subscribed, conflict, expired, rejected, clock (a call refused for
    # its Timestamp inside the window), quarantined (a dimension refused as unpublished)
    alerts: dict[str, int]
    headroom: Headroom | None = None  # marketplace_saas_send_* and _backlog_* (None: unknown)
    # lifecycle queue messages since start by outcome (applied, duplicate, stale, dead_letter,
    # queue_error): marketplace_saas_lifecycle_messages_total{outcome}
    lifecycle: dict[str, int] = field(default_factory=dict)


def _info(exc: BaseException) -> ErrorInfo | None:
    info = getattr(exc, "info", None)
    return info if isinstance(info, ErrorInfo) else None


def _unavailable(exc: Exception) -> tuple[int, dict[str, Any]]:
    log.error("saas_store_unavailable", extra={"detail": str(exc)[:300]})
    if isinstance(exc, StoreOutcomeUnknownError):
        return 503, outcome_unknown(exc)
    return 503, {
        "error": "store_unavailable",
        "message": f"nothing was stored, and nothing of it will be ({exc}); send it again later",
        "retry_after": RETRY_AFTER_SECONDS,
    }


def outcome_unknown(exc: Exception) -> dict[str, Any]:
    """The 503 body when the store cannot say whether the usage was stored (custom mode too)."""
    return {
        "error": "store_outcome_unknown",
        "message": f"the usage may or may not have been stored ({exc}); send it again with the "
        "same id, which counts it once either way (without an id it may count twice)",
        "retry_after": RETRY_AFTER_SECONDS,
    }


def _resync(since: int, pruned: int, cursor: int) -> dict[str, Any]:
    """GET /v1/customers/changes with a cursor older than the feed keeps: changes after it
    are gone, so the reader lists every customer and goes on from `cursor` (taken before)."""
    days = round(saas_events.CHANGES_KEEP / 86400)
    return {
        "error": "cursor_expired",
        "field": "since",
        "message": f"changes up to cursor {pruned} are no longer kept (the feed keeps {days} "
        f"days; since={since}): read every customer (GET /v1/customers), then poll from "
        f"cursor {cursor}",
        "cursor": str(cursor),
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
        entitlements: EntitlementReader | None = None,
    ) -> None:
        """`entitlements(product_code, account_id)`: GetEntitlements for one buyer, as
        [{"dimension", "value", "expiration"}] (None: contract entitlements are not read)."""
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
        self._limits = Limits(
            policy.dimensions,
            future_skew=policy.future_skew,
            max_age=BATCH_WINDOW,
            api=BATCH_METER_USAGE,
        )
        self._retry = RetryPolicy(policy.backoff_base, policy.backoff_cap)
        unknown = [d for d, _ in policy.contract if d not in policy.dimensions]
        if unknown:
            raise ValueError(f"contract dimensions not among the dimensions: {unknown}")
        self._spec = SealSpec(
            policy.dimensions, policy.identity, policy.zero_records, policy.hours, policy.contract
        )
        # The request's ProductCode: only with CustomerIdentifier records (license records carry
        # their own identity; AWS: never both kinds in one request).
        self._product = policy.product_code if policy.identity == "customer_identifier" else None
        self._bucket = TokenBucket(policy.calls_per_second, 1.0, self.clock.monotonic())
        self._send_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._units: dict[str, int] = dict.fromkeys(policy.dimensions, 0)  # micro-units
        self._calls: dict[str, int] = {}
        self._alerts: dict[str, int] = dict.fromkeys(
            (
                "not_subscribed",
                "conflict",
                "expired",
                "rejected",
                "clock",
                "quarantined",
                "dead_letter",
            ),
            0,
        )
        # This sender's findings (reset when it takes the sender role): dimensions AWS proved
        # unpublished, and the last Timestamp refusal inside our window (a clock disagreement).
        self._quarantined: dict[str, dict[str, Any]] = {}
        self._clock_issue: dict[str, Any] | None = None
        self._released = False
        self._failures = 0
        self._resume_at = 0.0
        self._seal_resume_at = 0.0  # clock.monotonic() before which no seal is tried again
        self._leader = False
        self._pruned_hour = -1
        self._headroom: tuple[float, Headroom] | None = None
        self._sealed_through = -1
        self._inflight_guard = threading.Lock()
        self._inflight: dict[str, tuple[threading.Lock, int]] = {}
        self._entitlements = entitlements
        self._lifecycle: dict[str, int] = dict.fromkeys(LIFECYCLE_OUTCOMES, 0)
        self._refresh_retry_at = 0.0  # monotonic: when `retry_entitlements` looks again
        self._refresh_backoff = REFRESH_RETRY
        self._refresh_tried: dict[str, float] = {}  # subject -> when this replica last tried it
        # The lifecycle queue failing since (clock time, failed receives, last error): /readyz.
        self._queue_down: tuple[float, int, str] | None = None
        # Messages the consumer failed on unexpectedly: (count, last clock time, where): /readyz.
        self._consumer_failed: tuple[int, float, str] | None = None
        self._changed = threading.Condition()  # wakes change-feed long polls of this replica

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
                lambda db: saas_ledger.ingest(db, records, now, hp, accept_unresolved=accept),
                timeout=INTAKE_WAIT,
                locks=saas_ledger.ingest_locks(records),
            )
        except RejectedError as exc:
            return exc.status, exc.body()
        except IdConflictError as exc:
            return 409, exc.body()
        except StoreUnavailableError as exc:
            return _unavailable(exc)
        return accepted(status, answers, self._units, self._count_lock)

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
        if self._entitlements is not None and customer.get("customer_aws_account_id"):
            # First sight of the buyer: its contract's entitlements, without delaying the answer.
            threading.Thread(
                target=self._first_entitlements,
                args=(str(customer["customer_aws_account_id"]),),
                name="entitlements",
                daemon=True,
            ).start()
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
            rows, total = self.store.read(
                lambda db: (
                    lambda found: (
                        [saas_events.enrich(db, r) for r in found[0]],
                        found[1],
                    )
                )(saas_ledger.list_customers(db))
            )
        except StoreUnavailableError as exc:
            return _unavailable(exc)
        return 200, {"customers": rows, "total": total}

    def customer(self, key: str) -> tuple[int, dict[str, Any]]:
        """GET /v1/customers/{id}: the ledger key, an AWS account id or a customer identifier.
        One match answers the customer; an account with several licenses answers them all."""
        if not 1 <= len(key) <= 2048:
            return 400, {"error": "invalid_request", "field": "id", "message": "1-2048 characters"}
        try:
            rows = self.store.read(
                lambda db: [saas_events.enrich(db, r) for r in saas_ledger.find_customers(db, key)]
            )
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
        out, retrying = self.store.read(
            lambda db: (saas_ledger.report(db, now, self.policy.hours), saas_ledger.retrying(db))
        )
        out["warnings"].extend(self._warnings(out["records_by_state"], retrying))
        pause = self._resume_at - self.clock.monotonic()
        out["sending"] = {
            "leader": self._leader,
            "consecutive_failures": self._failures,
            "paused_for_seconds": round(pause, 1) if self._failures and pause > 0 else 0.0,
        }
        room = self.headroom(fresh=True)
        out["sending"]["headroom"] = {
            "calls_per_second": room.calls_per_second,
            "capacity_per_hour": room.capacity_per_hour,
            "aws_quota_per_hour": room.ceiling_per_hour,
            "last_hour_records": room.hour_records,
            "load_ratio": round(room.load_ratio, 4),
            "backlog_records": room.backlog_records,
            "backlog_seconds": round(room.backlog_seconds, 1),
            "backlog_trend_per_hour": room.trend_per_hour,
            "last_hour_send_seconds": room.send_seconds,
            "send_ratio": round(room.send_ratio, 4),
            "expires_unsent": room.expires_unsent,
        }
        out["warnings"] = [*out["warnings"], *(f"sending: {r}" for r in room.reasons)]
        out["dimensions"] = list(self.policy.dimensions)
        out["identity"] = self.policy.identity
        return out

    def _warnings(
        self, by_state: dict[str, int], retrying: list[tuple[str, int, float]]
    ) -> list[str]:
        """What the ledger cannot say alone: the store's held and clock-refused work (seen by
        every replica) and this sender's findings (named by the sending sidecar only)."""
        out = []
        for code, calls, deadline in retrying:
            if code == TIMESTAMP_CODE:
                out.append(
                    f"{calls} BatchMeterUsage calls refused for their Timestamp inside AWS's "
                    "window: the sending sidecar's clock disagrees with AWS's (most likely "
                    f"ahead); resent as stored with backoff until {iso(deadline)}, then expired. "
                    + CLOCK_HINT
                )
        with self._count_lock:
            quarantined = dict(self._quarantined)
            clock_issue = dict(self._clock_issue) if self._clock_issue else None
        for dimension, why in sorted(quarantined.items()):
            out.append(
                f"dimension {dimension}: AWS refused it as not published for this product "
                f"({why['code']}, {why['since']}); its records are held unsent (state "
                f"quarantined) while the other dimensions keep billing. {QUARANTINE_HINT}"
            )
        if by_state.get("quarantined") and not quarantined:
            out.append(
                f"{by_state['quarantined']} records held unsent (state quarantined): AWS refused "
                "their dimension as not published (the sending sidecar's log and GET /v1/usage "
                f"name it). {QUARANTINE_HINT}"
            )
        if clock_issue and not any(c == TIMESTAMP_CODE for c, _, _ in retrying):
            out.append(
                f"BatchMeterUsage refused timestamps of hour {clock_issue['hour']} inside AWS's "
                f"window {clock_issue['refusals']} times since {clock_issue['since']}. "
                + CLOCK_HINT
            )
        return out

    def ready(self) -> tuple[bool, str | None]:
        """Not ready only while the store cannot take usage. Everything else a human should act
        on is a warning (`notices`), not unreadiness: taking replicas out of the Service would
        refuse the product's usage (an outage on top of a billing problem), and the other
        dimensions and hours still bill."""
        return self.store.available()

    def notices(self) -> list[str]:
        """Warnings while ready, each "code: message" (the probe listener shows the code only)."""
        out: list[str] = []
        with self._count_lock:
            if self._quarantined:
                out.append(
                    "dimension_quarantined: AWS refused "
                    + ", ".join(sorted(self._quarantined))
                    + " as not published; held unsent, the other dimensions bill"
                )
            if self._clock_issue:
                out.append(
                    "clock_skew: BatchMeterUsage refused timestamps inside AWS's window "
                    f"(hour {self._clock_issue['hour']}); resent until "
                    f"{self._clock_issue['deadline']}"
                )
            if self._alerts["conflict"] and self._on_sqlite():
                out.append("second_sender: " + SECOND_SENDER_HINT)  # the store still writes
            if self._queue_down is not None:
                since, tries, why = self._queue_down
                out.append(
                    f"events_queue_unreachable: receiving lifecycle events failing since "
                    f"{iso(since)} ({tries} tries; last: {why}); events wait on the queue, "
                    "but a buyer who leaves now has one hour to be billed"
                )
            failed = self._consumer_failed
            if failed is not None and self.clock.time() - failed[1] < CONSUMER_ERROR_NOTICE:
                out.append(
                    f"events_consumer_failing: {failed[0]} lifecycle messages failed "
                    f"unexpectedly since start, the last at {iso(failed[1])} ({failed[2]}); "
                    "they stay on the queue, which moves them to its dead-letter queue after "
                    "maxReceiveCount receives"
                )
        try:
            room = self.headroom()
        except StoreUnavailableError:
            return out  # `ready` answers for the store
        if room.reasons:
            out.append("sending_headroom: " + "; ".join(room.reasons))
        return out

    def _on_sqlite(self) -> bool:
        return getattr(self.store, "backend", "") == "sqlite"

    def headroom(self, *, fresh: bool = False) -> Headroom:
        """The sending headroom at the injected clock's `now` (cached HEADROOM_TTL seconds)."""
        mono = self.clock.monotonic()
        cached = self._headroom
        if not fresh and cached is not None and mono - cached[0] < HEADROOM_TTL:
            return cached[1]
        now = self.clock.time()
        hours, backlog, oldest = self.store.read(lambda db: saas_ledger.sending_facts(db, now))
        room = headroom(
            now, hours, backlog, self.policy.calls_per_second, oldest_unsent_hour=oldest
        )
        self._headroom = (mono, room)
        return room

    def counters(self) -> SaasCounters:
        now = self.clock.time()
        records, customers, oldest = self.store.read(lambda db: saas_ledger.counts(db, now))
        room = self.headroom()
        with self._count_lock:
            return SaasCounters(
                units_accepted={d: m / qty.SCALE for d, m in self._units.items()},
                records_by_state=records,
                customers_by_state=customers,
                oldest_unsent_hour_age_seconds=max(0.0, now - oldest) if oldest else 0.0,
                batch_calls=dict(self._calls),
                leader=self._leader,
                alerts=dict(self._alerts),
                headroom=room,
                lifecycle=dict(self._lifecycle),
            )

    def close(self) -> None:
        self.store.close()

    # -- the buyer lifecycle (docs/saas-lifecycle.md) ---------------------------------------

    def _note(self, outcome: str) -> None:
        with self._count_lock:
            self._lifecycle[outcome] = self._lifecycle.get(outcome, 0) + 1

    def handle_message(
        self,
        message_id: str,
        body: str,
        sent_at: float | None = None,
        reads: list[str] | None = None,
    ) -> str:
        """Apply one queue message to the store, once for the fleet: its outcome (applied,
        duplicate, stale, dead_letter). Raises StoreUnavailableError when nothing could be
        stored: the message must then stay on the queue (it comes back). The subject's
        entitlements are read at once, or, given `reads`, the subject is added to it for the
        caller to read (the event stays due in the store until then)."""
        now = self.clock.time()
        try:
            event = lifecycle.parse(body, sent_at if sent_at is not None else now)
        except lifecycle.EventError as exc:
            why = str(exc)
            fresh = self.store.write(
                lambda db: saas_events.dead_letter(db, message_id, body, why, now)
            )
            self._note("dead_letter")
            if fresh:
                with self._count_lock:
                    self._alerts["dead_letter"] = self._alerts.get("dead_letter", 0) + 1
                log.error(
                    "saas_lifecycle_dead_letter",
                    extra={"message_id": message_id[:100], "detail": str(exc)[:300]},
                )
            return "dead_letter"
        if self.policy.product_code and event.product_code not in (None, self.policy.product_code):
            # Another product's event on a shared queue: kept as a dead letter, not applied.
            fresh = self.store.write(
                lambda db: saas_events.dead_letter(
                    db, message_id, body, f"product {event.product_code}: not this sidecar's", now
                )
            )
            self._note("dead_letter")
            return "dead_letter"
        applied = self.store.write(
            lambda db: saas_events.apply(db, event, now), locks=saas_events.CHANGES_LOCKS
        )
        outcome = "duplicate" if applied.duplicate else "stale" if applied.stale else "applied"
        self._note(outcome)
        if applied.final and now >= event.time + lifecycle.FINAL_WINDOW:
            # Learned after AWS's final window closed (the queue was unreachable, or the event
            # late): the buyer's open usage is still sealed and sent at once, and AWS may answer
            # CustomerNotSubscribed (kept as not_subscribed). docs/saas-lifecycle.md.
            self._note("final_window_missed")
            log.error(
                "saas_final_window_missed",
                extra={
                    "subject": event.subject,
                    "event": event.detail_type,
                    "event_time": iso(event.time),
                    "window_closed_seconds_ago": round(now - event.time - lifecycle.FINAL_WINDOW),
                },
            )
        log.info(
            "saas_lifecycle_event",
            extra={
                "event": event.detail_type,
                "subject": event.subject,
                "outcome": outcome,
                "final_window": applied.final,
            },
        )
        if applied.changed:
            self._wake()
        if applied.refresh and reads is not None:
            reads.append(event.subject)
        elif applied.refresh:
            self.refresh_entitlements(event.subject)
        return outcome

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def refresh_entitlements(self, subject: str) -> bool:
        """GetEntitlements for the subject's account (an SNS subject names a CustomerIdentifier:
        its account comes from the resolved customer, if any); stores the answer. False when the
        call failed (logged; `retry_entitlements` tries again). A subject with no account
        or product to read for (an SNS buyer never resolved) is not read: its events' reads are
        settled, not retried (its first resolve reads by its account)."""
        if self._entitlements is None:
            return False
        key = subject[3:] if subject.startswith("ci:") else subject
        rows = self.store.read(lambda db: saas_ledger.find_customers(db, key))
        account = next(
            (r["customer_aws_account_id"] for r in rows if r.get("customer_aws_account_id")),
            None if subject.startswith("ci:") else subject,
        )
        product = self.policy.product_code or next(
            (r["product_code"] for r in rows if r.get("product_code")), None
        )
        if product is None:
            product = self.store.read(lambda db: saas_events.product_of(db, subject))
        due = self.store.read(lambda db: saas_events.refresh_ids(db, subject))
        if account is None or product is None:
            if due:
                self.store.write(lambda db: saas_events.settle_refreshes(db, due))
            return True
        read_at = self.clock.time()
        try:
            found = self._entitlements(product, account)
        except Exception as exc:  # an AWS refusal or outage: logged, the state stays as it was
            log.warning(
                "saas_entitlements_failed",
                extra={"subject": subject, "detail": f"{type(exc).__name__}: {str(exc)[:200]}"},
            )
            return False
        now = self.clock.time()
        changed = self.store.write(
            lambda db: saas_events.set_entitlements(db, subject, found, now, due, read_at),
            locks=saas_events.CHANGES_LOCKS,
        )
        if changed:
            self._wake()
        return True

    def retry_entitlements(self, deadline: float | None = None) -> None:
        """Read again the entitlements of events whose read failed or was cut by a crash (their
        message is deleted, or a redelivery may never come): at most every REFRESH_RETRY
        seconds, backing off to REFRESH_RETRY_MAX while reads keep failing; no read starts
        after `deadline` (monotonic)."""
        if self._entitlements is None or self.clock.monotonic() < self._refresh_retry_at:
            return
        now = self.clock.time()
        due = self.store.read(lambda db: saas_events.due_refreshes(db, now, REFRESH_SCAN))
        # Least recently tried first: subjects whose reads keep failing (a buyer the service
        # refuses) take their turn, never every turn; those no longer due are forgotten.
        self._refresh_tried = {s: self._refresh_tried.get(s, 0.0) for s in due}
        failed, read = [], False
        for subject in sorted(due, key=self._refresh_tried.__getitem__)[:REFRESH_BATCH]:
            if deadline is not None and self.clock.monotonic() >= deadline:
                break
            self._refresh_tried[subject] = self.clock.monotonic()
            if self.refresh_entitlements(subject):
                read = True
            else:
                failed.append(subject)
        self._refresh_backoff = (  # backs off while the service fails everyone, not someone
            min(REFRESH_RETRY_MAX, self._refresh_backoff * 2)
            if failed and not read
            else REFRESH_RETRY
        )
        self._refresh_retry_at = self.clock.monotonic() + self._refresh_backoff
        if failed:
            log.warning(
                "saas_entitlements_still_due",
                extra={"subjects": len(failed), "retry_in": round(self._refresh_backoff)},
            )

    def _first_entitlements(self, account: str) -> None:
        try:
            self.refresh_entitlements(account)
        except StoreUnavailableError as exc:
            log.warning("saas_entitlements_not_stored", extra={"detail": str(exc)[:300]})

    def consume(self, queue: EventSource, stop: threading.Event) -> None:
        """Long-poll the lifecycle queue until `stop`: each message applied (or dead-lettered)
        before it is deleted. An unreachable queue or store is retried with backoff; a message
        not deleted comes back after its visibility timeout. An unexpected exception (a bug,
        an odd store error) leaves its message on the queue, is counted (`consumer_error`),
        logged and shown in /readyz's warnings, and backs off: events never stop for good."""
        failures = errors = 0
        while not stop.is_set():
            # While the store cannot write, nothing is received: each receive counts towards the
            # queue's redrive limit, and a message past it would go to the SQS dead-letter queue.
            up, why = self.store.available()
            if not up:
                failures += 1
                self._note("store_error")
                log.warning("saas_lifecycle_store_unavailable", extra={"detail": str(why)[:300]})
                self.clock.wait(
                    stop, min(QUEUE_BACKOFF_CAP, self._retry.delay(failures, self._rng))
                )
                continue
            try:
                messages = queue.receive()
            except Exception as exc:
                failures += 1
                self._note("queue_error")
                with self._count_lock:
                    since = self._queue_down[0] if self._queue_down else self.clock.time()
                    self._queue_down = (since, failures, str(exc)[:200])
                delay = min(QUEUE_BACKOFF_CAP, self._retry.delay(failures, self._rng))
                log.warning(
                    "saas_lifecycle_queue_unreachable",
                    extra={"detail": str(exc)[:300], "retry_in": round(delay, 1)},
                )
                self._retry_reads()  # due reads do not wait for the queue
                self.clock.wait(stop, delay)
                continue
            if failures:
                log.info("saas_lifecycle_queue_reachable", extra={"after_failures": failures})
            failures = 0
            with self._count_lock:
                self._queue_down = None
            # Entitlements are read once the batch is applied and deleted: a slow read never
            # holds back the events behind it (a deprovisioning's final window) nor outlasts
            # their visibility timeout. A crash before the read leaves it due in the store.
            reads: list[str] = []
            failed = handled = False
            for message in messages:
                if stop.is_set():
                    return
                try:
                    self.handle_message(message.id, message.body, message.sent_at, reads)
                except StoreUnavailableError as exc:
                    self._note("store_error")
                    log.warning(
                        "saas_lifecycle_store_unavailable", extra={"detail": str(exc)[:300]}
                    )
                    self.clock.wait(stop, LEADER_RECHECK)
                    break  # the rest come back after their visibility timeout
                except Exception as exc:  # a bug, an odd store error: never the end of events
                    errors += 1
                    failed = True
                    self._consumer_error(exc, message.id)
                    # Not deleted: SQS gives it again (its redrive policy counts). No backoff
                    # here: the messages behind it in the batch (a deprovisioning's final
                    # window) go first, inside their visibility timeout.
                    continue
                errors, handled = 0, True
                try:
                    queue.delete(message)
                except Exception as exc:  # applied already: a redelivery is a duplicate
                    self._note("queue_error")
                    with self._count_lock:
                        since = self._queue_down[0] if self._queue_down else self.clock.time()
                        tries = self._queue_down[1] + 1 if self._queue_down else 1
                        self._queue_down = (since, tries, str(exc)[:200])
                    log.warning("saas_lifecycle_delete_failed", extra={"detail": str(exc)[:300]})
            if failed and not handled:  # every message failed: back off before receiving
                self.clock.wait(stop, min(QUEUE_BACKOFF_CAP, self._retry.delay(errors, self._rng)))
            # A pass of reads stops at the first failure (the service down or hanging: each
            # call may take its whole timeout) and after READ_PASS: the rest stay due in the
            # store, for `retry_entitlements`, so events never queue behind timeouts.
            deadline = self.clock.monotonic() + READ_PASS
            try:
                for subject in dict.fromkeys(reads):
                    if stop.is_set():
                        return
                    if self.clock.monotonic() >= deadline:
                        break
                    if not self.refresh_entitlements(subject):
                        break
                self.retry_entitlements(deadline)
            except StoreUnavailableError as exc:
                log.warning("saas_entitlements_not_stored", extra={"detail": str(exc)[:300]})
            except Exception as exc:  # the reads stay due in the store: retried later
                errors += 1
                self._consumer_error(exc, None)
                self.clock.wait(stop, min(QUEUE_BACKOFF_CAP, self._retry.delay(errors, self._rng)))

    def _consumer_error(self, exc: Exception, message_id: str | None) -> None:
        """Counted, logged by type and place only (a message body or token may be in its
        text), shown in /readyz's warnings (`notices`)."""
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = type(exc).__name__ + (
            f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else ""
        )
        self._note("consumer_error")
        with self._count_lock:
            count = self._consumer_failed[0] + 1 if self._consumer_failed else 1
            self._consumer_failed = (count, self.clock.time(), where)
        log.error(
            "saas_lifecycle_consumer_error",
            extra={"message_id": (message_id or "")[:100], "error": where},
        )

    def _retry_reads(self) -> None:
        """`retry_entitlements` while the queue is unreachable: a first read that failed at
        resolve must not wait for SQS, or the buyer's hours are billed whole."""
        try:
            self.retry_entitlements(self.clock.monotonic() + READ_PASS)
        except StoreUnavailableError as exc:
            log.warning("saas_entitlements_not_stored", extra={"detail": str(exc)[:300]})
        except Exception as exc:  # the reads stay due in the store: the consumer goes on
            self._consumer_error(exc, None)

    def changes(self, since: int, wait: float) -> tuple[int, dict[str, Any]]:
        """GET /v1/customers/changes: subjects changed after `since`, waiting up to `wait`
        seconds for one (this replica's changes wake it at once, other replicas' within
        CHANGES_POLL)."""
        end = time.monotonic() + max(0.0, min(wait, CHANGES_WAIT_MAX))
        while True:
            try:
                pruned, (cursor, items) = self.store.read(
                    lambda db: saas_events.changes_or_resync(db, since)
                )
            except StoreUnavailableError as exc:
                return _unavailable(exc)
            if pruned is not None:
                return 410, _resync(since, pruned, cursor)
            left = end - time.monotonic()
            if items or left <= 0:
                return 200, {"cursor": str(cursor), "changes": items}
            with self._changed:
                self._changed.wait(min(left, CHANGES_POLL))

    def dead_letters(self, limit: int = 20, offset: int = 0) -> tuple[int, dict[str, Any]]:
        """GET /v1/saas/dead-letters: the poison messages kept, newest first."""
        try:
            total, recent = self.store.read(lambda db: saas_events.dead_letters(db, limit, offset))
        except StoreUnavailableError as exc:
            return _unavailable(exc)
        return 200, {"total": total, "dead_letters": recent}

    def dead_letter(self, message_id: str) -> tuple[int, dict[str, Any]]:
        """GET /v1/saas/dead-letters/{message id}: one of them, with its body as kept."""
        try:
            found = self.store.read(lambda db: saas_events.dead_letter_of(db, message_id))
        except StoreUnavailableError as exc:
            return _unavailable(exc)
        if found is None:
            return 404, {
                "error": "unknown_dead_letter",
                "field": "id",
                "message": "no dead letter with this SQS message id is kept",
            }
        return 200, found

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
        cause = SECOND_SENDER_HINT if self._on_sqlite() else None
        for customer, dimension, hour in settled.conflicts:
            log.error(
                "saas_duplicate_record",
                extra={
                    "customer": customer,
                    "dimension": dimension,
                    "hour": iso_hour(hour),
                    "likely_cause": cause,
                },
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
            self._clock_issue = None
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
        if info.code == TIMESTAMP_CODE and not info.retryable:
            return self._timestamp_refused(batch, info, now)
        if info.code == DIMENSION_CODE and not info.retryable:
            return self._dimension_refused(batch, info, now)
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
        delay = self._pause()
        log.warning(
            "saas_batch_failed",
            extra={"code": info.code, "kind": info.kind, "retry_in": round(delay, 1)},
        )
        return False

    def _pause(self) -> float:
        self._failures += 1
        delay = self._retry.delay(self._failures, self._rng)
        self._resume_at = self.clock.monotonic() + delay
        return delay

    def _timestamp_refused(self, batch: Batch, info: ErrorInfo, now: float) -> bool:
        """TimestampOutOfBounds. Records of several hours: one call per hour, no call wasted.
        One hour: `next_batch` never sends a record past its deadline, so AWS refused a Timestamp
        our clock puts inside the window: in AWS's future (our clock ahead) or, in the window's
        last minutes, too old (ours behind). A clock disagreement, not a bad record: the stored
        request is resent as is after a backoff pause until its deadline, when its records
        expire (as custom mode does with MeterUsage). Never bisected, never 'rejected'."""
        hours = sorted({hour_of(float(r["Timestamp"])) for r in batch.request["UsageRecords"]})
        if len(hours) > 1:
            calls = self.store.write(
                lambda db: saas_ledger.regroup(
                    db, batch.id, now, self._product, by="hour", code=info.code
                )
            )
            self._count("out_of_bounds")
            log.warning(
                "saas_batch_refused",
                extra={"code": info.code, "records": batch.records, "regrouped_by_hour": calls},
            )
            return True
        self.store.write(lambda db: saas_ledger.failed(db, batch.id, info.code, now))
        self._count("clock_skew")
        deadline = self.policy.hours.deadline(hour_start(hours[0]))
        with self._count_lock:
            self._alerts["clock"] += 1
            since = self._clock_issue["since"] if self._clock_issue else iso(now)
            refusals = self._clock_issue["refusals"] + 1 if self._clock_issue else 1
            self._clock_issue = {
                "since": since,
                "refusals": refusals,
                "hour": iso_hour(hours[0]),
                "deadline": iso(deadline),
            }
        delay = self._pause()
        log.error(
            "saas_clock_skew",
            extra={
                "code": info.code,
                "hour": iso_hour(hours[0]),
                "records": batch.records,
                "retry_in": round(delay, 1),
                "deadline": iso(deadline),
                "hint": CLOCK_HINT,
            },
        )
        return False

    def _dimension_refused(self, batch: Batch, info: ErrorInfo, now: float) -> bool:
        """InvalidUsageDimension refuses the whole call. Records of several dimensions: one
        call per dimension. One dimension: the proof that AWS does not know it, so all of its
        unsent records are quarantined (held, never 'rejected') while the other dimensions
        keep billing: no more bisection, no more calls, however many customers."""
        dims = sorted({str(r.get("Dimension")) for r in batch.request["UsageRecords"]})
        if len(dims) > 1:
            calls = self.store.write(
                lambda db: saas_ledger.regroup(
                    db, batch.id, now, self._product, by="dimension", code=info.code
                )
            )
            self._count("refused")
            log.warning(
                "saas_batch_refused",
                extra={
                    "code": info.code,
                    "records": batch.records,
                    "regrouped_by_dimension": calls,
                },
            )
            return True
        dimension = dims[0]
        note = f"AWS: {info.code}: dimension {dimension} is not published for this product"
        held = self.store.write(
            lambda db: saas_ledger.quarantine(db, dimension, now, info.code, note, batch.id)
        )
        self._count("dimension_refused")
        with self._count_lock:
            self._alerts["quarantined"] += 1
            self._quarantined[dimension] = {
                "since": iso(now),
                "code": info.code,
                "message": info.message,
            }
        log.error(
            "saas_dimension_quarantined",
            extra={"dimension": dimension, "records_held": held, "hint": QUARANTINE_HINT},
        )
        return True

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
        sealed = self.store.write(
            lambda db: saas_ledger.seal(db, through, now, self._spec),
            locks=saas_ledger.SEAL_LOCKS,
            lock_wait=saas_ledger.SEAL_LOCK_WAIT,
        )
        self._sealed_through = through
        for dimension, why in list(self._quarantined.items()):
            if sealed:  # the new hours' records of a quarantined dimension never enter a call
                code = str(why["code"])
                note = f"AWS: {code}: dimension {dimension} is not published for this product"
                self.store.write(
                    functools.partial(
                        saas_ledger.hold, dimension=dimension, code=code, message=note
                    )
                )

    def _final_seal(self, now: float) -> None:
        """Customers in their final window: their open usage sealed now, to be sent inside it."""
        sealed = self.store.write(
            lambda db: saas_events.final_seal(db, now, self._spec),
            locks=saas_ledger.SEAL_LOCKS,
            lock_wait=saas_ledger.SEAL_LOCK_WAIT,
        )
        for customer, hour, records in sealed:
            log.info(
                "saas_final_window_sealed",
                extra={"customer": customer, "hour": iso_hour(hour), "records": records},
            )

    def tick(self, stop: threading.Event | None = None) -> None:
        """One pass as the leader: seal ended hours, send what is sealed."""
        stop = stop or threading.Event()
        if not self._released:  # a new sender tries held dimensions once more
            back = self.store.write(
                lambda db: saas_ledger.release_quarantined(db, self.policy.dimensions)
            )
            with self._count_lock:
                self._quarantined.clear()
            self._released = True
            if back:
                log.warning("saas_quarantine_released", extra={"records": back})
        now = self.clock.time()
        if self.clock.monotonic() >= self._seal_resume_at:
            try:
                self._seal(self.policy.hours.sealable_through(now))
            except StoreBusyError as exc:
                # A replica frozen mid-ingest holds the seal lock until the server ends its
                # transaction (seconds): send what is sealed, try the seal again in a while
                # (each try holds up the fleet's intake for up to SEAL_LOCK_WAIT).
                self._seal_resume_at = self.clock.monotonic() + SEAL_RETRY
                log.warning("saas_seal_deferred", extra={"detail": str(exc)[:300]})
            try:
                self._final_seal(now)
            except StoreBusyError as exc:
                self._seal_resume_at = self.clock.monotonic() + SEAL_RETRY
                log.warning("saas_final_seal_deferred", extra={"detail": str(exc)[:300]})
        self.store.write(lambda db: saas_ledger.track_sending(db, now))
        self._send(stop)
        self.store.write(lambda db: saas_ledger.track_sending(db, self.clock.time()))
        if hour_of(now) != self._pruned_hour:
            self._prune(now, stop)
            self._pruned_hour = hour_of(now)

    def _prune(self, now: float, stop: threading.Event) -> None:
        """Prune in transactions of at most a day of hours each, so intake and sending
        interleave with a first prune of a long history."""
        after: int | None = None
        while True:
            after = self.store.write(functools.partial(saas_ledger.prune, now=now, after=after))
            if after is None or stop.is_set():
                return

    def _is_leader(self) -> bool:
        try:
            leading = self.store.leading()
        except Exception as exc:  # a store that cannot tell makes us a follower, not a crash
            log.warning("saas_leader_check_failed", extra={"detail": str(exc)[:300]})
            leading = False
        if leading != self._leader:
            log.info("saas_leader" if leading else "saas_follower")
            self._released = False
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
        seal_pause = self._seal_resume_at - self.clock.monotonic()
        if seal_pause > 0:  # a due seal found its lock busy: try it again then
            wake.append(now + seal_pause)
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
