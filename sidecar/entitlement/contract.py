"""Contract mode's worker: check out at start, keep the checkout alive, re-check, check in.

- Every checkout (the start's, the periodic re-check's, one after a loss) has one ClientToken,
  reused by every attempt until AWS's answer is certain. The model gives ClientToken as the
  "unique, case-sensitive identifier that you provide to ensure the idempotency of the
  request": a retry after a lost answer (read timeout, reset) must be the same request, or a
  PERPETUAL checkout consumes twice and a PROVISIONAL one holds two seats for an hour. The next
  logical checkout gets a fresh token, as the guide recommends ("a random UUID for each unique
  request").
- NoEntitlementsAllowedException / ResourceNotFoundException at start: not entitled, final for
  that start (no retries: a new pod checks again). Throttling, 5xx and network errors: retried
  with capped backoff until MARKETPLACE_REGISTER_DEADLINE_SECONDS, never ready meanwhile.
- PROVISIONAL: ExtendLicenseConsumption once half the checkout's lifetime has passed (retried
  until its deadline); re-check every MARKETPLACE_LICENSE_CHECK_SECONDS with a new checkout,
  then check the old one in. PERPETUAL: re-checked only when nothing counted is asked for
  (a counted perpetual checkout draws the units down for good).
- Stop: CheckInLicense of the live PROVISIONAL checkout, bounded by the caller. A checkout
  answered after the stop began is never adopted: the worker checks it in itself.
- Every checkout AWS made is held or given back: an answer that does not verify is checked in
  at once (never resent with its ClientToken: AWS would answer the same checkout again); a
  check-in that fails (the swapped-out checkout of a re-check, a late answer) is owed, kept in
  the state directory and retried with backoff, at stop and by a restart, until its checkout
  has surely expired anyway.
- With a state directory (`ContractStore`) each checkout's ClientToken is kept before the
  request leaves and the live checkout once it is answered: a restarted sidecar extends the
  checkout it held (the same seat) instead of taking a second one, resends a checkout that was
  in flight with the same ClientToken (a re-check's is then finished: the old seat checked
  in), and adopts a counted PERPETUAL checkout instead of drawing the units down again.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sidecar.aws.errors import ErrorInfo
from sidecar.aws.license import GONE_CODES, Checkout, LicenseCallError, parse_time, redact
from sidecar.core.backoff import Backoff
from sidecar.core.clock import Clock
from sidecar.entitlement.contract_store import ContractStore
from sidecar.entitlement.license import (
    HOLDING,
    Asked,
    Held,
    License,
    LicenseSnapshot,
    LicenseState,
    ready,
    verify_checkout,
)

log = logging.getLogger("sidecar.contract")

# A checkout whose lifetime is unknown here has surely expired at AWS after this long: "a
# failed check-in returns to the pool after about 60 minutes" (seller guide).
OWED_SECONDS = 3600.0

SIGNED_NOTE = (
    "not verified: AWS publishes no public key, algorithm or claim set for the SignedToken of "
    "licenses AWS Marketplace issues (License Manager signs them with a KMS key of the issuer, "
    "aws:294406891311:AWS/Marketplace); the checkout is trusted through TLS to License Manager "
    "and the KeyFingerprint asked for"
)


class ContractService:
    """Owns the live checkout. `run` is the worker thread; `document`/`readiness` are reads."""

    def __init__(
        self,
        asked: Asked,
        gateway_factory: Callable[[], Any],
        clock: Clock,
        stop: threading.Event,
        *,
        check_seconds: float,
        deadline: float,
        backoff: Backoff,
        on_loss: str,
        rng: Callable[[], float],
        store: ContractStore | None = None,
    ) -> None:
        self.asked = asked
        self.machine = License()
        self._factory = gateway_factory
        self._gateway: Any = None
        self._clock = clock
        self._stop = stop
        self._check_seconds = check_seconds
        self._deadline = deadline
        self._backoff = backoff
        self.on_loss = on_loss
        self._rng = rng
        self._token: str | None = None  # the live checkout's consumption token
        # The ClientToken of a checkout sent without a certain answer yet: the next attempt (a
        # retry, the next re-check, a restart) resends it, so AWS answers that same checkout.
        self._inflight: str | None = None
        self._lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.results: dict[tuple[str, str], int] = {}  # (operation, result) -> count
        self.checked_in = False
        self.store = store
        self.resumed = False  # this start extended the checkout a previous process held
        self._closed = False  # the stop began: no answer is adopted any more
        self._kept: Held | None = None  # the checkout last kept in the state directory
        self._stop_deadline = 0.0  # monotonic: the stop's check-ins are retried until then
        # Check-ins owed (consumption token -> monotonic time after which the checkout has
        # surely expired at AWS anyway), retried from `_owed_at`.
        self._owed: dict[str, float] = {}
        self._owed_at = float("inf")
        self._owed_attempt = 0

    # -- reads (any thread) ----------------------------------------------------------------

    def readiness(self) -> tuple[bool, str | None]:
        snap = self.machine.snapshot()
        live = ready(snap, self.on_loss, self._clock.monotonic(), self._provisional)
        return live, snap.error.code if snap.error else None

    def document(self) -> dict[str, Any]:
        snap = self.machine.snapshot()
        held = snap.held
        now = self._clock.monotonic()
        doc: dict[str, Any] = {
            "mode": "contract",
            "state": snap.state.value,
            "entitled": snap.state in HOLDING,
            "ready": ready(snap, self.on_loss, now, self._provisional),
            "on_loss": self.on_loss,
            "product_sku": self.asked.product_sku,
            "checkout_type": self.asked.checkout_type,
            "entitlements_requested": [dict(e) for e in self.asked.entitlements],
            "entitlements_allowed": [],
            "license_arn": None,
            "issued_at": None,
            "expiration": None,
            "expires_in_seconds": None,
            "consumption_token": None,  # nosec B105 # a field name, not a secret: the token is shown redacted below
            "signed_token": {"present": False, "verified": False, "why": SIGNED_NOTE},
            "consecutive_failures": snap.consecutive_failures,
            "next_check_at": _iso(snap.next_check_at) if snap.next_check_at else None,
            "error": snap.error.to_json() if snap.error else None,
            "warnings": list(snap.warnings),
        }
        if held is not None:
            c = held.checkout
            doc.update(
                entitlements_allowed=[dict(e) for e in c.entitlements_allowed],
                license_arn=c.license_arn,
                issued_at=c.issued_at,
                expiration=_iso(held.expiration),
                expires_in_seconds=max(0, round(held.deadline - now)),
                consumption_token=redact(c.consumption_token),
            )
            doc["signed_token"]["present"] = bool(c.signed_token)
        return doc

    # -- the worker ------------------------------------------------------------------------

    def run(self) -> None:
        """Start, then keep the checkout alive until stopped; check in on the way out."""
        if self._start():
            self._keep()

    def gateway(self) -> Any:
        """The License Manager client (shared with the lease book), built on first use."""
        return self._gw()

    def _gw(self) -> Any:
        if self._gateway is None:
            self._gateway = self._factory()
        return self._gateway

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    def _result(self, op: str, result: str) -> None:
        key = (op, result)
        self.results[key] = self.results.get(key, 0) + 1

    # -- the state directory ---------------------------------------------------------------

    def _asked_key(self) -> dict[str, Any]:
        a = self.asked
        return {
            "sku": a.product_sku,
            "fingerprint": a.key_fingerprint,
            "entitlements": [dict(e) for e in a.entitlements],
            "type": a.checkout_type,
        }

    def _persist(self, held: Held | None) -> None:
        """Keep the live checkout and the in-flight checkout's ClientToken (None: nothing)."""
        self._kept = held
        if self.store is None:
            return
        client_token = self._inflight
        with self._lock:
            owed = sorted(self._owed)
        record: dict[str, Any] | None = None
        if client_token is not None or held is not None or owed:
            record = {"asked": self._asked_key(), "client_token": client_token, "held": None}
            record["returning"] = owed  # checkouts whose check-in is still owed
            record["node_id"] = self.asked.node_id  # the token's request names it
            if held is not None:
                c = held.checkout
                record["held"] = {
                    "consumption_token": c.consumption_token,
                    "entitlements_allowed": [dict(e) for e in c.entitlements_allowed],
                    "issued_at": c.issued_at,
                    "expiration": _iso(held.expiration),
                    "ttl": held.ttl,
                    "license_arn": c.license_arn,
                    "checkout_type": c.checkout_type,
                    "node_id": c.node_id,
                }
        try:
            self.store.save(checkout=record)
        except OSError as exc:  # the restart hole reopens for this checkout: say so
            log.error("contract_state_not_saved", extra={"detail": str(exc)[:300]})

    def _saved(self) -> tuple[str | None, dict[str, Any] | None]:
        """(the in-flight checkout's ClientToken to resend, the checkout a previous process
        held)."""
        if self.store is None:
            return None, None
        record = self.store.get("checkout")
        if not isinstance(record, dict):
            return None, None
        returning = record.get("returning")
        if isinstance(returning, list):
            # Check-ins a previous process owed: its checkouts may still hold seats at AWS.
            now = self._clock.monotonic()
            with self._lock:
                for token in returning:
                    if isinstance(token, str) and token:
                        self._owed[token] = now + OWED_SECONDS
                self._owed_at = now if self._owed else self._owed_at
        held = record.get("held") if isinstance(record.get("held"), dict) else None
        token = record.get("client_token") if isinstance(record.get("client_token"), str) else None
        if record.get("asked") != self._asked_key():
            # The settings changed: what was held is not what this start asks for.
            if held is not None and self.asked.checkout_type == "PROVISIONAL":
                token = str(held.get("consumption_token") or "")
                self._give_back(token, self._clock.monotonic() + OWED_SECONDS)
            self._persist(None)
            return None, None
        if token is not None and record.get("node_id", self.asked.node_id) != self.asked.node_id:
            # Sent by a pod of another name (a volume that outlived its pod): the same token
            # with another NodeId is refused (ValidationException). A new checkout instead;
            # the one in flight, if AWS made it, returns to the pool at its expiry.
            log.warning("contract_inflight_token_dropped", extra={"reason": "another node id"})
            token = None
        return token, held

    def _restore(self, saved: dict[str, Any], expiration: str | None, sent: float) -> Held | None:
        """A Held from the saved checkout and AWS's new Expiration (None: unusable)."""
        try:
            ttl = float(saved["ttl"])
            checkout = Checkout(
                consumption_token=str(saved["consumption_token"]),
                entitlements_allowed=tuple(
                    {str(k): str(v) for k, v in e.items()} for e in saved["entitlements_allowed"]
                ),
                issued_at=saved.get("issued_at"),
                expiration=expiration or saved.get("expiration"),
                license_arn=saved.get("license_arn"),
                checkout_type=saved.get("checkout_type"),
                signed_token=None,
                node_id=saved.get("node_id"),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        expires = parse_time(expiration or saved.get("expiration"))
        if expires is None or not checkout.consumption_token or ttl <= 0:
            return None
        # AWS extends to its now + the checkout's lifetime: count that lifetime from `sent`.
        return Held(checkout, sent, expires - ttl, expires, self._clock.time())

    def _resume(self, saved: dict[str, Any], started: float) -> str:
        """Extend the checkout a previous process held: "ok", "gone" or "stopped"/"late"."""
        if self.asked.checkout_type == "PERPETUAL":
            # Consumed for good: resending or re-checking out would draw the units down again.
            held = self._restore(saved, None, self._clock.monotonic())
            if held is None:
                return "gone"
            if not self._adopt(held, (), persist=False):
                return "stopped"
            self.resumed = True
            log.info("license_resumed", extra={"license_arn": held.checkout.license_arn})
            return "ok"
        token = str(saved.get("consumption_token") or "")
        attempt = 0
        while not self._stop.is_set():
            self._count("ExtendLicenseConsumption")
            try:
                sent = self._clock.monotonic()
                value = self._gw().extend(token)
            except LicenseCallError as exc:
                self._result("ExtendLicenseConsumption", _outcome(exc.info))
                if exc.info.code in GONE_CODES or not exc.info.retryable:
                    log.info("license_resume_gone", extra={"code": exc.info.code})
                    return "gone"
                self.machine.failed(exc.info, self._clock.time())
                delay = self._backoff.delay(attempt + 1, self._rng)
                attempt += 1
                if self._clock.monotonic() + delay - started > self._deadline:
                    return "late"
                if self._clock.wait(self._stop, delay):
                    return "stopped"
                continue
            held = self._restore(saved, value, sent)
            if held is None:
                self._result("ExtendLicenseConsumption", "unverified")
                return "gone"
            self._result("ExtendLicenseConsumption", "ok")
            if not self._adopt(held, ()):
                return "stopped"
            self.resumed = True
            log.info(
                "license_resumed",
                extra={"license_arn": held.checkout.license_arn, "expiration": value},
            )
            return "ok"
        return "stopped"

    def _checkout(self, client_token: str) -> tuple[Held | None, ErrorInfo | None, tuple[str, ...]]:
        """One CheckoutLicense attempt: (held, None, warnings) or (None, error, ())."""
        a = self.asked
        self._count("CheckoutLicense")
        try:
            gateway = self._gw()  # built on first use: not part of the call's time
            sent = self._clock.monotonic()
            answer: Checkout = gateway.checkout(
                a.product_sku,
                a.key_fingerprint,
                a.entitlements,
                a.checkout_type,
                client_token,
                a.node_id,
            )
        except LicenseCallError as exc:
            self._result("CheckoutLicense", _outcome(exc.info))
            return None, exc.info, ()
        error, warnings = verify_checkout(a.entitlements, answer, self._clock.time())
        if error is not None:
            self._result("CheckoutLicense", "unverified")
            if answer.consumption_token:
                # AWS made a checkout we will not use: give it back now, not in an hour. Not
                # resent: the same ClientToken would get the same checkout, the same verdict.
                log.warning(
                    "license_checkout_unverified",
                    extra={"error": error.to_json(), "checked_in": self._provisional},
                )
                if self._provisional:
                    self._give_back(answer.consumption_token, sent + _ttl(answer))
            return None, error, ()
        self._result("CheckoutLicense", "ok")
        issued, expires = parse_time(answer.issued_at), parse_time(answer.expiration)
        assert issued is not None and expires is not None  # nosec B101 # verified above
        held = Held(answer, sent, issued, expires, self._clock.time())
        return held, None, warnings

    def _adopt(self, held: Held, warnings: tuple[str, ...], *, persist: bool = True) -> bool:
        """Make `held` the live checkout; False when the stop began first (the stop's check-in
        has run or is running without it): then it is checked in here, never adopted."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._token = held.checkout.consumption_token
        self._inflight = None  # answered: the next checkout is a new request
        if closed:
            token = held.checkout.consumption_token
            log.warning(
                "license_answered_after_stop",
                extra={"consumption_token": redact(token), "checked_in": self._provisional},
            )
            if self._provisional:
                if not self._return_by(token, self._stop_deadline):
                    self._owe(token, held.deadline)  # kept for a restart in this pod
                self._persist(None)
            elif persist:
                self._persist(held)  # PERPETUAL: drawn for good; a restart adopts it
            return False
        if persist:
            self._persist(held)
        else:
            self._kept = held  # kept already (a PERPETUAL checkout adopted at restart)
        self.machine.checked_out(held, warnings, self._clock.time() + self._check_seconds)
        log.info(
            "license_checked_out",
            extra={
                "license_arn": held.checkout.license_arn,
                "allowed": [e.get("Name") for e in held.checkout.entitlements_allowed],
                "expires_in_seconds": round(held.ttl),
                "consumption_token": redact(held.checkout.consumption_token),
            },
        )
        return True

    def _start(self) -> bool:
        """Check out within the deadline. False: not entitled, unavailable, or stopped."""
        started = self._clock.monotonic()
        resend, saved = self._saved()
        self._return_owed(persist=False)  # the saved checkout stays kept until resumed
        if saved is not None:
            outcome = self._resume(saved, started)
            if outcome == "ok":
                if resend is not None:
                    # A re-check (or a checkout after a loss) was in flight: finish it with its
                    # token. AWS answers the checkout it made, and the old one is checked in.
                    self._inflight = resend
                    self._recheck()
                return True
            if outcome == "late":
                self.machine.give_up()
                log.error("license_unavailable", extra={"deadline_seconds": self._deadline})
                return False
            if outcome == "stopped":
                return False
        # One per start: every retry is the same request. A start whose answer was lost (the
        # process died with the request out) resends its token: AWS answers the same checkout.
        token = self._token_for(None, resend)
        attempt = 0
        while not self._stop.is_set():
            held, error, warnings = self._checkout(token)
            if held is not None:
                return self._adopt(held, warnings)
            assert error is not None  # nosec B101 # narrowing
            log.warning("license_checkout_failed", extra={"error": error.to_json()})
            if not error.retryable:
                self.machine.failed(error, self._clock.time(), final=True)
                self._answered(None)  # no checkout was made
                return False
            self.machine.failed(error, self._clock.time())
            delay = self._backoff.delay(attempt + 1, self._rng)
            attempt += 1
            if self._clock.monotonic() + delay - started > self._deadline:
                self.machine.give_up()
                log.error("license_unavailable", extra={"deadline_seconds": self._deadline})
                return False
            if self._clock.wait(self._stop, delay):
                return False
        return False

    def _keep(self) -> None:
        """The running pod: extend, re-check, recover after expiry or loss."""
        attempt = 0
        next_check = self._clock.monotonic() + self._check_seconds
        retry_at: float | None = None
        stale: Held | None = None  # expired here, perhaps not yet at AWS (our deadline is early)
        while not self._stop.is_set():
            now = self._clock.monotonic()
            if now >= self._owed_at:
                self._return_owed()
                continue
            snap = self.machine.snapshot()
            if self._provisional and self.machine.expire(now):
                log.error("license_expired", extra={"on_loss": self.on_loss})
                stale = snap.held
                snap = self.machine.snapshot()
                retry_at = now
            if snap.state in HOLDING and snap.held is not None:
                held = snap.held
                extend_at = held.extend_at if self._provisional else float("inf")
                if retry_at is not None:
                    extend_at = retry_at
                due = min(extend_at, next_check if self._rechecks else float("inf"))
                if now < due:
                    until = min(due, held.deadline) if self._provisional else due
                    until = min(until, self._owed_at)
                    self._clock.wait(self._stop, min(until - now, self._check_seconds))
                    continue
                if self._rechecks and now >= next_check:
                    next_check = now + self._check_seconds
                    self._recheck()
                    attempt, retry_at = 0, None
                    continue
                if self._extend(held):
                    attempt, retry_at = 0, None
                else:
                    delay = self._backoff.delay(attempt + 1, self._rng)
                    attempt += 1
                    retry_at = now + delay
                continue
            # Not holding (expired or lost): a fresh checkout, at backoff after transient
            # errors, at the check period after AWS said no (no retry storm).
            if retry_at is not None and now < retry_at:
                self._clock.wait(self._stop, min(retry_at, self._owed_at) - now)
                continue
            if stale is not None:
                # The same seat first: a fresh checkout while AWS still counts the old one
                # would need a second unit (and fail on a full pool).
                outcome = self._revive(stale)
                if outcome == "retry":
                    retry_at = now + self._backoff.delay(attempt + 1, self._rng)
                    attempt += 1
                    continue
                stale = None
                if outcome == "ok":
                    next_check = self._clock.monotonic() + self._check_seconds
                    attempt, retry_at = 0, None
                    continue
            fresh, error, warnings = self._checkout(self._token_for(None))
            if fresh is not None:
                if not self._adopt(fresh, warnings):
                    return
                next_check = self._clock.monotonic() + self._check_seconds
                attempt, retry_at = 0, None
                continue
            assert error is not None  # nosec B101 # narrowing
            if error.retryable:
                self.machine.failed(error, self._clock.time())
                retry_at = now + self._backoff.delay(attempt + 1, self._rng)
                attempt += 1
            else:
                self._answered(None)  # no checkout was made
                self.machine.lost(error, self._clock.time())
                retry_at = now + self._check_seconds

    @property
    def _provisional(self) -> bool:
        return self.asked.checkout_type == "PROVISIONAL"

    @property
    def _rechecks(self) -> bool:
        return self._provisional or not self.asked.counted

    def _extend(self, held: Held) -> bool:
        self._count("ExtendLicenseConsumption")
        try:
            gateway = self._gw()
            sent = self._clock.monotonic()
            value = gateway.extend(held.checkout.consumption_token)
        except LicenseCallError as exc:
            self._result("ExtendLicenseConsumption", _outcome(exc.info))
            log.warning("license_extend_failed", extra={"error": exc.info.to_json()})
            if exc.info.code in GONE_CODES:
                self._withdrawn(exc.info)
                return True  # nothing left to extend: not a retry
            self.machine.failed(exc.info, self._clock.time())
            return False
        expires = parse_time(value)
        if expires is None or expires <= held.expiration:
            # An Expiration that did not move is no extension (AWS's clock stepped back, or the
            # license ends there): counted a success, the waits would shrink to a busy loop.
            self._result("ExtendLicenseConsumption", "unverified")
            self.machine.failed(_bad_extension(value), self._clock.time())
            return False
        self._result("ExtendLicenseConsumption", "ok")
        self.machine.extended(expires, sent)
        snap = self.machine.snapshot()
        if snap.held is not None and not self._closed:  # else the stop's check-in decides
            self._persist(snap.held)
        log.info("license_extended", extra={"expiration": value})
        return True

    def _revive(self, stale: Held) -> str:
        """Extend a checkout that expired on our clock: "ok", "gone" or "retry"."""
        self._count("ExtendLicenseConsumption")
        try:
            gateway = self._gw()
            sent = self._clock.monotonic()
            value = gateway.extend(stale.checkout.consumption_token)
        except LicenseCallError as exc:
            self._result("ExtendLicenseConsumption", _outcome(exc.info))
            if exc.info.code in GONE_CODES:
                with self._lock:
                    if self._token == stale.checkout.consumption_token:
                        self._token = None
                self._persist(None)
                return "gone"
            self.machine.failed(exc.info, self._clock.time())
            return "retry" if exc.info.retryable else "gone"
        expires = parse_time(value)
        if expires is None:
            self._result("ExtendLicenseConsumption", "unverified")
            return "gone"
        self._result("ExtendLicenseConsumption", "ok")
        revived = replace(stale, expiration=max(expires, stale.expiration), renewed_at=sent)
        if revived.deadline <= self._clock.monotonic():
            return "gone"  # nothing left of it here: adopting it would loop without a wait
        self.machine.checked_out(revived, (), self._clock.time() + self._check_seconds)
        if not self._closed:  # else the stop's check-in decides what is kept
            self._persist(revived)
        log.info("license_revived", extra={"expiration": value})
        return "ok"

    def _recheck(self) -> None:
        """A new checkout (fresh token); then the old one is checked in."""
        old = self.machine.snapshot().held
        held, error, warnings = self._checkout(self._token_for(old))
        if held is not None and old is not None and self._short_for_swap(old, held):
            # Fewer entitlements than we hold, with counted ones asked: the pool may lack the
            # spare units for the moment of the swap (our own seat fills it). Give the smaller
            # checkout back and keep ours; a real reduction shows when an extension fails.
            self._give_back(held.checkout.consumption_token, held.deadline)
            self._answered(old)
            self._refused("a smaller answer than the live checkout")
            return
        if held is not None:
            swapped = old.checkout.consumption_token if old is not None else None
            if swapped is not None and self._provisional:
                # Owed from the moment the new one is kept (the same save): a kill before
                # its check-in leaves it to the restart, not out for an hour unknown.
                self._owe(swapped, old.deadline if old is not None else 0.0)
            if not self._adopt(held, warnings):
                # The stop began first: its check-in took the old one.
                with self._lock:
                    self._owed.pop(swapped or "", None)
                self._persist(None)
                return
            if swapped is not None and self._provisional and self._returned(swapped):
                with self._lock:
                    self._owed.pop(swapped, None)
                self._persist(held)
            return
        assert error is not None  # nosec B101 # narrowing
        log.warning("license_recheck_failed", extra={"error": error.to_json()})
        if not error.retryable:
            self._answered(old)  # no checkout stands; a retryable error keeps the token
        if error.code == "CheckoutNotVerified" and old is not None:
            # The answer was given back (`_checkout`); the live checkout was verified and is
            # still extended at AWS: it stands, and the next re-check asks anew.
            self.machine.warn(
                (
                    "recheck_unverified: License Manager's answer to the periodic re-check "
                    f"did not verify ({error.message[:200]}); it was checked in and the live "
                    "checkout stands",
                )
            )
            return
        if not error.retryable and self._provisional and self.asked.counted:
            # AWS answers "no license" and "not enough left" alike: the pool may simply have no
            # spare units for the swap. The live checkout stands until it fails to extend.
            self._refused(error.code)
            return
        if error.retryable:
            self.machine.failed(error, self._clock.time())
        else:
            self._withdrawn(error)
            if old is not None and self._provisional:
                # No longer counted as held here: nor at AWS (a seat nobody uses otherwise).
                self._give_back(old.checkout.consumption_token, old.deadline)
                self._persist(None)

    def _token_for(self, held: Held | None, resend: str | None = None) -> str:
        """The ClientToken of the checkout about to be sent, kept (with what is held) before
        it leaves: the one whose answer is still unknown, else `resend`, else a new one. A
        kill or a lost answer at any point then costs no second seat: the next attempt is the
        same request, and AWS answers the checkout it made."""
        if self._inflight is None:
            self._inflight = resend or uuid.uuid4().hex
        self._persist(held)
        return self._inflight

    def _answered(self, held: Held | None) -> None:
        """AWS's answer is certain (no checkout made, or it was given back): a new token next."""
        self._inflight = None
        self._persist(held)

    def _short_for_swap(self, old: Held, new: Held) -> bool:
        if not (self._provisional and self.asked.counted):
            return False
        names = {e.get("Name") for e in new.checkout.entitlements_allowed}
        return not {e.get("Name") for e in old.checkout.entitlements_allowed} <= names

    def _refused(self, why: str) -> None:
        self.machine.warn(
            (
                f"recheck_refused: License Manager refused the periodic re-check ({why}); "
                "the live checkout stands until an extension fails",
            )
        )

    def _withdrawn(self, error: ErrorInfo) -> None:
        with self._lock:
            self._token = None
        self._persist(None)
        self.machine.lost(error, self._clock.time())
        log.error("license_lost", extra={"code": error.code, "on_loss": self.on_loss})

    def _checkin(self, token: str) -> bool:
        return self._checkin_call(token) == "ok"

    def _returned(self, token: str) -> bool:
        """CheckInLicense of `token`: True when nothing is held by it any more (checked in
        now, or AWS says it no longer exists: expired or withdrawn)."""
        return self._checkin_call(token) in ("ok", "gone")

    def _checkin_call(self, token: str) -> str:
        self._count("CheckInLicense")
        try:
            self._gw().checkin(token)
        except LicenseCallError as exc:
            outcome = _outcome(exc.info)
            self._result("CheckInLicense", outcome)
            log.warning(
                "license_checkin_failed",
                extra={"error": exc.info.to_json(), "consumption_token": redact(token)},
            )
            return outcome
        self._result("CheckInLicense", "ok")
        log.info("license_checked_in", extra={"consumption_token": redact(token)})
        return "ok"

    def checkin_at_stop(self, budget: float = 0.0) -> None:
        """CheckInLicense of the live PROVISIONAL checkout, then of every check-in still owed;
        a retryable failure (throttled, network down) is retried with backoff for `budget`
        seconds. The caller bounds the time (a call hung past it is left behind). From here on
        no answer is adopted (`_adopt`)."""
        deadline = self._clock.monotonic() + budget
        with self._lock:
            self._closed = True
            self._stop_deadline = deadline
            token, self._token = self._token, None
        if self._inflight is not None:
            # Its answer, if it comes while this process lives, is checked in by the worker;
            # if not, AWS holds that checkout until it expires (a restart resends its token).
            log.warning("license_checkout_in_flight_at_stop")
        if token is not None and self._provisional:
            self.checked_in = self._return_by(token, deadline)
            if not self.checked_in:  # a restart in this pod extends it again (the same seat)
                log.error(
                    "license_not_returned_at_stop",
                    extra={"consumption_token": redact(token), "budget_seconds": budget},
                )
        with self._lock:
            owed = list(self._owed)
        for returning in owed:
            if self._return_by(returning, deadline):
                with self._lock:
                    self._owed.pop(returning, None)
        if self.checked_in or (token is None and self._provisional):
            self._persist(None)
        elif owed:
            self._persist(self._kept)  # the owed list changed; what was kept stays kept

    def _return_by(self, token: str, deadline: float) -> bool:
        """`_returned`, retried with backoff while a retryable failure leaves time."""
        attempt = 0
        never = threading.Event()  # the stop event is set: wait on one that is not
        while True:
            outcome = self._checkin_call(token)
            if outcome in ("ok", "gone"):
                return True
            attempt += 1
            delay = self._backoff.delay(attempt, self._rng)
            if outcome != "retryable_error" or self._clock.monotonic() + delay > deadline:
                return False
            self._clock.wait(never, delay)

    # -- check-ins owed ---------------------------------------------------------------------

    def _give_back(self, token: str, until: float) -> bool:
        """CheckInLicense of a checkout we do not keep; a failed one is owed (retried)."""
        if self._returned(token):
            return True
        self._owe(token, until)
        return False

    def _owe(self, token: str, until: float) -> None:
        with self._lock:
            self._owed[token] = max(until, self._clock.monotonic())
            if self._owed_at == float("inf"):
                self._owed_attempt = 0
                self._owed_at = self._clock.monotonic() + self._backoff.delay(1, self._rng)

    def _return_owed(self, *, persist: bool = True) -> None:
        """Retry the owed check-ins; those AWS has surely expired by now are dropped."""
        now = self._clock.monotonic()
        with self._lock:
            owed = dict(self._owed)
        if not owed:
            self._owed_at = float("inf")
            return
        for token, until in owed.items():
            if now >= until or self._returned(token):
                if now >= until:
                    log.warning(
                        "license_checkin_given_up",
                        extra={"consumption_token": redact(token), "why": "expired at AWS"},
                    )
                with self._lock:
                    self._owed.pop(token, None)
        with self._lock:
            left = bool(self._owed)
            self._owed_attempt += 1
            self._owed_at = (
                now + self._backoff.delay(self._owed_attempt + 1, self._rng)
                if left
                else float("inf")
            )
        if persist:
            self._persist(self._kept)  # an expired-here checkout stays kept (it may revive)

    def snapshot(self) -> LicenseSnapshot:
        return self.machine.snapshot()

    def checkins_owed(self) -> int:
        """Checkouts whose CheckInLicense failed and is retried (/metrics)."""
        with self._lock:
            return len(self._owed)


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _ttl(answer: Checkout) -> float:
    """The checkout's lifetime as AWS granted it (the guide's 60 minutes when unreadable)."""
    issued, expires = parse_time(answer.issued_at), parse_time(answer.expiration)
    if issued is None or expires is None or expires <= issued:
        return OWED_SECONDS
    return expires - issued


def _outcome(info: ErrorInfo) -> str:
    """A bounded metric label for a failed call."""
    if info.code in GONE_CODES:
        return "gone"
    return "retryable_error" if info.retryable else "terminal_error"


def _bad_extension(value: object) -> ErrorInfo:
    return ErrorInfo(
        "ExtensionNotVerified",
        f"ExtendLicenseConsumption answered Expiration {str(value)[:60]!r}",
        "retried; an answer without a valid Expiration does not extend the checkout",
        "verification",
        True,
    )


__all__ = ["ContractService", "LicenseState"]
