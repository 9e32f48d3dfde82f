"""Hour arithmetic for MeterUsage. Pure: every function takes the time it needs.

AWS keeps one record per pod, dimension and hour (the request's Timestamp rounded down), and a
record sent before its hour ends locks the rest of that hour. So hour H is sealed only once H has
ended plus `seal_margin` (in-flight POSTs, product clocks a little behind), and sent with a
timestamp inside H. AWS refuses timestamps more than six hours old: that is each hour's window.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

HOUR = 3600
AWS_WINDOW = 6 * HOUR


def hour_of(t: float) -> int:
    """Hour index (hours since the epoch) holding time `t`."""
    return math.floor(t / HOUR)


def hour_start(hour: int) -> float:
    return float(hour * HOUR)


def iso_hour(hour: int) -> str:
    return datetime.fromtimestamp(hour * HOUR, UTC).strftime("%Y-%m-%dT%H:00:00Z")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class HourPolicy:
    seal_margin: float = 60.0  # after the hour ends, before sealing it
    # The window a pod's hourly records are spread over when the fleet's size is unknown
    # (sidecar.usage.pacing sizes its frame from it); `send_after` spreads with `rng` over it.
    spread: float = 600.0
    # A record for a past, still unsealed hour is counted there only if that hour can still be
    # sent comfortably; otherwise it is carried into the open hour.
    late_floor: float = HOUR
    # An unsealed hour found with less than this left of its window (the sidecar was down) is
    # carried into the open hour at sealing instead of being sent at the last minute.
    seal_floor: float = 600.0
    warn_before: float = HOUR  # warn when an unsent hour's window closes within this
    window_safety: float = 120.0  # stop trying this long before AWS's six hours are over

    def seal_due(self, hour: int) -> float:
        """Earliest time hour `hour` may be sealed."""
        return hour_start(hour + 1) + self.seal_margin

    def sealable_through(self, now: float) -> int:
        """The last hour that may be sealed at `now`."""
        return hour_of(now - self.seal_margin) - 1

    def send_after(self, hour: int, rng: Callable[[], float]) -> float:
        """First send time of one (dimension, hour): spread so a fleet does not stampede."""
        return self.seal_due(hour) + rng() * self.spread

    def deadline(self, timestamp: float) -> float:
        """Last moment worth sending a request with this Timestamp (AWS's window, conservatively
        counted from the hour's start, since whether AWS rounds before comparing is unknown)."""
        return hour_start(hour_of(timestamp)) + AWS_WINDOW - self.window_safety

    def worth_sealing(self, hour: int, now: float) -> bool:
        return hour_start(hour) + AWS_WINDOW - self.window_safety - now >= self.seal_floor

    def countable(self, hour: int, now: float) -> bool:
        """Whether a record for an unsealed past `hour` may still be counted in it."""
        return hour_start(hour) + AWS_WINDOW - now >= self.late_floor


def request_timestamp(hour: int, now: float) -> int:
    """A Timestamp inside `hour`: its last second, or `now` for the open hour (drain, entitlement),
    never in the future."""
    return int(min(hour_start(hour + 1) - 1, max(hour_start(hour), now)))


def target_hour(
    record_hour: int,
    now: float,
    sealed: Callable[[int], bool],
    policy: HourPolicy,
) -> int:
    """Where a record for `record_hour` is counted.

    Its own hour while that hour is unsealed and can still be sent; otherwise the open hour (the
    current one, or the first unsealed hour after it: the entitlement record or a drain may have
    sealed the current hour early). AWS's guidance for outages: add it to a later hour.
    """
    current = hour_of(now)
    open_ = record_hour <= current and not sealed(record_hour)
    if open_ and (record_hour == current or policy.countable(record_hour, now)):
        return record_hour
    hour = max(current, record_hour)
    while sealed(hour):
        hour += 1
    return hour


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again after a failed send.

    Transient errors (throttling, 5xx, network) and configuration errors (IAM, credentials: a
    seller can fix those without restarting the pod) pause all sending of this pod, with capped
    exponential backoff and full jitter: one probe per pause, not one per pending hour.
    """

    base: float = 2.0
    cap: float = 300.0

    def delay(self, failures: int, rng: Callable[[], float]) -> float:
        exponent = min(max(failures, 1) - 1, 30)
        ceiling = float(min(self.cap, self.base * (2**exponent)))
        return ceiling / 2 + rng() * ceiling / 2  # half-jitter: never a hot retry loop


# Outcome of one send attempt, as the sender acts on it.
SENT, RETRY, CONFLICT, EXPIRED, REJECTED = "sent", "retry", "conflict", "expired", "rejected"

# MeterUsage errors that concern this one record (AWS's §5 "terminal per record").
RECORD_REFUSALS = frozenset(
    {
        "InvalidUsageDimensionException",
        "InvalidTagException",
        "InvalidUsageAllocationsException",
        "IdempotencyConflictException",
        "CustomerNotEntitledException",
        "InvalidProductCodeException",
        "PlatformNotSupportedException",
        "ValidationException",
        "ParamValidationError",
        "DisabledApiException",
    }
)


def decide(code: str | None, retryable: bool) -> str:
    """What one MeterUsage answer means for the stored hour."""
    if code is None:
        return SENT
    if code == "DuplicateRequestException":
        return CONFLICT  # recorded already with another value: never resend another quantity
    if code == "TimestampOutOfBoundsException":
        return EXPIRED
    if code in RECORD_REFUSALS and not retryable:
        return REJECTED
    return RETRY


class ScaledClock:
    """TEST ONLY: wall time running `scale` times faster from `origin`, so hours pass in seconds.

    The emulator applies the same formula (its `time_scale`/`time_origin` settings), so both
    agree on hours and the six-hour window. The wiring accepts it only against a loopback
    metering endpoint; production always uses the system clock.
    """

    def __init__(self, scale: float, origin: float) -> None:
        if not scale >= 1.0:
            raise ValueError("scale must be >= 1")
        self.scale = scale
        self.origin = origin

    def time(self) -> float:
        return self.origin + (time.time() - self.origin) * self.scale

    def monotonic(self) -> float:
        return time.monotonic() * self.scale

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        return stop.wait(max(0.0, seconds) / self.scale)
