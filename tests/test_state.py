"""The entitlement state machine, event by event."""

from __future__ import annotations

from sidecar.aws.errors import classify, verification_failure
from sidecar.entitlement.state import Entitlement, State

THROTTLED = classify("ThrottlingException", "slow down")
NOT_ENTITLED = classify("CustomerNotEntitledException", "no")
BAD_TOKEN = verification_failure("bad_signature", "forged")


def test_retryable_failures_keep_registering_until_give_up() -> None:
    m = Entitlement()
    assert m.failed(THROTTLED, 1).state is State.REGISTERING
    assert m.failed(THROTTLED, 2).state is State.REGISTERING
    snap = m.give_up(3)
    assert (snap.state, snap.final, snap.consecutive_failures) == (State.NOT_ENTITLED, True, 2)
    assert snap.error is not None and snap.error.code == "ThrottlingException"


def test_terminal_first_failure_is_final_and_later_success_cannot_undo_it() -> None:
    m = Entitlement()
    snap = m.failed(NOT_ENTITLED, 1)
    assert (snap.state, snap.final, snap.entitled) == (State.NOT_ENTITLED, True, False)
    assert m.succeeded("tok", {"iat": 2}, 2, None).state is State.NOT_ENTITLED


def test_failure_after_success_is_degraded_never_revocation() -> None:
    m = Entitlement()
    m.succeeded("tok", {"iat": 1}, 1, None)
    for error in (THROTTLED, NOT_ENTITLED, classify("AccessDeniedException", "iam")):
        snap = m.failed(error, 2)
        assert snap.state is State.DEGRADED
        assert snap.entitled and snap.token == "tok"
    snap = m.succeeded("tok2", {"iat": 3}, 3, None)
    assert (snap.state, snap.consecutive_failures, snap.error) == (State.ENTITLED, 0, None)


def test_bad_token_after_success_is_not_entitled_until_a_verified_token() -> None:
    m = Entitlement()
    m.succeeded("tok", {"iat": 1}, 1, None)
    snap = m.failed(BAD_TOKEN, 2)
    assert (snap.state, snap.token, snap.final) == (State.NOT_ENTITLED, None, False)
    assert m.failed(THROTTLED, 3).state is State.NOT_ENTITLED  # a hiccup does not restore it
    assert m.succeeded("tok2", {"iat": 4}, 4, None).state is State.ENTITLED


def test_bad_token_on_first_registration_is_final() -> None:
    snap = Entitlement().failed(BAD_TOKEN, 1)
    assert (snap.state, snap.final) == (State.NOT_ENTITLED, True)


def test_key_rotation_timestamp_becomes_a_warning() -> None:
    snap = Entitlement().succeeded("tok", {}, 1, rotation_at=1_700_000_000)
    assert snap.state is State.ENTITLED
    assert "MARKETPLACE_PUBLIC_KEY_VERSION" in snap.warnings[0]
