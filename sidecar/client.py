"""For the product: prove entitlement without trusting the sidecar.

    nonce = fresh random ──POST /v1/entitlement/challenge──> sidecar ──RegisterUsage(nonce)──> AWS
    claims = verify(token, YOUR_KEY, YOUR_PRODUCT_CODE, nonce)   <── raw PS256 token ──┘

A deleted sidecar yields no token, a fake one cannot sign, a replayed token carries another
nonce. Build the product code and public key into the product image, not its configuration.
Custom-metered products report usage with `report_usage` (MARKETPLACE_MODE=custom).
Stdlib + PyJWT only: importing this module never loads boto3 or kubernetes.
"""

from __future__ import annotations

import http.client
import json
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
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
        with urllib.request.urlopen(request, timeout=timeout) as resp:
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


class UsageError(Exception):
    """The sidecar did not acknowledge the usage. `reason` is a stable word.

    Unless `reason` is "invalid", "conflict" or "too_large", the units may or may not have been
    stored: send the same records with the same `id` again and they are counted once.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.status = status
        self.retry_after = retry_after


_USAGE_REASONS = {400: "invalid", 409: "conflict", 413: "too_large", 429: "unavailable"}
_USAGE_REASONS[503] = "unavailable"


def report_usage(
    records: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    url: str = DEFAULT_URL,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """POST /v1/usage: the sidecar's answer once the units are durable, or `UsageError`.

    `records`: one `{"dimension", "quantity", "id"?, "timestamp"?, "allocations"?}` or a list of
    up to 1,000. `timeout` bounds the whole call, connection to last byte.
    """
    try:
        body = json.dumps(records if isinstance(records, Mapping) else list(records)).encode()
    except (TypeError, ValueError) as exc:
        raise UsageError("invalid", f"records are not JSON-serialisable: {exc}") from None
    status, headers, payload = _request("POST", url.rstrip("/") + "/v1/usage", body, timeout)
    try:
        doc = json.loads(payload)
    except ValueError:
        raise UsageError(
            "bad_answer", f"HTTP {status}: the answer is not JSON", status=status
        ) from None
    if status in (200, 202) and isinstance(doc, dict):
        return doc
    error = doc.get("error") if isinstance(doc, dict) else None
    error = error if isinstance(error, dict) else {}
    code = str(error.get("code") or f"http_{status}")
    message = f"{code}: {error.get('message') or 'no message'}"
    reason = _USAGE_REASONS.get(status, f"sidecar_{status}")
    if code == "usage_needs_custom_mode":
        reason = "not_custom_mode"
    retry = headers.get("retry-after")
    retry_after = float(retry) if retry and retry.isdigit() else None
    raise UsageError(reason, message, status=status, retry_after=retry_after)


def _request(
    method: str, url: str, body: bytes, timeout: float
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP exchange under one overall deadline (a dripping server cannot stretch it)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(
            "no_sidecar", f"the sidecar URL must be http://host:port, got {url[:80]!r}"
        )
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    result: list[tuple[int, dict[str, str], bytes]] = []
    failure: list[BaseException] = []

    def exchange() -> None:
        try:
            conn.request(method, parts.path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            result.append((resp.status, headers, resp.read(1 << 20)))
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    worker = threading.Thread(target=exchange, name="report-usage", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        if conn.sock is not None:
            conn.sock.close()  # unblocks the worker; the answer, if any, is not waited for
        raise UsageError("timeout", f"no complete answer from {url} within {timeout} s")
    conn.close()
    if failure:
        exc = failure[0]
        raise UsageError(
            "no_sidecar", f"no sidecar answering at {url} ({type(exc).__name__}: {exc})"
        ) from None
    return result[0]
