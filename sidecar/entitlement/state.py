"""The entitlement state machine. Pure: callers pass the time of each event.

    registering --verified token--> entitled <--verified token-- degraded
        |   (retryable errors stay in     |  \\--any error but a bad token--^
        |    registering until deadline)  |
        +--terminal error, deadline, bad token--> not_entitled (final: no more calls)
    entitled/degraded --bad token--> not_entitled (until a verified token)

AWS raises entitlement errors only on a pod's first RegisterUsage call, so a failure after one
success can only be a network, IAM or AWS problem: `degraded`, never a revocation. A token that
fails verification is different: something answered in place of AWS. And AWS's refusal of the
first call itself is final whatever else happened meanwhile, even a success that overtook it.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from sidecar.aws.errors import ErrorInfo


class State(enum.StrEnum):
    REGISTERING = "registering"
    ENTITLED = "entitled"
    DEGRADED = "degraded"
    NOT_ENTITLED = "not_entitled"


SERVING_STATES = frozenset({State.ENTITLED, State.DEGRADED})
FIRST_CALL_VERDICT_KINDS = frozenset({"entitlement", "platform"})
FIRST_ANSWER_LOST_WARNING = (
    "first_answer_lost: the answer to this pod's first RegisterUsage call was lost, so AWS's "
    "entitlement check (made on that call only) may have been missed; set "
    "MARKETPLACE_STRICT_FIRST_ANSWER=true to refuse such pods"
)


@dataclass(frozen=True)
class Snapshot:
    state: State = State.REGISTERING
    token: str | None = None
    claims: dict[str, Any] | None = None
    last_attempt_at: float | None = None
    last_success_at: float | None = None
    next_registration_at: float | None = None
    consecutive_failures: int = 0
    error: ErrorInfo | None = None
    warnings: tuple[str, ...] = field(default=())
    # True once a terminal verdict ends registration for this pod: AWS would not repeat it.
    final: bool = False
    # The first call may have reached AWS but its answer was lost (sticky for the pod's life).
    first_answer_lost: bool = False

    @property
    def entitled(self) -> bool:
        return self.state in SERVING_STATES


class Entitlement:
    """Holds the current `Snapshot`; every transition is one method, safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap = Snapshot()

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snap

    def attempt(self, now: float) -> None:
        with self._lock:
            self._snap = replace(self._snap, last_attempt_at=now)

    def succeeded(
        self,
        token: str | None,
        claims: dict[str, Any] | None,
        now: float,
        rotation_at: float | None,
    ) -> Snapshot:
        """A verified token, or (custom mode: MeterUsage has none) an accepted call."""
        warnings: tuple[str, ...] = ()
        if rotation_at is not None:
            warnings = (
                "AWS reports the configured public key version expired (PublicKeyRotationTimestamp "
                f"{rotation_at:.0f}); configure the new key and MARKETPLACE_PUBLIC_KEY_VERSION",
            )
        with self._lock:
            if self._snap.final:
                return self._snap
            if self._snap.first_answer_lost:
                warnings = (FIRST_ANSWER_LOST_WARNING, *warnings)
            self._snap = replace(
                self._snap,
                state=State.ENTITLED,
                token=token,
                claims=claims,
                last_attempt_at=now,
                last_success_at=now,
                consecutive_failures=0,
                error=None,
                warnings=warnings,
            )
            return self._snap

    def failed(self, error: ErrorInfo, now: float, *, first_call: bool = False) -> Snapshot:
        """Record a failed attempt; `first_call`: the answer to the pod's first call."""
        with self._lock:
            snap = self._snap
            ever_ok = snap.last_success_at is not None
            if snap.final:
                state, final = State.NOT_ENTITLED, True
            elif first_call and not error.retryable and error.kind in FIRST_CALL_VERDICT_KINDS:
                # AWS's verdict on the first call stands, even if a later call got a token.
                state, final = State.NOT_ENTITLED, True
            elif error.kind == "verification":
                # Never entitled on a bad token. Before any success it ends registration.
                state, final = State.NOT_ENTITLED, not ever_ok
            elif ever_ok:
                # Only a verified token lifts a not_entitled caused by a bad token.
                serving = snap.state in SERVING_STATES
                state, final = (State.DEGRADED if serving else State.NOT_ENTITLED), False
            elif error.retryable:
                state, final = State.REGISTERING, False
            else:
                state, final = State.NOT_ENTITLED, True
            self._snap = replace(
                snap,
                state=state,
                final=final,
                token=None if state is State.NOT_ENTITLED else snap.token,
                claims=None if state is State.NOT_ENTITLED else snap.claims,
                last_attempt_at=now,
                consecutive_failures=snap.consecutive_failures + 1,
                error=error,
            )
            return self._snap

    def first_answer_lost(self) -> Snapshot:
        """The first call's answer was lost: warn from now on, for the pod's life."""
        with self._lock:
            if not self._snap.first_answer_lost:
                self._snap = replace(
                    self._snap,
                    first_answer_lost=True,
                    warnings=(FIRST_ANSWER_LOST_WARNING, *self._snap.warnings),
                )
            return self._snap

    def revoked(self, error: ErrorInfo, now: float) -> Snapshot:
        """Custom mode with dry_run/none: AWS refused the pod's first real MeterUsage after
        the product was already served. Final, like a refusal at start."""
        with self._lock:
            self._snap = replace(
                self._snap,
                state=State.NOT_ENTITLED,
                final=True,
                token=None,
                claims=None,
                last_attempt_at=now,
                next_registration_at=None,
                consecutive_failures=self._snap.consecutive_failures + 1,
                error=error,
            )
            return self._snap

    def give_up(self, now: float) -> Snapshot:
        """The first-registration deadline passed: the last (retryable) error becomes final."""
        with self._lock:
            if self._snap.last_success_at is None:
                self._snap = replace(
                    self._snap,
                    state=State.NOT_ENTITLED,
                    final=True,
                    token=None,
                    claims=None,
                    next_registration_at=None,
                )
            return self._snap

    def scheduled(self, at: float | None) -> None:
        with self._lock:
            self._snap = replace(self._snap, next_registration_at=at)
