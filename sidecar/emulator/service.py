"""An AWS Marketplace Metering Service emulator: the demo default and the test double.

Unmodified boto3 reaches it through AWS_ENDPOINT_URL_MARKETPLACE_METERING. It speaks awsJson1.1
(`POST /`, `X-Amz-Target: AWSMPMeteringService.<Op>`), refuses requests without SigV4 material
as AWS's front end does (it verifies no signature), validates requests against the constraints
of botocore's pinned service model (`model_violations`: nothing hard-coded, so a botocore bump
brings the next model's rules), signs PS256 tokens with its own key, raises entitlement
errors only on a pod's first call (as AWS does; a "pod" is the access key id in the SigV4
credential scope), and injects faults. Tests drive it through `/_emulator/config` and read
`/_emulator/calls`.
MeterUsage follows AWS's hour rules (see `meter.py`); its records are read at `/_emulator/ledger`.
ResolveCustomer and BatchMeterUsage (SaaS) follow `saas.py`: tests create customers and their
registration tokens at `POST /_emulator/saas/customers`, end subscriptions at
`POST /_emulator/saas/unsubscribe`, and read the records and counts at `/_emulator/saas/ledger`.
For tests that need hours to pass in seconds, `time_scale`/`time_origin` run the emulator's
MeterUsage clock faster (the sidecar's test-only scaled clock uses the same formula), and
`clock_offset` puts AWS's clock ahead of (or behind) the sidecar's, with `meter_future_seconds`
as AWS's undocumented tolerance for timestamps in its future.
"""

from __future__ import annotations

import functools
import json
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.core import quantity
from sidecar.core.ratelimit import TokenBucket
from sidecar.emulator import entitlements, license_manager, saas_events
from sidecar.emulator.meter import MeterBook
from sidecar.emulator.saas import MAX_BODY_BYTES, SaasBook

TARGET_PREFIX = "AWSMPMeteringService."
SIGNING_NAME = "aws-marketplace"
ENTITLEMENT_ERRORS = ("CustomerNotEntitledException", "PlatformNotSupportedException")
BODY_CAP = 4 << 20  # bytes of a request body kept; more is answered as too large
DRAIN_CAP = 64 << 20  # bytes beyond BODY_CAP read and dropped before answering
RESET = "ConnectionReset"  # pseudo error: drop the connection without an answer
# pseudo error: process the call (MeterUsage records it), then drop the connection: the caller
# never learns that AWS has the record.
RECORDED_RESET = "RecordedThenReset"
TOKEN_FAULTS = (
    "tamper",
    "wrong_nonce",
    "wrong_product",
    "wrong_version",
    "rs256",
    "alg_none",
    "future_iat",
    "other_key",
    "no_nonce",
)


@dataclass
class Fault:
    """Fail with `error` on calls after+1 .. after+first, or at `rate` (0..1) after `after`.

    Calls are counted from the moment the fault is configured; the first fault that fires wins.
    With `op`, only calls of that operation count and fail.
    """

    error: str
    first: int = 0
    rate: float = 0.0
    after: int = 0
    seen: int = 0
    op: str | None = None

    def fires(self, rng: random.Random) -> bool:
        self.seen += 1
        if self.after < self.seen <= self.after + self.first:
            return True
        return self.seen > self.after and self.rate > 0 and rng.random() < self.rate


@dataclass
class EmulatorConfig:
    entitled: bool = True
    platform_supported: bool = True
    product_codes: list[str] | None = None  # None: any product code is published
    key_versions: list[int] = field(default_factory=lambda: [1])
    region: str | None = None  # None: accept any region in the credential scope
    rotation_at: float | None = None
    latency: float = 0.0
    throttle_rps: float | None = None
    throttle_burst: int = 1
    faults: list[Fault] = field(default_factory=list)
    token_fault: str | None = None
    date_offset: float = 0.0  # seconds added to the Date header (clock-skew tests)
    # MeterUsage
    dimensions: list[str] | None = None  # None: any dimension is published
    meter_future_seconds: float = 300.0  # AWS's future limit is undocumented
    # How far in the past each API takes a timestamp (the pinned model's documentation):
    # MeterUsage "up to six hours"; BatchMeterUsage "24 hours or more" refused, and the previous
    # billing month's records only until 06:00 UTC on the 1st (the month-end grace).
    meter_window_seconds: float = 6 * 3600.0
    batch_window_seconds: float = 24 * 3600.0
    batch_month_grace_seconds: float = 6 * 3600.0
    # Seconds AWS's clock is ahead of this machine's (negative: behind): where the sidecar's
    # clock is off, MeterUsage and BatchMeterUsage judge timestamps by AWS's.
    clock_offset: float = 0.0
    meter_throttle_rps: float | None = None  # AWS: 10 per second per account and region
    meter_throttle_burst: int = 10
    dry_run_answer: str = "ok"  # "ok": 200 with MeteringRecordId DryRunOperation; "error": 400
    denied_operations: list[str] = field(default_factory=list)  # IAM says no
    time_scale: float = 1.0  # MeterUsage clock: origin + (now - origin) * scale
    time_origin: float = 0.0
    # BatchMeterUsage (SaaS); its clock is the MeterUsage clock, its future limit
    # meter_future_seconds
    batch_throttle_rps: float | None = None  # AWS: 10 per second per account and region
    batch_throttle_burst: int = 10
    unprocessed_rate: float = 0.0  # fraction of records answered as UnprocessedRecords
    resolve_throttle_rps: float | None = None  # ResolveCustomer's own bucket (AWS: undocumented)
    resolve_throttle_burst: int = 5


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Emulator:
    def __init__(self, config: EmulatorConfig | None = None, seed: int | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.key = _new_key()
        self._other_key: rsa.RSAPrivateKey | None = None
        self._lock = threading.Lock()
        self._pods_seen: set[str] = set()
        self._rng = random.Random(seed)  # noqa: S311  # nosec B311 # fault dice, not security
        self._bucket: TokenBucket | None = None
        self._meter_bucket: TokenBucket | None = None
        self._batch_bucket: TokenBucket | None = None
        self._resolve_bucket: TokenBucket | None = None
        self.book = MeterBook()
        self.saas = SaasBook()
        # In-process tests may drive the MeterUsage clock directly (a manual clock).
        self.meter_clock: Callable[[], float] | None = None
        self.calls: list[dict[str, Any]] = []
        self._generation = 0  # bumped by reset(): calls begun before it are not recorded
        self._apply_throttle()
        from botocore.session import get_session

        self._model = get_session().get_service_model("meteringmarketplace")

    # -- configuration -------------------------------------------------------------------

    def public_pem(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def reconfigure(self, changes: dict[str, Any]) -> None:
        known = {f.name for f in fields(EmulatorConfig)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
        with self._lock:
            for name, value in changes.items():
                if name == "faults":
                    value = [Fault(**f) for f in value]
                if name == "token_fault" and value not in (None, *TOKEN_FAULTS):
                    raise ValueError(f"token_fault must be one of {TOKEN_FAULTS}")
                if name == "unprocessed_rate" and not (
                    isinstance(value, int | float) and 0 <= value <= 1
                ):
                    raise ValueError("unprocessed_rate must be a number from 0 to 1")
                setattr(self.config, name, value)
            self._apply_throttle()

    def reset(self) -> None:
        with self._lock:
            self.config = EmulatorConfig()
            self._pods_seen.clear()
            self.calls.clear()
            self._generation += 1
            self.book = MeterBook()
            self.saas = SaasBook()
            self.meter_clock = None
            self._apply_throttle()
        entitlements.reset(self)

    def _apply_throttle(self) -> None:
        rps = self.config.throttle_rps
        self._bucket = (
            TokenBucket(rps, self.config.throttle_burst, time.monotonic()) if rps else None
        )
        mrps = self.config.meter_throttle_rps
        self._meter_bucket = (
            TokenBucket(mrps, self.config.meter_throttle_burst, time.monotonic()) if mrps else None
        )
        brps = self.config.batch_throttle_rps
        self._batch_bucket = (
            TokenBucket(brps, self.config.batch_throttle_burst, time.monotonic()) if brps else None
        )
        rrps = self.config.resolve_throttle_rps
        self._resolve_bucket = (
            TokenBucket(rrps, self.config.resolve_throttle_burst, time.monotonic())
            if rrps
            else None
        )

    def now(self) -> float:
        """The MeterUsage clock (scaled only when a test asks for it)."""
        cfg = self.config
        if self.meter_clock is not None:
            return self.meter_clock() + cfg.clock_offset
        return cfg.time_origin + (time.time() - cfg.time_origin) * cfg.time_scale + cfg.clock_offset

    # -- the API -------------------------------------------------------------------------

    def handle(
        self, target: str, body: bytes, auth: str, dated: bool = True
    ) -> tuple[int, dict[str, Any] | None]:
        """Answer one call: (HTTP status, JSON body), or (0, None) to drop the connection.
        `auth` is the Authorization header; `dated` whether X-Amz-Date or Date came with it."""
        op = target.removeprefix(TARGET_PREFIX) if target.startswith(TARGET_PREFIX) else ""
        oversize = op == "BatchMeterUsage" and len(body) >= MAX_BODY_BYTES
        try:
            params = {} if oversize else json.loads(body or b"{}")
        except ValueError:
            return _error("SerializationException", "body is not JSON")
        if not isinstance(params, dict):
            return _error("SerializationException", "body must be a JSON object")
        pod, region, service = _scope(auth)
        with self._lock:
            cfg = self.config
            latency = cfg.latency
            generation = self._generation
        if latency:
            time.sleep(latency)
        with self._lock:
            if generation != self._generation:
                # A slow call from before a reset (an earlier test's sidecar, long gone) must
                # not count against, or mark pods seen in, the new run: drop it unrecorded.
                return 0, None
            status, payload = self._dispatch(
                op, params, pod, region, service, len(body), auth_problem(auth, dated)
            )
            records = params.get("UsageRecords")
            self.calls.append(
                {
                    "op": op or target,
                    "pod": pod,
                    "nonce": params.get("Nonce"),
                    "dimension": params.get("UsageDimension"),
                    "quantity": _shown_quantity(params),
                    "dry_run": params.get("DryRun"),
                    "records": len(records) if isinstance(records, list) else None,
                    "status": status,
                    "code": (payload or {}).get("__type", "ok" if status else RESET),
                    "at": time.time(),
                }
            )
        return status, payload

    def _dispatch(
        self,
        op: str,
        params: dict[str, Any],
        pod: str,
        region: str | None,
        service: str | None,
        size: int = 0,
        unsigned: tuple[int, dict[str, Any]] | None = None,
    ) -> tuple[int, dict[str, Any] | None]:
        cfg = self.config
        if op not in self._model.operation_names:
            return _error("UnknownOperationException", f"unknown operation {op!r}")
        if unsigned is not None:  # AWS's front end refuses it before the operation runs
            return unsigned
        batch = op == "BatchMeterUsage"
        if batch:
            self.saas.count("calls")
            if size >= MAX_BODY_BYTES:
                return _error(
                    "ValidationException",
                    f"the request body is {size} bytes; BatchMeterUsage requests must be "
                    f"under 1 MB ({MAX_BODY_BYTES} bytes)",
                )
        if self._bucket is not None and self._bucket.take(time.monotonic()) > 0:
            if batch:
                self.saas.count("throttled")
            return _error("ThrottlingException", "Rate exceeded")
        if batch and self._batch_bucket is not None and self._batch_bucket.take(time.monotonic()):
            self.saas.count("throttled")
            return _error("ThrottlingException", "Rate exceeded")
        bucket = self._resolve_bucket
        if op == "ResolveCustomer" and bucket is not None and bucket.take(time.monotonic()):
            self.saas.count("resolve_throttled")
            return _error("ThrottlingException", "Rate exceeded")
        if (
            op == "MeterUsage"
            and self._meter_bucket is not None
            and self._meter_bucket.take(time.monotonic()) > 0
        ):
            return _error("ThrottlingException", "Rate exceeded")
        # every fault counts every call (of its operation)
        fired = [f for f in cfg.faults if f.op in (None, op) and f.fires(self._rng)]
        if fired:
            error = fired[0].error
            if error == RECORDED_RESET:
                self._validated(op, params, pod, region, service)
                return 0, None
            return (0, None) if error == RESET else _error(error, "injected fault")
        return self._validated(op, params, pod, region, service)

    def _validated(
        self, op: str, params: dict[str, Any], pod: str, region: str | None, service: str | None
    ) -> tuple[int, dict[str, Any] | None]:
        if service is not None and service != SIGNING_NAME:
            return _error(
                "InvalidSignatureException",
                f"Credential should be scoped to correct service: '{SIGNING_NAME}'.",
            )
        shape = self._model.operation_model(op).input_shape
        assert shape is not None  # nosec B101 # narrowing for mypy, not a check
        types, broken = model_violations(params, shape)
        if types:
            return _error("SerializationException", "; ".join(types))
        if broken:
            n = len(broken)
            return _error(
                "ValidationException",
                f"{n} validation error{'s' if n > 1 else ''} detected: {'; '.join(broken)}",
            )
        if op == "MeterUsage":
            return self._meter_usage(params, pod, region)
        if op in ("ResolveCustomer", "BatchMeterUsage"):
            return self._saas(op, params)
        if op != "RegisterUsage":
            return _error("UnsupportedOperation", f"the emulator does not implement {op} yet")
        return self._register_usage(params, pod, region)

    def _meter_usage(
        self, params: dict[str, Any], pod: str, region: str | None
    ) -> tuple[int, dict[str, Any] | None]:
        cfg = self.config
        dry_run = bool(params.get("DryRun"))
        if "MeterUsage" in cfg.denied_operations:
            code = "UnauthorizedException" if dry_run else "AccessDeniedException"
            return _error(code, "not authorized to perform aws-marketplace:MeterUsage")
        if cfg.region and region and region != cfg.region:
            return _error(
                "InvalidEndpointRegionException", f"call from {region}, pod runs in {cfg.region}"
            )
        now = self.now()
        problem = self.book.check(
            params,
            now,
            dimensions=cfg.dimensions,
            product_codes=cfg.product_codes,
            future_limit=cfg.meter_future_seconds,
            window=cfg.meter_window_seconds,
        )
        if problem is not None:
            return problem
        if dry_run:  # a permission check: no record, and not the pod's first call
            if cfg.dry_run_answer == "error":
                return _error("DryRunOperation", "the request would have succeeded")
            return 200, {"MeteringRecordId": "DryRunOperation"}
        first_call = pod not in self._pods_seen
        self._pods_seen.add(pod)
        if first_call and not cfg.platform_supported:
            return _error("PlatformNotSupportedException", "not running on ECS, EKS or Fargate")
        if first_call and not cfg.entitled:
            return _error("CustomerNotEntitledException", "customer is not subscribed")
        return self.book.record(params, pod, now)

    def _saas(self, op: str, params: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        cfg = self.config
        if op in cfg.denied_operations:
            return _error(
                "AccessDeniedException", f"not authorized to perform aws-marketplace:{op}"
            )
        if op == "ResolveCustomer":
            return self.saas.resolve(params, self.now())
        rate = cfg.unprocessed_rate
        return self.saas.batch(
            params,
            self.now(),
            dimensions=cfg.dimensions,
            product_codes=cfg.product_codes,
            future_limit=cfg.meter_future_seconds,
            unprocessed=lambda: rate > 0 and self._rng.random() < rate,
            window=cfg.batch_window_seconds,
            month_grace=cfg.batch_month_grace_seconds,
        )

    def saas_customer(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A customer and a fresh registration token for it (ValueError names a bad field)."""
        with self._lock:
            return self.saas.issue(spec, self.now())

    def saas_unsubscribe(self, spec: dict[str, Any]) -> list[str]:
        with self._lock:
            return self.saas.unsubscribe(spec)

    def saas_event(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Build one lifecycle event, apply it to the ledger, send it (and `copies` - 1 repeats)
        to the test's SQS queue (ValueError names a bad field; nothing is applied then)."""
        queue = saas_events.loopback_queue(spec.get("queue_url"))
        copies = spec.get("copies", 1)
        if not isinstance(copies, int) or isinstance(copies, bool) or not 1 <= copies <= 10:
            raise ValueError("copies must be a whole number from 1 to 10")
        fields = {k: v for k, v in spec.items() if k not in ("queue_url", "copies")}
        with self._lock:
            account, product = fields.get("customer_aws_account_id"), fields.get("product_code")
            if (
                fields.get("type") in saas_events.EVENTBRIDGE
                and "agreement_id" not in fields
                and isinstance(account, str)
                and isinstance(product, str)
            ):  # AWS names the buyer's agreement in each of its events, not a new one each time
                fields["agreement_id"] = self.saas.agreement_of(account, product)
            built = saas_events.build(fields, self.now())
        message_ids = saas_events.send(queue, [built.body] * copies)
        applied: list[str] = []
        if built.type in saas_events.DEPROVISIONING | saas_events.SUBSCRIBING:
            deprovision = built.type in saas_events.DEPROVISIONING
            with self._lock:
                applied = self.saas.lifecycle(
                    deprovision=deprovision,
                    account=built.account_id,
                    customer_identifier=built.customer_identifier,
                    product=built.product_code,
                    now=self.now(),
                )
            if deprovision and built.account_id is not None:
                ents = entitlements.book(self)
                with ents.lock:
                    ents.revoke(built.product_code, built.account_id)
        return {
            "event_id": built.event_id,
            "type": built.type,
            "message_ids": message_ids,
            "body": built.body,
            "applied_to": applied,
        }

    def saas_ledger(self) -> dict[str, Any]:
        with self._lock:
            return self.saas.ledger()

    def _register_usage(
        self, params: dict[str, Any], pod: str, region: str | None
    ) -> tuple[int, dict[str, Any] | None]:
        cfg = self.config
        if cfg.region and region and region != cfg.region:
            return _error("InvalidRegionException", f"call from {region}, pod runs in {cfg.region}")
        if cfg.product_codes is not None and params["ProductCode"] not in cfg.product_codes:
            return _error("InvalidProductCodeException", "product code not found")
        if params["PublicKeyVersion"] not in cfg.key_versions:
            return _error("InvalidPublicKeyVersionException", "public key version is invalid")
        first_call = pod not in self._pods_seen
        self._pods_seen.add(pod)
        if first_call and not cfg.platform_supported:
            return _error("PlatformNotSupportedException", "not running on ECS, EKS or Fargate")
        if first_call and not cfg.entitled:
            return _error("CustomerNotEntitledException", "customer is not subscribed")
        answer: dict[str, Any] = {"Signature": self._sign(params)}
        if cfg.rotation_at is not None:
            answer["PublicKeyRotationTimestamp"] = cfg.rotation_at
        return 200, answer

    def _sign(self, params: dict[str, Any]) -> str:
        claims: dict[str, Any] = {
            "productCode": params["ProductCode"],
            "publicKeyVersion": params["PublicKeyVersion"],
            "nonce": params.get("Nonce", ""),
            "iat": int(time.time()),
        }
        fault = self.config.token_fault
        key: Any = self.key
        alg = "PS256"
        if fault == "wrong_nonce":
            claims["nonce"] = "not-" + str(claims["nonce"])
        elif fault == "no_nonce":
            del claims["nonce"]
        elif fault == "wrong_product":
            claims["productCode"] = "some-other-product"
        elif fault == "wrong_version":
            claims["publicKeyVersion"] = int(claims["publicKeyVersion"]) + 1
        elif fault == "future_iat":
            claims["iat"] += 86400
        elif fault == "rs256":
            alg = "RS256"
        elif fault == "other_key":
            self._other_key = self._other_key or _new_key()
            key = self._other_key
        if fault == "alg_none":
            return jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
        token = jwt.encode(claims, key, algorithm=alg)
        if fault == "tamper":
            head, payload, sig = token.split(".")
            token = f"{head}.{payload}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}"
        return token

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"config": asdict(self.config), "calls": list(self.calls)}

    def ledger(self) -> dict[str, Any]:
        with self._lock:
            return self.book.ledger()


# Checked by the books with their own error (InvalidTagException), also as whole matches.
_OWN_ERRORS = frozenset({"TagKey", "TagValue", "TagList"})
SHOWN_VALUE = 100  # characters of an offending value quoted back, as AWS quotes it


@functools.cache
def _pattern(text: str) -> re.Pattern[str]:
    return re.compile(text)


def _member_path(where: str, name: str) -> str:
    """AWS's spelling of a member's path: lower-camel names, list items as `.N.member`."""
    inner = name[:1].lower() + name[1:]
    return f"{where}.{inner}" if where else inner


def _shown(value: Any) -> str:
    if value is None:
        return "Value null"
    if isinstance(value, dict | list):
        return "Value"
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if len(text) > SHOWN_VALUE:
        text = text[:SHOWN_VALUE] + "..."
    return f"Value '{text}'"


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "structure": (dict,),
    "list": (list,),
    "map": (dict,),
    "string": (str,),
    "integer": (int,),
    "long": (int,),
    "boolean": (bool,),
    "float": (int, float),
    "double": (int, float),
    "timestamp": (int, float, str),  # epoch seconds, as botocore sends it; ISO text tolerated
}


def model_violations(value: Any, shape: Any, where: str = "") -> tuple[list[str], list[str]]:
    """Every way `value` breaks the pinned service model, worded as AWS words them:
    (type mismatches, answered SerializationException; constraint violations, answered
    ValidationException). Everything comes from the model: required members, each string's
    `pattern` (matched against the whole value: Python's `$` would let a trailing newline
    through), `enum`, `min`/`max` lengths of strings and lists, `min`/`max` values of numbers.
    A model update (a botocore version bump) changes what is enforced with no code change."""
    types: list[str] = []
    broken: list[str] = []
    _walk(value, shape, where, types, broken)
    return types, broken


def _walk(value: Any, shape: Any, where: str, types: list[str], broken: list[str]) -> None:
    kind = shape.type_name
    allowed = _JSON_TYPES.get(kind)
    wrong = allowed is not None and (
        not isinstance(value, allowed) or (isinstance(value, bool) and kind != "boolean")
    )
    if wrong:
        types.append(f"{_shown(value)} at '{where}' is not a {kind}")
        return
    meta = shape.metadata
    if shape.name in _OWN_ERRORS:
        return

    def fail(constraint: str) -> None:
        broken.append(
            f"{_shown(value)} at '{where}' failed to satisfy constraint: Member must {constraint}"
        )

    if kind == "structure":
        for name in shape.required_members:
            if value.get(name) is None:
                broken.append(
                    f"Value null at '{_member_path(where, name)}' failed to satisfy constraint: "
                    "Member must not be null"
                )
        for name, member in shape.members.items():
            if value.get(name) is not None:
                _walk(value[name], member, _member_path(where, name), types, broken)
    elif kind == "map":
        for key, item in value.items():
            _walk(key, shape.key, f"{where}.key", types, broken)
            _walk(item, shape.value, f"{where}.{key}", types, broken)
    elif kind == "list":
        if "min" in meta and len(value) < meta["min"]:
            fail(f"have length greater than or equal to {meta['min']}")
        if "max" in meta and len(value) > meta["max"]:
            fail(f"have length less than or equal to {meta['max']}")
        for i, item in enumerate(value, 1):
            _walk(item, shape.member, f"{where}.{i}.member", types, broken)
    elif kind == "string":
        if "min" in meta and len(value) < meta["min"]:
            fail(f"have length greater than or equal to {meta['min']}")
        if "max" in meta and len(value) > meta["max"]:
            fail(f"have length less than or equal to {meta['max']}")
        pattern = meta.get("pattern")
        if pattern is not None and _pattern(pattern).fullmatch(value) is None:
            fail(f"satisfy regular expression pattern: {pattern}")
        enum = shape.enum
        if enum and value not in enum:
            fail(f"satisfy enum value set: [{', '.join(enum)}]")
    elif kind in ("integer", "long", "float", "double"):
        if "min" in meta and value < meta["min"]:
            fail(f"have value greater than or equal to {meta['min']}")
        if "max" in meta and value > meta["max"]:
            fail(f"have value less than or equal to {meta['max']}")


def auth_problem(auth: str, dated: bool = True) -> tuple[int, dict[str, Any]] | None:
    """What AWS's front end answers a request whose SigV4 material is missing or incomplete,
    before the operation runs (the emulator checks no signature): no `Authorization` header, or
    one that is not SigV4, is MissingAuthenticationTokenException; a SigV4 header missing its
    Credential, SignedHeaders or Signature, or a request with neither X-Amz-Date nor Date, is
    IncompleteSignatureException naming what is missing."""
    if not auth.startswith("AWS4-"):
        return _error(
            "MissingAuthenticationTokenException", "Request is missing Authentication Token"
        )
    missing = [
        f"Authorization header requires '{part}' parameter."
        for part in ("Credential", "Signature", "SignedHeaders")
        if f"{part}=" not in auth
    ]
    if not dated:
        missing.append(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header."
        )
    if missing:
        return _error("IncompleteSignatureException", " ".join([*missing, f"Authorization={auth}"]))
    return None


def _shown_quantity(params: dict[str, Any]) -> Any:
    """A MeterUsage call's quantity for `/_emulator/calls`, by value: a JSON integer when whole
    (whichever field carried it), the exact decimal string otherwise, else what was sent."""
    for name in ("UsageQuantityAsDecimal", "UsageQuantity"):
        if name in params:
            try:
                return quantity.to_json(quantity.parse(params[name]))
            except quantity.QuantityError:
                return params[name]
    return None


def _error(code: str, message: str) -> tuple[int, dict[str, Any]]:
    status = 500 if code == "InternalServiceErrorException" else 400
    return status, {"__type": code, "message": message}


def _scope(auth: str) -> tuple[str, str | None, str | None]:
    """(access key id, region, service) from a SigV4 Authorization header."""
    marker = "Credential="
    if marker not in auth:
        return "anonymous", None, None
    scope = auth.split(marker, 1)[1].split(",", 1)[0].split("/")
    if len(scope) < 5:
        return scope[0] or "anonymous", None, None
    return scope[0], scope[2], scope[3]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 30
    server: EmulatorServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def date_time_string(self, timestamp: float | None = None) -> str:
        offset = self.server.emulator.config.date_offset
        return super().date_time_string((timestamp or time.time()) + offset)

    def _body(self) -> bytes:
        length = max(0, int(self.headers.get("Content-Length") or 0))
        # Read past 1 MB so BatchMeterUsage's size limit is checked on the real size.
        body = self.rfile.read(min(length, BODY_CAP))
        rest = length - len(body)
        if rest > DRAIN_CAP:
            self.close_connection = True  # too much to swallow: answer, then hang up
        else:
            # Swallow the rest, so the client reads a 400 rather than a reset mid-upload.
            while rest > 0 and (chunk := self.rfile.read(min(rest, 1 << 16))):
                rest -= len(chunk)
        return body

    def _json(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self._body()
        if license_manager.handles(self.path, self.headers.get("X-Amz-Target", "")):
            license_manager.serve_post(self, body)  # AWS License Manager: its own module
            return None
        if entitlements.handles(self.path, self.headers.get("X-Amz-Target", "")):
            entitlements.serve_post(self, body)  # the Entitlement Service (GetEntitlements)
            return None
        emulator = self.server.emulator
        if self.path == "/_emulator/config":
            try:
                emulator.reconfigure(json.loads(body or b"{}"))
            except (ValueError, TypeError) as exc:
                return self._json(400, {"error": str(exc)})
            return self._json(200, emulator.snapshot()["config"])
        if self.path == "/_emulator/reset":
            emulator.reset()
            return self._json(200, {"reset": True})
        if self.path == "/_emulator/saas/events":
            try:
                spec = json.loads(body or b"{}")
                if not isinstance(spec, dict):
                    raise ValueError("the body must be a JSON object")
                return self._json(200, emulator.saas_event(spec))
            except (ValueError, TypeError) as exc:
                return self._json(400, {"error": str(exc)})
            except Exception as exc:  # the queue did not take it: the test's SQS, not a 500
                return self._json(502, {"error": f"SQS send failed: {type(exc).__name__}: {exc}"})
        if self.path in ("/_emulator/saas/customers", "/_emulator/saas/unsubscribe"):
            try:
                spec = json.loads(body or b"{}")
                if not isinstance(spec, dict):
                    raise ValueError("the body must be a JSON object")
                if self.path.endswith("/customers"):
                    return self._json(200, emulator.saas_customer(spec))
                return self._json(200, {"unsubscribed": emulator.saas_unsubscribe(spec)})
            except (ValueError, TypeError) as exc:
                return self._json(400, {"error": str(exc)})
        status, payload = emulator.handle(
            self.headers.get("X-Amz-Target", ""),
            body,
            self.headers.get("Authorization", ""),
            dated=bool(self.headers.get("X-Amz-Date") or self.headers.get("Date")),
        )
        if payload is None:
            # SO_LINGER 0: closing sends RST, as a dropped connection or a proxy reset would.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return None
        self._json(status, payload, "application/x-amz-json-1.1")
        return None

    def do_GET(self) -> None:
        if self.path.startswith(license_manager.PATH_PREFIX):
            license_manager.serve_get(self)
            return None
        if self.path == entitlements.PATH:
            entitlements.serve_get(self)
            return None
        if self.path == "/_emulator/calls":
            return self._json(200, self.server.emulator.snapshot()["calls"])
        if self.path == "/_emulator/ledger":
            return self._json(200, self.server.emulator.ledger())
        if self.path == "/_emulator/saas/ledger":
            return self._json(200, self.server.emulator.saas_ledger())
        if self.path == "/_emulator/public-key":
            data = self.server.emulator.public_pem().encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-pem-file")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        return self._json(404, {"error": "not found"})


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, emulator: Emulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator = emulator
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> EmulatorServer:
        threading.Thread(
            target=self.serve_forever, args=(0.2,), daemon=True, name="emulator"
        ).start()
        return self
