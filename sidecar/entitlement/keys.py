"""Loading the product's RegisterUsage public key, and refusing keys that protect nothing."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

MIN_RSA_BITS = 2048

# SHA-256 of the SubjectPublicKeyInfo DER of keys whose private half is public.
DENIED_FINGERPRINTS: dict[str, str] = {
    "d2f8d7917928bbe7a457bdbaa0f69221a49b0fbc867ea34b700e9e78364d57e8": (
        "the jwt.io demo key from AWS's Java sample (its private key is published)"
    ),
}


class UnusableKeyError(ValueError):
    """The configured key cannot be used; the message says why."""


def fingerprint(key: RSAPublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def load_public_key(pem: str | bytes) -> RSAPublicKey:
    """Parse a PEM public key and check it is an RSA key worth trusting."""
    data = pem.encode() if isinstance(pem, str) else pem
    if b"PRIVATE KEY" in data:
        raise UnusableKeyError("this is a private key; give the public key (BEGIN PUBLIC KEY)")
    try:
        key = serialization.load_pem_public_key(data.strip() + b"\n")
    except (ValueError, TypeError) as exc:
        raise UnusableKeyError(
            "not a PEM public key (expected -----BEGIN PUBLIC KEY----- ...)"
        ) from exc
    if not isinstance(key, RSAPublicKey):
        raise UnusableKeyError(f"must be an RSA key (PS256), got {type(key).__name__}")
    denied = DENIED_FINGERPRINTS.get(fingerprint(key))
    if denied:
        raise UnusableKeyError(f"refused: {denied}; use the key from your AMMP product page")
    if key.key_size < MIN_RSA_BITS:
        raise UnusableKeyError(
            f"RSA key is {key.key_size} bits; at least {MIN_RSA_BITS} are required"
        )
    return key
