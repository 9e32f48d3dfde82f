"""`sidecar.client.resolve_customer` against a hostile sidecar: one deadline for the whole call,
caps on the answer, no redirects, and every failure a `CustomerError` with a stable reason."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest

from sidecar import client
from tests.test_client_hostile import (
    Behaviour,
    HostileSidecar,
    answer,
    declared_huge,
    drip,
    endless_body,
    send,
    silent,
)

TIMEOUT = 2.0
MARGIN = 0.75
FAST = 1.0
SLOW = TIMEOUT + MARGIN
CUSTOMER = b'{"customer_aws_account_id": "123456789012", "license_arn": "arn:aws:x"}'


@dataclass
class Case:
    behave: Behaviour
    reason: str
    within: float = FAST
    retry_after: tuple[float, float] | None = None
    hint: str | None = None


CASES: dict[str, Case] = {
    "drip_headers": Case(drip(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 500), "timeout", SLOW),
    "drip_body": Case(
        drip(b"HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n", b'{"customer_aws_' + b"a" * 880),
        "timeout",
        SLOW,
    ),
    "never_answers": Case(silent, "timeout", SLOW),
    "closes_at_once": Case(send(b""), "bad_answer"),
    "not_http": Case(send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), "bad_answer"),
    "declared_100mb": Case(declared_huge, "bad_answer"),
    "endless_body": Case(endless_body, "bad_answer"),
    "nested_60000_on_200": Case(answer("200 OK", b"[" * 60_000), "bad_answer"),
    "json_list": Case(answer("200 OK", b"[1, 2]"), "bad_answer"),
    "no_customer_in_200": Case(answer("200 OK", b'{"customer_aws_account_id": 5}'), "bad_answer"),
    "redirect": Case(
        answer("307 Temporary Redirect", b"{}", "Location: http://169.254.169.254/"),
        "sidecar_307",
    ),
    "invalid_token": Case(
        answer("400 Bad Request", b'{"error": {"code": "invalid_token", "message": "no"}}'),
        "invalid_token",
    ),
    "expired_token": Case(
        answer(
            "410 Gone",
            b'{"error": {"code": "expired_token", "message": "late", "hint": "redeem at once"}}',
        ),
        "expired_token",
        hint="redeem at once",
    ),
    "store_down": Case(
        answer("503 Service Unavailable", b'{"error": {"code": "x"}}', "Retry-After: 7"),
        "unavailable",
        retry_after=(7.0, 7.0),
    ),
    "retry_after_forever": Case(
        answer("503 Service Unavailable", b"{}", "Retry-After: 99999999999"),
        "unavailable",
        retry_after=(600.0, 600.0),
    ),
    "other_mode": Case(
        answer("404 Not Found", b'{"error": {"code": "customers_need_saas_mode"}}'),
        "not_saas_mode",
    ),
    "bad_request": Case(answer("400 Bad Request", b'{"error": {"code": "x"}}'), "invalid"),
    "error_is_a_string": Case(answer("500 Oops", b'{"error": "go away"}'), "sidecar_500"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_resolve_customer_fails_closed_within_its_deadline(name: str) -> None:
    case = CASES[name]
    sidecar = HostileSidecar(case.behave)
    try:
        started = time.monotonic()
        with pytest.raises(client.CustomerError) as caught:
            client.resolve_customer("tok-1", url=sidecar.url, timeout=TIMEOUT)
        took = time.monotonic() - started
    finally:
        sidecar.close()
    err = caught.value
    assert err.reason == case.reason, err
    assert took <= case.within, f"{name}: {took:.2f} s"
    if case.retry_after is not None:
        low, high = case.retry_after
        assert err.retry_after is not None and low <= err.retry_after <= high
    assert err.hint == case.hint
    assert err.message.isprintable()


def test_a_customer_is_returned_and_the_token_sent_once_as_json() -> None:
    sidecar = HostileSidecar(answer("200 OK", CUSTOMER))
    try:
        got = client.resolve_customer("tok-abc", url=sidecar.url, timeout=TIMEOUT)
    finally:
        sidecar.close()
    assert got == json.loads(CUSTOMER)
    assert len(sidecar.requests) == 1
    head, _, body = sidecar.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/customers/resolve HTTP/1.1\r\n")
    assert json.loads(body) == {"registration_token": "tok-abc"}


@pytest.mark.parametrize(
    "token", ["", "x" * (client.MAX_REGISTRATION_TOKEN_CHARS + 1), "tok\r\nX-Evil: 1", "tök", 42]
)
def test_a_bad_token_is_refused_before_any_call(token: object) -> None:
    sidecar = HostileSidecar(answer("200 OK", CUSTOMER))
    try:
        with pytest.raises(client.CustomerError) as caught:
            client.resolve_customer(token, url=sidecar.url)  # type: ignore[arg-type]
    finally:
        sidecar.close()
    assert caught.value.reason == "invalid_token"
    assert sidecar.requests == []


def test_a_missing_sidecar_and_a_bad_url_are_named() -> None:
    with pytest.raises(client.CustomerError) as caught:
        client.resolve_customer("t", url="http://127.0.0.1:9", timeout=TIMEOUT)
    assert caught.value.reason == "no_sidecar"
    with pytest.raises(client.CustomerError) as caught:
        client.resolve_customer("t", url="https://user@127.0.0.1:1")
    assert caught.value.reason == "bad_url"
    with pytest.raises(ValueError, match="timeout"):
        client.resolve_customer("t", timeout=float("inf"))
