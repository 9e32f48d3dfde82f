"""AWS License Manager, as contract-priced container products use it: the emulator's part.

awsJson1.1 `POST /` with `X-Amz-Target: AWSLicenseManager.<Op>`, reached by unmodified boto3
through AWS_ENDPOINT_URL_LICENSE_MANAGER; requests validated against botocore's
`license-manager` model (patterns matched whole). CheckoutLicense, ExtendLicenseConsumption,
CheckInLicense and GetAccessToken; tests grant licenses and inject faults under
`/_emulator/license/...` (see `serve_post`). Floating counts: a checkout consumes, a check-in
returns, a provisional checkout nobody extends returns to the pool at its expiry; a PERPETUAL
one is drawn down for good. ClientToken makes a retried CheckoutLicense idempotent.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import socket
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

TARGET_PREFIX = "AWSLicenseManager."
PATH_PREFIX = "/_emulator/license/"
MARKETPLACE_FINGERPRINT = "aws:294406891311:AWS/Marketplace:issuer-fingerprint"
RESET = "ConnectionReset"  # a fault: the connection drops before the call is processed
LOST = "AnswerLost"  # a fault: the call is processed (units consumed), then the connection drops
# A fault: the call is processed (units consumed), its answer held back until the test releases
# it (`release`, or `LicenseBook.gate`): an answer that arrives late, at a moment the test picks.
HELD = "AnswerHeld"
# A fault: the checkout is made (units consumed), its answer names an entitlement nobody asked
# for (what a proxy, or an answer meant for another request, looks like): not verifiable.
ODD = "AnswerUnasked"
# A fault: the request waits for the same release before it is processed (a request still on
# its way while other calls go through).
DELAYED = "RequestHeld"
HOLD_MAX_SECONDS = 30.0  # a held answer nobody releases goes out after this (no hung tests)
ACCESS_TOKEN_SECONDS = 3600  # GetAccessToken: "Access tokens are valid for one hour"
# "In most cases, a request must reach AWS within five minutes of the time stamp in the request.
# Otherwise, AWS denies the request." (IAM User Guide, "Signing AWS API requests").
SIGV4_SKEW_SECONDS = 300.0


@dataclass
class Fault:
    """Fail the next `first` calls (of `op`, or every License Manager call) with `error`."""

    error: str
    first: int = 1
    op: str | None = None
    seen: int = 0

    def fires(self, op: str) -> bool:
        if self.op not in (None, op):
            return False
        self.seen += 1
        return self.seen <= self.first


@dataclass
class Grant:
    sku: str
    arn: str
    fingerprint: str
    entitlements: dict[str, dict[str, Any]]  # name -> {"unit", "max": int | None}
    expires_at: float | None = None  # the license's own end (emulator clock)
    revoked: bool = False


@dataclass
class Consumption:
    sku: str
    units: dict[str, int]  # entitlement -> units held
    checkout_type: str
    expires_at: float
    answer: dict[str, Any] = field(default_factory=dict)


class LicenseBook:
    """The licenses, their checkouts and the faults; every method is called under `lock`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.grants: dict[str, Grant] = {}
        self.consumptions: dict[str, Consumption] = {}
        self.client_tokens: dict[str, tuple[str, str]] = {}  # token -> (request, consumption)
        self.refresh_tokens: dict[str, dict[str, Any]] = {}
        self.faults: list[Fault] = []
        self.ttl = 3600.0  # a provisional checkout's lifetime (the guide: 60 minutes)
        self.clock_offset = 0.0  # AWS's clock minus this machine's
        self.latency = 0.0
        self.calls: list[dict[str, Any]] = []
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.clock: Callable[[], float] = time.time
        self.gate = threading.Event()  # set: held answers go out
        self.held_now = False  # the call being dispatched is to be held (read by `call`)
        self._rng = random.Random()  # noqa: S311  # nosec B311 # ids, not security

    def now(self) -> float:
        return self.clock() + self.clock_offset

    # -- test API --------------------------------------------------------------------------

    def grant(self, spec: dict[str, Any]) -> dict[str, Any]:
        sku = _text(spec, "sku")
        ents: dict[str, dict[str, Any]] = {}
        for e in spec.get("entitlements") or []:
            if not isinstance(e, dict) or "name" not in e:
                raise ValueError('each entitlement needs "name" (and "unit", "max"?)')
            maximum = e.get("max")
            if maximum is not None and (not isinstance(maximum, int) or maximum < 0):
                raise ValueError("max must be a whole number >= 0 (omit it: unlimited)")
            ents[str(e["name"])] = {"unit": str(e.get("unit", "None")), "max": maximum}
        if not ents:
            raise ValueError("a license needs at least one entitlement")
        account = str(spec.get("issuer_account", "294406891311"))
        arn = f"arn:aws:license-manager::{account}:license:l-{uuid.uuid4().hex}"
        expires_in = spec.get("expires_in")
        self.grants[sku] = Grant(
            sku,
            arn,
            str(spec.get("fingerprint", MARKETPLACE_FINGERPRINT)),
            ents,
            None if expires_in is None else self.now() + float(expires_in),
        )
        return {"license_arn": arn, "sku": sku}

    def change(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Revoke a license, or set an entitlement's maximum (a reduced or raised contract)."""
        grant = self.grants.get(_text(spec, "sku"))
        if grant is None:
            raise ValueError("no license for that sku")
        if spec.get("revoke"):
            grant.revoked = True
        if "name" in spec:
            ent = grant.entitlements.get(str(spec["name"]))
            if ent is None:
                raise ValueError("no such entitlement")
            ent["max"] = spec.get("max")
        if "expires_in" in spec:
            grant.expires_at = self.now() + float(spec["expires_in"])
        return self.state()

    def configure(self, spec: dict[str, Any]) -> dict[str, Any]:
        known = {"ttl_seconds", "faults", "clock_offset", "latency"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
        if "ttl_seconds" in spec:
            self.ttl = float(spec["ttl_seconds"])
        if "faults" in spec:
            self.faults = [Fault(**f) for f in spec["faults"]]
        if "clock_offset" in spec:
            self.clock_offset = float(spec["clock_offset"])
        if "latency" in spec:
            self.latency = float(spec["latency"])
        return {"ttl_seconds": self.ttl, "clock_offset": self.clock_offset}

    def token(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A license token (CreateToken's refresh token) the anywhere path exchanges."""
        value = jwt.encode(
            {
                "aud": _text(spec, "license_arn"),
                "roles": list(spec.get("role_arns") or []),
                "props": list(spec.get("properties") or []),
                "jti": uuid.uuid4().hex,
                "iat": int(self.now()),
            },
            self.key,
            algorithm="PS256",
        )
        self.refresh_tokens[value] = {
            "license_arn": spec["license_arn"],
            "properties": list(spec.get("properties") or []),
        }
        return {"token": value}

    def in_use(self, sku: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.consumptions.values():
            if c.sku == sku:
                for name, units in c.units.items():
                    out[name] = out.get(name, 0) + units
        return out

    def state(self) -> dict[str, Any]:
        self._expire()
        return {
            "licenses": {
                sku: {
                    "license_arn": g.arn,
                    "revoked": g.revoked,
                    "entitlements": g.entitlements,
                    "in_use": self.in_use(sku),
                    "checkouts": sum(1 for c in self.consumptions.values() if c.sku == sku),
                }
                for sku, g in self.grants.items()
            },
            "calls": list(self.calls),
            "ttl_seconds": self.ttl,
        }

    # -- the API ---------------------------------------------------------------------------

    def _expire(self) -> None:
        """Provisional checkouts past their expiry go back to the pool."""
        now = self.now()
        for token in [
            t
            for t, c in self.consumptions.items()
            if c.checkout_type == "PROVISIONAL" and c.expires_at <= now
        ]:
            del self.consumptions[token]

    def dispatch(self, op: str, params: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        self._expire()
        lost = odd = False
        for f in self.faults:
            if f.error == DELAYED:
                continue  # taken before the lock (`call`)
            if f.fires(op):
                if f.error == HELD:
                    self.held_now = True
                elif f.error == ODD:
                    odd = True
                elif f.error != LOST:
                    return (0, None) if f.error == RESET else _error(f.error, "injected fault")
                else:
                    lost = True
        handler = {
            "CheckoutLicense": self._checkout,
            "ExtendLicenseConsumption": self._extend,
            "CheckInLicense": self._checkin,
            "GetAccessToken": self._access_token,
        }.get(op)
        if handler is None:
            return _error("UnsupportedOperation", f"the emulator does not implement {op}")
        answer = handler(params)
        if odd and answer[1] is not None and "EntitlementsAllowed" in answer[1]:
            unasked = {"Name": "NotAsked", "Unit": "None"}
            answer = (answer[0], {**answer[1]})
            assert answer[1] is not None  # nosec B101 # narrowing for mypy
            answer[1]["EntitlementsAllowed"] = [*answer[1]["EntitlementsAllowed"], unasked]
        return (0, None) if lost else answer

    def _checkout(self, p: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        request = json.dumps({k: v for k, v in p.items() if k != "ClientToken"}, sort_keys=True)
        seen = self.client_tokens.get(p["ClientToken"])
        if seen is not None:
            if seen[0] != request:
                return _error(
                    "ValidationException", "ClientToken was used with different parameters"
                )
            done = self.consumptions.get(seen[1])
            if done is not None:
                return 200, done.answer  # the same request again: the same checkout
        grant = self.grants.get(p["ProductSKU"])
        now = self.now()
        if (
            grant is None
            or grant.revoked
            or grant.fingerprint != p["KeyFingerprint"]
            or (grant.expires_at is not None and grant.expires_at <= now)
        ):
            return _error("NoEntitlementsAllowedException", "No entitlements allowed")
        used = self.in_use(grant.sku)
        allowed: list[dict[str, str]] = []
        units: dict[str, int] = {}
        for e in p["Entitlements"]:
            have = grant.entitlements.get(e["Name"])
            if have is None or have["unit"] != e["Unit"]:
                continue
            want = int(e["Value"]) if str(e.get("Value", "")).isdigit() else 0
            maximum = have["max"]
            if want and maximum is not None and used.get(e["Name"], 0) + want > maximum:
                continue
            entry = {"Name": e["Name"], "Unit": e["Unit"]}
            if want:
                entry["Value"] = str(want)
                units[e["Name"]] = want
            allowed.append(entry)
        if not allowed:
            return _error("NoEntitlementsAllowedException", "No entitlements allowed")
        token = secrets.token_hex(16)
        expires = now + self.ttl
        answer = {
            "CheckoutType": p["CheckoutType"],
            "LicenseConsumptionToken": token,
            "EntitlementsAllowed": allowed,
            "SignedToken": self._sign(grant, allowed, now, expires),
            "IssuedAt": _iso(now),
            "Expiration": _iso(expires),
            "LicenseArn": grant.arn,
        }
        if p.get("NodeId"):
            answer["NodeId"] = p["NodeId"]
        if p["CheckoutType"] == "PERPETUAL":
            for name, n in units.items():  # drawn down for good
                ent = grant.entitlements[name]
                ent["max"] = max(0, int(ent["max"]) - n) if ent["max"] is not None else None
            units = {}
        self.consumptions[token] = Consumption(grant.sku, units, p["CheckoutType"], expires, answer)
        self.client_tokens[p["ClientToken"]] = (request, token)
        return 200, answer

    def _sign(self, grant: Grant, allowed: list[dict[str, str]], now: float, exp: float) -> str:
        """A PS256 JWT from the emulator's own key: the shape only (AWS publishes none)."""
        claims = {"iss": grant.fingerprint, "sub": grant.arn, "ent": allowed, "iat": int(now)}
        claims["exp"] = int(exp)
        return jwt.encode(claims, self.key, algorithm="PS256")

    def _extend(self, p: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        if p.get("DryRun"):  # permissions only, checked before the resource (as EC2 does)
            return _error("DryRunOperation", "Request would have succeeded")
        c = self.consumptions.get(p["LicenseConsumptionToken"])
        grant = self.grants.get(c.sku) if c is not None else None
        if c is None or grant is None or grant.revoked:
            return _error("ResourceNotFoundException", "License consumption not found")
        c.expires_at = self.now() + self.ttl
        return 200, {
            "LicenseConsumptionToken": p["LicenseConsumptionToken"],
            "Expiration": _iso(c.expires_at),
        }

    def _checkin(self, p: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        if self.consumptions.pop(p["LicenseConsumptionToken"], None) is None:
            return _error("ResourceNotFoundException", "License consumption not found")
        return 200, {}

    def _access_token(self, p: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        known = self.refresh_tokens.get(p["Token"])
        if known is None:
            return _error("AuthorizationException", "The refresh token is not valid")
        wanted = p.get("TokenProperties") or []
        if not set(wanted) <= set(known["properties"]):
            return _error("ValidationException", "TokenProperties do not match the token")
        now = int(self.now())
        access = jwt.encode(
            {
                "iss": "https://openid-license-manager.amazonaws.com",
                "aud": known["license_arn"],
                "sub": uuid.uuid4().hex,
                "iat": now,
                "exp": now + ACCESS_TOKEN_SECONDS,
            },
            self.key,
            algorithm="PS256",
        )
        return 200, {"AccessToken": access}


_BOOKS: weakref.WeakKeyDictionary[Any, LicenseBook] = weakref.WeakKeyDictionary()
_BOOKS_LOCK = threading.Lock()


def book(emulator: Any) -> LicenseBook:
    """The License Manager half of one emulator (created on first use)."""
    with _BOOKS_LOCK:
        found = _BOOKS.get(emulator)
        if found is None:
            found = _BOOKS[emulator] = LicenseBook()
        return found


def handles(path: str, target: str) -> bool:
    return target.startswith(TARGET_PREFIX) or path.startswith(PATH_PREFIX)


def serve_post(handler: Any, body: bytes) -> Any:
    """Answer one POST on the emulator's handler (test API or License Manager call)."""
    b = book(handler.server.emulator)
    path = handler.path
    if path.startswith(PATH_PREFIX):
        action = path[len(PATH_PREFIX) :]
        try:
            spec = json.loads(body or b"{}")
            if not isinstance(spec, dict):
                raise ValueError("the body must be a JSON object")
            with b.lock:
                if action == "reset":
                    b.gate.set()  # held answers of the old book go out
                    _BOOKS[handler.server.emulator] = LicenseBook()
                    return handler._json(200, {"reset": True})
                if action == "release":
                    b.gate.set()
                    return handler._json(200, {"released": True})
                actions: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
                    "licenses": b.grant,
                    "change": b.change,
                    "config": b.configure,
                    "tokens": b.token,
                }
                act = actions.get(action)
                if act is None:
                    return handler._json(404, {"error": f"no such action {action!r}"})
                return handler._json(200, act(spec))
        except (ValueError, TypeError, KeyError) as exc:
            return handler._json(400, {"error": str(exc)})
    auth = handler.headers.get("Authorization", "")
    target = handler.headers.get("X-Amz-Target", "")
    # A signed call stamped over five minutes from License Manager's clock (this machine's
    # plus `clock_offset`; botocore stamps with the real clock, also under a test's virtual
    # `b.clock`) is denied as AWS denies it, before anything else.
    stale = _stale_signature(handler.headers.get("X-Amz-Date"), time.time() + b.clock_offset)
    if stale is not None and "Credential=" in auth:
        with b.lock:
            b.calls.append(
                {
                    "op": target.removeprefix(TARGET_PREFIX),
                    "status": stale[0],
                    "code": stale[1]["__type"],
                    "client_token": None,  # nosec B105 # a field name: no token was taken
                    "access_key": auth.split("Credential=", 1)[1].split("/", 1)[0],
                    "at": time.time(),
                }
            )
        return handler._json(stale[0], stale[1], "application/x-amz-json-1.1")
    status, payload = call(b, target, body, auth)
    if payload is None:
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.close_connection = True
        return None
    return handler._json(status, payload, "application/x-amz-json-1.1")


def serve_get(handler: Any) -> Any:
    b = book(handler.server.emulator)
    with b.lock:
        return handler._json(200, b.state())


def call(
    b: LicenseBook, target: str, body: bytes, auth: str = ""
) -> tuple[int, dict[str, Any] | None]:
    """One License Manager call: validated against botocore's model, then answered."""
    op = target.removeprefix(TARGET_PREFIX)
    try:
        params = json.loads(body or b"{}")
    except ValueError:
        return _error("SerializationException", "body is not JSON")
    if not isinstance(params, dict):
        return _error("SerializationException", "body must be a JSON object")
    if b.latency:
        time.sleep(b.latency)
    with b.lock:
        delayed = any(f.fires(op) for f in b.faults if f.error == DELAYED)
    if delayed:
        b.gate.wait(HOLD_MAX_SECONDS)
    problem = _invalid(op, params)
    payload: dict[str, Any] | None
    with b.lock:
        b.held_now = False
        if problem is not None:
            status, payload = problem
        else:
            status, payload = b.dispatch(op, params)
        held, b.held_now = b.held_now, False
        b.calls.append(
            {
                "op": op,
                "status": status,
                "code": (payload or {}).get("__type", "ok" if status else RESET),
                "client_token": params.get("ClientToken"),
                # the access key id of the SigV4 credential scope (None: an unsigned call)
                "access_key": auth.split("Credential=", 1)[1].split("/", 1)[0]
                if "Credential=" in auth
                else None,
                "at": time.time(),
            }
        )
    if held:
        b.gate.wait(HOLD_MAX_SECONDS)
    return status, payload


def _invalid(op: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    from botocore.validate import ParamValidator

    model = _model()
    if op not in model.operation_names:
        return _error("UnknownOperationException", f"unknown operation {op!r}")
    shape = model.operation_model(op).input_shape
    assert shape is not None  # nosec B101 # narrowing for mypy, not a check
    report = ParamValidator().validate(params, shape)
    if report.has_errors():
        return _error("ValidationException", report.generate_report())
    broken = _violation(params, shape, "")
    if broken is not None:
        return _error("ValidationException", f"1 validation error detected: {broken}")
    return None


def _violation(value: Any, shape: Any, where: str) -> str | None:
    """What botocore leaves to the service: each string's `pattern` (matched whole: AWS matches
    whole values, Python's `$` would let a trailing newline through), `enum` and `max` length;
    the first violation, worded as AWS words them. Kept here, apart from the Metering side."""
    kind = shape.type_name
    if kind == "structure" and isinstance(value, dict):
        for name, member in shape.members.items():
            if name in value:
                inner = name[:1].lower() + name[1:]
                found = _violation(value[name], member, f"{where}.{inner}" if where else inner)
                if found is not None:
                    return found
    elif kind == "list" and isinstance(value, list):
        for i, item in enumerate(value, 1):
            found = _violation(item, shape.member, f"{where}.{i}.member")
            if found is not None:
                return found
    elif kind == "string" and isinstance(value, str):
        must = f"Value at '{where}' failed to satisfy constraint: Member must"
        pattern = shape.metadata.get("pattern")
        if pattern is not None and re.fullmatch(pattern, value) is None:
            return f"{must} satisfy regular expression pattern: {pattern}"
        if shape.enum and value not in shape.enum:
            return f"{must} satisfy enum value set: [{', '.join(shape.enum)}]"
        limit = shape.metadata.get("max")
        if limit is not None and len(value) > limit:
            return f"{must} have length less than or equal to {limit}"
    return None


def _stale_signature(stamp: str | None, now: float) -> tuple[int, dict[str, Any]] | None:
    """InvalidSignatureException worded as AWS words it, for a time stamp out of tolerance."""
    if not stamp:
        return None  # a Date header instead: not modelled
    try:
        signed = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 400, {"__type": "IncompleteSignatureException", "message": "bad X-Amz-Date"}
    fmt = "%Y%m%dT%H%M%SZ"
    here = datetime.fromtimestamp(now, UTC)
    if signed < now - SIGV4_SKEW_SECONDS:
        limit = datetime.fromtimestamp(now - SIGV4_SKEW_SECONDS, UTC).strftime(fmt)
        message = (
            f"Signature expired: {stamp} is now earlier than {limit} "
            f"({here.strftime(fmt)} - 5 min.)"
        )
    elif signed > now + SIGV4_SKEW_SECONDS:
        limit = datetime.fromtimestamp(now + SIGV4_SKEW_SECONDS, UTC).strftime(fmt)
        message = (
            f"Signature not yet current: {stamp} is still later than {limit} "
            f"({here.strftime(fmt)} + 5 min.)"
        )
    else:
        return None
    return 403, {"__type": "InvalidSignatureException", "message": message}


_MODEL: list[Any] = []


def _model() -> Any:
    if not _MODEL:
        from botocore.session import get_session

        _MODEL.append(get_session().get_service_model("license-manager"))
    return _MODEL[0]


def _text(spec: dict[str, Any], name: str) -> str:
    value = spec.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _error(code: str, message: str) -> tuple[int, dict[str, Any]]:
    status = 500 if code == "ServerInternalException" else 400
    return status, {"__type": code, "message": message}
