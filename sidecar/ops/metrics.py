"""Prometheus metrics for /metrics on the probe listener. Label values are bounded: AWS error
codes outside the known set become "other", paths outside the routes become "other"."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.aws.errors import KNOWN_CODES, ErrorInfo
from sidecar.entitlement.state import Snapshot, State
from sidecar.usage.headroom import Headroom

CONTENT_TYPE = CONTENT_TYPE_LATEST
VERIFY_PREFIX = "TokenVerificationFailed:"
KNOWN_REASONS = frozenset(
    {
        "malformed",
        "too_large",
        "bad_algorithm",
        "unknown_key_version",
        "bad_signature",
        "product_code_mismatch",
        "key_version_mismatch",
        "nonce_mismatch",
        "missing_claim",
        "iat_in_future",
        "too_old",
    }
)


def _bounded(value: str, known: frozenset[str]) -> str:
    return value if value in known else "other"


class _StateCollector(Collector):
    """Values read from the state machine at scrape time."""

    def __init__(self, snapshot: Callable[[], Snapshot], now: Callable[[], float]) -> None:
        self._snapshot = snapshot
        self._now = now

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self._snapshot()
        state = GaugeMetricFamily(
            "marketplace_entitlement_state", "1 for the current entitlement state", labels=["state"]
        )
        for s in State:
            state.add_metric([s.value], 1.0 if snap.state is s else 0.0)
        yield state
        yield GaugeMetricFamily(
            "marketplace_entitled",
            "1 when entitled or degraded",
            value=1.0 if snap.entitled else 0.0,
        )
        since = GaugeMetricFamily(
            "marketplace_last_registration_success_age_seconds",
            "Seconds since the last verified RegisterUsage (NaN before the first)",
            value=(self._now() - snap.last_success_at) if snap.last_success_at else float("nan"),
        )
        yield since
        yield GaugeMetricFamily(
            "marketplace_next_registration_timestamp_seconds",
            "Unix time of the next scheduled RegisterUsage (NaN when none is scheduled)",
            value=snap.next_registration_at or float("nan"),
        )
        yield GaugeMetricFamily(
            "marketplace_first_answer_lost",
            "1 when the answer to the pod's first RegisterUsage call was lost (AWS's entitlement "
            "check may have been missed); see warning first_answer_lost",
            value=1.0 if snap.first_answer_lost else 0.0,
        )
        yield GaugeMetricFamily(
            "marketplace_registration_consecutive_failures",
            "Failed RegisterUsage attempts since the last success",
            value=float(snap.consecutive_failures),
        )


class _RequestCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "marketplace_api_requests",
            "Local API requests by listener, path and status",
            labels=["listener", "path", "status"],
        )
        for labels, count in sorted(self._metrics.request_counts().items()):
            family.add_metric(list(labels), count)
        yield family


USAGE_HOUR_STATES = ("open", "sealed", "sent", "conflict", "expired", "rejected")
# The usage sender's outcomes of one MeterUsage call (sidecar.usage.hours).
USAGE_SEND_RESULTS = frozenset({"sent", "retry", "conflict", "expired", "rejected", "dry_run"})
USAGE_CODES = KNOWN_CODES | {
    "ok",  # the sender's code for a success
    "window",  # and for an hour expired before it could be sent
    "DuplicateRequestException",
    "TimestampOutOfBoundsException",
    "InvalidUsageDimensionException",
    "InvalidUsageAllocationsException",
    "InvalidTagException",
    "IdempotencyConflictException",
    "InvalidEndpointRegionException",
    "InvalidCustomerIdentifierException",
    "ValidationException",
}


class UsageCounts(Protocol):
    """What the usage pipeline reports at scrape time (custom mode)."""

    @property
    def units_accepted(self) -> Mapping[str, float]: ...  # durable units, by dimension

    @property
    def hours_by_state(self) -> Mapping[str, int]: ...  # (dimension, hour) rows by state

    @property
    def oldest_unsent_age_seconds(self) -> float: ...  # 0 when every ended hour is sent

    @property
    def send_attempts(self) -> Mapping[tuple[str, str], int]: ...  # by (result, code)

    @property
    def future_hour_units(self) -> Mapping[str, float]: ...  # by dimension: no drain sends them

    @property
    def unsent_at_exit(self) -> Mapping[str, float]: ...  # by dimension: left when a drain ended

    @property
    def volume_used_bytes(self) -> int: ...  # the state volume, as its limit counts it

    @property
    def volume_limit_bytes(self) -> int: ...

    @property
    def refused_volume_full(self) -> int: ...  # POSTs answered 503: the volume was full


class _UsageCollector(Collector):
    """Read from the usage store's counters at scrape time: nothing on the ingest path."""

    def __init__(
        self,
        counts: Callable[[], UsageCounts],
        dimensions: frozenset[str],
    ) -> None:
        self._counts = counts
        self._dimensions = dimensions

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        counts = self._counts()
        units = CounterMetricFamily(
            "marketplace_usage_units_accepted",
            "Units acknowledged (durable) to the product, by dimension",
            labels=["dimension"],
        )
        for dim in sorted(self._dimensions):
            units.add_metric([dim], float(counts.units_accepted.get(dim, 0)))
        yield units
        hours = GaugeMetricFamily(
            "marketplace_usage_hours",
            "Dimension-hours in the store by state (conflict and expired need a human)",
            labels=["state"],
        )
        for state in USAGE_HOUR_STATES:
            hours.add_metric([state], float(counts.hours_by_state.get(state, 0)))
        yield hours
        yield GaugeMetricFamily(
            "marketplace_usage_oldest_unsent_hour_age_seconds",
            "Seconds since the end of the oldest ended hour not yet accepted by AWS (0 when "
            "none); AWS refuses a record more than 6 hours after its usage",
            value=float(counts.oldest_unsent_age_seconds),
        )
        sends = CounterMetricFamily(
            "marketplace_usage_send_attempts",
            "MeterUsage calls by result and AWS error code",
            labels=["result", "code"],
        )
        merged: dict[tuple[str, str], int] = {}
        for (result, code), n in counts.send_attempts.items():
            key = (_bounded(result, USAGE_SEND_RESULTS), code and _bounded(code, USAGE_CODES))
            merged[key] = merged.get(key, 0) + n
        for (result, code), n in sorted(merged.items()):
            sends.add_metric([result, code], float(n))
        yield sends
        future = GaugeMetricFamily(
            "marketplace_usage_future_hour_units",
            "Units counted in an hour that has not started (carried past an hour already "
            "taken, e.g. by meter_zero's start check): no drain can send them, so they are "
            "lost if the pod ends before that hour does",
            labels=["dimension"],
        )
        unsent = CounterMetricFamily(
            "marketplace_usage_units_unsent_at_exit",
            "Units still unsent when the drain ended (kept in the state dir; lost with the pod)",
            labels=["dimension"],
        )
        for dim in sorted(self._dimensions):
            future.add_metric([dim], float(counts.future_hour_units.get(dim, 0)))
            unsent.add_metric([dim], float(counts.unsent_at_exit.get(dim, 0)))
        yield future
        yield unsent
        yield GaugeMetricFamily(
            "marketplace_usage_state_volume_used_bytes",
            "Bytes the usage store's volume holds (free pages of the store excluded); new usage "
            "is refused at 90% of the limit, warnings from 80%",
            value=float(counts.volume_used_bytes),
        )
        yield GaugeMetricFamily(
            "marketplace_usage_state_volume_limit_bytes",
            "The state volume's limit: MARKETPLACE_STATE_VOLUME_BYTES (the emptyDir's "
            "sizeLimit) or the filesystem's room, whichever is smaller",
            value=float(counts.volume_limit_bytes),
        )
        yield CounterMetricFamily(
            "marketplace_usage_refused_volume_full",
            "POST /v1/usage answered 503, nothing stored: the state volume was 90% full",
            value=float(counts.refused_volume_full),
        )


SAAS_RECORD_STATES = (
    "open",
    "sealed",
    "sent",
    "not_subscribed",
    "conflict",
    "expired",
    "rejected",
    "quarantined",
)
SAAS_CUSTOMER_STATES = ("active", "not_subscribed")
# One BatchMeterUsage call's outcome, as SaasService counts it; others become "other".
# clock_skew: a Timestamp refused inside the window (resent); dimension_refused: the proof that
# quarantined a dimension.
SAAS_BATCH_RESULTS = frozenset(
    {
        "ok",
        "out_of_bounds",
        "clock_skew",
        "refused",
        "dimension_refused",
        "throttled",
        "transient",
        "error",
    }
)


class SaasCounts(Protocol):
    """What SaasService.counters() reports at scrape time (saas mode)."""

    @property
    def units_accepted(self) -> Mapping[str, float]: ...  # durable units, by dimension

    @property
    def records_by_state(self) -> Mapping[str, int]: ...  # customer/dimension/hour records

    @property
    def customers_by_state(self) -> Mapping[str, int]: ...  # active, not_subscribed

    @property
    def oldest_unsent_hour_age_seconds(self) -> float: ...  # 0 when every sealed hour is sent

    @property
    def batch_calls(self) -> Mapping[str, int]: ...  # BatchMeterUsage calls by result

    @property
    def leader(self) -> bool: ...  # this sidecar holds the sender role

    @property
    def headroom(self) -> Headroom | None: ...  # sending headroom (None: not known)


SAAS_LIFECYCLE_OUTCOMES = (
    "applied",
    "duplicate",
    "stale",
    "dead_letter",
    "queue_error",
    "store_error",
    "consumer_error",
)
# name, help, Headroom attribute: the sending headroom's gauges (issue 19, item 12).
SAAS_HEADROOM_GAUGES = (
    (
        "marketplace_saas_backlog_records",
        "Sealed records not yet settled by AWS (the sending backlog)",
        "backlog_records",
    ),
    (
        "marketplace_saas_backlog_seconds",
        "Seconds the backlog needs at the paced BatchMeterUsage rate (25 records a call)",
        "backlog_seconds",
    ),
    (
        "marketplace_saas_backlog_trend_records_per_hour",
        "Change of the backlog found at the last two hours' sealing (> 0: falling behind)",
        "trend_per_hour",
    ),
    (
        "marketplace_saas_hour_records",
        "Records the newest sealed hour brought (one per customer and dimension with usage, "
        "plus the quantity-0 records)",
        "hour_records",
    ),
    (
        "marketplace_saas_send_capacity_records_per_hour",
        "Records an hour the sidecar sends at its paced rate (AWS's quota: 900,000)",
        "capacity_per_hour",
    ),
    (
        "marketplace_saas_send_load_ratio",
        "The newest hour's records over the paced hourly capacity (1 = an hour takes an hour "
        "to send)",
        "load_ratio",
    ),
    (
        "marketplace_saas_hour_send_seconds",
        "Seconds from sealing to the last settled record of the newest fully sent hour",
        "send_seconds",
    ),
    (
        "marketplace_saas_send_ratio",
        "The longer of the last hour's sending and the oldest unfinished hour's so far, over "
        "one hour",
        "send_ratio",
    ),
)


class _SaasCollector(Collector):
    """Read from SaasService's counters at scrape time: nothing on the ingest path."""

    def __init__(self, counts: Callable[[], SaasCounts], dimensions: frozenset[str]) -> None:
        self._counts = counts
        self._dimensions = dimensions

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        try:
            counts = self._counts()
        except Exception:  # a database outage must not make /metrics answer 500
            yield GaugeMetricFamily(
                "marketplace_saas_counters_available",
                "1 when the saas counters could be read from the usage store at this scrape",
                value=0.0,
            )
            return
        yield GaugeMetricFamily(
            "marketplace_saas_counters_available",
            "1 when the saas counters could be read from the usage store at this scrape",
            value=1.0,
        )
        units = CounterMetricFamily(
            "marketplace_usage_units_accepted",
            "Units acknowledged (durable) to the product, by dimension",
            labels=["dimension"],
        )
        for dim in sorted(self._dimensions):
            units.add_metric([dim], float(counts.units_accepted.get(dim, 0)))
        yield units
        records = GaugeMetricFamily(
            "marketplace_saas_records",
            "Customer/dimension/hour records by state (not_subscribed, conflict, expired and "
            "quarantined need a human)",
            labels=["state"],
        )
        for state in SAAS_RECORD_STATES:
            records.add_metric([state], float(counts.records_by_state.get(state, 0)))
        yield records
        customers = GaugeMetricFamily(
            "marketplace_saas_customers",
            "Resolved customers by state (not_subscribed: learned from BatchMeterUsage)",
            labels=["state"],
        )
        for state in SAAS_CUSTOMER_STATES:
            customers.add_metric([state], float(counts.customers_by_state.get(state, 0)))
        yield customers
        yield GaugeMetricFamily(
            "marketplace_saas_oldest_unsent_hour_age_seconds",
            "Seconds since the end of the oldest sealed hour with a record not yet accepted "
            "by AWS (0 when none); BatchMeterUsage refuses records 24 hours or more after "
            "their usage, and a closed month's records from 06:00 UTC on the 1st",
            value=float(counts.oldest_unsent_hour_age_seconds),
        )
        calls = CounterMetricFamily(
            "marketplace_saas_batch_calls",
            "BatchMeterUsage calls by result",
            labels=["result"],
        )
        merged: dict[str, int] = {}
        for result, n in counts.batch_calls.items():
            key = _bounded(result, SAAS_BATCH_RESULTS)
            merged[key] = merged.get(key, 0) + n
        for result, n in sorted(merged.items()):
            calls.add_metric([result], float(n))
        yield calls
        yield GaugeMetricFamily(
            "marketplace_saas_leader",
            "1 when this sidecar is the fleet's sender (holds the store's sender lock)",
            value=1.0 if counts.leader else 0.0,
        )
        lifecycle: Mapping[str, int] = getattr(counts, "lifecycle", None) or {}
        messages = CounterMetricFamily(
            "marketplace_saas_lifecycle_messages",
            "Lifecycle queue messages by outcome (applied, duplicate, stale, dead_letter: kept "
            "in the store unparsed, alert on any; queue_error, store_error: retried; "
            "consumer_error: an unexpected failure, the message left on the queue)",
            labels=["outcome"],
        )
        for outcome in SAAS_LIFECYCLE_OUTCOMES:
            messages.add_metric([outcome], float(lifecycle.get(outcome, 0)))
        yield messages
        yield CounterMetricFamily(
            "marketplace_saas_final_windows_missed",
            "Deprovisionings learned after their one-hour final window had closed (the queue "
            "unreachable or the event late): that buyer's last usage is sent anyway and AWS "
            "may refuse it (kept as not_subscribed)",
            value=float(lifecycle.get("final_window_missed", 0)),
        )
        room = getattr(counts, "headroom", None)
        if room is None:
            return
        for name, doc, attr in SAAS_HEADROOM_GAUGES:
            value = getattr(room, attr)
            yield GaugeMetricFamily(name, doc, value=float(value or 0.0))
        yield GaugeMetricFamily(
            "marketplace_saas_send_headroom_low",
            "1 when sending is near its ceiling: an hour's sending over half an hour, a backlog "
            "over 30 minutes at the paced rate, or records bound to expire (GET /v1/usage "
            "and /readyz say which)",
            value=1.0 if room.alert else 0.0,
        )


@dataclass(frozen=True)
class ContractCounts:
    """Contract mode at scrape time: the checkout's state, its expiry, call results, leases."""

    state: str
    expires_in_seconds: float | None
    results: Mapping[tuple[str, str], int]  # (License Manager operation, result) -> calls
    leases_by_entitlement: Mapping[str, int]  # units the product's leases hold
    # CheckInLicense calls that failed and are retried, by source (checkout: the pod's own
    # swapped-out or late checkouts; lease: the product's leases): seats AWS may still hold.
    checkins_owed: Mapping[str, int] = field(default_factory=dict)


CONTRACT_STATES = (
    "checking",
    "checked_out",
    "extending",
    "expired",
    "not_entitled",
    "unavailable",
)
LICENSE_OPS = frozenset({"CheckoutLicense", "ExtendLicenseConsumption", "CheckInLicense"})
LICENSE_RESULTS = frozenset({"ok", "gone", "retryable_error", "terminal_error", "unverified"})
CHECKIN_SOURCES = ("checkout", "lease")
MAX_LEASE_LABELS = 50  # entitlement names come from the product: bounded, the rest "other"


class _ContractCollector(Collector):
    def __init__(self, counts: Callable[[], ContractCounts]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c = self._counts()
        state = GaugeMetricFamily(
            "marketplace_license_state", "1 for contract mode's checkout state", labels=["state"]
        )
        for s in CONTRACT_STATES:
            state.add_metric([s], 1.0 if c.state == s else 0.0)
        yield state
        yield GaugeMetricFamily(
            "marketplace_license_expires_in_seconds",
            "Seconds until the pod's checkout expires on this machine's count (NaN: none held); "
            "an extension half-way through the grant resets it",
            value=float("nan") if c.expires_in_seconds is None else float(c.expires_in_seconds),
        )
        calls = CounterMetricFamily(
            "marketplace_license_calls",
            "License Manager calls (pod checkout and product leases) by operation and result",
            labels=["operation", "result"],
        )
        for (op, result), n in sorted(c.results.items()):
            calls.add_metric([_bounded(op, LICENSE_OPS), _bounded(result, LICENSE_RESULTS)], n)
        yield calls
        leases = GaugeMetricFamily(
            "marketplace_license_lease_units",
            "Units the product's leases hold, by entitlement",
            labels=["entitlement"],
        )
        for i, (name, n) in enumerate(sorted(c.leases_by_entitlement.items())):
            leases.add_metric([name if i < MAX_LEASE_LABELS else "other"], float(n))
        yield leases
        owed = GaugeMetricFamily(
            "marketplace_license_checkins_owed",
            "Check-ins that failed and are retried until AWS takes the units back (or the "
            "checkout has surely expired): checkout (the pod's) or lease (the product's)",
            labels=["source"],
        )
        for source in CHECKIN_SOURCES:
            owed.add_metric([source], float(c.checkins_owed.get(source, 0)))
        yield owed


class Metrics:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot] | None,
        routes: frozenset[str],
        now: Callable[[], float] = time.time,
    ) -> None:
        self.registry = CollectorRegistry()
        self._routes = routes
        self.attempts = Counter(
            "marketplace_register_attempts",
            "RegisterUsage attempts by result and AWS error code",
            ["result", "code"],
            registry=self.registry,
        )
        self.verify_failures = Counter(
            "marketplace_token_verification_failures",
            "Tokens that failed verification, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.challenges = Counter(
            "marketplace_challenges",
            "Product challenges by result",
            ["result"],
            registry=self.registry,
        )
        # Counted in a plain dict and exported at scrape time, to keep prometheus_client's
        # per-sample locks off the request path of 16 concurrent keep-alive connections.
        self._requests: dict[tuple[str, str, str], int] = {}
        self._requests_lock = threading.Lock()
        self.registry.register(_RequestCollector(self))
        Info("marketplace_sidecar_build", "Build information", registry=self.registry).info(
            {"version": __version__}
        )
        if snapshot is not None:  # saas mode has no entitlement state machine
            self.registry.register(_StateCollector(snapshot, now))
        ProcessCollector(registry=self.registry)

    def watch_usage(self, counts: Callable[[], UsageCounts], dimensions: frozenset[str]) -> None:
        """Custom mode: export the usage pipeline's counters (label values bounded by config)."""
        self.registry.register(_UsageCollector(counts, dimensions))

    def watch_contract(self, counts: Callable[[], ContractCounts]) -> None:
        """Contract mode: the checkout, its calls and the product's leases."""
        self.registry.register(_ContractCollector(counts))

    def watch_saas(self, counts: Callable[[], SaasCounts], dimensions: frozenset[str]) -> None:
        """SaaS mode: export SaasService's counters (label values bounded by config)."""
        self.registry.register(_SaasCollector(counts, dimensions))

    # -- observer hooks ------------------------------------------------------------------

    def attempt(self, error: ErrorInfo | None) -> None:
        if error is None:
            self.attempts.labels("ok", "").inc()
        elif error.code.startswith(VERIFY_PREFIX):
            reason = _bounded(error.code.removeprefix(VERIFY_PREFIX), KNOWN_REASONS)
            self.attempts.labels("verification_failed", "").inc()
            self.verify_failures.labels(reason).inc()
        else:
            result = "retryable_error" if error.retryable else "terminal_error"
            self.attempts.labels(result, _bounded(error.code, KNOWN_CODES)).inc()

    def challenge(self, result: str) -> None:
        self.challenges.labels(result).inc()

    def request(self, listener: str, path: str, status: int) -> None:
        key = (listener, path if path in self._routes else "other", str(status))
        with self._requests_lock:
            self._requests[key] = self._requests.get(key, 0) + 1

    def request_counts(self) -> dict[tuple[str, str, str], int]:
        with self._requests_lock:
            return dict(self._requests)

    def render(self) -> bytes:
        return generate_latest(self.registry)
