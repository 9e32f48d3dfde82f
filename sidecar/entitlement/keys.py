"""Loading the product's RegisterUsage public key: the client package's `keys` module, shared so
the sidecar and the product refuse the same keys (the client package never imports the sidecar)."""

from marketplace_sidecar_client.keys import (
    DENIED_FINGERPRINTS,
    MAX_KEY_FILE_BYTES,
    MIN_RSA_BITS,
    UnusableKeyError,
    fingerprint,
    load_public_key,
)

__all__ = [
    "DENIED_FINGERPRINTS",
    "MAX_KEY_FILE_BYTES",
    "MIN_RSA_BITS",
    "UnusableKeyError",
    "fingerprint",
    "load_public_key",
]
