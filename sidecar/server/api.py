"""The local HTTP API (stdlib server: about 19 MiB idle, no dependencies).

Two listeners share one router: the API (loopback by default; it carries tokens) and the probe
listener (all interfaces, so kubelet httpGet probes work; only /healthz and /readyz). Client
mistakes get JSON 4xx answers, never 500.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from sidecar import __version__
from sidecar.entitlement.registrar import Registrar
from sidecar.entitlement.state import Snapshot
from sidecar.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.ops.metrics import Metrics

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4096
# POST /v1/usage takes up to 1,000 records: about 400 bytes each with the longest names, leaving
# room for a few allocations per record.
MAX_USAGE_BODY_BYTES = 1 << 20
USAGE_PATH = "/v1/usage"
MAX_NONCE_CHARS = 255
IDLE_TIMEOUT_SECONDS = 30.0
PROBE_IDLE_TIMEOUT_SECONDS = 5.0  # kubelet opens one connection per probe
_BUSY_BODY = b'{"error":{"code":"busy","message":"too many open connections"}}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


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
        return json.dumps(self.body, separators=(",", ":")).encode()


def _problem(status: HTTPStatus, code: str, message: str, **headers: str) -> Reply:
    return Reply(status, {"error": {"code": code, "message": message}}, headers)


class UsageEndpoint(Protocol):
    """The usage pipeline as the API sees it (custom mode); `post` never raises."""

    def post(self, body: bytes) -> tuple[int, dict[str, Any]]: ...

    def report(self) -> dict[str, Any]: ...


class Router:
    """Maps (method, path, body) to a `Reply`. No sockets here."""

    def __init__(
        self,
        registrar: Registrar,
        health: Callable[[], str | None],
        *,
        probe_only: bool = False,
        extras: Callable[[], dict[str, Any]] | None = None,
        metrics: Metrics | None = None,
        usage: UsageEndpoint | None = None,
    ) -> None:
        self._registrar = registrar
        self._usage = usage
        self._health = health
        self._extras = extras or dict
        self._cached: tuple[Snapshot, dict[str, Any], Reply] | None = None
        routes: dict[str, dict[str, Callable[[bytes], Reply]]] = {
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
        }
        self.metrics = metrics
        if metrics is not None and probe_only:
            routes["/metrics"] = {"GET": self._metrics}
        if not probe_only:
            routes["/v1/entitlement"] = {"GET": self._entitlement}
            routes["/v1/entitlement/challenge"] = {"POST": self._challenge}
            # Usage carries billing data: loopback API only, never the probe listener.
            routes[USAGE_PATH] = {"GET": self._usage_report, "POST": self._usage_post}
            if usage is not None:
                routes["/v1/entitlement/challenge"] = {"POST": self._no_challenge}
        self.routes = routes

    def max_body(self, path: str) -> int:
        """1 MiB for usage on the API listener (in hourly mode too: a clear 404, not a 413)."""
        return (
            MAX_USAGE_BODY_BYTES if path == USAGE_PATH and path in self.routes else MAX_BODY_BYTES
        )

    def allowed(self, path: str) -> list[str] | None:
        methods = self.routes.get(path)
        if methods is None:
            return None
        allowed = list(methods)
        return [*allowed, "HEAD"] if "GET" in allowed else allowed

    def handle(self, method: str, path: str, body: bytes) -> Reply:
        methods = self.routes.get(path)
        if methods is None:
            return _problem(HTTPStatus.NOT_FOUND, "not_found", f"no such path: {path[:100]}")
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            allowed = ", ".join(self.allowed(path) or [])
            return _problem(
                HTTPStatus.METHOD_NOT_ALLOWED,
                "method_not_allowed",
                f"{method} is not allowed here; use {allowed}",
                Allow=allowed,
            )
        return handler(body)

    # -- endpoints -----------------------------------------------------------------------

    def _healthz(self, _: bytes) -> Reply:
        problem = self._health()
        if problem:
            return Reply(503, {"status": "unhealthy", "reason": problem, "version": __version__})
        return Reply(200, {"status": "ok", "version": __version__})

    def _readyz(self, _: bytes) -> Reply:
        snap = self._registrar.machine.snapshot()
        body: dict[str, Any] = {"ready": snap.entitled, "state": snap.state.value}
        if snap.error is not None:
            body["error"] = snap.error.to_json()
        return Reply(200 if snap.entitled else 503, body)

    def _metrics(self, _: bytes) -> Reply:
        assert self.metrics is not None
        return Reply(200, {}, encoded=self.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    def _entitlement(self, _: bytes) -> Reply:
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
        if out.error is not None:
            payload["error"] = out.error.to_json()
        status = HTTPStatus.FORBIDDEN if out.status == "refused" else HTTPStatus.BAD_GATEWAY
        return Reply(status, payload)

    def _no_challenge(self, _: bytes) -> Reply:
        # 404, not 409: in this mode the resource does not exist (and fuzzers expect 404).
        return _problem(
            HTTPStatus.NOT_FOUND,
            "no_token_in_custom_mode",
            "MARKETPLACE_MODE=custom meters with MeterUsage, which returns no signed token, so "
            "there is nothing to challenge; read GET /v1/entitlement and GET /v1/usage instead",
        )

    def _usage_post(self, body: bytes) -> Reply:
        if self._usage is None:
            return _usage_needs_custom_mode()
        status, doc = self._usage.post(body)
        headers = {}
        retry = doc.get("retry_after")
        if isinstance(retry, int | float) and status in (429, 503):
            headers["Retry-After"] = str(max(1, int(retry + 0.999)))
        return Reply(status, _as_problem(doc), headers)

    def _usage_report(self, _: bytes) -> Reply:
        if self._usage is None:
            return _usage_needs_custom_mode()
        return Reply(200, self._usage.report())

    def describe(self, snap: Snapshot, extra: dict[str, Any] | None = None) -> dict[str, Any]:
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
            "warnings": list(snap.warnings),
            **(self._extras() if extra is None else extra),
        }


def _as_problem(doc: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's flat errors in this API's shape: {"error": {"code", "message", ...}}."""
    code = doc.get("error")
    if not isinstance(code, str):
        return doc
    details = ("message", "field", "problems")
    error = {"code": code, "message": str(doc.get("message") or code)}
    error.update({k: doc[k] for k in details[1:] if k in doc})
    rest = {k: v for k, v in doc.items() if k != "error" and k not in details}
    return {"error": error, **rest}


def _usage_needs_custom_mode() -> Reply:
    return _problem(
        HTTPStatus.NOT_FOUND,
        "usage_needs_custom_mode",
        "usage is reported only with MARKETPLACE_MODE=custom (custom-metered products); this "
        "sidecar runs in hourly mode (RegisterUsage)",
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # keep-alive without 40 ms Nagle/delayed-ACK stalls
    timeout = IDLE_TIMEOUT_SECONDS  # replaced per server in setup(): idle clients are cut off
    server_version = f"marketplace-sidecar/{__version__}"
    sys_version = ""
    server: LocalServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed HTTP (400, 414, 431, 501...) as JSON, then close."""
        status = HTTPStatus(code)
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # else the stdlib writes no status line at all
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
        payload = reply.payload()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        metrics = self.server.router.metrics
        if metrics is not None:
            path = (getattr(self, "path", "") or "").split("?", 1)[0]
            metrics.request(self.server.name, path, reply.status)

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0]
        router = self.server.router
        body = b""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return self._send(
                _problem(
                    HTTPStatus.LENGTH_REQUIRED,
                    "length_required",
                    "send a Content-Length; chunked bodies are not accepted",
                )
            )
        length_text = self.headers.get("Content-Length", "0")
        if not length_text.isdigit():
            self.close_connection = True
            return self._send(
                _problem(
                    HTTPStatus.BAD_REQUEST,
                    "bad_content_length",
                    "Content-Length must be a non-negative integer",
                )
            )
        length = int(length_text)
        limit = router.max_body(path)
        if length > limit:
            self.close_connection = True  # the unread body must not be parsed as a request
            return self._send(
                _problem(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    "too_large",
                    f"request body is limited to {limit} bytes",
                )
            )
        if length:
            body = self.rfile.read(length)
        self._send(router.handle(self.command, path, body))
        return None

    def __getattr__(self, name: str) -> Any:
        """Every method (TRACE, CONNECT, made-up ones) reaches the router: 405 or 404, not 501."""
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        router: Router,
        max_connections: int,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
        name: str = "api",
    ) -> None:
        self.router = router
        self.name = name
        self.idle_timeout = idle_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Cap concurrent connections so a flood cannot exhaust threads or memory."""
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

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
