"""Where the RegisterUsage token is checked: the client package's `verify` module, shared so the
sidecar and the product verify exactly alike (imports flow one way: the sidecar depends on the
client package, never the reverse)."""

from marketplace_sidecar_client.tokens import (
    DEFAULT_LEEWAY_SECONDS,
    MAX_TOKEN_CHARS,
    TokenError,
    verify_token,
)

__all__ = ["DEFAULT_LEEWAY_SECONDS", "MAX_TOKEN_CHARS", "TokenError", "verify_token"]
