"""Where the RegisterUsage token is checked.

The token is a JWS: header {"alg":"PS256","typ":"JWT"}, claims productCode, publicKeyVersion,
nonce, iat. PS256 is pinned; the key is chosen by the key version *we asked for*, never by
anything inside the token; every claim we sent must come back unchanged. No I/O, no clock of
its own: `now` is passed in. The sidecar and the products' client share this module, so it
imports nothing but PyJWT and cryptography.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

MAX_TOKEN_CHARS = 16 * 1024
DEFAULT_LEEWAY_SECONDS = 300.0


class TokenError(Exception):
    """The token is not valid. `reason` is a stable machine-readable word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def verify_token(
    token: object,
    keys: Mapping[int, RSAPublicKey],
    *,
    product_code: str,
    public_key_version: int,
    nonce: str,
    now: float,
    leeway: float = DEFAULT_LEEWAY_SECONDS,
    max_age: float | None = None,
) -> dict[str, Any]:
    """Return the verified claims, or raise `TokenError` naming what is wrong."""
    if not isinstance(token, str) or not token:
        raise TokenError("malformed", "token must be a non-empty string")
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError("too_large", f"token is longer than {MAX_TOKEN_CHARS} characters")
    if not token.isascii() or token.count(".") != 2 or "" in token.split("."):
        raise TokenError("malformed", "token must be three non-empty base64url parts")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenError("malformed", f"unreadable token header: {exc}") from None
    if header.get("alg") != "PS256":
        raise TokenError("bad_algorithm", f"alg must be PS256, got {header.get('alg')!r}")
    key = keys.get(public_key_version)
    if key is None:
        raise TokenError(
            "unknown_key_version", f"no public key configured for version {public_key_version}"
        )
    try:
        claims: Any = jwt.decode(
            token,
            key,
            algorithms=["PS256"],
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
                "require": [],
            },
        )
    except jwt.InvalidSignatureError:
        raise TokenError("bad_signature", "signature does not verify with the key") from None
    except jwt.PyJWTError as exc:
        raise TokenError("malformed", f"token rejected: {exc}") from None
    if not isinstance(claims, dict):
        raise TokenError("malformed", "claims must be a JSON object")
    _check_claims(claims, product_code, public_key_version, nonce, now, leeway, max_age)
    return claims


def _check_claims(
    claims: dict[str, Any],
    product_code: str,
    public_key_version: int,
    nonce: str,
    now: float,
    leeway: float,
    max_age: float | None,
) -> None:
    for name in ("productCode", "publicKeyVersion", "nonce", "iat"):
        if name not in claims:
            raise TokenError("missing_claim", f"claim {name!r} is missing")
    if claims["productCode"] != product_code:
        raise TokenError(
            "product_code_mismatch",
            f"productCode {claims['productCode']!r} is not the configured {product_code!r}",
        )
    if _as_int(claims["publicKeyVersion"]) != public_key_version:
        raise TokenError(
            "key_version_mismatch",
            f"publicKeyVersion {claims['publicKeyVersion']!r} is not {public_key_version}",
        )
    got_nonce = claims["nonce"]
    if not isinstance(got_nonce, str) or not hmac.compare_digest(
        got_nonce.encode(), nonce.encode()
    ):
        raise TokenError("nonce_mismatch", "nonce is not the one sent (replayed token?)")
    iat = claims["iat"]
    if isinstance(iat, bool) or not isinstance(iat, int | float) or not math.isfinite(iat):
        raise TokenError("malformed", "iat must be a number of seconds")
    if iat > now + leeway:
        raise TokenError("iat_in_future", f"iat is {iat - now:.0f} s in the future")
    if max_age is not None and iat < now - max_age:
        raise TokenError("too_old", f"token was issued {now - iat:.0f} s ago (max {max_age:.0f})")


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():  # int() refuses "²"
        return int(value)
    return None
