"""Contract mode's license state: a pure machine, times passed in by the caller.

    checking ──checkout verified──> checked_out <──extended / re-checked── extending
        │                               │  │                                  ▲
        │ refused (final)               │  └── extension due or failing ──────┘
        ▼                               ▼ local deadline passed
    not_entitled <──license withdrawn── expired ──fresh checkout──> checked_out
        ▲                                                  (AWS's answer, at any time)
    unavailable: only retryable errors until the start deadline (final for that start)

A checkout's expiry is AWS's `Expiration - IssuedAt` counted on this machine's monotonic clock
from the moment the request was sent: never compared with this machine's wall clock, so a
clock that disagrees with AWS's changes nothing, and the local deadline is never later than
AWS's (AWS issued the answer after we sent the request).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from sidecar.aws.errors import ErrorInfo
from sidecar.aws.license import Checkout, parse_time

# A wall clock further than this from AWS's IssuedAt is shown as a warning (SigV4's tolerance).
SKEW_WARNING_SECONDS = 300.0


class LicenseState(Enum):
    CHECKING = "checking"
    CHECKED_OUT = "checked_out"
    EXTENDING = "extending"
    EXPIRED = "expired"
    NOT_ENTITLED = "not_entitled"
    UNAVAILABLE = "unavailable"


HOLDING = frozenset({LicenseState.CHECKED_OUT, LicenseState.EXTENDING})


@dataclass(frozen=True)
class Held:
    """One live checkout, as the local API shows it (the consumption token kept apart)."""

    checkout: Checkout
    sent_at: float  # monotonic, when the CheckoutLicense request was sent
    issued_at: float  # AWS's IssuedAt, epoch seconds (AWS's clock)
    expiration: float  # AWS's current Expiration (extended), epoch seconds (AWS's clock)
    checked_at: float  # wall clock of the answer (for display)
    renewed_at: float = -1.0  # monotonic, when the last checkout or extension was sent

    @property
    def extend_at(self) -> float:
        """Half-way through what AWS granted last: the other half is left for retries."""
        base = self.renewed_at if self.renewed_at >= 0 else self.sent_at
        return base + (self.deadline - base) / 2

    @property
    def deadline(self) -> float:
        """Monotonic time by which AWS's checkout has surely not yet expired."""
        return self.sent_at + (self.expiration - self.issued_at)

    @property
    def ttl(self) -> float:
        return self.expiration - self.issued_at


@dataclass(frozen=True)
class LicenseSnapshot:
    state: LicenseState
    held: Held | None = None
    error: ErrorInfo | None = None
    consecutive_failures: int = 0
    had_license: bool = False  # a checkout succeeded during this start
    warnings: tuple[str, ...] = ()
    last_attempt_at: float | None = None
    next_check_at: float | None = None  # wall clock, for display


def verify_checkout(
    asked: tuple[dict[str, str], ...], answer: Checkout, wall_now: float
) -> tuple[ErrorInfo | None, tuple[str, ...]]:
    """(why the answer is unusable or None, warnings). Pure.

    AWS allows a subset of what was asked (a tiered product asks for every tier and gets the
    one bought), so the check is: something allowed, nothing allowed that was not asked, no
    count below the one asked, a consumption token, and IssuedAt < Expiration."""
    wanted = {e["Name"]: e for e in asked}
    problems: list[str] = []
    if not answer.consumption_token:
        problems.append("no LicenseConsumptionToken")
    if not answer.entitlements_allowed:
        problems.append("EntitlementsAllowed is empty")
    for got in answer.entitlements_allowed:
        want = wanted.get(got.get("Name", ""))
        if want is None:
            problems.append(f"entitlement {got.get('Name', '')[:80]!r} was not asked for")
            continue
        if got.get("Unit") not in (None, want["Unit"]):
            problems.append(f"entitlement {want['Name']!r} came back in unit {got.get('Unit')!r}")
        if "Value" in want:
            # A count was asked (config: a whole number): the answer must grant that many.
            value = got.get("Value", "")
            if not value.isdecimal() or int(value) < int(want["Value"]):
                problems.append(
                    f"entitlement {want['Name']!r}: {value[:40] or 'no count'} allowed, "
                    f"{want['Value']} asked"
                )
    issued, expires = parse_time(answer.issued_at), parse_time(answer.expiration)
    if issued is None or expires is None:
        problems.append("IssuedAt or Expiration missing or not ISO 8601")
    elif expires <= issued:
        problems.append("Expiration is not after IssuedAt")
    if problems:
        return (
            ErrorInfo(
                "CheckoutNotVerified",
                "; ".join(problems)[:500],
                "License Manager's answer does not cover this checkout; check "
                "MARKETPLACE_LICENSE_ENTITLEMENTS, or look for something answering in place of "
                "AWS (AWS_ENDPOINT_URL_LICENSE_MANAGER, a proxy)",
                "verification",
                False,
            ),
            (),
        )
    warnings: tuple[str, ...] = ()
    assert issued is not None  # nosec B101 # narrowing: checked above
    if abs(issued - wall_now) > SKEW_WARNING_SECONDS:
        warnings = (
            f"clock_skew: this machine's clock is {wall_now - issued:+.0f} s from License "
            "Manager's IssuedAt; expiry is counted from AWS's own times, so the checkout is "
            "unaffected, but synchronise the node clock (NTP)",
        )
    return None, warnings


class License:
    """The state, swapped whole under a lock; readers take immutable snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap = LicenseSnapshot(LicenseState.CHECKING)

    def snapshot(self) -> LicenseSnapshot:
        return self._snap

    def _set(self, **changes: Any) -> LicenseSnapshot:
        with self._lock:
            self._snap = replace(self._snap, **changes)
            return self._snap

    def checked_out(self, held: Held, warnings: tuple[str, ...], next_check_at: float) -> None:
        self._set(
            state=LicenseState.CHECKED_OUT,
            held=held,
            error=None,
            consecutive_failures=0,
            had_license=True,
            warnings=warnings,
            next_check_at=next_check_at,
        )

    def extended(self, expiration: float, sent_at: float) -> None:
        snap = self._snap
        if snap.held is None:
            return
        self._set(
            state=LicenseState.CHECKED_OUT,
            held=replace(
                snap.held, expiration=max(expiration, snap.held.expiration), renewed_at=sent_at
            ),
            error=None,
            consecutive_failures=0,
        )

    def failed(self, error: ErrorInfo, wall_now: float, *, final: bool = False) -> None:
        """A failed attempt. Holding a live checkout: `extending` (still ready); else not ready."""
        snap = self._snap
        if final:
            state = LicenseState.NOT_ENTITLED
        elif snap.state in HOLDING:
            state = LicenseState.EXTENDING
        else:
            state = snap.state
        self._set(
            state=state,
            error=error,
            consecutive_failures=snap.consecutive_failures + 1,
            last_attempt_at=wall_now,
        )

    def lost(self, error: ErrorInfo, wall_now: float) -> None:
        """AWS says the license is gone (revoked, withdrawn, not enough units left)."""
        self._set(
            state=LicenseState.NOT_ENTITLED,
            held=None,
            error=error,
            consecutive_failures=self._snap.consecutive_failures + 1,
            last_attempt_at=wall_now,
        )

    def expire(self, mono_now: float) -> bool:
        """The local deadline passed without an extension: True if this call expired it."""
        snap = self._snap
        if snap.state not in HOLDING or snap.held is None or mono_now < snap.held.deadline:
            return False
        self._set(state=LicenseState.EXPIRED, held=None)
        return True

    def give_up(self) -> None:
        """The start deadline passed with only retryable errors."""
        if self._snap.state is LicenseState.CHECKING:
            self._set(state=LicenseState.UNAVAILABLE)

    def warn(self, warnings: tuple[str, ...]) -> None:
        self._set(warnings=warnings)


def ready(
    snap: LicenseSnapshot, on_loss: str, now: float | None = None, expires: bool = True
) -> bool:
    """Ready while a checkout is live; after a loss, as MARKETPLACE_LICENSE_ON_LOSS says.

    `now` (monotonic) judges liveness itself: a worker stuck in a call (an answer dripping in)
    cannot mark an expiring checkout expired, and readiness must not outlive the deadline."""
    if snap.state in HOLDING:
        held = snap.held
        if not (expires and now is not None and held is not None and now >= held.deadline):
            return True
        return on_loss == "serve"  # expired here, whatever the worker has not yet noticed
    lost = snap.state in (LicenseState.EXPIRED, LicenseState.NOT_ENTITLED) and snap.had_license
    return lost and on_loss == "serve"


@dataclass(frozen=True)
class Asked:
    """What the pod checks out: the settings, as CheckoutLicense takes them."""

    product_sku: str
    key_fingerprint: str
    entitlements: tuple[dict[str, str], ...]
    checkout_type: str
    node_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def counted(self) -> bool:
        return any("Value" in e for e in self.entitlements)
