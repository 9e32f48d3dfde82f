"""The registration loop with a manual clock: retries, deadlines, re-registration, challenges.

The gateway here is a scripted stand-in for AWS (the edge); the loop, backoff, verification and
state machine are the real ones. End-to-end runs over HTTP are in test_integration.py.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.aws.errors import classify
from sidecar.aws.metering import AwsCallError, Registration
from sidecar.core.backoff import Backoff, ThrottleSchedule
from sidecar.entitlement.registrar import Policy, Registrar
from sidecar.entitlement.state import Entitlement, State
from tests.helpers import ManualClock, claims, new_key, sign

Step = Callable[[str], Registration]


class ScriptedAws:
    """Plays `script` in order (the last step repeats); records every nonce it is sent."""

    def __init__(self, clock: ManualClock, script: list[Any], key: rsa.RSAPrivateKey) -> None:
        self.clock, self.script, self.key = clock, script, key
        self.nonces: list[str] = []
        self.first: list[bool] = []

    def register_usage(
        self, product_code: str, version: int, nonce: str, *, first: bool = False
    ) -> Registration:
        self.nonces.append(nonce)
        self.first.append(first)
        step = self.script[min(len(self.nonces), len(self.script)) - 1]
        if isinstance(step, str) and step != "ok":
            raise AwsCallError(classify(step, "scripted"))
        if callable(step):
            return step(nonce)  # type: ignore[no-any-return]
        return Registration(sign(self.key, claims(nonce=nonce, iat=self.clock.t)), None, "req-1")


def make(
    script: list[Any],
    key: rsa.RSAPrivateKey,
    *,
    stop_after_waits: int | None = None,
    deadline: float = 3600.0,
    interval: float = 3600.0,
) -> tuple[Registrar, ScriptedAws, ManualClock]:
    clock = ManualClock(stop_after_waits)
    aws = ScriptedAws(clock, script, key)
    policy = Policy(
        product_code="prod-abc",
        public_key_version=1,
        keys={1: key.public_key()},
        interval=interval,
        deadline=deadline,
        backoff=Backoff(base=1.0, cap=60.0),
        challenge_rate=1.0,
        challenge_burst=2,
    )
    reg = Registrar(
        policy, lambda: aws, Entitlement(), clock, random.Random(3).random, threading.Event()
    )
    return reg, aws, clock


def test_first_registration_succeeds_with_a_fresh_long_nonce_each_call(
    key: rsa.RSAPrivateKey,
) -> None:
    reg, aws, _ = make(["ok"], key, stop_after_waits=3)
    reg.run()
    snap = reg.machine.snapshot()
    assert snap.state is State.ENTITLED and snap.claims is not None
    assert len(aws.nonces) == 3  # first + two re-registrations before stop
    assert len(set(aws.nonces)) == 3
    assert all(32 <= len(n) <= 255 for n in aws.nonces)
    assert snap.claims["nonce"] == aws.nonces[-1]


def test_5xx_and_network_errors_back_off_exponentially(key: rsa.RSAPrivateKey) -> None:
    script = ["InternalServiceErrorException", "EndpointConnectionError", "ReadTimeoutError", "ok"]
    reg, aws, clock = make(script, key, stop_after_waits=4)
    reg.run()
    assert reg.machine.snapshot().state is State.ENTITLED
    assert len(aws.nonces) == 4  # 3 retried failures, then success; the 4th wait stops it
    for n, delay in enumerate(clock.waits[:3], start=1):
        assert 0 <= delay < Backoff(1.0, 60.0).ceiling(n)


def test_throttles_land_in_successive_slots_after_the_first_attempt(
    key: rsa.RSAPrivateKey,
) -> None:
    script = ["ThrottlingException"] * 4 + ["ok"]
    reg, _, clock = make(script, key, stop_after_waits=5)
    attempts: list[float] = []
    original = reg.attempt

    def timed(nonce: str) -> Any:
        attempts.append(clock.mono)
        return original(nonce)

    reg.attempt = timed  # type: ignore[method-assign]
    reg.run()
    assert reg.machine.snapshot().state is State.ENTITLED
    first, *retries = attempts
    assert first == 0
    # The default (adaptive) windows follow each other from the first attempt.
    windows = [ThrottleSchedule().window(k) for k in (1, 2, 3, 4)]
    for at, (low, high) in zip(retries, windows, strict=True):
        assert low <= at < high


def test_terminal_error_stops_registration_for_good(key: rsa.RSAPrivateKey) -> None:
    reg, aws, clock = make(["CustomerNotEntitledException"], key)
    reg.run()
    snap = reg.machine.snapshot()
    assert (snap.state, snap.final) == (State.NOT_ENTITLED, True)
    assert snap.error is not None and snap.error.code == "CustomerNotEntitledException"
    assert len(aws.nonces) == 1 and clock.waits == []
    # A later call would succeed at AWS (errors come only on the first call): never make it.
    out = reg.challenge("product-nonce")
    assert out.status == "refused" and len(aws.nonces) == 1


def test_gives_up_at_the_deadline(key: rsa.RSAPrivateKey) -> None:
    reg, aws, clock = make(["ThrottlingException"], key, deadline=120)
    reg.run()
    snap = reg.machine.snapshot()
    assert (snap.state, snap.final) == (State.NOT_ENTITLED, True)
    assert snap.error is not None and snap.error.code == "ThrottlingException"
    assert clock.mono <= 120
    assert len(aws.nonces) == snap.consecutive_failures


def test_reregistration_failure_degrades_then_recovers(key: rsa.RSAPrivateKey) -> None:
    states: list[State] = []
    script: list[Any] = ["ok", "InternalServiceErrorException", "AccessDeniedException", "ok"]
    reg, _, clock = make(script, key, stop_after_waits=4, interval=100)
    original = reg.attempt

    def spy(nonce: str) -> Any:
        result = original(nonce)
        states.append(reg.machine.snapshot().state)
        return result

    reg.attempt = spy  # type: ignore[method-assign]
    reg.run()
    assert states == [State.ENTITLED, State.DEGRADED, State.DEGRADED, State.ENTITLED]
    # After the retryable failure the next try comes sooner than the interval.
    assert clock.waits[1] < 60
    assert 90 <= clock.waits[0] <= 110


def test_forged_token_on_reregistration_is_not_entitled(key: rsa.RSAPrivateKey) -> None:
    forger = new_key()

    def forged(nonce: str) -> Registration:
        return Registration(sign(forger, claims(nonce=nonce)), None, None)

    reg, _, _ = make(["ok", forged], key, stop_after_waits=2)
    reg.run()
    snap = reg.machine.snapshot()
    assert snap.state is State.NOT_ENTITLED and snap.token is None
    assert snap.error is not None
    assert snap.error.code == "TokenVerificationFailed:bad_signature"


def test_replayed_token_is_refused(key: rsa.RSAPrivateKey) -> None:
    old = sign(key, claims(nonce="an-earlier-nonce"))
    reg, _, _ = make([lambda nonce: Registration(old, None, None)], key)
    reg.run()
    snap = reg.machine.snapshot()
    assert snap.error is not None and snap.error.code.endswith("nonce_mismatch")
    assert snap.final


def test_challenge_uses_the_product_nonce_and_is_rate_limited(key: rsa.RSAPrivateKey) -> None:
    reg, aws, clock = make(["ok"], key)
    assert reg.first_registration()
    first = reg.challenge("product-nonce-1")
    assert first.status == "ok"
    assert first.snapshot.claims is not None
    assert first.snapshot.claims["nonce"] == "product-nonce-1"
    assert reg.challenge("product-nonce-2").status == "ok"
    limited = reg.challenge("product-nonce-3")
    assert limited.status == "rate_limited" and 0 < limited.retry_after <= 1
    assert len(aws.nonces) == 3
    clock.mono += 1
    assert reg.challenge("product-nonce-4").status == "ok"


def test_challenge_retries_retryable_then_reports_the_real_error(key: rsa.RSAPrivateKey) -> None:
    reg, aws, _ = make(["ok", "ThrottlingException", "ok"], key)
    assert reg.first_registration()
    assert reg.challenge("n").status == "ok" and aws.nonces[1:] == ["n", "n"]
    reg2, _, _ = make(["ok", "InvalidRegionException"], key)
    assert reg2.first_registration()
    out = reg2.challenge("n")
    assert out.status == "failed" and out.error is not None
    assert out.error.code == "InvalidRegionException"
