"""The pure license state machine and the check of CheckoutLicense's answer."""

from __future__ import annotations

from sidecar.aws.errors import ErrorInfo
from sidecar.aws.license import Checkout, parse_time, redact
from sidecar.config import parse_license_entitlements
from sidecar.entitlement.license import Held, License, LicenseState, ready, verify_checkout

ASKED = ({"Name": "Seats", "Unit": "Count", "Value": "2"}, {"Name": "Premium", "Unit": "None"})
ISSUED = "2026-12-07T10:00:00Z"


def answer(
    allowed: tuple[dict[str, str], ...], expiration: str = "2026-12-07T11:00:00Z"
) -> Checkout:
    return Checkout("tok", allowed, ISSUED, expiration, "arn:x", "PROVISIONAL", None, None)


def test_a_subset_is_allowed_but_nothing_foreign_or_short() -> None:
    now = parse_time(ISSUED) or 0.0
    assert verify_checkout(ASKED, answer(({"Name": "Premium", "Unit": "None"},)), now)[0] is None
    err, _ = verify_checkout(ASKED, answer(({"Name": "Other", "Unit": "None"},)), now)
    assert err is not None and "was not asked for" in err.message
    err, _ = verify_checkout(
        ASKED, answer(({"Name": "Seats", "Unit": "Count", "Value": "1"},)), now
    )
    assert err is not None and "1 allowed, 2 asked" in err.message
    err, _ = verify_checkout(ASKED, answer(()), now)
    assert err is not None and "empty" in err.message
    err, _ = verify_checkout(ASKED, answer(ASKED, expiration=ISSUED), now)
    assert err is not None and "Expiration is not after IssuedAt" in err.message
    err, _ = verify_checkout(ASKED, answer(ASKED, expiration="tomorrow"), now)
    assert err is not None and "ISO 8601" in err.message


def test_skew_is_a_warning_not_a_failure() -> None:
    now = (parse_time(ISSUED) or 0.0) + 3600
    err, warnings = verify_checkout(ASKED, answer(ASKED), now)
    assert err is None and warnings[0].startswith("clock_skew")


def test_deadline_counts_aws_durations_on_the_monotonic_clock() -> None:
    held = Held(answer(ASKED), sent_at=100.0, issued_at=0.0, expiration=3600.0, checked_at=0.0)
    assert held.deadline == 3700.0 and held.extend_at == 1900.0
    later = Held(answer(ASKED), 100.0, 0.0, expiration=5400.0, checked_at=0.0, renewed_at=1900.0)
    assert later.extend_at == 1900.0 + (5500.0 - 1900.0) / 2  # half of what AWS granted last


def test_states_and_readiness() -> None:
    m = License()
    assert m.snapshot().state is LicenseState.CHECKING and not ready(m.snapshot(), "serve")
    held = Held(answer(ASKED), 0.0, 0.0, 10.0, 0.0)
    m.checked_out(held, (), 0.0)
    error = ErrorInfo("ServerInternalException", "", "", "transient", True)
    m.failed(error, 0.0)
    assert m.snapshot().state is LicenseState.EXTENDING and ready(m.snapshot(), "unready")
    assert not m.expire(9.9) and m.expire(10.0)
    assert m.snapshot().state is LicenseState.EXPIRED
    assert not ready(m.snapshot(), "unready") and ready(m.snapshot(), "serve")
    never = License()
    never.failed(
        ErrorInfo("NoEntitlementsAllowedException", "", "", "entitlement", False), 0.0, final=True
    )
    assert not ready(never.snapshot(), "serve")  # "serve" keeps a license once held, no more


def test_entitlements_setting_parses_to_checkout_shape() -> None:
    parsed = parse_license_entitlements('[{"name": "Seats", "unit": "Count", "value": 3}]')
    assert parsed == ({"Name": "Seats", "Unit": "Count", "Value": "3"},)
    for bad, says in [
        ("{}", "JSON list"),
        ('[{"name": "a", "unit": "None", "value": 1}]', "takes no value"),
        ('[{"name": "a", "unit": "Count", "value": 0}]', "whole number"),
        ('[{"name": "a b", "unit": "Count"}]', "without spaces"),
        ('[{"name": "a", "unit": "Count"}, {"name": "a", "unit": "Count"}]', "twice"),
        ('[{"name": "a", "unit": "Count", "extra": 1}]', "unknown key"),
    ]:
        try:
            parse_license_entitlements(bad)
        except ValueError as exc:
            assert says in str(exc)
        else:
            raise AssertionError(f"accepted {bad}")


def test_redact_never_shows_the_token() -> None:
    token = "f1603b3c1f574b7284db84a9e771ee12"
    shown = redact(token) or ""
    assert token not in shown and shown.startswith("f160") and "32" in shown


def test_readiness_judges_the_deadline_itself_while_the_worker_is_stuck() -> None:
    """The worker marks a checkout expired only between calls: one stuck in a call whose
    answer drips in for tens of seconds must not keep /readyz green past the deadline."""
    m = License()
    m.checked_out(Held(answer(ASKED), 0.0, 0.0, 10.0, 0.0), (), 0.0)
    snap = m.snapshot()  # still CHECKED_OUT: nobody called expire()
    assert ready(snap, "unready", now=9.9) and not ready(snap, "unready", now=10.0)
    assert ready(snap, "serve", now=10.0)  # "serve" keeps a license once held
    assert ready(snap, "unready", now=10.0, expires=False)  # PERPETUAL: no local expiry
