"""Hour arithmetic for MeterUsage and BatchMeterUsage. Pure: every function takes the time it needs.

AWS keeps one record per pod (or customer), dimension and hour (the Timestamp rounded down), and
a record sent before its hour ends locks the rest of that hour. So hour H is sealed only once H
has ended plus `seal_margin` (in-flight POSTs, product clocks a little behind), and sent with a
timestamp inside H. How long AWS accepts a record afterwards (each hour's window) depends on the
API: see `window_closes`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

HOUR = 3600
AWS_WINDOW = 6 * HOUR  # MeterUsage: "up to six hours in the past"
METER_USAGE = "MeterUsage"  # custom mode
BATCH_METER_USAGE = "BatchMeterUsage"  # SaaS mode
APIS = (METER_USAGE, BATCH_METER_USAGE)
BATCH_WINDOW = 24 * HOUR  # BatchMeterUsage: "up to 24 hours in the past"
MONTH_END_GRACE = 6 * HOUR  # BatchMeterUsage: a closed month's records, until 06:00 UTC on the 1st


def hour_of(t: float) -> int:
    """Hour index (hours since the epoch) holding time `t`."""
    return math.floor(t / HOUR)


def hour_start(hour: int) -> float:
    return float(hour * HOUR)


def iso_hour(hour: int) -> str:
    return datetime.fromtimestamp(hour * HOUR, UTC).strftime("%Y-%m-%dT%H:00:00Z")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def next_month_start(t: float) -> float:
    """00:00 UTC on the first day of the month after the one holding `t`: when AWS's billing
    month of `t` ends."""
    day = datetime.fromtimestamp(t, UTC)
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


def window_closes(api: str, hour: int) -> float:
    """The instant from which AWS refuses a record of `hour` sent with `api`; it accepts the
    record strictly before it. Counted from the hour's START (whether AWS rounds the Timestamp
    down before comparing is undocumented), so never later than AWS's own count.

    MeterUsage (model, `MeterUsageRequest.Timestamp`): "up to six hours in the past".

    BatchMeterUsage (model, `UsageRecord.Timestamp` and the operation's documentation): "up to
    24 hours in the past", and "We accept usage records for the previous billing month until
    06:00 UTC on the first day of the next month ... After 06:00 UTC on April 1, March records
    are rejected regardless of the normal 24-hour submission window." The 6-hour grace is a
    CUT-OFF, not an extension: it is the time after the billing month closes (00:00 UTC on
    the 1st) during which its records still count, and it only ever shortens the 24 hours (for
    the closed month's last 18 hours). So the window is min(24 h, 06:00 UTC on the 1st of the
    next month). The same text's "On April 1 at 05:00 UTC, you can still submit records for
    March 31" holds for March 31's records stamped after 05:00; reading it as "all of March 31
    until 06:00" would extend the 24 hours by up to 6, which the model says nowhere else, so the
    sidecar does not count on it (the cost: the first six hours of a month's last day expire
    up to 6 h before AWS might refuse them, after an outage of a day).
    """
    start = hour_start(hour)
    if api == METER_USAGE:
        return start + AWS_WINDOW
    if api == BATCH_METER_USAGE:
        return min(start + BATCH_WINDOW, next_month_start(start) + MONTH_END_GRACE)
    raise ValueError(f"api must be one of {', '.join(APIS)}, not {api!r}")


def first_hour_open(api: str, t: float) -> int:
    """The oldest hour whose window (`window_closes`) is still open at `t`: every older hour's
    record is refused by then. `window_closes` never decreases from one hour to the next (an
    hour of a new month always closes 24 h after its start, after any hour of the month
    before), so the hours refused at `t` are exactly those before this one."""
    hour = hour_of(t - BATCH_WINDOW) - 1  # every window is at most a day long
    while window_closes(api, hour) <= t:
        hour += 1
    return hour


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
    window_safety: float = 120.0  # stop trying this long before AWS's window closes
    # Whose window the hours follow (`window_closes`): custom mode sends with MeterUsage; SaaS
    # mode (SaasPolicy, SealSpec) always turns this into BatchMeterUsage.
    api: str = METER_USAGE

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {', '.join(APIS)}, not {self.api!r}")

    def using(self, api: str) -> HourPolicy:
        """The same margins, with `api`'s window."""
        return self if api == self.api else replace(self, api=api)

    def closes(self, hour: int) -> float:
        """When AWS stops accepting a record of `hour` sent with this policy's API."""
        return window_closes(self.api, hour)

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
        return self.closes(hour_of(timestamp)) - self.window_safety

    def worth_sealing(self, hour: int, now: float) -> bool:
        return self.closes(hour) - self.window_safety - now >= self.seal_floor

    def countable(self, hour: int, now: float) -> bool:
        """Whether a record for an unsealed past `hour` may still be counted in it."""
        return self.closes(hour) - now >= self.late_floor

    def first_unexpired(self, now: float) -> int:
        """The oldest hour whose deadline is not past at `now` (older ones expire unsent)."""
        return first_hour_open(self.api, now + self.window_safety)


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
    agree on hours and on each API's window. The wiring accepts it only against a loopback
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
