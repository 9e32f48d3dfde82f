"""Floating seats for the product: leases over PROVISIONAL checkouts, on the loopback API.

- `POST /v1/licenses/checkout {"entitlement", "units", "id"}`: one CheckoutLicense of `units`
  of `entitlement` (PROVISIONAL), answered as a lease. The lease is kept (state directory,
  with its ClientToken) before the request leaves: a retry of the same id, after a lost answer
  or a restart, resends the same ClientToken, so AWS answers the same checkout and never counts
  the units twice. The same id with the same body is the same lease (and renews it); with a
  different body, 409.
- The product renews (`POST /v1/licenses/renew {"id"}`, or the same checkout again) at least
  every MARKETPLACE_LICENSE_LEASE_TIMEOUT_SECONDS; the sidecar extends the AWS checkout
  half-way through each grant while the lease is renewed. A lease not renewed in time (the
  product died) is checked back in; so is one the product checks in.
- Only one CheckoutLicense for leases is in flight at a time (`_aws`): two products racing for
  the last seat are answered one after the other, by AWS. Renewals and reads never wait on AWS.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Callable
from typing import Any

from sidecar.aws.errors import ErrorInfo
from sidecar.aws.license import GONE_CODES, LicenseCallError, parse_time, redact
from sidecar.core.clock import Clock
from sidecar.entitlement.contract_store import ContractStore
from sidecar.entitlement.license import verify_checkout

log = logging.getLogger("sidecar.contract")

ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
NAME_RE = re.compile(r"[!-~]{1,255}")  # the sidecar's own bound (the model gives no pattern)
MAX_UNITS = 1_000_000_000
MAX_LEASES = 1000
FIELDS = frozenset({"id", "entitlement", "units"})

Answer = tuple[int, dict[str, Any]]


class LeaseBook:
    """The product's leases: API handlers (`checkout`, `renew`, `checkin`, `listing`) and the
    keeper's `tick` (extend, time out, retry check-ins). Times are the injected clock's."""

    def __init__(
        self,
        store: ContractStore,
        gateway: Callable[[], Any],
        clock: Clock,
        *,
        product_sku: str,
        key_fingerprint: str,
        units_of: dict[str, str],
        timeout: float,
        node_id: str | None = None,
    ) -> None:
        self._store = store
        self._gw = gateway
        self._clock = clock
        self._sku = product_sku
        self._fingerprint = key_fingerprint
        self._units_of = units_of  # entitlement -> unit, from MARKETPLACE_LICENSE_ENTITLEMENTS
        self.timeout = timeout
        self._node_id = node_id
        self._lock = threading.Lock()  # memory and the store
        self._aws = threading.Lock()  # one lease CheckoutLicense in flight
        self.results: dict[tuple[str, str], int] = {}
        self.wake = threading.Event()  # set when a lease is added: the keeper plans again
        self._closed = False  # the stop returned the leases: no new checkout from here on
        self._leases: dict[str, dict[str, Any]] = {}  # id -> record (persisted fields)
        self._renewed: dict[str, float] = {}  # id -> monotonic, last renewal by the product
        self._deadline: dict[str, float] = {}  # id -> monotonic, AWS's expiry counted here
        self._extend_at: dict[str, float] = {}
        now, wall = clock.monotonic(), clock.time()
        for lease_id, record in (store.get("leases") or {}).items():
            if isinstance(record, dict) and ID_RE.fullmatch(str(lease_id)):
                self._leases[lease_id] = record
                # A restart: the product gets a full timeout to renew; AWS's checkout is
                # extended at once. What is left of its grant is counted on this machine's
                # wall clock from the last checkout or extension sent (AWS's clock is never
                # compared with ours); unknown: nothing left, so an outage means "lost".
                self._renewed[lease_id] = now
                self._deadline[lease_id] = now + _left(record, wall)
                self._extend_at[lease_id] = now
        if self._leases:
            log.info("leases_restored", extra={"leases": len(self._leases)})

    # -- reads -----------------------------------------------------------------------------

    def held_by_entitlement(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for r in self._leases.values():
                if r["state"] == "held":
                    out[r["entitlement"]] = out.get(r["entitlement"], 0) + int(r["units"])
            return out

    def checkins_owed(self) -> int:
        """Leases checked in (or timed out) whose CheckInLicense failed: `returning`, retried
        by the keeper (/metrics)."""
        with self._lock:
            return sum(1 for r in self._leases.values() if r["state"] == "returning")

    def listing(self) -> Answer:
        with self._lock:
            leases = [self._view(i) for i in sorted(self._leases)]
        return 200, {
            "leases": leases,
            "lease_timeout_seconds": self.timeout,
            "held_by_entitlement": self.held_by_entitlement(),
        }

    def _view(self, lease_id: str) -> dict[str, Any]:
        r = self._leases[lease_id]
        now = self._clock.monotonic()
        view: dict[str, Any] = {
            "id": lease_id,
            "entitlement": r["entitlement"],
            "units": r["units"],
            "state": r["state"],
            "license_arn": r.get("license_arn"),
            "renew_within_seconds": max(
                0, round(self._renewed.get(lease_id, now) + self.timeout - now, 1)
            ),
        }
        if r.get("consumption_token"):
            view["consumption_token"] = redact(r["consumption_token"])
        if r.get("why"):
            view["why"] = r["why"]
        return view

    # -- the API ---------------------------------------------------------------------------

    def checkout(self, body: bytes) -> Answer:
        doc, problem = _parse(body, FIELDS)
        if problem is not None:
            return problem
        assert doc is not None  # nosec B101 # narrowing
        lease_id, name, units = doc.get("id"), doc.get("entitlement"), doc.get("units")
        if not isinstance(lease_id, str) or not ID_RE.fullmatch(lease_id):
            return _bad("id", "1-64 characters of A-Z a-z 0-9 . _ : - (the product's own id)")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            return _bad("entitlement", "the entitlement's name: 1-255 printable characters")
        if isinstance(units, bool) or not isinstance(units, int) or not 0 < units <= MAX_UNITS:
            return _bad("units", f"a whole number from 1 to {MAX_UNITS}")
        # The stop has returned the leases and the process is about to exit: a checkout now
        # would hold units at AWS that nobody checks in. Asked at once (not after a checkout
        # in flight), and again once it is this request's turn.
        if self._closed:
            return _stopping()
        with self._aws:
            with self._lock:
                if self._closed:
                    return _stopping()
                known = self._leases.get(lease_id)
                if known is not None:
                    if (known["entitlement"], known["units"]) != (name, units):
                        return 409, _problem(
                            "lease_id_in_use",
                            f"lease {lease_id!r} is {known['units']} x {known['entitlement']!r}; "
                            "an id names one lease: use a new id for another one",
                        )
                    if known["state"] == "held":
                        self._renewed[lease_id] = self._clock.monotonic()
                        return 200, {**self._view(lease_id), "created": False}
                    if known["state"] != "pending":
                        return 409, _problem(
                            "lease_" + str(known["state"]),
                            f"lease {lease_id!r} is {known['state']}; check it in, then use "
                            "a new id",
                        )
                    record = known
                else:
                    if len(self._leases) >= MAX_LEASES:
                        return 409, _problem(
                            "too_many_leases", f"at most {MAX_LEASES} leases at a time"
                        )
                    record = {
                        "entitlement": name,
                        "units": units,
                        "unit": self._units_of.get(name, "Count"),
                        "client_token": uuid.uuid4().hex,
                        "state": "pending",
                    }
                    # Kept before the request leaves: a restart resends this ClientToken.
                    saved, why = self._save({**self._leases, lease_id: record})
                    if not saved:
                        return 503, _problem(
                            "state_not_saved",
                            f"the lease could not be kept in MARKETPLACE_STATE_DIR ({why}); "
                            "nothing was checked out",
                            retry_after=5,
                        )
                    self._leases[lease_id] = record
            return self._send(lease_id, dict(record))

    def _send(self, lease_id: str, record: dict[str, Any]) -> Answer:
        """CheckoutLicense for a pending lease (called under `_aws`)."""
        asked = {
            "Name": record["entitlement"],
            "Unit": record["unit"],
            "Value": str(record["units"]),
        }
        sent, sent_wall = self._clock.monotonic(), self._clock.time()
        try:
            answer = self._gw().checkout(
                self._sku,
                self._fingerprint,
                (asked,),
                "PROVISIONAL",
                record["client_token"],
                self._node_id,
            )
        except LicenseCallError as exc:
            self._count("CheckoutLicense", _label(exc.info))
            if exc.info.retryable:  # the pending record stays: the same id resends the token
                return 503, _problem(
                    "license_manager_unavailable",
                    f"{exc.info.code}: retry with the same id (the same request)",
                    retry_after=2,
                )
            self._forget(lease_id)
            if exc.info.code in GONE_CODES:
                here = self.held_by_entitlement().get(record["entitlement"], 0)
                return 409, {
                    **_problem(
                        "no_units_left",
                        f"License Manager allowed no {record['units']} x "
                        f"{record['entitlement']!r}: fewer than {record['units']} are left in "
                        f"the license (AWS does not say how many), or there is no license; "
                        f"this sidecar's leases hold {here}",
                    ),
                    "entitlement": record["entitlement"],
                    "units_asked": record["units"],
                    "held_here": here,
                }
            return 502, _problem(exc.info.code, f"{exc.info.message[:300]}; {exc.info.hint}")
        error, _ = verify_checkout((asked,), answer, self._clock.time())
        issued, expires = parse_time(answer.issued_at), parse_time(answer.expiration)
        if error is not None or issued is None or expires is None:
            self._count("CheckoutLicense", "unverified")
            self._forget(lease_id)
            if answer.consumption_token:
                self._checkin_now(answer.consumption_token)
            why = error.message if error is not None else "no IssuedAt/Expiration"
            return 502, _problem("CheckoutNotVerified", why)
        self._count("CheckoutLicense", "ok")
        with self._lock:
            if lease_id not in self._leases:  # checked in meanwhile (a keeper timeout)
                self._checkin_now(answer.consumption_token)
                return 404, _problem("unknown_lease", f"lease {lease_id!r} was checked in")
            if self._closed:  # answered after the stop returned the leases: straight back
                self._checkin_now(answer.consumption_token)
                self._forget_locked(lease_id)
                log.info("lease_checked_in", extra={"lease": lease_id, "why": "stop"})
                return 503, _problem(
                    "stopping", "the sidecar is stopping (SIGTERM): the lease was checked back in"
                )
            held = {
                **record,
                "state": "held",
                "consumption_token": answer.consumption_token,
                "license_arn": answer.license_arn,
                "expiration": answer.expiration,
                "ttl": expires - issued,
                "renewed_wall": sent_wall,
            }
            saved, why = self._save({**self._leases, lease_id: held})
            if not saved:
                # Not kept: a restart would not know this checkout. Give it back now.
                self._leases.pop(lease_id, None)
                self._save(dict(self._leases))
                self._checkin_now(answer.consumption_token)
                return 503, _problem(
                    "state_not_saved",
                    f"the lease could not be kept ({why}); it was checked back in",
                    retry_after=5,
                )
            self._leases[lease_id] = held
            self._renewed[lease_id] = self._clock.monotonic()
            self._deadline[lease_id] = sent + (expires - issued)
            self._extend_at[lease_id] = sent + (expires - issued) / 2
            self.wake.set()
            log.info(
                "lease_checked_out",
                extra={
                    "lease": lease_id,
                    "entitlement": record["entitlement"],
                    "units": record["units"],
                    "consumption_token": redact(answer.consumption_token),
                },
            )
            return 200, {**self._view(lease_id), "created": True}

    def renew(self, body: bytes) -> Answer:
        lease_id, problem = _lease_id(body)
        if problem is not None:
            return problem
        with self._lock:
            record = self._leases.get(lease_id)
            if record is None:
                return 404, _unknown(lease_id)
            if record["state"] == "lost":
                return 410, _problem(
                    "lease_lost",
                    f"License Manager no longer honours lease {lease_id!r} "
                    f"({record.get('why', 'gone')}); check it in and stop using its units",
                )
            if record["state"] != "held":
                return 409, _problem(
                    "lease_" + str(record["state"]),
                    f"lease {lease_id!r} is {record['state']}: checkout again with the same id",
                )
            self._renewed[lease_id] = self._clock.monotonic()
            return 200, self._view(lease_id)

    def checkin(self, body: bytes) -> Answer:
        lease_id, problem = _lease_id(body)
        if problem is not None:
            return problem
        with self._lock:
            record = self._leases.get(lease_id)
            if record is None:
                return 404, _unknown(lease_id)
            if record["state"] == "pending":
                return 409, _problem(
                    "lease_pending", f"lease {lease_id!r} is being checked out; retry"
                )
            token = record.get("consumption_token")
        returned = self._return(lease_id, token, "checked_in")
        return 200, {"id": lease_id, "checked_in": True, "returned_to_license": returned}

    # -- the keeper ------------------------------------------------------------------------

    def tick(self) -> float:
        """Time out, extend and finish what is due; the seconds until the next tick."""
        now = self._clock.monotonic()
        with self._lock:
            items = [(i, dict(r)) for i, r in self._leases.items()]
        for lease_id, r in items:
            state = r["state"]
            if state == "pending":
                if self._aws.acquire(blocking=False):  # else the API is sending it
                    try:
                        status, _ = self._send(lease_id, r)
                    finally:
                        self._aws.release()
                    if status == 200:
                        log.info("lease_pending_resolved", extra={"lease": lease_id})
                continue
            if state in ("held", "lost") and now - self._renewed.get(lease_id, now) > self.timeout:
                log.warning(
                    "lease_timed_out",
                    extra={"lease": lease_id, "timeout_seconds": self.timeout},
                )
                self._return(lease_id, r.get("consumption_token"), "timed_out")
                continue
            if state == "returning":
                self._return(lease_id, r.get("consumption_token"), "retry")
                continue
            if state == "held" and now >= self._extend_at.get(lease_id, now):
                self._extend(lease_id, r)
        return self._next_due()

    def _next_due(self) -> float:
        """Seconds until the next extension or timeout is due (at most 5, at least 0.05)."""
        now = self._clock.monotonic()
        due = now + 5.0
        with self._lock:
            for lease_id, r in self._leases.items():
                if r["state"] in ("pending", "returning"):
                    due = min(due, now + 1.0)
                if r["state"] == "held":
                    due = min(due, self._extend_at.get(lease_id, now))
                due = min(due, self._renewed.get(lease_id, now) + self.timeout)
        return max(0.05, due - now)

    def _extend(self, lease_id: str, r: dict[str, Any]) -> None:
        sent, sent_wall = self._clock.monotonic(), self._clock.time()
        try:
            value = self._gw().extend(str(r["consumption_token"]))
        except LicenseCallError as exc:
            self._count("ExtendLicenseConsumption", _label(exc.info))
            with self._lock:
                if not self._same_checkout(lease_id, r):
                    return
                if exc.info.code in GONE_CODES or not exc.info.retryable:
                    self._leases[lease_id] = {**self._leases[lease_id], "state": "lost"}
                    self._leases[lease_id]["why"] = exc.info.code
                    self._save(dict(self._leases))
                    log.error("lease_lost", extra={"lease": lease_id, "code": exc.info.code})
                    return
                # Retry soon; past AWS's expiry the units are back in the pool: lost.
                if sent >= self._deadline.get(lease_id, sent):
                    self._leases[lease_id] = {
                        **self._leases[lease_id],
                        "state": "lost",
                        "why": "expired",
                    }
                    self._save(dict(self._leases))
                    log.error("lease_lost", extra={"lease": lease_id, "code": "expired"})
                    return
                left = self._deadline[lease_id] - sent
                self._extend_at[lease_id] = sent + min(left / 4, 5.0)
            return
        expires = parse_time(value)
        with self._lock:
            if not self._same_checkout(lease_id, r):
                return
            if expires is None:
                self._count("ExtendLicenseConsumption", "unverified")
                self._extend_at[lease_id] = sent + 1.0
                return
            self._count("ExtendLicenseConsumption", "ok")
            ttl = float(r.get("ttl") or 3600.0)
            self._deadline[lease_id] = sent + ttl
            self._extend_at[lease_id] = sent + ttl / 2
            self._leases[lease_id] = {
                **self._leases[lease_id],
                "expiration": value,
                "renewed_wall": sent_wall,
            }
            self._save(dict(self._leases))

    def _same_checkout(self, lease_id: str, r: dict[str, Any]) -> bool:
        """The lease still holds the checkout `r` named (under `_lock`): not checked in, nor
        replaced by a new lease of the same id while a call about the old one was out."""
        now = self._leases.get(lease_id)
        return now is not None and now.get("consumption_token") == r.get("consumption_token")

    def _return(self, lease_id: str, token: Any, why: str) -> bool:
        """Check the lease's units in; a failed call leaves it `returning` (retried by the
        keeper until AWS says it is gone). True when AWS took the units back now."""
        ok = True
        if token:
            ok = self._checkin_now(str(token))
        with self._lock:
            if not self._same_checkout(lease_id, {"consumption_token": token}):
                return ok  # gone, or a new lease of the same id meanwhile: not this one's
            if ok:
                self._forget_locked(lease_id)
                if why != "retry":
                    log.info("lease_checked_in", extra={"lease": lease_id, "why": why})
            else:
                self._leases[lease_id] = {**self._leases[lease_id], "state": "returning"}
                self._save(dict(self._leases))
        return ok

    def checkin_all(self) -> None:
        """At stop: every lease goes back (the pod, and its products, are going away); held
        ones first, then pending ones (which may wait for a checkout in flight)."""
        with self._lock:
            self._closed = True
            items = [(i, r.get("consumption_token")) for i, r in self._leases.items()]
        for lease_id, token in items:
            if token:
                self._return(lease_id, token, "stop")
        for lease_id, token in items:
            if token:
                continue
            # Pending: its CheckoutLicense may have been made at AWS with the answer lost.
            # Resent with its kept ClientToken, AWS answers that checkout (or makes it), and
            # `_send` checks it straight back in; forgotten, it would hold units for an hour.
            with self._aws:
                with self._lock:
                    record = self._leases.get(lease_id)
                    pending = record is not None and record["state"] == "pending"
                if pending and record is not None:
                    status, _ = self._send(lease_id, dict(record))
                    if status == 503 and lease_id in self._leases:
                        log.warning("lease_pending_at_stop", extra={"lease": lease_id})

    def _checkin_now(self, token: str) -> bool:
        try:
            self._gw().checkin(token)
        except LicenseCallError as exc:
            self._count("CheckInLicense", _label(exc.info))
            # Gone already (expired, revoked): nothing is held any more.
            return exc.info.code in GONE_CODES
        self._count("CheckInLicense", "ok")
        return True

    # -- helpers ---------------------------------------------------------------------------

    def _count(self, op: str, result: str) -> None:
        key = (op, result)
        self.results[key] = self.results.get(key, 0) + 1

    def _save(self, leases: dict[str, dict[str, Any]]) -> tuple[bool, str]:
        try:
            self._store.save(leases=leases)
        except OSError as exc:
            log.error("contract_state_not_saved", extra={"detail": str(exc)[:300]})
            return False, type(exc).__name__
        return True, ""

    def _forget(self, lease_id: str) -> None:
        with self._lock:
            self._forget_locked(lease_id)

    def _forget_locked(self, lease_id: str) -> None:
        if self._leases.pop(lease_id, None) is not None:
            self._save(dict(self._leases))
        self._renewed.pop(lease_id, None)
        self._deadline.pop(lease_id, None)
        self._extend_at.pop(lease_id, None)


def _left(record: dict[str, Any], wall_now: float) -> float:
    """Seconds of AWS's grant left, by this machine's wall clock (0 when unknown)."""
    try:
        ttl, renewed = float(record["ttl"]), float(record["renewed_wall"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    return max(0.0, min(ttl, ttl - (wall_now - renewed)))


def _label(info: ErrorInfo) -> str:
    if info.code in GONE_CODES:
        return "gone"
    return "retryable_error" if info.retryable else "terminal_error"


def _problem(code: str, message: str, *, retry_after: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": code, "message": message}
    if retry_after is not None:
        body["retry_after"] = retry_after
    return body


def _stopping() -> Answer:
    return 503, _problem(
        "stopping",
        "the sidecar is stopping (SIGTERM): no new leases; ask another pod",
        retry_after=5,
    )


def _bad(field: str, allowed: str) -> Answer:
    return 400, {**_problem("invalid_field", f"{field}: must be {allowed}"), "field": field}


def _unknown(lease_id: str) -> dict[str, Any]:
    return _problem(
        "unknown_lease",
        f"no lease {lease_id!r}: checked in, timed out (not renewed in time) or never "
        "checked out; POST /v1/licenses/checkout for a new one",
    )


def _parse(body: bytes, fields: frozenset[str]) -> tuple[dict[str, Any] | None, Answer | None]:
    try:
        doc = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None, (400, _problem("invalid_json", "the body must be a JSON object"))
    if not isinstance(doc, dict):
        return None, (400, _problem("invalid_json", "the body must be a JSON object"))
    extra = sorted(set(doc) - fields)
    if extra:
        return None, (
            400,
            {
                **_problem(
                    "invalid_field",
                    f"{str(extra[0])[:60]}: unknown field; allowed: {', '.join(sorted(fields))}",
                ),
                "field": str(extra[0])[:60],
            },
        )
    return doc, None


def _lease_id(body: bytes) -> tuple[str, Answer | None]:
    """The `id` of a renew or check-in body, or the 400 that says what is wrong with it."""
    doc, problem = _parse(body, frozenset({"id"}))
    if problem is not None:
        return "", problem
    assert doc is not None  # nosec B101 # narrowing
    lease_id = doc.get("id")
    if not isinstance(lease_id, str) or not ID_RE.fullmatch(lease_id):
        return "", _bad("id", "the id the lease was checked out with")
    return lease_id, None
