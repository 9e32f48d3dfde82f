"""Loading the product's RegisterUsage public key, and refusing keys that protect nothing."""

from __future__ import annotations

import hashlib
import re

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

MIN_RSA_BITS = 2048
# A 16384-bit RSA public key is about 3 KB of PEM; anything far larger is not a key.
MAX_KEY_FILE_BYTES = 64 * 1024
_PEM_BEGIN = re.compile(rb"-----BEGIN ([^-\r\n]{1,64})-----")

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
    _check_one_block(data)
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


def _check_one_block(data: bytes) -> None:
    """Refuse what the PEM parser would silently ignore: a second key, or text around the key.

    The parser reads only the first block, so a file holding two keys would trust whichever
    came first; a seller who pasted the wrong one (or an attacker who prepended theirs) must
    hear about it rather than have the sidecar pick one.
    """
    blocks = _PEM_BEGIN.findall(data)
    if len(blocks) > 1:
        names = ", ".join(b.decode("ascii", "replace") for b in blocks)
        raise UnusableKeyError(
            f"holds {len(blocks)} PEM blocks ({names}); give exactly one public key"
        )
    begin = _PEM_BEGIN.search(data)
    if begin is None:
        return  # the parser's own "not a PEM public key" says it best
    end_line = b"-----END " + blocks[0] + b"-----"
    end = data.find(end_line, begin.end())
    if data[: begin.start()].strip():
        raise UnusableKeyError(
            f"unexpected text before -----BEGIN {blocks[0].decode('ascii', 'replace')}-----; "
            "the file must hold the PEM key and nothing else"
        )
    if end >= 0 and data[end + len(end_line) :].strip():
        raise UnusableKeyError(
            f"unexpected text after {end_line.decode('ascii', 'replace')}; "
            "the file must hold the PEM key and nothing else"
        )
