"""AWS Marketplace Entitlement Service (GetEntitlements) for SaaS contracts: the emulator's part.

Unmodified boto3 reaches it through AWS_ENDPOINT_URL_MARKETPLACE_ENTITLEMENT_SERVICE. The pinned
model (`marketplace-entitlement` 2017-01-11) offers two protocols, `smithy-rpc-v2-cbor` and
`json`: botocore resolves `json` (awsJson1.1, `POST /` with `X-Amz-Target:
AWSMPEntitlementService.GetEntitlements`); SDKs that prefer CBOR send `POST
/service/AWSMPEntitlementService/operation/GetEntitlements` and expect CBOR back
(`smithy-protocol: rpc-v2-cbor`). Both are answered: CBOR is read with botocore's own CBOR reader
and written here (`cbor`). Requests are validated against the model with the
emulator's model-driven checks (`service.model_violations`), then:

- `Filter` keys are unioned per value list and intersected across keys (the model's words);
  CUSTOMER_IDENTIFIER and CUSTOMER_AWS_ACCOUNT_ID together are refused with
  InvalidParameterException ("mutually exclusive ... not both in the same request");
- pages of `MaxResults` (1..25, default 25); `NextToken` is opaque, bound to the query it came
  from; a token from elsewhere is InvalidParameterException;
- faults: `faults` (an error for the next `first` calls), `loop_next_token` (every page
  answers the same NextToken) and `endless_pages` (empty pages, each with a new NextToken,
  forever): hostile services for the client's loop bounds.

Tests set a customer's entitlements at `POST /_emulator/entitlements` (one product and account,
each entitlement with exactly one of integer, double, boolean, string and an optional expiry),
configure faults at `POST /_emulator/entitlements/config` and read calls at
`GET /_emulator/entitlements`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

TARGET = "AWSMPEntitlementService"
JSON_TARGET = TARGET + "."
RPC_PREFIX = f"/service/{TARGET}/operation/"
PATH = "/_emulator/entitlements"
DEFAULT_PAGE = 25
_VALUE_KEYS = {
    "integer": "IntegerValue",
    "double": "DoubleValue",
    "boolean": "BooleanValue",
    "string": "StringValue",
}


@dataclass
class Row:
    product_code: str
    account_id: str
    dimension: str
    value: dict[str, Any]  # one EntitlementValue member
    expiration: float | None
    customer_identifier: str | None
    license_arn: str | None

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ProductCode": self.product_code,
            "Dimension": self.dimension,
            "CustomerAWSAccountId": self.account_id,
            "Value": self.value,
        }
        if self.customer_identifier is not None:
            out["CustomerIdentifier"] = self.customer_identifier
        if self.license_arn is not None:
            out["LicenseArn"] = self.license_arn
        if self.expiration is not None:
            out["ExpirationDate"] = Epoch(self.expiration)
        return out


@dataclass(frozen=True)
class Epoch:
    """A timestamp in a CBOR answer (tag 1, seconds)."""

    seconds: float


class EntitlementBook:
    """Entitlements per (product, account), faults and calls; methods run under `lock`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: dict[tuple[str, str], list[Row]] = {}
        self.faults: list[dict[str, Any]] = []
        self.loop_next_token = False
        self.endless_pages = False  # every page empty, every NextToken new (never ends)
        self.calls: list[dict[str, Any]] = []

    # -- test API --------------------------------------------------------------------------

    def set(self, spec: dict[str, Any], now: float) -> dict[str, Any]:
        product = _text(spec, "product_code")
        account = _text(spec, "customer_aws_account_id")
        if not account.isdigit() or len(account) != 12:
            raise ValueError("customer_aws_account_id must be 12 digits")
        ident = spec.get("customer_identifier")
        arn = spec.get("license_arn")
        items = spec.get("entitlements")
        if not isinstance(items, list):
            raise ValueError("entitlements must be a list (empty: the customer has none)")
        rows = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("dimension"), str):
                raise ValueError(f"entitlements[{i}]: needs a string dimension")
            given = [k for k in _VALUE_KEYS if k in item]
            if len(given) > 1:
                raise ValueError(f"entitlements[{i}]: one of {', '.join(_VALUE_KEYS)}, not several")
            value: dict[str, Any] = {}
            if given:
                value = {_VALUE_KEYS[given[0]]: _typed(given[0], item[given[0]], i)}
            expiration = item.get("expiration")
            if "expires_in" in item:
                expiration = now + float(item["expires_in"])
            if expiration is not None and not isinstance(expiration, (int, float)):
                raise ValueError(f"entitlements[{i}]: expiration must be Unix seconds")
            rows.append(
                Row(
                    product,
                    account,
                    item["dimension"],
                    value,
                    None if expiration is None else float(expiration),
                    None if ident is None else str(ident),
                    None if arn is None else str(arn),
                )
            )
        self.rows[(product, account)] = rows
        return {"product_code": product, "customer_aws_account_id": account, "count": len(rows)}

    def revoke(self, product: str | None, account: str) -> None:
        """License Deprovisioned: the customer's entitlements are gone."""
        for key in [k for k in self.rows if k[1] == account and product in (None, k[0])]:
            self.rows[key] = []

    def configure(self, spec: dict[str, Any]) -> dict[str, Any]:
        unknown = set(spec) - {"faults", "loop_next_token", "endless_pages"}
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        if "faults" in spec:
            faults = spec["faults"]
            if not isinstance(faults, list) or not all(
                isinstance(f, dict) and isinstance(f.get("error"), str) for f in faults
            ):
                raise ValueError('faults: a list of {"error": code, "first": n}')
            self.faults = [{"error": f["error"], "first": int(f.get("first", 1))} for f in faults]
        if "loop_next_token" in spec:
            self.loop_next_token = bool(spec["loop_next_token"])
        if "endless_pages" in spec:
            self.endless_pages = bool(spec["endless_pages"])
        return {
            "faults": self.faults,
            "loop_next_token": self.loop_next_token,
            "endless_pages": self.endless_pages,
        }

    def state(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "entitlements": {
                f"{p}/{a}": [
                    {"dimension": r.dimension, "value": r.value, "expiration": r.expiration}
                    for r in rows
                ]
                for (p, a), rows in self.rows.items()
            },
        }

    # -- GetEntitlements ------------------------------------------------------------------

    def get(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        for fault in self.faults:
            if fault["first"] > 0:
                fault["first"] -= 1
                return _error(fault["error"], "injected by the emulator")
        filters: dict[str, list[str]] = params.get("Filter") or {}
        if "CUSTOMER_IDENTIFIER" in filters and "CUSTOMER_AWS_ACCOUNT_ID" in filters:
            return _error(
                "InvalidParameterException",
                "CustomerIdentifier and CustomerAWSAccountId are mutually exclusive; use one or "
                "the other, not both in the same request",
            )
        product = params["ProductCode"]
        fields = {
            "CUSTOMER_IDENTIFIER": lambda r: r.customer_identifier,
            "CUSTOMER_AWS_ACCOUNT_ID": lambda r: r.account_id,
            "DIMENSION": lambda r: r.dimension,
            "LICENSE_ARN": lambda r: r.license_arn,
        }
        found = [
            row
            for (p, _), rows in sorted(self.rows.items())
            if p == product
            for row in rows
            if all(fields[name](row) in values for name, values in filters.items())
        ]
        query = hashlib.sha256(
            json.dumps([product, sorted((k, sorted(v)) for k, v in filters.items())]).encode()
        ).hexdigest()[:16]
        start = 0
        token = params.get("NextToken")
        if token is not None:
            offset = _offset(token, query)
            if offset is None:
                return _error("InvalidParameterException", "NextToken is not valid")
            start = offset
        size = int(params.get("MaxResults") or DEFAULT_PAGE)
        page = found[start : start + size]
        answer: dict[str, Any] = {"Entitlements": [r.wire() for r in page]}
        if self.loop_next_token:
            answer["NextToken"] = _token(0, query)
        elif self.endless_pages:
            answer = {"Entitlements": [], "NextToken": _token(start + size, query)}
        elif start + size < len(found):
            answer["NextToken"] = _token(start + size, query)
        return 200, answer


def _token(offset: int, query: str) -> str:
    return base64.urlsafe_b64encode(f"{offset}:{query}".encode()).decode()


def _offset(token: str, query: str) -> int | None:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        offset, bound = text.split(":", 1)
        return int(offset) if bound == query and int(offset) >= 0 else None
    except (ValueError, UnicodeError):
        return None


def _typed(kind: str, value: Any, i: int) -> Any:
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) >= 2**31:
            raise ValueError(f"entitlements[{i}]: integer must be a 32-bit whole number")
        return value
    if kind == "double":
        try:
            number = float(Decimal(str(value))) if not isinstance(value, bool) else math.nan
        except InvalidOperation:
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"entitlements[{i}]: double must be a finite number")
        return number
    if kind == "boolean":
        if not isinstance(value, bool):
            raise ValueError(f"entitlements[{i}]: boolean must be true or false")
        return value
    if not isinstance(value, str):
        raise ValueError(f"entitlements[{i}]: string must be a string")
    return value


def _text(spec: dict[str, Any], name: str) -> str:
    value = spec.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _error(code: str, message: str) -> tuple[int, dict[str, Any]]:
    status = 500 if code == "InternalServiceErrorException" else 400
    return status, {"__type": code, "message": message}


def _json_ready(value: Any) -> Any:
    """An answer for awsJson1.1: timestamps as epoch seconds."""
    if isinstance(value, Epoch):
        return value.seconds
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return value


# -- CBOR (RFC 8949), the subset an rpc-v2-cbor answer needs ---------------------------------


def cbor(value: Any) -> bytes:
    out = bytearray()
    _encode(out, value)
    return bytes(out)


def _head(out: bytearray, major: int, n: int) -> None:
    if n < 24:
        out.append(major << 5 | n)
    elif n < 1 << 8:
        out += bytes([major << 5 | 24, n])
    elif n < 1 << 16:
        out += bytes([major << 5 | 25]) + n.to_bytes(2, "big")
    elif n < 1 << 32:
        out += bytes([major << 5 | 26]) + n.to_bytes(4, "big")
    else:
        out += bytes([major << 5 | 27]) + n.to_bytes(8, "big")


def _encode(out: bytearray, value: Any) -> None:
    if value is None:
        out.append(0xF6)
    elif isinstance(value, bool):
        out.append(0xF5 if value else 0xF4)
    elif isinstance(value, int):
        _head(out, 0, value) if value >= 0 else _head(out, 1, -1 - value)
    elif isinstance(value, float):
        out += b"\xfb" + struct.pack(">d", value)
    elif isinstance(value, Epoch):
        _head(out, 6, 1)
        _encode(out, value.seconds)
    elif isinstance(value, str):
        data = value.encode()
        _head(out, 3, len(data))
        out += data
    elif isinstance(value, list):
        _head(out, 4, len(value))
        for item in value:
            _encode(out, item)
    elif isinstance(value, dict):
        _head(out, 5, len(value))
        for key, item in value.items():
            _encode(out, str(key))
            _encode(out, item)
    else:
        raise TypeError(f"no CBOR encoding for {type(value).__name__}")


def decode(body: bytes) -> Any:
    """A CBOR request body, read with botocore's own CBOR reader (the client's counterpart)."""
    from botocore.parsers import RpcV2CBORParser

    parser = RpcV2CBORParser()
    if not body:
        return {}
    return parser.parse_data_item(parser.get_peekable_stream_from_bytes(body))


# -- wiring into the emulator's HTTP handler ------------------------------------------------

_BOOKS: weakref.WeakKeyDictionary[Any, EntitlementBook] = weakref.WeakKeyDictionary()
_BOOKS_LOCK = threading.Lock()


def book(emulator: Any) -> EntitlementBook:
    with _BOOKS_LOCK:
        found = _BOOKS.get(emulator)
        if found is None:
            found = _BOOKS[emulator] = EntitlementBook()
        return found


def reset(emulator: Any) -> None:
    """Forget every entitlement, fault and call (the emulator's reset)."""
    with _BOOKS_LOCK:
        _BOOKS[emulator] = EntitlementBook()


def handles(path: str, target: str) -> bool:
    return (
        target.startswith(JSON_TARGET)
        or path.startswith(RPC_PREFIX)
        or path == PATH
        or path.startswith(PATH + "/")
    )


def call(
    b: EntitlementBook, op: str, body: bytes, auth: str, dated: bool, *, use_cbor: bool
) -> tuple[int, Any]:
    """One Entitlement Service call: signed, decodable, valid against the model, then answered."""
    from sidecar.emulator.service import auth_problem, model_violations

    refused = auth_problem(auth, dated)
    if refused is not None:
        return refused
    model = _model()
    if op not in model.operation_names:
        return _error("UnknownOperationException", f"unknown operation {op[:80]!r}")
    try:
        params = decode(body) if use_cbor else json.loads(body or b"{}")
    except Exception:  # botocore's reader raises its own parser errors on bad CBOR
        return _error("SerializationException", "the body cannot be decoded")
    if not isinstance(params, dict):
        return _error("SerializationException", "the body must be a map")
    shape = model.operation_model(op).input_shape
    types, broken = model_violations(params, shape)
    if types:
        return _error("SerializationException", "; ".join(types))
    if broken:
        n = len(broken)
        return _error(
            "ValidationException",
            f"{n} validation error{'s' if n > 1 else ''} detected: {'; '.join(broken)}",
        )
    with b.lock:
        status, payload = b.get(params)
        b.calls.append(
            {
                "op": op,
                "status": status,
                "code": payload.get("__type", "ok"),
                "filter": params.get("Filter"),
                "next_token": params.get("NextToken"),
                "at": time.time(),
            }
        )
    return status, payload


def serve_post(handler: Any, body: bytes) -> None:
    emulator = handler.server.emulator
    b = book(emulator)
    target = handler.headers.get("X-Amz-Target", "")
    use_cbor = handler.path.startswith(RPC_PREFIX)
    if use_cbor or target.startswith(JSON_TARGET):
        op = handler.path[len(RPC_PREFIX) :] if use_cbor else target[len(JSON_TARGET) :]
        status, payload = call(
            b,
            op,
            body,
            handler.headers.get("Authorization", ""),
            bool(handler.headers.get("X-Amz-Date") or handler.headers.get("Date")),
            use_cbor=use_cbor,
        )
        if not use_cbor:
            handler._json(status, _json_ready(payload), "application/x-amz-json-1.1")
            return
        data = cbor(payload)
        handler.send_response(status)
        handler.send_header("Content-Type", "application/cbor")
        handler.send_header("smithy-protocol", "rpc-v2-cbor")
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        handler.end_headers()
        handler.wfile.write(data)
        return
    try:
        spec = json.loads(body or b"{}")
        if not isinstance(spec, dict):
            raise ValueError("the body must be a JSON object")
        with b.lock:
            if handler.path == PATH:
                answer = b.set(spec, emulator.now())
            elif handler.path == PATH + "/config":
                answer = b.configure(spec)
            else:
                handler._json(404, {"error": "not found"})
                return
    except (ValueError, TypeError) as exc:
        handler._json(400, {"error": str(exc)})
        return
    handler._json(200, answer)


def serve_get(handler: Any) -> None:
    b = book(handler.server.emulator)
    with b.lock:
        handler._json(200, b.state())


_MODEL: list[Any] = []


def _model() -> Any:
    if not _MODEL:
        from botocore.session import get_session

        _MODEL.append(get_session().get_service_model("marketplace-entitlement"))
    return _MODEL[0]
