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

from sidecar.aws.errors import ErrorInfo, verification_failure
from sidecar.aws.metering import AwsCallError, Registration
from sidecar.core.backoff import Backoff, ThrottleSchedule, jittered
from sidecar.core.clock import Clock
from sidecar.core.ratelimit import TokenBucket
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
    def register_usage(self, product_code: str, version: int, nonce: str) -> Registration: ...


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
    clock_skew: float = 300.0
    challenge_rate: float = 1.0
    challenge_burst: int = 3
    challenge_deadline: float = 20.0


@dataclass(frozen=True)
class ChallengeOutcome:
    """`status`: ok | rate_limited | refused (terminal verdict already given) | failed."""

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

    # -- one attempt ---------------------------------------------------------------------

    def _get_gateway(self) -> Gateway:
        with self._gateway_lock:
            if self._gateway is None:
                self._gateway = self._factory()
            return self._gateway

    def attempt(self, nonce: str) -> ErrorInfo | None:
        """One RegisterUsage call and verification; the state machine records the result."""
        now = self._clock.time()
        self.machine.attempt(now)
        before = self.machine.snapshot().state
        error: ErrorInfo | None = None
        try:
            reg = self._get_gateway().register_usage(
                self.policy.product_code, self.policy.public_key_version, nonce
            )
        except GatewaySetupError as exc:
            error = exc.info
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
                error = verification_failure(exc.reason, exc.message)
                log.error(
                    "token_rejected",
                    extra={"reason": exc.reason, "token_sha256": token_fingerprint(reg.signature)},
                )
        if error is not None:
            snap = self.machine.failed(error, self._clock.time())
            if snap.final and self._verdicts is not None:
                self._verdicts.save(error)
            log.log(
                logging.WARNING if snap.state is not State.NOT_ENTITLED else logging.ERROR,
                "register_failed",
                extra={
                    "code": error.code,
                    "kind": error.kind,
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

    # -- loops ---------------------------------------------------------------------------

    def run(self) -> None:
        """First registration, then re-register every interval until `stop` is set."""
        remembered = self._verdicts.load() if self._verdicts is not None else None
        if remembered is not None:
            self.machine.failed(remembered, self._clock.time())
            log.error("verdict_remembered", extra={"code": remembered.code})
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
            if self._clock.wait(self._stop, period):
                return
            self.attempt(self._nonce())

    def first_registration(self) -> bool:
        """Retry retryable errors until the deadline. False when registration is over.

        Throttles follow the fleet-aware `ThrottleSchedule`; other retryable errors (AWS 5xx,
        network) follow capped exponential backoff with full jitter.
        """
        started = self._clock.monotonic()
        deadline_at = started + self.policy.deadline
        failures = throttles = 0
        while not self._stop.is_set():
            error = self.attempt(self._nonce())
            if error is None:
                return True
            if not error.retryable:
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
                log.error("register_gave_up", extra={"code": error.code, "failures": failures})
                return False
            self.machine.scheduled(self._clock.time() + delay)
            if self._clock.wait(self._stop, delay):
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
        wait = self._challenges.take(self._clock.monotonic())
        if wait > 0:
            return ChallengeOutcome("rate_limited", snap, None, retry_after=wait)
        deadline_at = self._clock.monotonic() + self.policy.challenge_deadline
        failures = 0
        while True:
            error = self.attempt(nonce)
            snap = self.machine.snapshot()
            if error is None:
                return ChallengeOutcome("ok", snap)
            failures += 1
            delay = self.policy.backoff.delay(failures, self._rng)
            if not error.retryable or self._clock.monotonic() + delay > deadline_at:
                return ChallengeOutcome("failed", snap, error)
            if self._clock.wait(self._stop, delay):
                return ChallengeOutcome("failed", snap, error)
