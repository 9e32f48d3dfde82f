"""Token verification: what is accepted, and every way a forged or replayed token is refused."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.entitlement.verify import MAX_TOKEN_CHARS, TokenError, verify_token
from tests.helpers import NOW, claims, new_key, sign


def check(token: object, key: rsa.RSAPrivateKey, nonce: str = "n-1", **kw: Any) -> dict[str, Any]:
    return verify_token(
        token,
        {1: key.public_key()},
        product_code="prod-abc",
        public_key_version=1,
        nonce=nonce,
        now=NOW,
        **kw,
    )


def reason(token: object, key: rsa.RSAPrivateKey, **kw: Any) -> str:
    with pytest.raises(TokenError) as info:
        check(token, key, **kw)
    return info.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_genuine_token_returns_its_claims(key: rsa.RSAPrivateKey) -> None:
    assert check(sign(key, claims()), key) == claims()


def test_unknown_claims_are_ignored(key: rsa.RSAPrivateKey) -> None:
    got = check(sign(key, claims(extra="x", exp=1)), key)
    assert got["extra"] == "x"


def test_key_version_as_decimal_string_is_accepted(key: rsa.RSAPrivateKey) -> None:
    assert check(sign(key, claims(publicKeyVersion="1")), key)["publicKeyVersion"] == "1"


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"productCode": "free-product"}, "product_code_mismatch"),
        ({"publicKeyVersion": 2}, "key_version_mismatch"),
        ({"publicKeyVersion": True}, "key_version_mismatch"),
        ({"publicKeyVersion": 1.0}, "key_version_mismatch"),
        ({"nonce": "n-0"}, "nonce_mismatch"),
        ({"nonce": 1}, "nonce_mismatch"),
        ({"iat": int(NOW) + 3600}, "iat_in_future"),
        ({"iat": "yesterday"}, "malformed"),
        ({"iat": True}, "malformed"),
    ],
)
def test_each_wrong_claim_is_refused(
    key: rsa.RSAPrivateKey, over: dict[str, Any], expected: str
) -> None:
    assert reason(sign(key, claims(**over)), key) == expected


@pytest.mark.parametrize("missing", ["productCode", "publicKeyVersion", "nonce", "iat"])
def test_each_missing_claim_is_refused(key: rsa.RSAPrivateKey, missing: str) -> None:
    c = claims()
    del c[missing]
    assert reason(sign(key, c), key) == "missing_claim"


def test_iat_within_clock_skew_is_accepted_and_max_age_enforced(key: rsa.RSAPrivateKey) -> None:
    assert check(sign(key, claims(iat=NOW + 200)), key, leeway=300)
    assert reason(sign(key, claims(iat=NOW + 400)), key, leeway=300) == "iat_in_future"
    assert check(sign(key, claims(iat=NOW - 50)), key, max_age=60)
    assert reason(sign(key, claims(iat=NOW - 61)), key, max_age=60) == "too_old"


def test_signature_from_another_key_is_refused(key: rsa.RSAPrivateKey) -> None:
    assert reason(sign(new_key(), claims()), key) == "bad_signature"


def test_rs256_with_the_right_key_is_refused(key: rsa.RSAPrivateKey) -> None:
    assert reason(sign(key, claims(), alg="RS256"), key) == "bad_algorithm"


def test_alg_none_is_refused(key: rsa.RSAPrivateKey) -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    assert reason(f"{header}.{body}.", key) == "malformed"
    assert reason(f"{header}.{body}.c2ln", key) == "bad_algorithm"


def test_hs256_with_the_public_key_as_secret_is_refused(key: rsa.RSAPrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    secret = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    import hashlib
    import hmac

    mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    assert reason(f"{header}.{body}.{b64(mac)}", key) == "bad_algorithm"


def test_ps256_header_with_swapped_payload_is_refused(key: rsa.RSAPrivateKey) -> None:
    head, _, sig = sign(key, claims()).split(".")
    forged_body = b64(json.dumps(claims(productCode="prod-abc", nonce="n-1", iat=NOW + 1)).encode())
    assert reason(f"{head}.{forged_body}.{sig}", key) == "bad_signature"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "..",
        "!!!.???.###",
        b64(b"not json") + "." + b64(b"{}") + ".sig",
        b64(b'["list"]') + "." + b64(b"{}") + ".sig",
        "é.é.é",
        None,
        42,
    ],
)
def test_garbage_is_refused_without_traceback(key: rsa.RSAPrivateKey, token: object) -> None:
    assert reason(token, key) in {"malformed", "bad_algorithm"}


def test_non_json_payload_with_valid_signature_is_refused(key: rsa.RSAPrivateKey) -> None:
    token = jwt.api_jws.encode(b"not json", key, algorithm="PS256")
    assert reason(token, key) == "malformed"


def test_truncated_and_padded_tokens_are_refused(key: rsa.RSAPrivateKey) -> None:
    token = sign(key, claims())
    assert reason(token[:-10], key) == "bad_signature"
    assert reason(token + "AAAA", key) == "bad_signature"
    assert reason(token + "=", key) in {"bad_signature", "malformed"}


def test_oversized_tokens_and_headers_are_refused(key: rsa.RSAPrivateKey) -> None:
    assert reason("a" * (MAX_TOKEN_CHARS + 1), key) == "too_large"
    huge_header = sign(key, claims(), padding="x" * MAX_TOKEN_CHARS)
    assert reason(huge_header, key) == "too_large"


def test_key_is_chosen_by_requested_version_not_the_token(key: rsa.RSAPrivateKey) -> None:
    other = new_key()
    keys = {1: key.public_key(), 2: other.public_key()}
    token = sign(other, claims(publicKeyVersion=2))
    with pytest.raises(TokenError) as info:
        verify_token(
            token, keys, product_code="prod-abc", public_key_version=1, nonce="n-1", now=NOW
        )
    assert info.value.reason == "bad_signature"
    with pytest.raises(TokenError) as info:
        verify_token(token, {}, product_code="prod-abc", public_key_version=1, nonce="n-1", now=NOW)
    assert info.value.reason == "unknown_key_version"
