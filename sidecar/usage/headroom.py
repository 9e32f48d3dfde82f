"""SaaS sending headroom: how close the sender is to AWS's BatchMeterUsage ceiling. Pure.

AWS allows 10 BatchMeterUsage calls per second per account and region, 25 records each: at most
900,000 records an hour. The sidecar paces at `calls_per_second` (8 by default: 720,000 an
hour). Each sealed hour brings one record per active customer and dimension (with quantity-0
records on), so a product with enough customers needs more than an hour to send an hour: the
backlog grows and records pass BatchMeterUsage's window unsent. Everything here is computed from
facts the ledger stores (per sealed hour: when it was sealed, its records, the backlog it found,
when its last record was settled) and the time `now` the caller passes in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.usage.hours import BATCH_METER_USAGE, HOUR, iso, iso_hour, window_closes

BATCH_RECORDS = 25
AWS_CALLS_PER_SECOND = 10.0  # AWS's BatchMeterUsage quota per account and region (default)
WARN_RATIO = 0.5  # an hour's sending may take half the hour before anyone is told
WARN_BACKLOG_SECONDS = 1800.0  # a backlog needing more than 30 minutes at the paced rate


@dataclass(frozen=True)
class HourSending:
    """One sealed hour, as the ledger tracks it."""

    hour: int
    sealed_at: float
    records: int
    backlog_before: int  # sealed-unsent records of earlier hours when this hour was sealed
    finished_at: float | None  # its last record settled (sent, refused or expired); None: not yet


@dataclass(frozen=True)
class Headroom:
    calls_per_second: float
    capacity_per_hour: int  # records an hour at the paced rate
    ceiling_per_hour: int  # records an hour at AWS's quota
    hour_records: int  # the newest sealed hour's records
    load_ratio: float  # hour_records / capacity_per_hour: 1.0 = an hour takes an hour to send
    backlog_records: int
    backlog_seconds: float  # to send the backlog at the paced rate
    trend_per_hour: float  # the backlog's change between the last two seals (records/hour)
    send_seconds: float | None  # the newest finished hour: sealing to its last settled record
    sending_for_seconds: float  # the oldest unfinished hour: seconds since it was sealed
    send_ratio: float  # max(send_seconds, sending_for_seconds) / one hour
    expires_unsent: bool  # at the paced rate the backlog outlasts AWS's window
    reasons: tuple[str, ...]

    @property
    def alert(self) -> bool:
        return bool(self.reasons)


def capacity_per_hour(calls_per_second: float) -> int:
    return int(calls_per_second * BATCH_RECORDS * HOUR)


def send_seconds(records: int, calls_per_second: float) -> float:
    """Seconds to send `records` at the paced rate (full calls of 25)."""
    return math.ceil(max(0, records) / BATCH_RECORDS) / calls_per_second


def headroom(
    now: float,
    hours: Sequence[HourSending],
    backlog: int,
    calls_per_second: float,
    *,
    oldest_unsent_hour: int | None = None,
    warn_ratio: float = WARN_RATIO,
    warn_backlog_seconds: float = WARN_BACKLOG_SECONDS,
) -> Headroom:
    """The headroom at `now` from the recent sealed hours (any order) and the current backlog."""
    ordered = sorted(hours, key=lambda h: h.hour)
    capacity = capacity_per_hour(calls_per_second)
    newest = ordered[-1] if ordered else None
    hour_records = newest.records if newest else 0
    load = hour_records / capacity if capacity else 0.0
    backlog_s = send_seconds(backlog, calls_per_second)
    trend = (
        float(ordered[-1].backlog_before - ordered[-2].backlog_before) if len(ordered) >= 2 else 0.0
    )
    finished = [h for h in ordered if h.finished_at is not None]
    last = finished[-1] if finished else None
    took = None
    if last is not None and last.finished_at is not None:
        took = max(0.0, last.finished_at - last.sealed_at)
    unfinished = [h for h in ordered if h.finished_at is None]
    running = max(0.0, now - unfinished[0].sealed_at) if unfinished else 0.0
    ratio = max(took or 0.0, running) / HOUR
    left = (
        window_closes(BATCH_METER_USAGE, oldest_unsent_hour) - now
        if oldest_unsent_hour is not None
        else None
    )
    expires = left is not None and backlog > 0 and backlog_s > left
    pace = f"{calls_per_second:g} calls/s"
    reasons: list[str] = []
    if load > warn_ratio:
        reasons.append(
            f"hour {iso_hour(newest.hour) if newest else '-'} sealed {hour_records} records: "
            f"sending them takes {load:.0%} of an hour at {pace} (the paced ceiling is "
            f"{capacity} records an hour; AWS's quota {capacity_per_hour(AWS_CALLS_PER_SECOND)})"
        )
    if last is not None and took is not None and took / HOUR > warn_ratio:
        reasons.append(
            f"sending hour {iso_hour(last.hour)} took {took / 60:.0f} min "
            f"({took / HOUR:.0%} of an hour)"
        )
    if unfinished and running / HOUR > warn_ratio:
        reasons.append(
            f"hour {iso_hour(unfinished[0].hour)} has been sending for {running / 60:.0f} min "
            f"({running / HOUR:.0%} of an hour)"
        )
    if backlog_s > warn_backlog_seconds:
        reasons.append(
            f"{backlog} records wait to be sent: {backlog_s / 60:.0f} min at {pace}"
            + (f", growing by {trend:.0f} records an hour" if trend > 0 else "")
        )
    if expires:
        reasons.append(
            "at the paced rate the backlog outlasts BatchMeterUsage's window for the oldest "
            f"unsent hour (it closes {iso(now + (left or 0.0))}): records will expire unsent"
        )
    return Headroom(
        calls_per_second=calls_per_second,
        capacity_per_hour=capacity,
        ceiling_per_hour=capacity_per_hour(AWS_CALLS_PER_SECOND),
        hour_records=hour_records,
        load_ratio=load,
        backlog_records=backlog,
        backlog_seconds=backlog_s,
        trend_per_hour=trend,
        send_seconds=took,
        sending_for_seconds=running,
        send_ratio=ratio,
        expires_unsent=expires,
        reasons=tuple(reasons),
    )
