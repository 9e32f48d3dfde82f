"""`sidecar.client`, kept for products that import it from the sidecar's own install: the client
is its own distribution now (`marketplace-sidecar-client`, PyJWT and cryptography only), and this
module re-exports it unchanged. A product image installs that package alone (docs/client.md).
"""

from marketplace_sidecar_client import (
    CHALLENGE_PATH,
    DEFAULT_MAX_AGE,
    DEFAULT_URL,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_PROBLEMS,
    MAX_REGISTRATION_TOKEN_CHARS,
    RETRY_AFTER_MAX,
    RETRY_AFTER_MIN,
    CustomerError,
    EntitlementError,
    FieldProblem,
    LeaseError,
    UsageError,
    challenge,
    checkin_lease,
    checkout_lease,
    parse_retry_after,
    renew_lease,
    report_usage,
    resolve_customer,
    verify,
)

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
    "parse_retry_after",
    "renew_lease",
    "report_usage",
    "resolve_customer",
    "verify",
]
