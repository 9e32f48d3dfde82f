"""For the product: prove entitlement without trusting the sidecar.

    nonce = fresh random ──POST /v1/entitlement/challenge──> sidecar ──RegisterUsage(nonce)──> AWS
    claims = verify(token, YOUR_KEY, YOUR_PRODUCT_CODE, nonce)   <── raw PS256 token ──┘

A deleted sidecar yields no token, a fake one cannot sign, a replayed token carries another
nonce. Build the product code and public key into the product image, not its configuration.
Stdlib + PyJWT only: importing this module never loads boto3 or kubernetes.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from sidecar.entitlement.keys import load_public_key
from sidecar.entitlement.verify import TokenError, verify_token

DEFAULT_URL = "http://127.0.0.1:8787"
DEFAULT_MAX_AGE = 300.0


class EntitlementError(Exception):
    """Not entitled, or not provably so. `reason` is a stable word; fail closed on any of them."""

    def __init__(self, reason: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


def verify(
    token: str,
    key: RSAPublicKey | str | bytes,
    product_code: str,
    nonce: str,
    max_age: float = DEFAULT_MAX_AGE,
    *,
    public_key_version: int = 1,
    now: float | None = None,
) -> dict[str, Any]:
    """Verify an AWS RegisterUsage token the product asked for; return its claims."""
    public = key if isinstance(key, RSAPublicKey) else load_public_key(key)
    try:
        return verify_token(
            token,
            {public_key_version: public},
            product_code=product_code,
            public_key_version=public_key_version,
            nonce=nonce,
            now=time.time() if now is None else now,
            max_age=max_age,
        )
    except TokenError as exc:
        raise EntitlementError(f"token_{exc.reason}", exc.message) from None


def challenge(
    key: RSAPublicKey | str | bytes,
    product_code: str,
    *,
    url: str = DEFAULT_URL,
    public_key_version: int = 1,
    max_age: float = DEFAULT_MAX_AGE,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Run the whole challenge against the sidecar and return verified claims, or raise."""
    nonce = secrets.token_urlsafe(32)
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/entitlement/challenge",
        data=json.dumps({"nonce": nonce}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        # The URL is the caller's own configured sidecar address, never network input.
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # nosec B310
            body = json.loads(resp.read(1 << 16))
    except urllib.error.HTTPError as exc:
        raise _refusal(exc) from None
    except (urllib.error.URLError, OSError) as exc:
        raise EntitlementError(
            "no_sidecar", f"no entitlement sidecar answering at {url} ({exc})"
        ) from None
    except ValueError:
        raise EntitlementError("bad_answer", "the sidecar's answer is not JSON") from None
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str):
        raise EntitlementError("no_token", "the sidecar answered without a token")
    return verify(token, key, product_code, nonce, max_age, public_key_version=public_key_version)


def _refusal(exc: urllib.error.HTTPError) -> EntitlementError:
    try:
        body = json.loads(exc.read(1 << 16))
        error = body.get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    code = str(error.get("code") or f"http_{exc.code}")
    message = str(error.get("message") or exc.reason)
    if exc.code == 429:
        retry = exc.headers.get("Retry-After", "1")
        return EntitlementError("rate_limited", message, retry_after=float(retry or 1))
    if code == "CustomerNotEntitledException":
        return EntitlementError("not_entitled", message)
    return EntitlementError(f"sidecar_{exc.code}", f"{code}: {message}")
