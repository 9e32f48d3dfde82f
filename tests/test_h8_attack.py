"""Issue 10, attacked again: holes found after the fixes, each pinned by a test."""

from __future__ import annotations

import pytest

from sidecar import client
from tests.helpers import new_key


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
