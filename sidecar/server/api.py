"""The local HTTP API (stdlib server: about 19 MiB idle, no dependencies).

Two listeners share one router: the API (loopback by default; it carries tokens) and the probe
listener (all interfaces, so kubelet httpGet probes work: /healthz, /readyz with the state and
error code only, and /metrics unless MARKETPLACE_METRICS_LISTEN moves or disables it). Client
mistakes get JSON 4xx answers, never 500.
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import io
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Literal, Protocol
from urllib.parse import unquote

from sidecar import __version__
from sidecar.entitlement.registrar import Registrar
from sidecar.entitlement.state import Snapshot
from sidecar.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.ops.metrics import Metrics
from sidecar.server.probe import yield_to_probes
from sidecar.usage.db import StoreUnavailableError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4096
# POST /v1/usage takes up to 1,000 records: about 400 bytes each with the longest names, leaving
# room for a few allocations per record.
MAX_USAGE_BODY_BYTES = 1 << 20
USAGE_PATH = "/v1/usage"
CUSTOMERS_PATH = "/v1/customers"
RESOLVE_PATH = "/v1/customers/resolve"
CUSTOMER_PREFIX = "/v1/customers/"
CUSTOMER_ROUTE = "/v1/customers/{id}"  # the route's name in metrics and the OpenAPI document
CHANGES_PATH = "/v1/customers/changes"  # ?since=<cursor>&wait=<seconds, 0-20>
DEAD_LETTERS_PATH = "/v1/saas/dead-letters"  # ?limit=<1-100>&offset=<n>
DEAD_LETTER_PREFIX = "/v1/saas/dead-letters/"
DEAD_LETTER_ROUTE = "/v1/saas/dead-letters/{id}"
MAX_DEAD_LETTERS_PAGE = 100
MAX_MESSAGE_ID_CHARS = 100  # an SQS MessageId is a UUID (36)
# A registration token is opaque and AWS documents no maximum; observed ones are far below this.
MAX_RESOLVE_BODY_BYTES = 16 * 1024
# An account id (12 digits), a CustomerIdentifier (1-255) or the ledger's key, account id and
# license ARN joined by "/" (percent-encode it as %2F in the path).
MAX_CUSTOMER_KEY_CHARS = 2048
MAX_NONCE_CHARS = 255
# Resolve handlers in flight at once. Each may wait on AWS (ResolveCustomer retried for up to
# 10 s while throttled) holding one of the API's connections; registration faces the internet
# through the seller's page, usage intake does not. Beyond this many, a resolve is answered 429
# at once, so junk registrations can never take the connections POST /v1/usage needs.
MAX_RESOLVES_IN_FLIGHT = 8
RESOLVE_BUSY_RETRY_SECONDS = 2
# Change-feed long polls waiting at once. Each holds one of the API's connections for up to
# 20 s; beyond this many, a poll that would wait is answered 429 at once, so pollers can never
# take the connections POST /v1/usage needs (API_LIMITS.max_connections is 64).
MAX_CHANGE_WAITS = 16
CHANGES_BUSY_RETRY_SECONDS = 1
REPORT_RETRY_SECONDS = 5
Listener = Literal["api", "probe", "metrics"]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# `json.dumps(..., separators=(",", ":"))` without building an encoder per reply.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    encoded: bytes | None = None  # pre-serialised `body`, when the router caches it
    content_type: str = "application/json"

    def payload(self) -> bytes:
        if self.encoded is not None:
            return self.encoded
        return _COMPACT.encode(self.body).encode()


def _problem(status: HTTPStatus, code: str, message: str, **headers: str) -> Reply:
    return Reply(status, {"error": {"code": code, "message": message}}, headers)


# Brackets a body may hold and still pass `body_problem` unparsed: far below the recursion
# limit (1,000 frames, the handler's own stack included), far above any usage record's nesting.
_SHALLOW = 500


def body_problem(body: bytes) -> Reply | None:
    """A 400 for JSON that parses but must not reach a handler, else None.

    Two shapes: strings holding a lone UTF-16 surrogate ("\\ud800" is valid JSON, but no UTF-8
    encoder, botocore's included, accepts the text), and nesting deep enough that the parser
    raises RecursionError. A body that is not JSON at all is left to the handler to name.

    Most bodies can hold neither and pass unparsed (the handler parses them anyway): ASCII with
    no `\\u` escape and no NUL holds no surrogate (UTF-16 or UTF-32 text has NULs), and
    fewer than `_SHALLOW` brackets cannot nest deep enough to exhaust the recursion limit.
    """
    if (
        body.isascii()
        and b"\x00" not in body  # UTF-16 or UTF-32 text: its escapes have NULs inside
        and b"\\u" not in body
        and body.count(b"[") + body.count(b"{") < _SHALLOW
    ):
        return None
    try:
        doc = json.loads(body)
    except RecursionError:
        return _problem(HTTPStatus.BAD_REQUEST, "invalid_json", "body is nested too deeply")
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        return None
    if not encodable(doc):
        return _problem(
            HTTPStatus.BAD_REQUEST,
            "invalid_json",
            "body holds a lone UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode text",
        )
    return None


def encodable(value: object) -> bool:
    """True when every string in a parsed JSON value encodes as UTF-8 (no lone surrogates).

    Callers that take a string from a request and send it on (a challenge's nonce to AWS)
    check it with this first."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


class UsageEndpoint(Protocol):
    """The usage pipeline as the API sees it (custom mode); `post` never raises."""

    def post(self, body: bytes) -> tuple[int, dict[str, Any]]: ...

    def report(self) -> dict[str, Any]: ...


class SaasEndpoint(Protocol):
    """SaasService as the API sees it (saas mode); none of these raise for a client mistake."""

    def post(self, body: bytes) -> tuple[int, dict[str, Any]]: ...

    def report(self) -> dict[str, Any]: ...

    def resolve(self, body: bytes) -> tuple[int, dict[str, Any]]: ...

    def customers(self) -> tuple[int, dict[str, Any]]: ...

    def customer(self, key: str) -> tuple[int, dict[str, Any]]: ...

    def changes(self, since: int, wait: float) -> tuple[int, dict[str, Any]]: ...

    def dead_letters(self, limit: int, offset: int) -> tuple[int, dict[str, Any]]: ...

    def dead_letter(self, message_id: str) -> tuple[int, dict[str, Any]]: ...


class ContractEndpoint(Protocol):
    """ContractService as the API sees it (contract mode): reads of memory only."""

    def document(self) -> dict[str, Any]: ...


class LeaseEndpoint(Protocol):
    """LeaseBook as the API sees it (contract mode with a state directory)."""

    def checkout(self, body: bytes) -> tuple[int, dict[str, Any]]: ...

    def renew(self, body: bytes) -> tuple[int, dict[str, Any]]: ...

    def checkin(self, body: bytes) -> tuple[int, dict[str, Any]]: ...

    def listing(self) -> tuple[int, dict[str, Any]]: ...


LEASES_PATH = "/v1/licenses"
LEASE_PATHS = ("checkout", "renew", "checkin")


class Router:
    """Maps (method, path, body) to a `Reply`. No sockets here."""

    def __init__(
        self,
        registrar: Registrar | None,
        health: Callable[[], str | None],
        *,
        listener: Listener = "api",
        serve_metrics: bool = False,
        extras: Callable[[], dict[str, Any]] | None = None,
        metrics: Metrics | None = None,
        warnings: Sequence[str] = (),
        usage: UsageEndpoint | None = None,
        saas: SaasEndpoint | None = None,
        readiness: Callable[[], tuple[bool, str | None]] | None = None,
        notices: Callable[[], list[str]] | None = None,
        contract: ContractEndpoint | None = None,
        leases: LeaseEndpoint | None = None,
    ) -> None:
        """`listener` picks the routes: "api" everything but /metrics; "probe" /healthz and a
        /readyz that tells the cluster only the state and error code (AWS messages can name
        role ARNs and accounts); "metrics" nothing but /metrics. `serve_metrics` adds /metrics.

        SaaS mode passes no registrar, `saas` and `readiness` (the store is available).
        `notices` adds `warnings` to a ready /readyz: custom mode's state volume filling (from
        memory), saas mode's sending headroom (a store read at most every few seconds) and a
        second sender on SQLite. The probe listener shows each warning's name only."""
        if registrar is None and readiness is None and contract is None:
            raise ValueError("a Router needs a registrar or a readiness function")
        self._contract = contract
        self._registrar = registrar
        self._readiness = readiness
        self._notices = notices
        self._warnings = tuple(warnings)  # from the configuration; they last the process
        self._usage = usage
        self._saas = saas
        self._health = health
        self._extras = extras or dict
        self._cached: tuple[Snapshot, dict[str, Any], Reply] | None = None
        self._resolves = threading.BoundedSemaphore(MAX_RESOLVES_IN_FLIGHT)
        self._change_waits = threading.BoundedSemaphore(MAX_CHANGE_WAITS)
        self.redacted = listener != "api"
        routes: dict[str, dict[str, Callable[[bytes], Reply]]] = {}
        if listener != "metrics":
            routes["/healthz"] = {"GET": self._healthz}
            routes["/readyz"] = {"GET": self._readyz}
        self.metrics = metrics
        if metrics is not None and (serve_metrics or listener == "metrics"):
            routes["/metrics"] = {"GET": self._metrics}
        if listener == "api":
            routes["/v1/entitlement"] = {"GET": self._entitlement}
            routes["/v1/entitlement/challenge"] = {"POST": self._challenge}
            # Usage and customers carry billing data: loopback API only, never the probe listener.
            routes[USAGE_PATH] = {"GET": self._usage_report, "POST": self._usage_post}
            routes[RESOLVE_PATH] = {"POST": self._resolve}
            routes[CUSTOMERS_PATH] = {"GET": self._customers}
            routes[CUSTOMER_ROUTE] = {"GET": self._customer}
            routes[CHANGES_PATH] = {"GET": self._customer}  # routed by `handle`, with the query
            # The lifecycle queue's poison messages (bodies may name buyers): loopback API only.
            routes[DEAD_LETTERS_PATH] = {"GET": self._customer}  # by `handle`, with the query
            routes[DEAD_LETTER_ROUTE] = {"GET": self._customer}  # by `handle`, with the id
            if usage is not None:
                routes["/v1/entitlement/challenge"] = {"POST": self._no_challenge}
            # Leases hold the buyer's units: loopback API only, never the probe listener. The
            # routes exist in every mode (a wrong method is a 405, as for usage and customers);
            # outside contract mode they answer 404 naming the mode.
            lease = self._lease_route if contract is not None else self._no_leases
            routes[LEASES_PATH] = {"GET": lease(leases, "listing")}
            for name in LEASE_PATHS:
                routes[f"{LEASES_PATH}/{name}"] = {"POST": lease(leases, name)}
            if contract is not None:
                routes["/v1/entitlement/challenge"] = {"POST": self._no_challenge}
            if saas is not None:
                routes["/v1/entitlement"] = {"GET": self._no_entitlement}
                routes["/v1/entitlement/challenge"] = {"POST": self._no_entitlement}
        self.routes = routes
        # The routes that may run under the API's CPU turn (`CpuTurn`): an allowlist, so a route
        # added later runs without the turn until someone checks that it never waits. These
        # read memory only: the health callable, the state machine's snapshot, the cached
        # entitlement. Everything else may wait on something (AWS for a challenge, the usage
        # store's commit, SQLite or PostgreSQL for usage and customers, the store again for
        # SaaS mode's /readyz) and runs without it.
        pure = {("/healthz", "GET"), ("/v1/entitlement", "GET")}
        if registrar is not None or contract is not None:
            pure.add(("/readyz", "GET"))
        self._pure = frozenset(pure)

    def cpu_only(self, method: str, path: str) -> bool:
        """True when answering needs only the CPU: an allowlisted route, or a 404/405 problem."""
        methods = self.routes.get(self.route(path))
        if methods is None:
            return True
        method = "GET" if method == "HEAD" else method
        return method not in methods or (self.route(path), method) in self._pure

    def route(self, path: str) -> str:
        """The route a path belongs to: /v1/customers/<one segment> is /v1/customers/{id}, and
        /v1/saas/dead-letters/<one segment> is /v1/saas/dead-letters/{id}."""
        if path in self.routes:
            return path
        for prefix, route in (
            (CUSTOMER_PREFIX, CUSTOMER_ROUTE),
            (DEAD_LETTER_PREFIX, DEAD_LETTER_ROUTE),
        ):
            if path.startswith(prefix):
                key = path[len(prefix) :]
                return route if key and "/" not in key else path
        return path

    def max_body(self, path: str) -> int:
        """1 MiB for usage on the API listener (in hourly mode too: a clear 404, not a 413)."""
        if path not in self.routes:
            return MAX_BODY_BYTES
        if path == USAGE_PATH:
            return MAX_USAGE_BODY_BYTES
        return MAX_RESOLVE_BODY_BYTES if path == RESOLVE_PATH else MAX_BODY_BYTES

    def allowed(self, path: str) -> list[str] | None:
        methods = self.routes.get(self.route(path))
        if methods is None:
            return None
        allowed = list(methods)
        return [*allowed, "HEAD"] if "GET" in allowed else allowed

    def handle(self, method: str, path: str, body: bytes, query: str = "") -> Reply:
        route = self.route(path)
        methods = self.routes.get(route)
        if methods is None:
            return _problem(HTTPStatus.NOT_FOUND, "not_found", f"no such path: {path[:100]}")
        if route == CHANGES_PATH and method in ("GET", "HEAD"):
            return self._changes(query)
        if route == DEAD_LETTERS_PATH and method in ("GET", "HEAD"):
            return self._dead_letters(query)
        if route == DEAD_LETTER_ROUTE and method in ("GET", "HEAD"):
            return self._dead_letter_at(path[len(DEAD_LETTER_PREFIX) :])
        if route == CUSTOMER_ROUTE:
            handler = methods.get("GET" if method == "HEAD" else method)
            if handler is not None:
                return self._customer_at(path[len(CUSTOMER_PREFIX) :])
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            allowed = ", ".join(self.allowed(path) or [])
            return _problem(
                HTTPStatus.METHOD_NOT_ALLOWED,
                "method_not_allowed",
                f"{method} is not allowed here; use {allowed}",
                Allow=allowed,
            )
        if body and method == "POST":
            problem = body_problem(body)
            if problem is not None:
                return problem
        return handler(body)

    # -- endpoints -----------------------------------------------------------------------

    def _healthz(self, _: bytes) -> Reply:
        problem = self._health()
        if problem:
            return Reply(503, {"status": "unhealthy", "reason": problem, "version": __version__})
        return Reply(200, {"status": "ok", "version": __version__})

    def _readyz(self, _: bytes) -> Reply:
        if self._contract is not None:
            return self._contract_readyz()
        if self._registrar is None:
            return self._store_readyz()
        snap = self._registrar.machine.snapshot()
        body: dict[str, Any] = {"ready": snap.entitled, "state": snap.state.value}
        if snap.error is not None:
            body["error"] = {"code": snap.error.code} if self.redacted else snap.error.to_json()
        notices = self._notices() if self._notices is not None else []
        if notices:
            body["warnings"] = notices
        return Reply(200 if snap.entitled else 503, body)

    def _contract_readyz(self) -> Reply:
        """Contract mode: ready while a license checkout is live (or as ON_LOSS says)."""
        assert self._contract is not None  # nosec B101 # routed only in contract mode
        doc = self._contract.document()
        body: dict[str, Any] = {"ready": doc["ready"], "state": doc["state"]}
        error = doc.get("error")
        if error:  # AWS messages can name accounts and ARNs: the probe listener gets the code
            body["error"] = {"code": error["code"]} if self.redacted else error
        if doc.get("warnings"):
            body["warnings"] = [w.split(":")[0] for w in doc["warnings"]]
        return Reply(200 if doc["ready"] else 503, body)

    def _store_readyz(self) -> Reply:
        """SaaS mode: ready while the usage store can take writes (PostgreSQL up)."""
        assert self._readiness is not None  # nosec B101 # the constructor demands one of two
        try:
            ok, reason = self._readiness()
        except Exception as exc:  # a readiness probe answers; it never 500s
            ok, reason = False, f"readiness check failed: {type(exc).__name__}"
        if ok:
            body: dict[str, Any] = {"ready": True, "state": "ready"}
            warnings = self._notices() if self._notices is not None else []
            if warnings:  # ready, with "code: message" lines a human should act on
                body["warnings"] = [w.split(":")[0] if self.redacted else w for w in warnings]
            return Reply(200, body)
        error: dict[str, Any] = {"code": "store_unavailable"}
        if not self.redacted:  # a driver's message can name hosts and users
            error["message"] = str(reason or "the usage store is unavailable")[:500]
        return Reply(503, {"ready": False, "state": "store_unavailable", "error": error})

    def _metrics(self, _: bytes) -> Reply:
        assert self.metrics is not None  # nosec B101 # routed only when metrics exist
        return Reply(200, {}, encoded=self.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    def _entitlement(self, _: bytes) -> Reply:
        if self._contract is not None:
            doc = self._contract.document()
            return Reply(200, {**doc, "warnings": [*self._warnings, *doc["warnings"]]})
        if self._registrar is None:
            return self._no_entitlement(b"")
        # Snapshots are immutable: serialise each one once, not on every poll.
        snap, extra = self._registrar.machine.snapshot(), self._extras()
        cached = self._cached
        if cached is None or cached[0] is not snap or cached[1] != extra:
            body = self.describe(snap, extra)
            reply = Reply(200, body, encoded=json.dumps(body, separators=(",", ":")).encode())
            self._cached = cached = (snap, extra, reply)
        return cached[2]

    def _challenge(self, body: bytes) -> Reply:
        try:
            doc = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            return _problem(HTTPStatus.BAD_REQUEST, "invalid_json", "body must be JSON")
        if self._registrar is None:
            return self._no_entitlement(b"")
        nonce = doc.get("nonce") if isinstance(doc, dict) else None
        if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE_CHARS:
            return _problem(
                HTTPStatus.BAD_REQUEST,
                "invalid_nonce",
                f'body must be {{"nonce": "<1-{MAX_NONCE_CHARS} characters>"}}; '
                "use a fresh random value per challenge",
            )
        out = self._registrar.challenge(nonce)
        payload = self.describe(out.snapshot)
        if out.status == "ok":
            return Reply(200, payload)
        if out.status == "rate_limited":
            retry = max(1, int(out.retry_after + 0.999))
            return _problem(
                HTTPStatus.TOO_MANY_REQUESTS,
                "rate_limited",
                "too many challenges: each one is a RegisterUsage call against the account's "
                f"quota; retry in {retry} s",
                **{"Retry-After": str(retry)},
            )
        if out.status == "registering":
            retry = max(1, int(out.retry_after + 0.999))
            return _problem(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "registering",
                "the first registration's verdict is not known yet; no AWS call was made "
                f"(one now could hide AWS's refusal); retry in {retry} s",
                **{"Retry-After": str(retry)},
            )
        if out.error is not None:
            payload["error"] = out.error.to_json()
        status = HTTPStatus.FORBIDDEN if out.status == "refused" else HTTPStatus.BAD_GATEWAY
        return Reply(status, payload)

    @staticmethod
    def _lease_route(leases: LeaseEndpoint | None, name: str) -> Callable[[bytes], Reply]:
        if leases is None:
            return _leases_need_state_dir
        if name == "listing":
            return lambda _: _pipeline_reply(*leases.listing())
        call: Callable[[bytes], tuple[int, dict[str, Any]]] = getattr(leases, name)
        return lambda body: _pipeline_reply(*call(body))

    @staticmethod
    def _no_leases(_leases: LeaseEndpoint | None, _name: str) -> Callable[[bytes], Reply]:
        return lambda _: _problem(
            HTTPStatus.NOT_FOUND,
            "no_leases_in_this_mode",
            "floating leases are License Manager checkouts: MARKETPLACE_MODE=contract only",
        )

    def _no_challenge(self, _: bytes) -> Reply:
        # 404, not 409: in this mode the resource does not exist (and fuzzers expect 404).
        return _problem(
            HTTPStatus.NOT_FOUND,
            "no_token_in_custom_mode",
            "MARKETPLACE_MODE=custom meters with MeterUsage, which returns no signed token, so "
            "there is nothing to challenge; read GET /v1/entitlement and GET /v1/usage instead",
        )

    def _no_entitlement(self, _: bytes) -> Reply:
        return _problem(
            HTTPStatus.NOT_FOUND,
            "no_entitlement_in_saas_mode",
            "MARKETPLACE_MODE=saas has no entitlement to report: there is no RegisterUsage and "
            "no token; who may use the product is the customer list (GET /v1/customers, "
            "POST /v1/customers/resolve) and usage goes to POST /v1/usage",
        )

    def _usage_post(self, body: bytes) -> Reply:
        pipeline = self._saas or self._usage
        if pipeline is None:
            return _usage_needs_custom_mode()
        return _pipeline_reply(*pipeline.post(body))

    def _usage_report(self, _: bytes) -> Reply:
        pipeline = self._saas or self._usage
        if pipeline is None:
            return _usage_needs_custom_mode()
        try:
            return Reply(200, pipeline.report())
        except StoreUnavailableError as exc:  # PostgreSQL down: an answer, not a dropped socket
            return _pipeline_reply(
                503,
                {
                    "error": "store_unavailable",
                    "message": f"the usage store cannot be read ({str(exc)[:300]}); retry later",
                    "retry_after": REPORT_RETRY_SECONDS,
                },
            )

    def _resolve(self, body: bytes) -> Reply:
        if self._saas is None:
            return _customers_need_saas_mode()
        if not self._resolves.acquire(blocking=False):
            return _problem(
                HTTPStatus.TOO_MANY_REQUESTS,
                "resolve_busy",
                f"{MAX_RESOLVES_IN_FLIGHT} registrations are already being resolved; retry in "
                f"{RESOLVE_BUSY_RETRY_SECONDS} s (usage reporting is not affected)",
                **{"Retry-After": str(RESOLVE_BUSY_RETRY_SECONDS)},
            )
        try:
            return _pipeline_reply(*self._saas.resolve(body))
        finally:
            self._resolves.release()

    def _customers(self, _: bytes) -> Reply:
        if self._saas is None:
            return _customers_need_saas_mode()
        return _pipeline_reply(*self._saas.customers())

    def _customer(self, _: bytes) -> Reply:  # routed by `handle`, with the key from the path
        return _customers_need_saas_mode()

    def _changes(self, query: str) -> Reply:
        """GET /v1/customers/changes?since=<cursor>&wait=<seconds>: the change feed."""
        if self._saas is None:
            return _customers_need_saas_mode()
        from urllib.parse import parse_qs

        try:
            args = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            args = {"": [""]}
        unknown = sorted(set(args) - {"since", "wait"})
        since_text = (args.get("since") or ["0"])[-1]
        wait_text = (args.get("wait") or ["0"])[-1]
        if unknown:
            return _problem(
                HTTPStatus.BAD_REQUEST,
                "invalid_query",
                f"{unknown[0][:40] or 'query'}: only since=<cursor> and wait=<seconds> are allowed",
            )
        # ASCII digits only (isdigit also takes '²'), and within the store's int64 sequence.
        digits = since_text.isascii() and since_text.isdigit() and len(since_text) <= 19
        if not digits or int(since_text) >= 2**63:
            return _problem(
                HTTPStatus.BAD_REQUEST,
                "invalid_query",
                "since: the cursor of the previous answer (a non-negative integer; 0 for all)",
            )
        try:
            wait = float(wait_text)
        except ValueError:
            wait = -1.0
        if not 0.0 <= wait <= 20.0:
            return _problem(
                HTTPStatus.BAD_REQUEST,
                "invalid_query",
                "wait: seconds to wait for a change, 0 to 20",
            )
        if wait == 0.0:
            return _pipeline_reply(*self._saas.changes(int(since_text), 0.0))
        if not self._change_waits.acquire(blocking=False):
            return _problem(
                HTTPStatus.TOO_MANY_REQUESTS,
                "changes_busy",
                f"{MAX_CHANGE_WAITS} change-feed polls are already waiting; retry in "
                f"{CHANGES_BUSY_RETRY_SECONDS} s (usage reporting is not affected)",
                **{"Retry-After": str(CHANGES_BUSY_RETRY_SECONDS)},
            )
        try:
            return _pipeline_reply(*self._saas.changes(int(since_text), wait))
        finally:
            self._change_waits.release()

    def _dead_letters(self, query: str) -> Reply:
        """GET /v1/saas/dead-letters?limit=<1-100>&offset=<n>: the lifecycle queue's poison
        messages kept, newest first."""
        if self._saas is None:
            return _customers_need_saas_mode()
        from urllib.parse import parse_qs

        try:
            args = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            args = {"": [""]}
        unknown = sorted(set(args) - {"limit", "offset"})
        if unknown:
            return _problem(
                HTTPStatus.BAD_REQUEST,
                "invalid_query",
                f"{unknown[0][:40] or 'query'}: only limit=<1-{MAX_DEAD_LETTERS_PAGE}> and "
                "offset=<n> are allowed",
            )
        limit = _small_int((args.get("limit") or ["20"])[-1])
        if limit is None or not 1 <= limit <= MAX_DEAD_LETTERS_PAGE:
            return _problem(
                HTTPStatus.BAD_REQUEST,
                "invalid_query",
                f"limit: how many dead letters to list, 1 to {MAX_DEAD_LETTERS_PAGE}",
            )
        offset = _small_int((args.get("offset") or ["0"])[-1])
        if offset is None:
            return _problem(
                HTTPStatus.BAD_REQUEST,
                "invalid_query",
                "offset: how many of the newest to skip, 0 to 999999999",
            )
        return _pipeline_reply(*self._saas.dead_letters(limit, offset))

    def _dead_letter_at(self, raw: str) -> Reply:
        if self._saas is None:
            return _customers_need_saas_mode()
        key = _path_key(raw, MAX_MESSAGE_ID_CHARS)
        if key is None:
            return _problem(
                HTTPStatus.BAD_REQUEST,
                "invalid_dead_letter",
                "id: the path ends with a dead letter's message_id from GET "
                f"{DEAD_LETTERS_PATH} (1-{MAX_MESSAGE_ID_CHARS} printable characters)",
            )
        return _pipeline_reply(*self._saas.dead_letter(key))

    def _customer_at(self, raw: str) -> Reply:
        if self._saas is None:
            return _customers_need_saas_mode()
        key = _path_key(raw, MAX_CUSTOMER_KEY_CHARS)
        if key is None:
            return _problem(
                HTTPStatus.BAD_REQUEST,
                "invalid_customer",
                "customer: the path ends with an AWS account id (12 digits), a customer "
                "identifier or a customer key from GET /v1/customers (1-"
                f"{MAX_CUSTOMER_KEY_CHARS} printable characters, percent-encoded)",
            )
        return _pipeline_reply(*self._saas.customer(key))

    def describe(self, snap: Snapshot, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self._registrar is not None  # nosec B101 # saas mode never describes a snapshot
        policy = self._registrar.policy
        return {
            "state": snap.state.value,
            "entitled": snap.entitled,
            "product_code": policy.product_code,
            "public_key_version": policy.public_key_version,
            "token": snap.token,
            "claims": snap.claims,
            "last_attempt_at": iso(snap.last_attempt_at),
            "last_success_at": iso(snap.last_success_at),
            "next_registration_at": iso(snap.next_registration_at),
            "consecutive_failures": snap.consecutive_failures,
            "error": snap.error.to_json() if snap.error else None,
            "warnings": [*self._warnings, *snap.warnings],
            **(self._extras() if extra is None else extra),
        }


def _small_int(text: str) -> int | None:
    """ASCII digits (isdigit also takes '²'), at most 9 of them; else None."""
    if text.isascii() and text.isdigit() and len(text) <= 9:
        return int(text)
    return None


def _as_problem(doc: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's flat errors in this API's shape: {"error": {"code", "message", ...}}."""
    code = doc.get("error")
    if not isinstance(code, str):
        return doc
    details = ("message", "field", "problems", "hint")
    error = {"code": code, "message": str(doc.get("message") or code)}
    error.update({k: doc[k] for k in details[1:] if k in doc})
    rest = {k: v for k, v in doc.items() if k != "error" and k not in details}
    return {"error": error, **rest}


def _pipeline_reply(status: int, doc: dict[str, Any]) -> Reply:
    """A pipeline's (status, body): errors in this API's shape, Retry-After on 429 and 503."""
    headers = {}
    retry = doc.get("retry_after")
    if status in (429, 503):
        seconds = retry if isinstance(retry, int | float) and math.isfinite(retry) else 1
        headers["Retry-After"] = str(max(1, int(seconds + 0.999)))
    return Reply(status, _as_problem(doc), headers)


def _leases_need_state_dir(_: bytes) -> Reply:
    return _problem(
        HTTPStatus.NOT_FOUND,
        "leases_need_state_dir",
        "product leases are kept in MARKETPLACE_STATE_DIR (so they survive a restart and are "
        "never counted twice); set it to a writable pod-lifetime directory",
    )


def _customers_need_saas_mode() -> Reply:
    return _problem(
        HTTPStatus.NOT_FOUND,
        "customers_need_saas_mode",
        "customers are resolved only with MARKETPLACE_MODE=saas (SaaS products: "
        "ResolveCustomer and BatchMeterUsage); this sidecar runs in another mode",
    )


def _usage_needs_custom_mode() -> Reply:
    return _problem(
        HTTPStatus.NOT_FOUND,
        "usage_needs_custom_mode",
        "usage is reported only with MARKETPLACE_MODE=custom (custom-metered products); this "
        "sidecar runs in hourly mode (RegisterUsage)",
    )


# How long an API request waits for the CPU turn before it goes on without one. A holder keeps
# it for a fraction of a millisecond, so under a flood the wait is a few ms; this bound is only
# reached when something is wrong (a holder that blocks: a bug), and then costs each request this.
TURN_WAIT_SECONDS = 0.05


class CpuTurn:
    """One API request computes at a time: the others park on a C lock, not on the GIL.

    CPython runs one thread at a time anyway. When 16 flooded API connections are all runnable,
    each GIL hand-over is a fight that the probe listener's thread often loses, and a probe
    waits several switch intervals. Parked on this lock, at most one API thread is runnable
    beside the probe's (benchmarks/throughput.py: flooded /healthz p99 about a third of what it
    was, for a few percent of the API's req/s). The turn is kept through the reply's send:
    given back before it, the p99 was as bad as with no turn at all.

    A holder that waits on anything but the CPU would stall the whole API with it, so the
    handler holds the turn only while the request is already in memory and its route is on the
    allowlist of pure ones (`Router.cpu_only`), and lets go before anything that may block
    (see `_Handler`). `take` is bounded besides: after `wait` seconds a request goes on
    without the turn (counted in `late`), so even a bug cannot stall the API for longer.
    """

    def __init__(self, wait: float = TURN_WAIT_SECONDS) -> None:
        self._lock = threading.Lock()
        self.wait = wait
        self.late = 0  # requests that went on without the turn (approximate: no lock)

    def take(self) -> bool:
        if self._lock.acquire(timeout=self.wait):
            return True
        self.late += 1
        return False

    def give(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


def head_complete(buffered: bytes) -> bool:
    """The request line and headers are all in `buffered` (the blank line that ends them is).

    The stdlib then parses them from the buffer without one more read, so parsing cannot wait
    on the client. A head split over several segments is parsed without the turn."""
    return b"\n\r\n" in buffered or b"\n\n" in buffered


class Phase(enum.Enum):
    """Where a connection is; each phase but `BUSY` has a total deadline, not an idle timer."""

    IDLE = "idle"  # waiting for the first byte of a request (keep-alive, or just accepted)
    READING = "reading"  # request line, headers and body must all arrive before the deadline
    BUSY = "busy"  # our handler runs (a challenge may wait on AWS): no deadline
    WRITING = "writing"  # the client must take the response before the deadline


@dataclass(frozen=True)
class Limits:
    """Per-listener connection policy: a cap, and deadlines that no byte-dripping can extend."""

    max_connections: int
    idle_seconds: float  # keep-alive: the next request's first byte must come within this
    request_seconds: float  # from a request's first byte to the end of its body
    write_seconds: float = 10.0


class _Conn:
    """One accepted connection, as the accept thread's deadline and eviction policy see it."""

    __slots__ = ("deadline", "dropped", "low", "phase", "since", "sock")

    def __init__(self, sock: socket.socket, now: float, idle: float) -> None:
        self.sock = sock
        self.phase = Phase.IDLE
        self.since = now
        self.deadline = now + idle
        self.dropped = False
        self.low = False  # its request is a registration (resolve): shed before usage waits

    def enter(self, phase: Phase, seconds: float = math.inf) -> None:
        # Deadline first: the accept thread reads these without a lock, and must never pair
        # the new phase with the old phase's (possibly passed) deadline.
        now = time.monotonic()
        self.deadline = now + seconds
        self.since = now
        self.phase = phase

    @property
    def evictable(self) -> bool:
        """Nothing of ours is in flight: dropping it costs the client a reconnect, nothing more."""
        return not self.dropped and self.phase in (Phase.IDLE, Phase.READING)


# Kubelet and Prometheus send a whole request in one segment; the product is on loopback.
API_LIMITS = Limits(max_connections=64, idle_seconds=30.0, request_seconds=10.0)
PROBE_LIMITS = Limits(max_connections=32, idle_seconds=5.0, request_seconds=3.0)
METRICS_LIMITS = Limits(max_connections=8, idle_seconds=60.0, request_seconds=3.0)


def _canned(status: HTTPStatus, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, status.phrase.encode(), len(body), body)
    )


_PHRASES = {status.value: status.phrase for status in HTTPStatus}
_date: tuple[int, str] = (-1, "")


def http_date() -> str:
    """`date_time_string()` for now, formatted once a second (it has whole seconds)."""
    global _date
    now = int(time.time())
    second, text = _date
    if second != now:
        text = email.utils.formatdate(now, usegmt=True)
        _date = (now, text)  # one tuple: a thread reads the old pair or the new, never a mix
    return text


def _path_key(raw: str, most: int) -> str | None:
    """The last path segment, percent-decoded: 1 to `most` printable characters, else None."""
    try:
        key = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        return None
    return key if 0 < len(key) <= most and key.isprintable() else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # keep-alive without 40 ms Nagle/delayed-ACK stalls
    # Blocking sockets: a socket timeout makes CPython poll() before every recv and send
    # (measurably slower), and it restarts on every byte anyway. Deadlines are enforced by
    # the server's accept thread, which shuts overdue sockets down (LocalServer.reap).
    timeout = None
    # Unbuffered: `_send` joins status line, headers and body into one send itself, and a
    # 100 Continue leaves at once (not with the reply, after the body it invites).
    wbufsize = 0
    server_version = f"marketplace-sidecar/{__version__}"
    sys_version = ""
    server: LocalServer
    _conn: _Conn
    _turn: CpuTurn | None  # the API listener's; probes and metrics never take it
    _held = False  # this thread holds the turn
    _missed = False  # this request waited its bound for the turn once: it goes on without

    def setup(self) -> None:
        super().setup()
        self._conn = self.server.connection_of(self.request)
        self._turn = self.server.turn
        rfile = self.rfile
        if not isinstance(rfile, io.BufferedReader):  # rbufsize is -1: always buffered
            raise TypeError(f"expected a buffered request stream, got {type(rfile).__name__}")
        self._peek = rfile.peek

    def handle_one_request(self) -> None:
        conn, limits = self._conn, self.server.limits
        conn.enter(Phase.IDLE, limits.idle_seconds)
        if conn.dropped or not self._peek(1):  # blocks until a first byte, EOF or eviction
            self.close_connection = True
            return
        conn.enter(Phase.READING, limits.request_seconds)
        # The first byte is in: peek() now returns the buffer without reading. A head still on
        # its way (a dripping client) is parsed without the turn, at the client's pace.
        self._missed = False
        if self._turn is not None and head_complete(self._peek()):
            self._take_turn()
        try:
            super().handle_one_request()
        finally:
            self._give_turn()
        if conn.dropped:
            self.close_connection = True

    def _take_turn(self) -> None:
        if self._turn is not None and not self._held and not self._missed:
            self._held = self._turn.take()
            self._missed = not self._held

    def _give_turn(self) -> None:
        if self._held and self._turn is not None:
            self._held = False
            self._turn.give()

    def handle_expect_100(self) -> bool:
        self._give_turn()  # it writes, and the client may not be reading
        return super().handle_expect_100()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed HTTP (400, 414, 431, 501...) as JSON, then close."""
        status = HTTPStatus(code)
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # else the stdlib writes no status line at all
        if self._conn.dropped:
            return  # cut off at its deadline or evicted: it already got its answer
        self._send(
            Reply(
                code,
                {
                    "error": {
                        "code": status.phrase.lower().replace(" ", "_"),
                        "message": message or status.description,
                    }
                },
            )
        )

    def _send(self, reply: Reply) -> None:
        self._conn.enter(Phase.WRITING, self.server.limits.write_seconds)
        payload = reply.payload()
        lines = [
            f"{self.protocol_version} {reply.status} {_PHRASES[reply.status]}",
            f"Server: {self.version_string()}",
            f"Date: {http_date()}",
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {len(payload)}",
            "Cache-Control: no-store",
            *(f"{name}: {value}" for name, value in reply.headers.items()),
        ]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.request_version == "HTTP/0.9":  # as the stdlib: a 0.9 reply is the body alone
            head = b""
        self._write(head if self.command == "HEAD" else head + payload)
        metrics = self.server.router.metrics
        if metrics is not None:
            path = (getattr(self, "path", "") or "").split("?", 1)[0]
            metrics.request(self.server.name, self.server.router.route(path), reply.status)

    def _write(self, data: bytes) -> None:
        """Send `data`; under the turn only what the socket takes at once.

        A client that does not read (a large reply, or many pipelined requests whose replies
        it never takes) fills the socket's buffer: the rest waits for it without the turn."""
        sent = 0
        if self._held:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                sent = self.connection.send(data, socket.MSG_DONTWAIT)
            if sent < len(data):
                self._give_turn()
        if sent < len(data):
            self.connection.sendall(memoryview(data)[sent:])

    def _refuse(self, status: HTTPStatus, code: str, message: str) -> None:
        self.close_connection = True  # whatever follows on the wire is not a request
        self._send(_problem(status, code, message))

    def _dispatch(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            return self._refuse(
                HTTPStatus.LENGTH_REQUIRED,
                "length_required",
                "send a Content-Length; chunked bodies are not accepted",
            )
        length = content_length(self.headers.get_all("Content-Length") or [])
        if length is None:
            return self._refuse(
                HTTPStatus.BAD_REQUEST,
                "bad_content_length",
                "Content-Length must be one non-negative integer of ASCII digits",
            )
        path = self.path.split("?", 1)[0]
        limit = self.server.router.max_body(path)
        if length > limit:
            return self._refuse(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "too_large",
                f"request body is limited to {limit} bytes",
            )
        self._conn.low = path == RESOLVE_PATH
        pure = self.server.router.cpu_only(self.command, path)
        if length or not pure:
            self._give_turn()  # a body comes at the client's pace; other handlers may wait
        body = self.rfile.read(length) if length else b""
        if self._conn.dropped or len(body) < length:
            # Cut off at its deadline, evicted, or the client hung up: never act on half a request.
            self.close_connection = True
            return None
        if pure:
            self._take_turn()
        self._conn.enter(Phase.BUSY)
        try:
            query = self.path.split("?", 1)[1] if "?" in self.path else ""
            reply = self.server.router.handle(self.command, path, body, query)
        except Exception:  # our bug: the client gets an answer it can act on, the log the trace
            self._give_turn()  # logging writes to a pipe that may be full
            log.exception("request_failed", extra={"path": path[:100]})
            self.close_connection = True
            reply = _problem(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "internal_error",
                "the sidecar failed on this request (a bug, logged as request_failed); "
                "retry later and report it",
            )
        self._send(reply)
        return None

    # The common methods skip __getattr__'s failed lookup on every request.
    do_GET = do_HEAD = do_POST = _dispatch  # noqa: N815 - the stdlib's naming

    def __getattr__(self, name: str) -> Any:
        """Every method (TRACE, CONNECT, made-up ones) reaches the router: 405 or 404, not 501."""
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)


def content_length(values: list[str]) -> int | None:
    """The body length, or None when the header is not one plain decimal number.

    `str.isdigit` accepts "²" and other digits `int` refuses; repeated differing values are
    the classic request-smuggling shape.
    """
    if not values:
        return 0
    text = values[0].strip()
    if any(v.strip() != text for v in values) or not (text.isascii() and text.isdigit()):
        return None
    if len(text) > 18:  # far beyond MAX_BODY_BYTES, and below int()'s digit limit
        return MAX_BODY_BYTES + 1
    return int(text)


class LocalServer(HTTPServer):
    """One thread per connection (as the stdlib's threading server), with a policy in front.

    The cap bounds threads and memory. When the listener is full, a new connection evicts the
    connection that has waited longest without a request in progress on our side (idle or
    still sending its request) rather than being refused, so one more probe always gets in
    while slow clients hold every slot. The accept thread also shuts down every connection
    past its deadline (`reap`): a client that drips one byte a second cannot keep a slot.
    """

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        router: Router,
        limits: Limits,
        name: str = "api",
        *,
        turn: CpuTurn | None = None,
    ) -> None:
        """`turn`: the API listener's CPU turn (a fresh `CpuTurn` by default); other listeners
        have none, so a probe never queues behind the product's requests."""
        self.router = router
        self.name = name
        self.turn = turn or (CpuTurn() if name == "api" else None)
        self.limits = limits
        self._conns: dict[socket.socket, _Conn] = {}
        self._live = 0
        self._lock = threading.Lock()
        self._next_reap = 0.0
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)
        self._busy = _canned(
            HTTPStatus.SERVICE_UNAVAILABLE, "busy", "too many connections are busy; retry"
        )
        self._late = _canned(
            HTTPStatus.REQUEST_TIMEOUT,
            "request_timeout",
            f"send the whole request within {limits.request_seconds:g} s of its first byte",
        )

    def connection_of(self, sock: socket.socket) -> _Conn:
        with self._lock:
            conn = self._conns.get(sock)
        if conn is None:  # cannot happen: registered before its thread starts
            conn = _Conn(sock, time.monotonic(), 0.0)
            conn.dropped = True
        return conn

    def process_request(self, request: Any, client_address: Any) -> None:
        now = time.monotonic()
        conn = _Conn(request, now, self.limits.idle_seconds)
        with self._lock:
            if self._live >= self.limits.max_connections:
                victim = self._victim()
                if victim is None:  # every slot runs a request of ours: refuse, do not queue
                    with contextlib.suppress(OSError):
                        request.sendall(self._busy)
                    self.shutdown_request(request)
                    return
                self._drop(victim, self._busy if victim.phase is Phase.READING else b"")
            self._conns[request] = conn
            self._live += 1
        try:
            threading.Thread(
                target=self._serve, args=(request, client_address, conn), daemon=True
            ).start()
        except RuntimeError:  # no thread to be had: give the slot back
            self._release(request, conn)
            self.shutdown_request(request)

    def _victim(self) -> _Conn | None:
        """Who leaves a full listener. Registrations (resolve) give way first: one between
        requests, else the newest in progress (most likely one about to be refused 429 over its
        budget; one cut while AWS answers still stores the customer, and the same token then
        answers from the store). Then the oldest connection idle or still sending its request."""
        live = [c for c in self._conns.values() if not c.dropped]
        lows = [c for c in live if c.low]
        calm = [c for c in lows if c.phase is not Phase.BUSY]
        if calm:
            return min(calm, key=lambda c: c.since)
        if lows:
            return max(lows, key=lambda c: c.since)
        victims = [c for c in live if c.evictable]
        return min(victims, key=lambda c: c.since) if victims else None

    def _serve(self, request: socket.socket, client_address: Any, conn: _Conn) -> None:
        if self.name == "api":  # the product's traffic steps back; probes and metrics do not
            yield_to_probes()
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._release(request, conn)
            self.shutdown_request(request)

    def _release(self, request: socket.socket, conn: _Conn) -> None:
        with self._lock:  # after this, `reap` and eviction no longer touch the socket
            self._conns.pop(request, None)
            if not conn.dropped:
                conn.dropped = True
                self._live -= 1

    def _drop(self, conn: _Conn, farewell: bytes) -> None:
        """Wake the connection's thread with EOF (shutdown, not close: the thread owns the fd)."""
        conn.dropped = True
        self._live -= 1
        with contextlib.suppress(OSError):
            if farewell:
                conn.sock.send(farewell, socket.MSG_DONTWAIT)
            conn.sock.shutdown(socket.SHUT_RDWR)

    def reap(self, now: float) -> int:
        """Shut down every connection past its deadline; return how many."""
        with self._lock:
            late = [c for c in self._conns.values() if not c.dropped and c.deadline <= now]
            for conn in late:
                self._drop(conn, self._late if conn.phase is Phase.READING else b"")
        return len(late)

    def service_actions(self) -> None:
        """Runs in the accept loop after each poll (0.2 s) and each accepted connection."""
        now = time.monotonic()
        if now >= self._next_reap:
            self._next_reap = now + 0.1
            self.reap(now)

    def server_close(self) -> None:
        super().server_close()
        with self._lock:
            for conn in list(self._conns.values()):
                if not conn.dropped:
                    self._drop(conn, b"")

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that resets or vanishes is routine (debug); anything else is our bug."""
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("connection_error", exc_info=True)
        else:
            log.error("request_failed", exc_info=True)

    def serve_in_thread(self, name: str) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, args=(0.2,), name=name, daemon=True)
        thread.start()
        return thread
