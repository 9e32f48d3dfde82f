"""The registration loop: first registration with retries, then periodic re-registration.

Each attempt: fresh nonce -> RegisterUsage -> verify the token -> update the state machine.
Retry policy and time come from injected objects (`Backoff`, `Clock`, `rng`), so the whole loop
runs deterministically in tests. I/O happens only in the gateway passed in.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from sidecar.aws.errors import (
    CLOCK_SKEW,
    FIRST_ANSWER_LOST,
    SIGV4_SKEW_SECONDS,
    ErrorInfo,
    clock_skew,
    first_answer_lost,
    may_have_reached_aws,
    state_dir_unwritable,
    verification_failure,
)
from sidecar.aws.metering import AwsCallError, Registration
from sidecar.core.backoff import Backoff, ThrottleSchedule, jittered
from sidecar.core.clock import Clock
from sidecar.core.ratelimit import TokenBucket
from sidecar.entitlement.marker import FirstCall, FirstCallMarker
from sidecar.entitlement.state import Entitlement, Snapshot, State
from sidecar.entitlement.verdict import VerdictStore
from sidecar.entitlement.verify import TokenError, verify_token

log = logging.getLogger(__name__)

NONCE_BYTES = 32  # 256 bits of randomness, 43 characters


def new_nonce() -> str:
    return secrets.token_urlsafe(NONCE_BYTES)


def token_fingerprint(token: str) -> str:
    """Enough to correlate log lines with a token, never enough to replay it."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


class Gateway(Protocol):
    def register_usage(
        self, product_code: str, version: int, nonce: str, *, first: bool = False
    ) -> Registration:
        """`first`: the pod's first call, whose answer cannot be asked for again (waits longer)."""


class Observer(Protocol):
    """Told about every attempt and challenge (metrics); must not raise."""

    def attempt(self, error: ErrorInfo | None) -> None: ...

    def challenge(self, result: str) -> None: ...


class _Silent:
    def attempt(self, error: ErrorInfo | None) -> None:
        pass

    def challenge(self, result: str) -> None:
        pass


class GatewaySetupError(Exception):
    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


@dataclass(frozen=True)
class Policy:
    product_code: str
    public_key_version: int
    keys: Mapping[int, RSAPublicKey]
    interval: float = 3600.0
    jitter: float = 0.1
    deadline: float = 3600.0
    backoff: Backoff = field(default_factory=Backoff)
    throttle: ThrottleSchedule = field(default_factory=ThrottleSchedule)
    clock_skew: float = SIGV4_SKEW_SECONDS
    challenge_rate: float = 1.0
    challenge_burst: int = 3
    challenge_deadline: float = 20.0
    # Every RegisterUsage call (registrar and challenges) takes a slot: the account's quota is
    # 5/s for all its pods, and retries must not multiply admitted challenges.
    aws_call_rate: float = 1.0
    aws_call_burst: int = 3
    # Refuse a pod whose first answer was lost instead of serving it with a warning.
    strict_first_answer: bool = False


@dataclass(frozen=True)
class ChallengeOutcome:
    """`status`: ok | rate_limited | registering (first verdict not known yet: no AWS call)
    | refused (terminal verdict already given) | failed."""

    status: str
    snapshot: Snapshot
    error: ErrorInfo | None = None
    retry_after: float = 0.0


class Registrar:
    def __init__(
        self,
        policy: Policy,
        gateway_factory: Callable[[], Gateway],
        machine: Entitlement,
        clock: Clock,
        rng: Callable[[], float],
        stop: threading.Event,
        nonce_factory: Callable[[], str] = new_nonce,
        verdicts: VerdictStore | None = None,
        observer: Observer | None = None,
        marker: FirstCallMarker | None = None,
    ) -> None:
        self.policy = policy
        self.machine = machine
        self._factory = gateway_factory
        self._gateway: Gateway | None = None
        self._gateway_lock = threading.Lock()
        self._clock = clock
        self._rng = rng
        self._stop = stop
        self._nonce = nonce_factory
        self._verdicts = verdicts
        self._observer: Observer = observer or _Silent()
        self._challenges = TokenBucket(
            policy.challenge_rate, policy.challenge_burst, clock.monotonic()
        )
        self._calls = TokenBucket(policy.aws_call_rate, policy.aws_call_burst, clock.monotonic())
        self._marker = marker or FirstCallMarker(None)
        # Where the pod's first call stands (see marker.py); `_doubt`: a call of the undecided
        # phase may have reached AWS without its answer reaching us.
        self._first = FirstCall.UNSENT
        self._doubt = False
        self._first_lock = threading.Lock()

    # -- one attempt ---------------------------------------------------------------------

    def _get_gateway(self) -> Gateway:
        with self._gateway_lock:
            if self._gateway is None:
                self._gateway = self._factory()
            return self._gateway

    def attempt(self, nonce: str) -> ErrorInfo | None:
        """One RegisterUsage call and verification; the state machine records the result."""
        snap = self.machine.snapshot()
        if snap.final:
            return snap.error  # a terminal verdict: never another call, whoever asks
        now = self._clock.time()
        self.machine.attempt(now)
        before = snap.state
        error: ErrorInfo | None = None
        first = False
        try:
            gateway = self._get_gateway()
        except GatewaySetupError as exc:
            error = exc.info
        if error is None:
            first, error = self._before_send()
        if error is None:
            try:
                reg = gateway.register_usage(
                    self.policy.product_code, self.policy.public_key_version, nonce, first=first
                )
            except AwsCallError as exc:
                error = exc.info
        if error is None:
            try:
                claims = verify_token(
                    reg.signature,
                    self.policy.keys,
                    product_code=self.policy.product_code,
                    public_key_version=self.policy.public_key_version,
                    nonce=nonce,
                    now=self._clock.time(),
                    leeway=self.policy.clock_skew,
                )
            except TokenError as exc:
                if exc.reason == "iat_in_future":
                    # The signature verified: AWS issued it; our clock is behind AWS's.
                    error = clock_skew(f"token {exc.message}; this machine's clock is behind")
                else:
                    error = verification_failure(exc.reason, exc.message)
                log.error(
                    "token_rejected",
                    extra={"reason": exc.reason, "token_sha256": token_fingerprint(reg.signature)},
                )
        undecided, error = self._after_call(first, error)
        if error is not None:
            snap = self.machine.failed(error, self._clock.time(), first_call=undecided)
            if snap.final and self._verdicts is not None:
                self._verdicts.save(error)
            log.log(
                logging.WARNING if snap.state is not State.NOT_ENTITLED else logging.ERROR,
                "register_failed",
                extra={
                    "code": error.code,
                    "kind": error.kind,
                    "hint": error.hint,
                    "request_id": error.request_id,
                    "state": snap.state.value,
                    "failures": snap.consecutive_failures,
                },
            )
        else:
            snap = self.machine.succeeded(reg.signature, claims, now, reg.rotation_at)
            # Quiet when nothing changed: an hourly success is not news.
            log.log(
                logging.INFO if snap.state is not before else logging.DEBUG,
                "registered",
                extra={
                    "state": snap.state.value,
                    "request_id": reg.request_id,
                    "token_sha256": token_fingerprint(reg.signature),
                },
            )
            for warning in snap.warnings:
                if not warning.startswith("first_answer_lost"):
                    log.warning("key_rotation", extra={"detail": warning})
        self._observer.attempt(error)
        if snap.state is not before:
            log.info(
                "state_changed",
                extra={
                    "from": before.value,
                    "to": snap.state.value,
                    "code": error.code if error else None,
                },
            )
        return error

    # -- the pod's first call ------------------------------------------------------------

    def _before_send(self) -> tuple[bool, ErrorInfo | None]:
        """(first, error): record "first call sent" before an undecided call leaves."""
        with self._first_lock:
            if self._first in (FirstCall.ANSWERED, FirstCall.LOST):
                return False, None
            if self._first is FirstCall.UNSENT:
                try:
                    self._marker.mark_sent()
                except OSError as exc:
                    log.error("first_call_marker_failed", extra={"detail": str(exc)})
                    return False, state_dir_unwritable(str(exc))
                self._first = FirstCall.SENT
            return True, None

    def _after_call(self, first: bool, error: ErrorInfo | None) -> tuple[bool, ErrorInfo | None]:
        """Update the first-call record. Returns (this answer decides the first registration,
        the error to record: in strict mode a possibly-lost first answer refuses the pod)."""
        if not first:
            return False, error
        with self._first_lock:
            if self._first not in (FirstCall.SENT, FirstCall.UNSENT):
                return False, error  # decided meanwhile
            if error is not None and may_have_reached_aws(error):
                if not self._doubt:
                    log.warning(
                        "first_answer_maybe_lost",
                        extra={"code": error.code, "strict": self.policy.strict_first_answer},
                    )
                self._doubt = True
                if not self.policy.strict_first_answer:
                    return True, error
                # Strict: no retry. It would be the pod's second call, which AWS answers with
                # a token (and bills) whatever the subscription.
                error = first_answer_lost(strict=True)
            elif error is not None and error.retryable and error.code != CLOCK_SKEW:
                if not self._doubt and self._first is FirstCall.SENT:
                    # Never left, or AWS answered and we saw it: no answer is out there.
                    self._marker.unmark_sent()
                    self._first = FirstCall.UNSENT
                return True, error
            # Decided: a token (even one our late clock cannot accept yet) or a refusal.
            refused = error is not None and error.kind in ("entitlement", "platform")
            # AWS refuses only a pod's first call: its refusal proves nothing was lost before.
            lost = self._doubt and (
                not refused or (error is not None and error.code == FIRST_ANSWER_LOST)
            )
            self._first = FirstCall.LOST if lost else FirstCall.ANSWERED
            if refused and error is not None and self._verdicts is not None:
                # Before "answered": a sidecar killed in between must leave its restart the
                # refusal, not an answered first call that makes its next call a re-registration.
                self._verdicts.save(error)
            self._marker.mark_answered(lost)
        if lost and not self.policy.strict_first_answer:
            self.machine.first_answer_lost()
            log.warning(
                "first_answer_lost",
                extra={
                    "detail": "the answer to this pod's first RegisterUsage call was lost; "
                    "AWS's entitlement check may have been missed (strict mode off: an "
                    "entitled pod is served with this warning)"
                },
            )
        return True, error

    # -- loops ---------------------------------------------------------------------------

    def run(self) -> None:
        """First registration, then re-register every interval until `stop` is set."""
        remembered = self._verdicts.load() if self._verdicts is not None else None
        if remembered is not None:
            self.machine.failed(remembered, self._clock.time())
            log.error("verdict_remembered", extra={"code": remembered.code})
            return
        if not self._resume_first_call():
            return
        if not self.first_registration():
            return
        while not self._stop.is_set():
            snap = self.machine.snapshot()
            if snap.final:
                return
            period = jittered(self.policy.interval, self.policy.jitter, self._rng)
            if snap.error is not None and snap.error.retryable:
                period = min(
                    period, self.policy.backoff.delay(snap.consecutive_failures, self._rng)
                )
            self.machine.scheduled(self._clock.time() + period)
            if self._clock.wait(self._stop, period) or not self._call_slot(None):
                return
            if self.machine.snapshot().final:  # a verdict may have come while we waited
                return
            self.attempt(self._nonce())

    def _resume_first_call(self) -> bool:
        """Pick up where an earlier sidecar in this pod left its first call. False: refused."""
        status = self._marker.status()
        with self._first_lock:
            self._first = status
            self._doubt = status in (FirstCall.SENT, FirstCall.LOST)
        if status is FirstCall.SENT:
            log.warning(
                "first_answer_maybe_lost",
                extra={
                    "detail": "an earlier sidecar in this pod sent the first RegisterUsage call "
                    "and recorded no answer (killed while it was in flight?)",
                    "strict": self.policy.strict_first_answer,
                },
            )
        if not self._doubt:
            return True
        if self.policy.strict_first_answer:
            error = first_answer_lost(strict=True)
            self.machine.failed(error, self._clock.time(), first_call=True)
            if self._verdicts is not None:
                self._verdicts.save(error)
            with self._first_lock:
                self._first = FirstCall.LOST
            self._marker.mark_answered(True)
            self._observer.attempt(error)
            log.error("register_failed", extra={"code": error.code, "hint": error.hint})
            return False
        if status is FirstCall.LOST:
            self.machine.first_answer_lost()
        return True

    def _call_slot(self, deadline_at: float | None) -> bool:
        """Wait for a slot of the sidecar-wide AWS call budget; False on stop or past deadline."""
        while not self._stop.is_set():
            now = self._clock.monotonic()
            wait = self._calls.take(now)
            if wait <= 0:
                return True
            if deadline_at is not None and now + wait > deadline_at:
                return False
            if self._clock.wait(self._stop, wait):
                return False
        return False

    def first_registration(self) -> bool:
        """Retry retryable errors until the deadline. False when registration is over.

        Throttles follow the fleet-aware `ThrottleSchedule`; other retryable errors (AWS 5xx,
        network, clock skew, region lookups) follow capped exponential backoff with full jitter.
        """
        started = self._clock.monotonic()
        deadline_at = started + self.policy.deadline
        failures = throttles = 0
        while not self._stop.is_set():
            if not self._call_slot(None):
                return False
            error = self.attempt(self._nonce())
            if error is None:
                return True
            if not error.retryable or self.machine.snapshot().final:
                return not self.machine.snapshot().final
            failures += 1
            now = self._clock.monotonic()
            if error.code == "ThrottlingException":
                throttles += 1
                delay = self.policy.throttle.delay(throttles, started, now, self._rng)
            else:
                delay = self.policy.backoff.delay(failures, self._rng)
            if now + delay > deadline_at:
                self.machine.give_up(self._clock.time())
                log.error(
                    "register_gave_up",
                    extra={"code": error.code, "hint": error.hint, "failures": failures},
                )
                return False
            self.machine.scheduled(self._clock.time() + delay)
            if self._clock.wait(self._stop, delay):
                return False
            if self.machine.snapshot().final:  # a verdict may have come while we waited
                return False
        return False

    # -- challenge -----------------------------------------------------------------------

    def challenge(self, nonce: str) -> ChallengeOutcome:
        """Register with the product's own nonce, so the product can verify the token itself."""
        outcome = self._challenge(nonce)
        self._observer.challenge(outcome.status)
        return outcome

    def _challenge(self, nonce: str) -> ChallengeOutcome:
        snap = self.machine.snapshot()
        if snap.final:
            return ChallengeOutcome("refused", snap, snap.error)
        if snap.last_success_at is None:
            # The first verdict is not known: a call now could be the pod's second, which AWS
            # answers with a token whatever the subscription. Never call AWS before it is.
            return ChallengeOutcome("registering", snap, snap.error, self._registering_retry(snap))
        wait = self._challenges.take(self._clock.monotonic())
        if wait > 0:
            return ChallengeOutcome("rate_limited", snap, None, retry_after=wait)
        deadline_at = self._clock.monotonic() + self.policy.challenge_deadline
        failures = 0
        while True:
            if not self._call_slot(deadline_at):
                snap = self.machine.snapshot()
                if snap.final:
                    return ChallengeOutcome("refused", snap, snap.error)
                return ChallengeOutcome("rate_limited", snap, None, retry_after=1.0)
            error = self.attempt(nonce)
            snap = self.machine.snapshot()
            if snap.final:  # a terminal verdict, whenever it came, is the answer
                return ChallengeOutcome("refused", snap, snap.error)
            if error is None:
                return ChallengeOutcome("ok", snap)
            failures += 1
            delay = self.policy.backoff.delay(failures, self._rng)
            if not error.retryable or self._clock.monotonic() + delay > deadline_at:
                return ChallengeOutcome("failed", snap, error)
            if self._clock.wait(self._stop, delay):
                return ChallengeOutcome("failed", snap, error)

    def _registering_retry(self, snap: Snapshot) -> float:
        """Seconds until the first verdict may be known: the next retry, else a second."""
        if snap.next_registration_at is not None:
            return min(30.0, max(1.0, snap.next_registration_at - self._clock.time()))
        return 1.0
