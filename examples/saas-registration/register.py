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
"""

from __future__ import annotations

import argparse
import contextlib
import html
import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from marketplace_sidecar_client import CustomerError, resolve_customer

log = logging.getLogger("saas-registration")

TOKEN_FIELD = "x-amzn-marketplace-token"  # noqa: S105  # nosec B105 # a form field name
OFFER_FIELD = "x-amzn-marketplace-offer-type"
MAX_FORM_BYTES = 16 * 1024  # one opaque token and one short field
READ_SECONDS = 10.0  # the longest silence between two bytes of a request
# This page faces the internet: a connection gets this long from accept to its whole form (a
# client that drips one byte at a time, or sends nothing, is cut), and at most MAX_CONNECTIONS
# are served at once (more are closed at accept), so silent sockets cannot take every thread.
REQUEST_SECONDS = 15.0
MAX_CONNECTIONS = 64
FORM_TYPE = "application/x-www-form-urlencoded"


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

    def _cut(self) -> None:
        """The request did not arrive in time: shut the socket so the blocked read returns."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_POST(self) -> None:
        self.close_connection = True  # one request per connection: no idle keep-alive to hold
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


class RegistrationServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        sidecar: str,
        registered: Any = no_redirect,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, Registration)
        self.sidecar = sidecar
        self.registered = registered

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # full: close it rather than queue a thread
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="host:port to serve on")
    parser.add_argument("--sidecar", default="http://127.0.0.1:8787", help="the sidecar's API")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO)
    server = RegistrationServer((host.strip("[]"), int(port)), args.sidecar)
    log.info("listening on %s", args.listen)
    server.serve_forever()


if __name__ == "__main__":
    main()
