"""The entitlement path's edges: a bad sidecar URL in the client, a kill right after the first
refusal, a key version in non-ASCII digits; each a hole once found, pinned by a test."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar import client
from sidecar.aws.errors import ErrorInfo
from sidecar.entitlement.marker import FirstCallMarker
from sidecar.entitlement.state import State
from sidecar.entitlement.verdict import VerdictStore
from sidecar.entitlement.verify import TokenError, verify_token
from tests.helpers import NOW, claims, new_key, sign
from tests.test_first_call import build


@pytest.mark.parametrize(
    "url",
    [
        "http://a..b:8787",  # empty label: the name lookup's IDNA step raises UnicodeError
        "http://" + "a" * 70 + ":8787",  # a label over 63 characters: same
        "http://[::1:8787",  # unbalanced bracket: urlsplit raises ValueError
    ],
)
def test_client_bad_sidecar_url_is_an_entitlement_error(url: str) -> None:
    """The documented `except EntitlementError` must catch a mistyped sidecar URL too."""
    with pytest.raises(client.EntitlementError) as caught:
        client.challenge(new_key().public_key(), "prod", url=url, timeout=2)
    assert caught.value.reason == "bad_url"


class _CrashAtAnswered(FirstCallMarker):
    """Records what a sidecar SIGKILLed right after `first-call.answered` is written would
    leave for its restart: the verdict file as it is on disk at that instant."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.verdict_on_disk: object = "never answered"

    def mark_answered(self, lost: bool) -> None:
        assert self.directory is not None
        self.verdict_on_disk = VerdictStore(self.directory, "prod-abc").load()
        super().mark_answered(lost)


def test_a_kill_right_after_the_first_refusal_is_marked_answered_keeps_the_refusal(
    key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    """`answered` without the verdict beside it lets a restart call again as a re-registration,
    which AWS answers with a token: the unsubscribed pod would become entitled."""
    marker = _CrashAtAnswered(tmp_path)
    reg, _, _ = build(["CustomerNotEntitledException"], key, tmp_path)
    reg._marker = marker
    reg.run()
    assert reg.machine.snapshot().state is State.NOT_ENTITLED
    remembered = marker.verdict_on_disk
    assert isinstance(remembered, ErrorInfo) and remembered.kind == "entitlement"


@pytest.mark.parametrize("version", ["\u00b2", "\u0661"])  # superscript two, Arabic-Indic one
def test_a_non_ascii_digit_key_version_is_a_token_error(
    key: rsa.RSAPrivateKey, version: str
) -> None:
    """`str.isdigit` accepts "²", which `int` refuses: that must be a TokenError, never a
    ValueError that escapes verify_token (and the registrar's or the product's handler)."""
    token = sign(key, claims(nonce="n-1", publicKeyVersion=version))
    with pytest.raises(TokenError) as caught:
        verify_token(
            token,
            {1: key.public_key()},
            product_code=claims()["productCode"],
            public_key_version=1,
            nonce="n-1",
            now=NOW,
        )
    assert caught.value.reason == "key_version_mismatch"
