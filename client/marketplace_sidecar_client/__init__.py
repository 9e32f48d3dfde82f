"""For the product: prove entitlement without trusting the sidecar.

    nonce = fresh random ──POST /v1/entitlement/challenge──> sidecar ──RegisterUsage(nonce)──> AWS
    claims = verify(token, YOUR_KEY, YOUR_PRODUCT_CODE, nonce)   <── raw PS256 token ──┘

A deleted sidecar yields no token, a fake one cannot sign, a replayed token carries another
nonce. Build the product code and public key into the product image, not its configuration.
Custom-metered products report usage with `report_usage` (MARKETPLACE_MODE=custom); SaaS
backends (MARKETPLACE_MODE=saas) redeem a buyer's registration token with `resolve_customer`
and report usage with `report_usage`, each record naming its customer. Contract products
(MARKETPLACE_MODE=contract) hold floating seats with `checkout_lease`, `renew_lease` and
`checkin_lease`.
Its own distribution (`marketplace-sidecar-client`, the repository's client/ directory): the
standard library, PyJWT and cryptography only; it imports nothing of the sidecar, and the sidecar
imports its token and key checks from here (one way), so both verify exactly alike.

The sidecar may be hostile too, so the transport is a few lines of plain HTTP/1.1 over a socket
rather than urllib: one deadline for the whole call (not per read, which a server dripping one
byte at a time defeats), a cap on the answer's size, no redirects, no proxies from the
environment, and every failure (network, HTTP, JSON, shape) raised as `EntitlementError`.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from datetime import UTC
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from marketplace_sidecar_client.keys import UnusableKeyError, load_public_key
from marketplace_sidecar_client.tokens import TokenError, verify_token

__version__ = "0.1.0"
__all__ = [
    "CHALLENGE_PATH",
    "DEFAULT_MAX_AGE",
    "DEFAULT_URL",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_PROBLEMS",
    "MAX_REGISTRATION_TOKEN_CHARS",
    "RETRY_AFTER_MAX",
    "RETRY_AFTER_MIN",
    "CustomerError",
    "EntitlementError",
    "FieldProblem",
    "LeaseError",
    "UsageError",
    "challenge",
    "checkin_lease",
    "checkout_lease",
    "customer_changes",
    "dead_letters",
    "get_customer",
    "get_dead_letter",
    "parse_retry_after",
    "renew_lease",
    "report_usage",
    "resolve_customer",
    "verify",
]

DEFAULT_URL = "http://127.0.0.1:8787"
DEFAULT_MAX_AGE = 300.0
DEAD_LETTER_ANSWER_BYTES = 1 << 20  # one dead letter with its body (see get_dead_letter)
CHALLENGE_PATH = "/v1/entitlement/challenge"
# The sidecar's answers are a few KiB; anything much larger is not the sidecar talking.
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 256 * 1024
# `retry_after` is always finite: a 429 or 503 never makes the product wait forever or spin.
RETRY_AFTER_MIN = 1.0
RETRY_AFTER_MAX = 600.0
_MESSAGE_CHARS = 300

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*")
_DIGITS = re.compile(r"[0-9]{1,12}")
_CURSOR = re.compile(r"[0-9]{1,19}")
_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")


class EntitlementError(Exception):
    """Not entitled, or not provably so. `reason` is a stable word; fail closed on any of them.

    `retry_after` (seconds, between RETRY_AFTER_MIN and RETRY_AFTER_MAX) is set when the sidecar
    asked the product to come back later (429, 503).
    """

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
    public = _public_key(key)
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
    """Run the whole challenge against the sidecar and return verified claims, or raise.

    `timeout` bounds the whole call (connect, send, every byte of the answer), not each read.
    """
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    deadline = time.monotonic() + timeout
    public = _public_key(key)
    nonce = secrets.token_urlsafe(32)
    status, headers, doc = _request(
        "POST", url.rstrip("/") + CHALLENGE_PATH, {"nonce": nonce}, deadline
    )
    if status != 200:
        raise _refusal(status, headers, doc)
    if not isinstance(doc, dict):
        raise EntitlementError("bad_answer", "the sidecar's answer is not a JSON object")
    token = doc.get("token")
    if not isinstance(token, str):
        raise EntitlementError("no_token", "the sidecar answered without a token")
    return verify(
        token, public, product_code, nonce, max_age, public_key_version=public_key_version
    )


def _public_key(key: RSAPublicKey | str | bytes) -> RSAPublicKey:
    if isinstance(key, RSAPublicKey):
        return key
    try:
        return load_public_key(key)
    except UnusableKeyError as exc:
        raise EntitlementError("bad_key", f"the product's built-in key: {exc}") from None


# -- transport ---------------------------------------------------------------------------


def _request(
    method: str, url: str, body: Any, deadline: float, limit: int = MAX_BODY_BYTES
) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 exchange with the sidecar, finished by `deadline` (a time.monotonic() value).

    Sends `body` as JSON (None: no body). Returns (status, headers with lower-case names,
    the parsed JSON answer or None when the body is empty or not JSON). Never follows a
    redirect (a 3xx is just a status), never uses a proxy, reads at most MAX_HEADER_BYTES +
    `limit` (MAX_BODY_BYTES). Raises EntitlementError: bad_url, no_sidecar (could not connect),
    timeout (the deadline passed), bad_answer (not HTTP, too large, cut short).
    Only the host name lookup is outside the deadline: use an IP address or localhost.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[::1" and other unbalanced brackets
        raise EntitlementError("bad_url", f"bad sidecar URL {url[:100]!r}") from None
    if (
        parts.scheme != "http"
        or not parts.hostname
        or "@" in parts.netloc
        or not url.isascii()
        or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url)
    ):
        raise EntitlementError(
            "bad_url", f"the sidecar URL must be http://host:port, got {url[:100]!r}"
        )
    if not _valid_host(parts.hostname):  # refused here, never handed to a name lookup
        raise EntitlementError("bad_url", f"bad host in the sidecar URL {url[:100]!r}")
    try:
        port = 80 if parts.port is None else parts.port
    except ValueError:
        raise EntitlementError("bad_url", f"bad port in the sidecar URL {url[:100]!r}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    payload = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Accept: application/json\r\nConnection: close\r\n"
        + ("Content-Type: application/json\r\n" if body is not None else "")
        + f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode("ascii")
    if deadline <= time.monotonic():
        raise EntitlementError("timeout", "no time left to call the sidecar")
    try:
        sock = _connect(parts.hostname, port, deadline)
    except OSError as exc:
        raise EntitlementError(
            "no_sidecar", f"no entitlement sidecar answering at {url} ({exc})"
        ) from None
    except UnicodeError:  # the name lookup refuses the host ("a..b", a label over 63 chars)
        raise EntitlementError("bad_url", f"bad host in the sidecar URL {url[:100]!r}") from None
    with sock:
        try:
            _settimeout(sock, deadline)
            sock.sendall(head + payload)
            raw = _receive(sock, deadline, limit)
        except TimeoutError:
            raise EntitlementError(
                "timeout", f"the sidecar at {url} did not answer in time"
            ) from None
        except OSError as exc:
            raise EntitlementError(
                "bad_answer", f"connection to the sidecar lost ({exc})"
            ) from None
    status, headers, content = raw
    return status, headers, _json_or_none(content)


_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _valid_host(host: str) -> bool:
    """An IP literal, or a DNS name of 1-63-character labels and at most 253 characters."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(p) for p in name.split("."))


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """Try each address of `host` (localhost: ::1, then 127.0.0.1) within the one deadline."""
    error: OSError = OSError(f"{host} has no address")
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            _settimeout(sock, deadline)
            sock.connect(address)
            return sock
        except OSError as exc:  # TimeoutError included
            sock.close()
            error = exc
    raise error


def _settimeout(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)


def _receive(
    sock: socket.socket, deadline: float, limit: int = MAX_BODY_BYTES
) -> tuple[int, dict[str, str], bytes]:
    buf = bytearray()
    while True:  # the head: status line and headers
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buf) > MAX_HEADER_BYTES:
            raise _bad(f"headers larger than {MAX_HEADER_BYTES} bytes")
        if not _recv_into(sock, buf, deadline):
            raise _bad("the connection closed before the headers ended")
    if end > MAX_HEADER_BYTES:
        raise _bad(f"headers larger than {MAX_HEADER_BYTES} bytes")
    status, headers = _parse_head(bytes(buf[:end]))
    del buf[: end + 4]
    if "transfer-encoding" in headers:
        raise _bad("chunked or encoded answers are not accepted")
    length_text = headers.get("content-length")
    if length_text is None:
        while len(buf) <= limit and _recv_into(sock, buf, deadline):
            pass
        if len(buf) > limit:
            raise _bad(f"answer larger than {limit} bytes")
        return status, headers, bytes(buf)
    if not _DIGITS.fullmatch(length_text):
        raise _bad(f"Content-Length is not a number: {length_text[:20]!r}")
    length = int(length_text)
    if length > limit:
        raise _bad(f"answer of {length} bytes is larger than {limit}")
    while len(buf) < length:
        if not _recv_into(sock, buf, deadline):
            raise _bad(f"the answer ended after {len(buf)} of {length} bytes")
    return status, headers, bytes(buf[:length])


def _recv_into(sock: socket.socket, buf: bytearray, deadline: float) -> bool:
    """Append what arrives before the deadline; False at end of stream."""
    _settimeout(sock, deadline)
    chunk = sock.recv(65536)
    buf += chunk
    return bool(chunk)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise _bad(f"not an HTTP status line: {lines[0][:40]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        field = _HEADER_LINE.fullmatch(line)
        if field is None:
            raise _bad(f"malformed header line: {line[:40]!r}")
        name = field.group(1).decode("ascii").lower()
        value = field.group(2).decode("latin-1")
        if name in headers and headers[name] != value:
            if name in ("content-length", "transfer-encoding"):
                raise _bad(f"conflicting {name} headers")
            value = f"{headers[name]}, {value}"
        headers[name] = value
    return int(match.group(1)), headers


def _json_or_none(content: bytes) -> Any:
    if not content:
        return None
    try:
        return json.loads(content.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested beyond reason
        return None


def _bad(detail: str) -> EntitlementError:
    return EntitlementError("bad_answer", f"the sidecar's answer is not valid HTTP: {detail}")


# -- reading refusals --------------------------------------------------------------------


def _refusal(status: int, headers: dict[str, str], doc: Any) -> EntitlementError:
    error = doc.get("error") if isinstance(doc, dict) else None
    code = f"http_{status}"
    message = f"the sidecar answered HTTP {status}"
    if isinstance(error, dict):
        if isinstance(error.get("code"), str) and error["code"]:
            code = _clean(error["code"])
        if isinstance(error.get("message"), str) and error["message"]:
            message = _clean(error["message"])
    elif isinstance(error, str) and error:
        message = _clean(error)
    retry_after = parse_retry_after(headers.get("retry-after"), time.time())
    if retry_after is None and status in (429, 503):
        retry_after = RETRY_AFTER_MIN
    if status == 429:
        return EntitlementError("rate_limited", message, retry_after=retry_after)
    if code == "CustomerNotEntitledException":
        return EntitlementError("not_entitled", message)
    return EntitlementError(f"sidecar_{status}", f"{code}: {message}", retry_after=retry_after)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or an HTTP date), clamped to
    [RETRY_AFTER_MIN, RETRY_AFTER_MAX]; None when absent, RETRY_AFTER_MIN when unreadable."""
    if value is None:
        return None
    text = value.strip()
    if _SECONDS.fullmatch(text):
        seconds = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)  # "-0000" means UTC, not local time
            seconds = when.timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return RETRY_AFTER_MIN
    if not math.isfinite(seconds):
        return RETRY_AFTER_MIN
    return min(max(seconds, RETRY_AFTER_MIN), RETRY_AFTER_MAX)


def _clean(text: str) -> str:
    """A hostile sidecar's text, made safe to log: printable and short."""
    return "".join(c if c.isprintable() else "?" for c in text[:_MESSAGE_CHARS])


class FieldProblem(NamedTuple):
    """One thing the sidecar refused in a request: the field (e.g. `quantity`, `[1].dimension`)
    and what is allowed there."""

    field: str
    message: str


# The sidecar lists at most 20 problems per answer; a hostile one gets no more room than that.
MAX_PROBLEMS = 20


class UsageError(Exception):
    """The sidecar did not acknowledge the usage. `reason` is a stable word.

    Unless `reason` is "invalid", "conflict" or "too_large", the units may or may not have been
    stored: send the same records with the same `id` again and they are counted once.
    `problems`: the fields the sidecar's answer named (400, 409), each with what is allowed;
    str() shows them all, so a log line says which field of which record to fix.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        problems: Sequence[FieldProblem] = (),
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.problems = list(problems)


def _field_problems(error: Mapping[str, Any]) -> list[FieldProblem]:
    """The (field, message) pairs of a sidecar error: its `problems` list, else its `field`."""
    listed = error.get("problems")
    pairs: list[Any] = listed if isinstance(listed, list) else [error]
    out = []
    for item in pairs[:MAX_PROBLEMS]:
        if not isinstance(item, Mapping):
            continue
        field, message = item.get("field"), item.get("message")
        if isinstance(field, str) and field:
            text = message if isinstance(message, str) and message else "refused"
            out.append(FieldProblem(_clean(field), _clean(text)))
    return out


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
    up to 1,000. A quantity (a record's or an allocation's) is an `int`, a `decimal.Decimal` or a
    decimal string such as "2.5" (at most 6 decimal places), sent exactly; a `float` is refused
    (`UsageError` "invalid"): 0.1 as a float is not one tenth, and billed usage must be exact.
    In saas mode each record also names its customer: `customer_aws_account_id` and
    `license_arn` (MARKETPLACE_SAAS_IDENTITY=license), or `customer_identifier`. `timeout`
    bounds the whole call, connection to last byte (the same transport, deadline and caps as
    `challenge`).
    """
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    body: Any
    if isinstance(records, Mapping):
        body = _exact(records, "")
    else:
        body = [_exact(r, f"records[{i}]") for i, r in enumerate(records)]
    try:
        json.dumps(body)
    except (TypeError, ValueError) as exc:
        raise UsageError("invalid", f"records are not JSON-serialisable: {exc}") from None
    try:
        status, headers, doc = _request(
            "POST", url.rstrip("/") + "/v1/usage", body, time.monotonic() + timeout
        )
    except EntitlementError as exc:  # the transport's reasons: bad_url, no_sidecar, timeout, ...
        raise UsageError(exc.reason, exc.message) from None
    if status in (200, 202) and isinstance(doc, dict):
        return doc
    if doc is None:
        raise UsageError("bad_answer", f"HTTP {status}: the answer is not JSON", status=status)
    error = doc.get("error") if isinstance(doc, dict) else None
    error = error if isinstance(error, dict) else {}
    code = _clean(str(error.get("code") or f"http_{status}"))
    problems = _field_problems(error)
    if problems:  # every field named, not only the first one's message
        message = f"{code}: " + "; ".join(f"{p.field}: {p.message}" for p in problems)
    else:
        message = f"{code}: {_clean(str(error.get('message') or 'no message'))}"
    reason = _USAGE_REASONS.get(status, f"sidecar_{status}")
    if code == "usage_needs_custom_mode":
        reason = "not_custom_mode"
    retry_after = parse_retry_after(headers.get("retry-after"), time.time())
    raise UsageError(reason, message, status=status, retry_after=retry_after, problems=problems)


_DECIMAL_CEILING = Decimal(10) ** 10  # AWS's …AsDecimal pattern: at most 10 whole digits


def _exact_quantity(value: Any, field: str) -> Any:
    """A Decimal as its exact decimal string; a float refused; anything else as given (the
    sidecar checks it and names the field)."""
    if isinstance(value, float):
        raise UsageError(
            "invalid",
            f"{field} is a float ({value!r}); pass an int, a decimal.Decimal or a decimal string "
            'such as "2.5": a float is not exact, and billed usage must be',
        )
    if isinstance(value, Decimal):
        if not value.is_finite() or not 0 <= value < _DECIMAL_CEILING:
            # Checked before formatting: `Decimal("1E+999999999")` would write a gigabyte.
            raise UsageError(
                "invalid", f"{field} must be from 0 to 9999999999.999999, got {value:.6}"
            )
        return format(value, "f")  # 2.50 -> "2.50", 1E+2 -> "100": the same value, exactly
    return value


def _exact(record: Any, field: str) -> Any:
    """A shallow copy of a record with its quantities (and its allocations') made exact."""
    if not isinstance(record, Mapping):
        return record
    out = dict(record)
    where = f"{field}.quantity" if field else "quantity"
    if "quantity" in out:
        out["quantity"] = _exact_quantity(out["quantity"], where)
    allocations = out.get("allocations")
    if isinstance(allocations, Sequence) and not isinstance(allocations, (str, bytes)):
        base = f"{field}.allocations" if field else "allocations"
        out["allocations"] = [
            {**a, "quantity": _exact_quantity(a["quantity"], f"{base}[{i}].quantity")}
            if isinstance(a, Mapping) and "quantity" in a
            else a
            for i, a in enumerate(allocations)
        ]
    return out


class CustomerError(Exception):
    """The sidecar did not resolve the registration token. `reason` is a stable word:

    invalid_token (AWS does not know the token: show the buyer an error), expired_token (too
    late: `hint` says what to change), unavailable (AWS or the store is down: retry after
    `retry_after` seconds, the same token is still good within its lifetime), not_saas_mode,
    invalid (the request), or a transport reason (bad_url, no_sidecar, timeout, bad_answer).
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.hint = hint


# A registration token is opaque; the sidecar takes bodies up to 16 KiB.
MAX_REGISTRATION_TOKEN_CHARS = 8192
_CUSTOMER_REASONS = {
    "invalid_token": "invalid_token",  # nosec B105 # reason codes, not secrets
    "expired_token": "expired_token",  # nosec B105 # reason codes, not secrets
    "customers_need_saas_mode": "not_saas_mode",
}


def resolve_customer(
    token: str, *, url: str = DEFAULT_URL, timeout: float = 20.0
) -> dict[str, Any]:
    """POST /v1/customers/resolve: who the buyer behind `token` is, or `CustomerError`.

    `token` is the `x-amzn-marketplace-token` field of the form AWS's buyer page posts to the
    registration URL: call this as soon as it arrives (the token expires). The answer holds
    `customer_aws_account_id`, `license_arn`, `product_code` and, for older integrations,
    `customer_identifier`, plus the sidecar's `customer` key and `state`; the sidecar stores
    it, so calling again with the same token answers from the store (`from_store`).
    `timeout` bounds the whole call (the sidecar retries AWS's throttling for up to 10 s
    before answering 503); same transport, deadline and caps as `challenge`.
    """
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    if not isinstance(token, str) or not 0 < len(token) <= MAX_REGISTRATION_TOKEN_CHARS:
        raise CustomerError(
            "invalid_token",
            f"the registration token must be 1-{MAX_REGISTRATION_TOKEN_CHARS} characters "
            "(the x-amzn-marketplace-token form field)",
        )
    if not token.isascii() or not token.isprintable():
        raise CustomerError(
            "invalid_token", "the registration token must be printable ASCII; AWS issues no other"
        )
    try:
        status, headers, doc = _request(
            "POST",
            url.rstrip("/") + "/v1/customers/resolve",
            {"registration_token": token},
            time.monotonic() + timeout,
        )
    except EntitlementError as exc:  # the transport's reasons
        raise CustomerError(exc.reason, exc.message) from None
    if status == 200:
        if not isinstance(doc, dict):
            raise CustomerError("bad_answer", "HTTP 200 without a JSON object", status=status)
        if not any(
            isinstance(doc.get(k), str) and doc[k]
            for k in ("customer_aws_account_id", "customer_identifier")
        ):
            raise CustomerError(
                "bad_answer", "HTTP 200 without a customer account id or identifier", status=status
            )
        return doc
    error = doc.get("error") if isinstance(doc, dict) else None
    error = error if isinstance(error, dict) else {}
    code = _clean(str(error.get("code") or f"http_{status}"))
    message = f"{code}: {_clean(str(error.get('message') or 'no message'))}"
    hint = error.get("hint")
    if status in (429, 503):
        reason = "unavailable"
    elif status == 400 and code not in _CUSTOMER_REASONS:
        reason = "invalid"
    else:
        reason = _CUSTOMER_REASONS.get(code, f"sidecar_{status}")
    retry_after = parse_retry_after(headers.get("retry-after"), time.time())
    if retry_after is None and status in (429, 503):
        retry_after = RETRY_AFTER_MIN
    raise CustomerError(
        reason,
        message,
        status=status,
        retry_after=retry_after,
        hint=_clean(hint) if isinstance(hint, str) else None,
    )


class LeaseError(Exception):
    """The sidecar did not grant, renew or return the lease. `reason` is a stable word:

    no_units_left (409: `entitlement`, `units_asked`, `held_here` say what), conflict (the id
    names another lease), lost (410: License Manager no longer honours it: stop using the
    units), unknown_lease (404: checked in, timed out or never checked out), invalid (400:
    `field` names it), unavailable (503: retry after `retry_after` with the same id: the same
    request), no_state_dir, or a transport reason (bad_url, no_sidecar, timeout, bad_answer).
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        field: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.field = field
        self.details = dict(details or {})


_LEASE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_LEASE_CODES = {
    "no_units_left": "no_units_left",
    "lease_id_in_use": "conflict",
    "lease_lost": "lost",
    "unknown_lease": "unknown_lease",
    "leases_need_state_dir": "no_state_dir",
}


def checkout_lease(
    lease_id: str, entitlement: str, units: int, *, url: str = DEFAULT_URL, timeout: float = 20.0
) -> dict[str, Any]:
    """POST /v1/licenses/checkout: `units` of `entitlement` as a lease, or `LeaseError`.

    The same `lease_id` with the same entitlement and units is the same lease (safe to retry
    after a lost answer or a 503: it never takes the units twice). Renew it with `renew_lease`
    within the answer's `renew_within_seconds`, and give it back with `checkin_lease`.
    """
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise LeaseError("invalid", "units must be a whole number >= 1", field="units")
    if not isinstance(entitlement, str) or not entitlement:
        raise LeaseError("invalid", "entitlement must be a non-empty string", field="entitlement")
    body = {"id": lease_id, "entitlement": entitlement, "units": units}
    return _lease_call("checkout", lease_id, body, url, timeout)


def renew_lease(lease_id: str, *, url: str = DEFAULT_URL, timeout: float = 10.0) -> dict[str, Any]:
    """POST /v1/licenses/renew: the product still uses the lease; `LeaseError` "lost" or
    "unknown_lease" means it must stop using the units (check out again for new ones)."""
    return _lease_call("renew", lease_id, {"id": lease_id}, url, timeout)


def checkin_lease(
    lease_id: str, *, url: str = DEFAULT_URL, timeout: float = 20.0
) -> dict[str, Any]:
    """POST /v1/licenses/checkin: the units go back to the license (the sidecar retries
    CheckInLicense itself when License Manager cannot be reached)."""
    return _lease_call("checkin", lease_id, {"id": lease_id}, url, timeout)


def _lease_call(
    action: str, lease_id: str, body: dict[str, Any], url: str, timeout: float
) -> dict[str, Any]:
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    if not isinstance(lease_id, str) or not _LEASE_ID.fullmatch(lease_id):
        raise LeaseError("invalid", "lease_id must be 1-64 of A-Z a-z 0-9 . _ : -", field="id")
    try:
        status, headers, doc = _request(
            "POST", url.rstrip("/") + f"/v1/licenses/{action}", body, time.monotonic() + timeout
        )
    except EntitlementError as exc:  # the transport's reasons
        raise LeaseError(exc.reason, exc.message) from None
    if status == 200:
        if not isinstance(doc, dict) or doc.get("id") != lease_id:
            raise LeaseError("bad_answer", "HTTP 200 without this lease's id", status=status)
        return doc
    error = doc.get("error") if isinstance(doc, dict) else None
    error = error if isinstance(error, dict) else {}
    code = _clean(str(error.get("code") or f"http_{status}"))
    message = f"{code}: {_clean(str(error.get('message') or 'no message'))}"
    if status in (429, 503):
        reason = "unavailable"
    elif status == 400:
        reason = "invalid"
    else:
        reason = _LEASE_CODES.get(code, f"sidecar_{status}")
    retry_after = parse_retry_after(headers.get("retry-after"), time.time())
    if retry_after is None and status in (429, 503):
        retry_after = RETRY_AFTER_MIN
    field = error.get("field")
    details: dict[str, Any] = {}
    if isinstance(doc, dict):
        if isinstance(doc.get("entitlement"), str):
            details["entitlement"] = _clean(doc["entitlement"])
        for key in ("units_asked", "held_here"):
            value = doc.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                details[key] = value
    raise LeaseError(
        reason,
        message,
        status=status,
        retry_after=retry_after,
        field=_clean(field) if isinstance(field, str) else None,
        details=details,
    )


def _customer_read(path: str, timeout: float, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """GET a saas-mode customer route: the JSON object, or `CustomerError`."""
    try:
        status, headers, doc = _request("GET", path, None, time.monotonic() + timeout, limit)
    except EntitlementError as exc:  # the transport's reasons
        raise CustomerError(exc.reason, exc.message) from None
    if status == 200 and isinstance(doc, dict):
        return doc
    error = doc.get("error") if isinstance(doc, dict) else None
    error = error if isinstance(error, dict) else {}
    code = _clean(str(error.get("code") or f"http_{status}"))
    message = f"{code}: {_clean(str(error.get('message') or 'no message'))}"
    reason = {
        404: code if code in ("unknown_customer", "unknown_dead_letter") else "not_saas_mode",
        400: "invalid",
        410: "cursor_expired",  # changes after `since` were pruned: list customers again
        429: "unavailable",  # the change feed's long polls are all taken (changes_busy)
        503: "unavailable",
    }.get(status, f"sidecar_{status}")
    retry_after = parse_retry_after(headers.get("retry-after"), time.time())
    if retry_after is None and status in (429, 503):
        retry_after = RETRY_AFTER_MIN
    raise CustomerError(reason, message, status=status, retry_after=retry_after)


def get_customer(customer: str, *, url: str = DEFAULT_URL, timeout: float = 10.0) -> dict[str, Any]:
    """GET /v1/customers/{customer} (saas mode): what the sidecar knows of the buyer, including
    `subscription` (subscribed, pending_unsubscribe, unsubscribed, subscribe_failed) and
    `lifecycle` (agreement, license, free trial, final window, entitlements) when AWS's events
    reach it. `customer`: the AWS account id, customer identifier or customer key. An account
    with several licenses answers {"customers": [...]}. Raises `CustomerError` (reason
    unknown_customer, unavailable, not_saas_mode, invalid, or a transport reason)."""
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    if not isinstance(customer, str) or not 0 < len(customer) <= 2048 or not customer.isprintable():
        raise CustomerError("invalid", "customer: 1-2048 printable characters")
    from urllib.parse import quote

    return _customer_read(url.rstrip("/") + "/v1/customers/" + quote(customer, safe=""), timeout)


def customer_changes(
    since: str = "0", *, wait: float = 0.0, url: str = DEFAULT_URL, timeout: float | None = None
) -> dict[str, Any]:
    """GET /v1/customers/changes (saas mode): the buyers whose subscription state or
    entitlements changed after the cursor `since` ("0": every change), waiting up to
    `wait` seconds (0-20) for one. Returns {"cursor": ..., "changes": [...]}: keep the cursor
    (it is the store's: it works on any replica and after restarts) and pass it next time.
    Raises `CustomerError` (unavailable: retry after `retry_after`; cursor_expired: the
    changes after `since` are no longer kept, list every customer and go on from the cursor
    its message names; invalid; transport)."""
    if not isinstance(wait, (int, float)) or not 0 <= wait <= 20:
        raise ValueError(f"wait must be 0-20 seconds, got {wait!r}")
    if not isinstance(since, str) or _CURSOR.fullmatch(since) is None:
        raise CustomerError("invalid", "since: the cursor of a previous answer (digits)")
    budget = wait + 10.0 if timeout is None else timeout
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    query = f"?since={since}&wait={wait:g}"
    return _customer_read(url.rstrip("/") + "/v1/customers/changes" + query, budget)


def dead_letters(
    *, limit: int = 20, offset: int = 0, url: str = DEFAULT_URL, timeout: float = 10.0
) -> dict[str, Any]:
    """GET /v1/saas/dead-letters (saas mode): the lifecycle queue's messages that were no event
    the sidecar understands, newest first: {"total": n, "dead_letters": [{message_id, bytes,
    reason, received_at, truncated}]}. Raises `CustomerError` (invalid, unavailable,
    not_saas_mode, or a transport reason)."""
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    for name, value, low, high in (("limit", limit, 1, 100), ("offset", offset, 0, 999_999_999)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    query = f"?limit={limit}&offset={offset}"
    return _customer_read(url.rstrip("/") + "/v1/saas/dead-letters" + query, timeout)


def get_dead_letter(
    message_id: str, *, url: str = DEFAULT_URL, timeout: float = 10.0
) -> dict[str, Any]:
    """GET /v1/saas/dead-letters/{message_id} (saas mode): one dead letter with its `body` as
    kept (its first 65,536 characters; `truncated` says if that is all). Raises `CustomerError`
    (unknown_dead_letter, invalid, unavailable, not_saas_mode, or a transport reason)."""
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    if not isinstance(message_id, str) or not 0 < len(message_id) <= 100:
        raise CustomerError("invalid", "message_id: 1-100 printable characters")
    if not message_id.isprintable():
        raise CustomerError("invalid", "message_id: 1-100 printable characters")
    from urllib.parse import quote

    path = "/v1/saas/dead-letters/" + quote(message_id, safe="")
    # 65,536 characters kept, each up to 12 bytes once JSON escapes it (a surrogate pair).
    return _customer_read(url.rstrip("/") + path, timeout, DEAD_LETTER_ANSWER_BYTES)
