"""The pod's first RegisterUsage call: nothing may race it, a lost answer is never silent, and a
terminal verdict stops every caller. Manual clock, scripted AWS at the edge, real registrar,
state machine, marker files and router (no sockets); end to end in test_integration.py."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.aws.errors import classify
from sidecar.aws.metering import Registration
from sidecar.core.backoff import Backoff
from sidecar.entitlement.marker import ANSWERED, SENT, FirstCallMarker
from sidecar.entitlement.registrar import Policy, Registrar
from sidecar.entitlement.state import Entitlement, State
from sidecar.entitlement.verdict import VerdictStore
from sidecar.server.api import Router
from tests.helpers import ManualClock, claims, sign
from tests.test_registrar import ScriptedAws

NOT_ENTITLED = classify("CustomerNotEntitledException", "customer is not subscribed")


class HookClock(ManualClock):
    """A manual clock that runs `on_wait` while the code under test waits."""

    def __init__(self) -> None:
        super().__init__()
        self.on_wait: Any = None

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        if self.on_wait is not None:
            self.on_wait()
        return super().wait(stop, seconds)


def build(
    script: list[Any],
    key: rsa.RSAPrivateKey,
    state_dir: Path | None = None,
    *,
    strict: bool = False,
    stop_after_waits: int | None = None,
    call_rate: float = 100.0,
    call_burst: int = 100,
    backoff: Backoff | None = None,
) -> tuple[Registrar, ScriptedAws, HookClock]:
    clock = HookClock()
    clock.stop_after_waits = stop_after_waits
    aws = ScriptedAws(clock, script, key)
    policy = Policy(
        product_code="prod-abc",
        public_key_version=1,
        keys={1: key.public_key()},
        backoff=backoff or Backoff(base=1.0, cap=60.0),
        challenge_rate=100.0,
        challenge_burst=100,
        aws_call_rate=call_rate,
        aws_call_burst=call_burst,
        strict_first_answer=strict,
    )
    reg = Registrar(
        policy,
        lambda: aws,
        Entitlement(),
        clock,
        random.Random(5).random,
        threading.Event(),
        verdicts=VerdictStore(state_dir, "prod-abc") if state_dir else None,
        marker=FirstCallMarker(state_dir),
    )
    return reg, aws, clock


def challenge_reply(reg: Registrar, nonce: str = "product-nonce") -> Any:
    return Router(reg, lambda: None).handle(
        "POST", "/v1/entitlement/challenge", json.dumps({"nonce": nonce}).encode()
    )


# -- item 1: nothing calls AWS before the first verdict is known ----------------------------


def test_a_challenge_while_registering_answers_503_at_once_and_makes_no_call(
    key: rsa.RSAPrivateKey,
) -> None:
    reg, aws, _ = build(["InternalServiceErrorException"], key)
    reg.attempt("registrar-nonce")  # the first call failed; the registrar will retry
    assert reg.machine.snapshot().state is State.REGISTERING
    reply = challenge_reply(reg)
    assert reply.status == 503
    assert reply.body["error"]["code"] == "registering"
    assert 1 <= int(reply.headers["Retry-After"]) <= 30
    assert aws.nonces == ["registrar-nonce"]  # the challenge never reached AWS


def test_a_first_call_refusal_stands_even_if_a_later_call_got_a_token() -> None:
    machine = Entitlement()
    machine.succeeded("token-of-a-racing-call", {"iat": 1}, 1.0, None)
    snap = machine.failed(NOT_ENTITLED, 2.0, first_call=True)
    assert (snap.state, snap.final, snap.token) == (State.NOT_ENTITLED, True, None)
    # The same error on a re-registration is no revocation (AWS cannot send it then).
    other = Entitlement()
    other.succeeded("tok", {"iat": 1}, 1.0, None)
    assert other.failed(NOT_ENTITLED, 2.0).state is State.DEGRADED


# -- item 3: after a terminal verdict, zero calls ---------------------------------------------


def test_a_verdict_given_while_the_first_registration_waits_stops_it(
    key: rsa.RSAPrivateKey,
) -> None:
    reg, aws, clock = build(["InternalServiceErrorException", "ok"], key)
    clock.on_wait = lambda: reg.machine.failed(NOT_ENTITLED, clock.t, first_call=True)
    reg.run()
    snap = reg.machine.snapshot()
    assert (snap.state, snap.final) == (State.NOT_ENTITLED, True)
    assert len(aws.nonces) == 1  # no call after the wait


def test_a_verdict_given_while_the_registrar_sleeps_stops_reregistration(
    key: rsa.RSAPrivateKey,
) -> None:
    reg, aws, clock = build(["ok"], key, stop_after_waits=3)
    clock.on_wait = lambda: reg.machine.failed(NOT_ENTITLED, clock.t, first_call=True)
    reg.run()
    assert len(aws.nonces) == 1
    assert reg.attempt("anyone") is not None and len(aws.nonces) == 1


# -- item 4: a challenge that returns after a final verdict answers 403 ----------------------


def test_a_challenge_whose_call_returns_after_a_final_verdict_is_refused_403(
    key: rsa.RSAPrivateKey,
) -> None:
    reg, aws, clock = build(["ok"], key)
    assert reg.first_registration()

    def late_refusal(nonce: str) -> Registration:
        # The pod's first answer arrives while the challenge's own call is in flight.
        reg.machine.failed(NOT_ENTITLED, clock.t, first_call=True)
        return Registration(sign(key, claims(nonce=nonce, iat=clock.t)), None, "req-2")

    aws.script = ["ok", late_refusal]
    reply = challenge_reply(reg)
    assert reply.status == 403
    assert reply.body["state"] == "not_entitled" and reply.body["token"] is None
    assert reply.body["error"]["code"] == "CustomerNotEntitledException"


# -- item 2: a lost first answer is visible, and refusable -----------------------------------


def test_a_read_timeout_on_the_first_call_then_a_token_warns(
    key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    reg, aws, _ = build(["ReadTimeoutError", "ok"], key, tmp_path, stop_after_waits=3)
    reg.run()
    snap = reg.machine.snapshot()
    assert snap.state is State.ENTITLED and snap.first_answer_lost
    assert any(w.startswith("first_answer_lost") for w in snap.warnings)
    assert aws.first[:2] == [True, True]  # both used the longer first-call timeout
    assert json.loads((tmp_path / ANSWERED).read_text()) == {"first_answer_lost": True}
    # The warning survives later re-registrations (it is about the pod, not one call).
    assert len(aws.nonces) >= 3 and reg.machine.snapshot().first_answer_lost
    assert aws.first[2:] == [False] * (len(aws.nonces) - 2)


def test_strict_mode_refuses_a_pod_whose_first_answer_was_lost_without_calling_again(
    key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    reg, aws, _ = build(["ConnectionClosedError", "ok"], key, tmp_path, strict=True)
    reg.run()
    snap = reg.machine.snapshot()
    assert (snap.state, snap.final) == (State.NOT_ENTITLED, True)
    assert snap.error is not None and snap.error.code == "FirstAnswerLost"
    assert len(aws.nonces) == 1  # a retry would be the pod's second call: AWS would bill it
    assert challenge_reply(reg).status == 403


@pytest.mark.parametrize("code", ["EndpointConnectionError", "ConnectTimeoutError"])
def test_a_call_that_never_left_is_not_a_lost_answer(
    key: rsa.RSAPrivateKey, tmp_path: Path, code: str
) -> None:
    reg, _, _ = build([code, "ok"], key, tmp_path, strict=True)
    assert reg.first_registration()
    snap = reg.machine.snapshot()
    assert snap.state is State.ENTITLED and not snap.first_answer_lost and snap.warnings == ()
    assert json.loads((tmp_path / ANSWERED).read_text()) == {"first_answer_lost": False}


def test_a_refusal_after_a_lost_answer_proves_the_first_call_never_arrived(
    key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    reg, _, _ = build(["ReadTimeoutError", "CustomerNotEntitledException"], key, tmp_path)
    reg.run()
    snap = reg.machine.snapshot()
    assert (snap.state, snap.final, snap.first_answer_lost) == (State.NOT_ENTITLED, True, False)
    assert snap.error is not None and snap.error.code == "CustomerNotEntitledException"


def test_a_restart_after_a_kill_during_the_first_call_warns_or_refuses(
    key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    (tmp_path / SENT).write_text("{}")  # what a sidecar killed mid-call leaves behind
    fresh, aws, _ = build(["ok"], key, tmp_path, stop_after_waits=1)
    fresh.run()
    snap = fresh.machine.snapshot()
    assert snap.state is State.ENTITLED and snap.first_answer_lost
    assert aws.first[0] is True
    strict, aws3, _ = build(["ok"], key, tmp_path, strict=True)
    strict.run()
    snap = strict.machine.snapshot()
    assert (snap.state, snap.final) == (State.NOT_ENTITLED, True)
    assert snap.error is not None and snap.error.code == "FirstAnswerLost"
    assert aws3.nonces == []  # strict: not a single call


def test_a_restart_after_an_answered_first_call_does_not_warn(
    key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    first, _, _ = build(["ThrottlingException", "ok"], key, tmp_path)
    assert first.first_registration()
    again, aws, _ = build(["ok"], key, tmp_path, strict=True, stop_after_waits=1)
    again.run()
    snap = again.machine.snapshot()
    assert snap.state is State.ENTITLED and not snap.first_answer_lost
    assert aws.first == [False]  # a re-registration from AWS's point of view


def test_killed_while_backing_off_from_an_aws_answer_is_not_a_lost_answer(
    key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    reg, _, _ = build(["ThrottlingException"], key, tmp_path)
    reg.attempt("n")  # AWS answered (throttled); then the sidecar is killed while waiting
    assert not (tmp_path / SENT).exists()
    again, _, _ = build(["ok"], key, tmp_path, strict=True)
    assert again._resume_first_call() and again.first_registration()
    assert not again.machine.snapshot().first_answer_lost


def test_an_unwritable_state_dir_makes_no_call(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    reg, aws, _ = build(["ok"], key, gone)
    error = reg.attempt("n")
    assert error is not None and error.code == "StateDirUnwritable" and error.retryable
    assert aws.nonces == []


# -- item 9: clock skew is retried, not a forgery ---------------------------------------------


def test_a_token_from_the_future_is_a_clock_problem_that_heals(key: rsa.RSAPrivateKey) -> None:
    reg, aws, clock = build([], key)

    def ahead(nonce: str) -> Registration:
        return Registration(sign(key, claims(nonce=nonce, iat=clock.t + 330)), None, None)

    aws.script = [ahead, ahead, "ok"]
    assert reg.first_registration()
    snap = reg.machine.snapshot()
    assert snap.state is State.ENTITLED and len(aws.nonces) == 3
    reg2, aws2, clock2 = build([], key)
    aws2.script = [
        lambda n: Registration(sign(key, claims(nonce=n, iat=clock2.t + 330)), None, None)
    ]
    reg2.attempt("n")
    snap2 = reg2.machine.snapshot()
    assert (snap2.state, snap2.final) == (State.REGISTERING, False)
    assert snap2.error is not None
    assert (snap2.error.code, snap2.error.kind, snap2.error.retryable) == (
        "ClockSkew",
        "clock",
        True,
    )
    assert "synchronise the node clock" in snap2.error.hint


# -- item 8: one AWS call budget for the registrar and challenges -----------------------------


def test_challenge_retries_share_the_aws_call_budget(key: rsa.RSAPrivateKey) -> None:
    reg, aws, clock = build(
        ["ok", "InternalServiceErrorException"],
        key,
        call_rate=1.0,
        call_burst=2,
        backoff=Backoff(base=0.05, cap=0.2),
    )
    assert reg.first_registration()
    started = clock.mono
    out = reg.challenge("n")
    assert out.status in ("failed", "rate_limited")
    elapsed = clock.mono - started
    assert 19 <= elapsed <= 20  # retried until the 20 s challenge deadline...
    # ...at the budget's pace: 1/s plus the one slot left of the burst, not every ~0.1 s.
    assert len(aws.nonces) - 1 <= 1 + elapsed * 1.0
