from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.entitlement.keys import UnusableKeyError, fingerprint, load_public_key
from tests.helpers import new_key, pem

# The "Replace with your public key" PEM in AWS's Java RegisterUsage sample: the jwt.io demo key.
JWT_IO_DEMO_KEY = """-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDdlatRjRjogo3WojgGHFHYLugd
UWAY9iR3fy4arWNA1KoS8kVw33cJibXr8bvwUAUparCwlvdbH6dvEOfou0/gCFQs
HUfQrSDv+MuSUMAe8jzKE4qW+jK+xQU9a03GUnKHkkle+Q0pX/g6jXZ7r1/xAK5D
o2kQ+X5xK9cipRgEKwIDAQAB
-----END PUBLIC KEY-----
"""


def refusal(text: str | bytes) -> str:
    with pytest.raises(UnusableKeyError) as info:
        load_public_key(text)
    return str(info.value)


def test_rsa_2048_public_key_loads(key: rsa.RSAPrivateKey) -> None:
    loaded = load_public_key(pem(key))
    assert fingerprint(loaded) == fingerprint(key.public_key())


def test_jwt_io_demo_key_is_refused_by_name() -> None:
    assert "jwt.io demo key" in refusal(JWT_IO_DEMO_KEY)


def test_short_rsa_key_is_refused() -> None:
    assert "1024 bits" in refusal(pem(new_key(1024)))


def test_non_rsa_private_and_garbage_keys_are_refused(key: rsa.RSAPrivateKey) -> None:
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert "must be an RSA key" in refusal(ec_pem)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert "private key" in refusal(private)
    assert "not a PEM public key" in refusal("hello")


def test_a_pem_holding_two_keys_is_refused_not_resolved_to_the_first(
    key: rsa.RSAPrivateKey,
) -> None:
    # The PEM parser would silently trust whichever key came first.
    message = refusal(pem(new_key()) + pem(key))
    assert "2 PEM blocks" in message and "exactly one public key" in message


def test_text_around_the_key_is_refused(key: rsa.RSAPrivateKey) -> None:
    assert "unexpected text after -----END PUBLIC KEY-----" in refusal(pem(key) + "garbage\n")
    assert "unexpected text before -----BEGIN PUBLIC KEY-----" in refusal("note\n" + pem(key))
    # Whitespace and a missing final newline are not a problem.
    assert fingerprint(load_public_key("\n  " + pem(key).strip() + "\n\n")) == fingerprint(
        key.public_key()
    )
