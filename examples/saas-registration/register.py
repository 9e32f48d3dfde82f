"""A SaaS registration URL handler with no framework: Python's http.server and the sidecar client.

AWS Marketplace sends the buyer's browser to the product's registration URL with a form POST
(application/x-www-form-urlencoded) holding `x-amzn-marketplace-token` and, for a free trial,
`x-amzn-marketplace-offer-type=free-trial`. The token must be redeemed at once: this handler
hands it to the sidecar (POST /v1/customers/resolve, which calls ResolveCustomer and stores the
customer for the whole fleet) and answers the buyer.

    python register.py --listen 0.0.0.0:8080 --sidecar http://127.0.0.1:8787

Adapt `registered` to your product: create the account, start a session, then redirect. Never
put the customer's identity in a URL the browser can edit: anyone could claim another buyer's
subscription by changing it. Keep it server side (a session) or sign it.

The page faces the internet, so it bounds what one client can take (docs/registration-page.md):
connections per client and in all, a deadline for the whole form, form posts per client and in
all per second (429 before anything is read or resolved). When full, a new connection evicts
the oldest one still sending its form (the client with the most connections first), so silent
sockets cannot keep real buyers out. Behind a load balancer every connection comes from the
balancer: start it with `--client-header X-Forwarded-For` (only if the balancer sets that
header) so that limits apply to the buyer's address, and let the balancer cap connections.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from marketplace_sidecar_client import CustomerError, resolve_customer

log = logging.getLogger("saas-registration")

TOKEN_FIELD = "x-amzn-marketplace-token"  # noqa: S105  # nosec B105 # a form field name
OFFER_FIELD = "x-amzn-marketplace-offer-type"
MAX_FORM_BYTES = 16 * 1024  # one opaque token and one short field
READ_SECONDS = 5.0  # the longest silence between two bytes of a request
# This page faces the internet: a connection gets this long from accept to its whole form (a
# client that drips one byte at a time, or sends nothing, is cut), and at most MAX_CONNECTIONS
# are served at once, PER_CLIENT_CONNECTIONS of them from one address. A browser sends its form
# at once: a full page evicts the oldest connection still sending, never one being resolved.
REQUEST_SECONDS = 10.0
MAX_CONNECTIONS = 64
PER_CLIENT_CONNECTIONS = 8
# Form posts (each may cost a ResolveCustomer call on the seller's account): per client address
# and in all, as token buckets (rate per second, burst). A buyer posts once, maybe reloads.
CLIENT_POSTS = (0.5, 4)
TOTAL_POSTS = (20.0, 40)
MAX_TRACKED_CLIENTS = 10_000  # per-client buckets kept; the idlest are forgotten first
FORM_TYPE = "application/x-www-form-urlencoded"


class Buckets:
    """Token buckets keyed by client; `take` answers 0 (go) or the seconds until a token."""

    def __init__(self, rate: float, burst: int, max_keys: int = MAX_TRACKED_CLIENTS) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str, now: float) -> float:
        with self._lock:
            tokens, at = self._state.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if len(self._state) >= self.max_keys:  # dicts keep order: the first is the idlest
                del self._state[next(iter(self._state))]
            if tokens >= 1.0:
                self._state[key] = (tokens - 1.0, now)
                return 0.0
            self._state[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


class Registration(BaseHTTPRequestHandler):
    server: RegistrationServer
    protocol_version = "HTTP/1.1"
    server_version = "saas-registration"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(READ_SECONDS)
        self._deadline = threading.Timer(REQUEST_SECONDS, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def _client(self) -> str:
        """The address limits apply to: the peer, or the header a trusted balancer sets."""
        header = self.server.client_header
        if header:
            values = (self.headers.get(header) or "").split(",")
            return values[-1].strip()[:64] or str(self.client_address[0])
        return str(self.client_address[0])

    def _too_many(self) -> bool:
        """Answer 429 (closing) when this client, or everyone, posts too fast."""
        wait = self.server.posts_allowed(self._client(), time.monotonic())
        if not wait:
            return False
        self._page(
            HTTPStatus.TOO_MANY_REQUESTS,
            "Please wait a moment",
            "Too many attempts; reload this page in a few seconds.",
            **{"Retry-After": str(max(1, int(wait + 0.999)))},
        )
        return True

    def _cut(self) -> None:
        """The request did not arrive in time: shut the socket so the blocked read returns."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_POST(self) -> None:
        self.close_connection = True  # one request per connection: no idle keep-alive to hold
        if self._too_many():  # before the body is read or anything is resolved
            return None
        form = self._form()
        if form is None:
            return None
        tokens = form.get(TOKEN_FIELD, [])
        if len(tokens) != 1 or not tokens[0]:
            return self._page(
                HTTPStatus.BAD_REQUEST,
                "Registration link incomplete",
                "Open the product again from AWS Marketplace and choose Set up your account.",
            )
        free_trial = form.get(OFFER_FIELD, [""])[0] == "free-trial"
        try:
            customer = resolve_customer(tokens[0], url=self.server.sidecar, timeout=20.0)
        except CustomerError as exc:
            return self._refused(exc)
        log.info(
            "registered",
            extra={"customer": customer.get("customer"), "free_trial": free_trial},
        )
        target = self.server.registered(customer, free_trial)
        if target is not None:
            self.send_response(HTTPStatus.SEE_OTHER)  # the browser GETs the target
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            return None
        trial = " Your free trial has started." if free_trial else ""
        return self._page(
            HTTPStatus.OK,
            "Welcome",
            f"Your AWS account {customer.get('customer_aws_account_id') or ''} is registered."
            + trial,
        )

    def do_GET(self) -> None:
        self.close_connection = True
        self._page(
            HTTPStatus.METHOD_NOT_ALLOWED,
            "Start from AWS Marketplace",
            "This page is opened by AWS Marketplace after you subscribe.",
            Allow="POST",
        )

    def _form(self) -> dict[str, list[str]] | None:
        ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != FORM_TYPE:
            self._page(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Bad request", f"expected {FORM_TYPE}")
            return None
        length_text = self.headers.get("Content-Length") or ""
        if self.headers.get("Transfer-Encoding") or not (
            length_text.isascii() and length_text.isdigit()
        ):
            self._page(HTTPStatus.LENGTH_REQUIRED, "Bad request", "send a Content-Length")
            return None
        length = int(length_text)
        if length > MAX_FORM_BYTES:
            self._page(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "Bad request", "form too large")
            return None
        try:
            body = self.rfile.read(length)
        except OSError:  # a silence past READ_SECONDS, or cut at REQUEST_SECONDS
            self.close_connection = True
            return None
        if len(body) < length:
            self.close_connection = True
            return None
        self._deadline.cancel()  # the form is in: redeeming the token may take the sidecar 20 s
        self.server.form_read(self.connection)  # no longer evictable
        try:
            return parse_qs(
                body.decode("ascii"), strict_parsing=False, max_num_fields=10, errors="strict"
            )
        except (UnicodeDecodeError, ValueError):
            self._page(HTTPStatus.BAD_REQUEST, "Bad request", "the form is not readable")
            return None

    def _refused(self, exc: CustomerError) -> None:
        if exc.reason == "invalid_token":
            return self._page(
                HTTPStatus.BAD_REQUEST,
                "Registration link not valid",
                "Open the product again from AWS Marketplace and choose Set up your account.",
            )
        if exc.reason == "expired_token":
            return self._page(
                HTTPStatus.GONE,
                "Registration link expired",
                "Open the product again from AWS Marketplace to get a fresh link.",
            )
        log.warning("registration_failed", extra={"reason": exc.reason, "detail": exc.message})
        if exc.reason == "unavailable":
            retry = str(int(exc.retry_after or 5))
            return self._page(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "Please try again",
                "Registration is briefly unavailable; reload this page in a few seconds.",
                **{"Retry-After": retry},
            )
        return self._page(
            HTTPStatus.BAD_GATEWAY,
            "Registration failed",
            "We could not confirm your subscription; please try again shortly.",
        )

    def _page(self, status: HTTPStatus, title: str, text: str, **headers: str) -> None:
        body = (
            "<!doctype html><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(text)}</p>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the token is in no URL, but keep access logs to the product's own middleware


def no_redirect(customer: dict[str, Any], free_trial: bool) -> str | None:
    """Replace with your product's step: create the account, set a session, return its URL.

    `free_trial` comes from the buyer's browser (x-amzn-marketplace-offer-type), which anyone
    can post by hand: show it, never grant anything on it. What the buyer is entitled to is
    AWS's answer (the resolved customer) and, later, the metering results."""
    return None


class _Conn:
    __slots__ = ("client", "reading", "since", "sock")

    def __init__(self, sock: socket.socket, client: str, since: float) -> None:
        self.sock, self.client, self.since, self.reading = sock, client, since, True


class RegistrationServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the stdlib's 5 drops SYNs in a burst: buyers wait 1 s, 3 s...

    def __init__(
        self,
        address: tuple[str, int],
        sidecar: str,
        registered: Any = no_redirect,
        *,
        client_header: str | None = None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._conns: dict[socket.socket, _Conn] = {}
        self._lock = threading.Lock()
        self._client_posts = Buckets(*CLIENT_POSTS)
        self._all_posts = Buckets(*TOTAL_POSTS)
        super().__init__(address, Registration)
        self.sidecar = sidecar
        self.registered = registered
        self.client_header = client_header  # set: a balancer in front, its header names buyers
        self.refused = 0  # connections closed at accept: every slot was resolving
        self.evicted = 0  # connections cut to make room (still sending their form)

    def posts_allowed(self, client: str, now: float) -> float:
        """0 when a form post may go on, else the seconds to wait (this client, then all)."""
        return self._client_posts.take(client, now) or self._all_posts.take("", now)

    def form_read(self, sock: socket.socket) -> None:
        with self._lock:
            conn = self._conns.get(sock)
            if conn is not None:
                conn.reading = False

    def _victim(self, client: str) -> tuple[bool, _Conn | None]:
        """(room, who makes it) for a connection from `client`: its own oldest still-reading
        one when it is at its cap; else, when the page is full, the oldest still-reading
        connection of the client holding the most. (False, None): none can be evicted."""
        mine = [c for c in self._conns.values() if c.client == client]
        per_client = self.client_header is None  # behind a balancer every peer is the balancer
        if per_client and len(mine) >= PER_CLIENT_CONNECTIONS:
            pool = [c for c in mine if c.reading]
        elif len(self._conns) >= MAX_CONNECTIONS:
            held: dict[str, int] = {}
            for c in self._conns.values():
                held[c.client] = held.get(c.client, 0) + 1
            pool = [c for c in self._conns.values() if c.reading]
            if pool:
                top = max(held[c.client] for c in pool)
                pool = [c for c in pool if held[c.client] == top]
        else:
            return True, None
        return (True, min(pool, key=lambda c: c.since)) if pool else (False, None)

    def process_request(self, request: Any, client_address: Any) -> None:
        client = str(client_address[0])
        with self._lock:
            room, victim = self._victim(client)
            if not room:  # every slot is resolving: close it rather than queue a thread
                self.refused += 1
                self.shutdown_request(request)
                return
            if victim is not None:
                self.evicted += 1
                del self._conns[victim.sock]
                with contextlib.suppress(OSError):  # its thread's blocked read returns
                    victim.sock.shutdown(socket.SHUT_RDWR)
            self._conns[request] = _Conn(request, client, time.monotonic())
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: Any) -> None:
        with self._lock:
            self._conns.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (or was evicted) is routine; anything else is logged."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        log.exception("request_failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="host:port to serve on")
    parser.add_argument("--sidecar", default="http://127.0.0.1:8787", help="the sidecar's API")
    parser.add_argument(
        "--client-header",
        help="behind a load balancer: the header it sets to the buyer's address "
        "(X-Forwarded-For; its last value is used). Never set it without a balancer that "
        "overwrites the header: a client could name any address",
    )
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO)
    server = RegistrationServer(
        (host.strip("[]"), int(port)), args.sidecar, client_header=args.client_header
    )
    log.info("listening on %s", args.listen)
    server.serve_forever()


if __name__ == "__main__":
    main()
