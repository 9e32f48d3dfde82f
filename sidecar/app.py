"""The `run` daemon: wiring, threads and signals.

    env ──> config check in a forked child (pydantic-settings; this process never imports
                │  it) ──(bad: exit 2, nothing bound)
      MARKETPLACE_MODE=hourly (default)
    ┌──────────────── registrar thread ─────────────────┐   verdict.json, first-call marker
    │ region ─> botocore RegisterUsage(nonce) ─> verify  │<─> (pod-lifetime emptyDir: AWS's
    │ one AWS call budget; Backoff / ThrottleSchedule    │    first-call refusal, and a lost
    │ every hour again; challenges only after a verdict  │    first answer, survive restarts)
    └────────────────────────────┬───────────────────────┘
      or MARKETPLACE_MODE=custom │
    ┌──────────────── usage thread ──────────────────────┐   usage store (SQLite WAL in the
    │ entitlement: MeterUsage 0 | DryRun | none          │<─> same emptyDir) <── POST /v1/usage
    │ then each ended hour: seal, MeterUsage it once     │    (202 only after fsync; hour totals,
    └────────────────────────────┬───────────────────────┘    id digests; migrated if it fits)
                                 ▼
                     Entitlement (state machine) ──> Metrics, kube mirrors (opt-in:
                                 │                   pod condition, Events)
                                 ▼
    127.0.0.1:8787  /healthz /readyz /v1/entitlement /v1/entitlement/challenge (hourly only)
                    /v1/usage (custom: POST records, GET per-hour state); one request
                    computes at a time (CpuTurn), never while it waits on a client or AWS
    0.0.0.0:8788    /healthz /readyz (state and code only) /metrics (MARKETPLACE_METRICS_LISTEN:
                    here, a listener of its own, or off); deadlines, oldest-idle eviction

      or MARKETPLACE_MODE=saas (no registrar, no key, no entitlement state machine)
    ┌──────────────── saas thread (SaasService.run) ─────┐   usage store: PostgreSQL
    │ leader only (store.leading()): each ended hour:    │<─> (MARKETPLACE_USAGE_DATABASE_URL,
    │ seal, one record per customer/dimension/hour,      │    shared by the fleet) or SQLite
    │ BatchMeterUsage <= 25 records; others: idle-check  │    in MARKETPLACE_STATE_DIR (one
    └────────────────────────────────────────────────────┘    replica); intake: totals and keys
    lifecycle thread (MARKETPLACE_SAAS_EVENTS_QUEUE_URL): SQS long poll ─> parse EventBridge /
    SNS envelopes ─> apply once per fleet in the store (GetEntitlements on changes) ─> delete
    127.0.0.1:8787  /healthz /readyz (the store is available) /v1/usage (POST, GET)
                    /v1/customers/resolve (POST: ResolveCustomer) /v1/customers[/{id}] (GET)
                    /v1/customers/changes (GET: the change feed, long poll)
                    /v1/saas/dead-letters[/{id}] (GET: the queue's poison messages kept)
                    /v1/entitlement: 404 naming the mode
    0.0.0.0:8788    /healthz /readyz (ready, state, error code only) /metrics (saas counters
                    read from SaasService.counters() at scrape time)

      or MARKETPLACE_MODE=contract (no registrar, no key; sidecar.entitlement.contract)
    contract thread: License Manager CheckoutLicense at start (one ClientToken, retried until
    the deadline), ExtendLicenseConsumption half-way through each grant, a fresh checkout every
    MARKETPLACE_LICENSE_CHECK_SECONDS; /readyz and /v1/entitlement read its License state;
    CheckInLicense at SIGTERM within MARKETPLACE_DRAIN_SECONDS. With MARKETPLACE_STATE_DIR the
    checkout survives restarts and a leases thread keeps the product's /v1/licenses leases.
    With MARKETPLACE_DIMENSIONS (contract with consumption) a usage thread runs custom mode's
    pipeline too, its start check the license (`license_gate`): nothing goes to MeterUsage
    before a checkout; at SIGTERM the drain and the check-in share the one budget

SIGTERM or SIGINT sets one stop event. Custom mode then seals the partial hour and sends what
is pending within MARKETPLACE_DRAIN_SECONDS (the API still accepts usage meanwhile); saas mode
drains the same way (the leader sends what is due); the servers close and the process exits 0.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from sidecar import __version__
from sidecar.aws.errors import classify, for_endpoint
from sidecar.config import (
    ENDPOINT_ENV,
    PREFIX,
    Settings,
    config_warnings,
    describe,
    scrub_url_secret,
)
from sidecar.core.backoff import Backoff, ThrottleSchedule
from sidecar.core.clock import Clock, SystemClock
from sidecar.entitlement.marker import FirstCallMarker
from sidecar.entitlement.registrar import GatewaySetupError, Policy, Registrar
from sidecar.entitlement.state import Entitlement, Snapshot
from sidecar.entitlement.verdict import VerdictStore
from sidecar.ops import logs
from sidecar.ops.kube import KubeTarget, Mirror, desired
from sidecar.ops.metrics import ContractCounts, Metrics
from sidecar.server.api import API_LIMITS, METRICS_LIMITS, PROBE_LIMITS, LocalServer, Router
from sidecar.server.netaddr import parse_hostport
from sidecar.stopsignals import StopSignals

if TYPE_CHECKING:
    from sidecar.entitlement.contract import ContractService
    from sidecar.entitlement.leases import LeaseBook
    from sidecar.usage.saas import SaasPolicy, SaasService
    from sidecar.usage.service import EntitlementResult, UsagePolicy, UsageService

log = logging.getLogger("sidecar")

ROUTES = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/entitlement",
        "/v1/entitlement/challenge",
        "/v1/usage",
        "/v1/customers",
        "/v1/customers/resolve",
        "/v1/customers/{id}",
        "/v1/saas/dead-letters",
        "/v1/saas/dead-letters/{id}",
        "/v1/licenses",
        "/v1/licenses/checkout",
        "/v1/licenses/renew",
        "/v1/licenses/checkin",
    }
)


def policy_from(settings: Settings, keys: Mapping[int, RSAPublicKey]) -> Policy:
    return Policy(
        product_code=settings.product_code or "",  # hourly and custom mode require it
        public_key_version=settings.public_key_version,
        keys=keys,
        interval=settings.register_interval_seconds,
        jitter=settings.register_jitter,
        deadline=settings.register_deadline_seconds,
        backoff=Backoff(settings.backoff_base_seconds, settings.backoff_cap_seconds),
        throttle=ThrottleSchedule(settings.throttle_schedule, fleet=settings.fleet_size),
        clock_skew=settings.clock_skew_seconds,
        challenge_rate=settings.challenge_rate_per_second,
        challenge_burst=settings.challenge_burst,
        challenge_deadline=settings.challenge_deadline_seconds,
        aws_call_rate=settings.aws_call_rate_per_second,
        aws_call_burst=settings.aws_call_burst,
        strict_first_answer=settings.strict_first_answer,
    )


def usage_policy(settings: Settings) -> UsagePolicy:
    from sidecar.usage.service import UsagePolicy

    if settings.state_dir is None:  # the mode validator requires it
        raise ValueError("MARKETPLACE_STATE_DIR is required with MARKETPLACE_DIMENSIONS")
    contract = settings.mode == "contract"
    return UsagePolicy(
        product_code=settings.product_code or "",  # custom mode (and consumption) require it
        dimensions=settings.dimension_list,
        state_dir=settings.state_dir,
        entitlement_check="license" if contract else settings.entitlement_check,
        check_dimension=settings.entitlement_dimension or None,
        drain_seconds=settings.drain_seconds,
        entitlement_deadline=settings.register_deadline_seconds,
        backoff_base=settings.backoff_base_seconds,
        backoff_cap=settings.backoff_cap_seconds,
        volume_bytes=settings.state_volume_bytes,
        fleet_size=settings.fleet_size,
        calls_per_second=settings.meter_calls_per_second,
        pod_name=settings.pod_name,
        pod_index=settings.pod_index,
    )


def saas_policy(settings: Settings) -> SaasPolicy:
    from sidecar.usage.overage import Basis
    from sidecar.usage.saas import SaasPolicy

    return SaasPolicy(
        dimensions=settings.dimension_list,
        identity=settings.saas_identity,
        # license identity sends no product code, but a set one still pins ResolveCustomer:
        # the seller's credentials resolve the buyers of every product of the account.
        product_code=settings.product_code,
        accept_unresolved=settings.accept_unresolved_customers,
        zero_records=settings.zero_usage_records,
        contract=tuple((d, Basis(b)) for d, b in settings.contract_dimensions.items()),
        calls_per_second=settings.saas_calls_per_second,
        drain_seconds=settings.drain_seconds,
        backoff_base=settings.backoff_base_seconds,
        backoff_cap=settings.backoff_cap_seconds,
    )


def entitlement_reader(settings: Settings) -> Callable[[str, str], list[dict[str, Any]]]:
    """GetEntitlements (marketplace-entitlement, us-east-1) for one buyer, as plain dicts; the
    client is built on first use."""
    client: list[Any] = []
    guard = threading.Lock()

    def read(product_code: str, account_id: str) -> list[dict[str, Any]]:
        from sidecar.aws import entitlement

        with guard:
            if not client:
                client.append(entitlement.entitlement_client(timeout=settings.aws_timeout_seconds))
        return [
            {
                "dimension": e.dimension,
                "value": e.value,
                "expiration": e.expiration,
                "kind": e.kind,
            }
            for e in entitlement.get_entitlements(client[0], product_code, account_id)
        ]

    return read


def queue_region(url: str) -> str:
    """The queue's region from its URL (sqs.<region>.amazonaws.com); else AWS_REGION and the
    other usual places; else us-east-1, where AWS Marketplace's events are delivered."""
    from urllib.parse import urlparse

    from sidecar.aws.region import RegionNotFoundError, resolve_region

    host = urlparse(url).hostname or ""
    parts = host.split(".")
    if len(parts) >= 4 and parts[0] == "sqs" and parts[2] == "amazonaws":
        return parts[1]
    if len(parts) >= 4 and parts[1] == "queue" and parts[2] == "amazonaws":
        return parts[0]
    try:
        return resolve_region()[0]
    except RegionNotFoundError:
        return "us-east-1"


def open_saas(settings: Settings, factory: Callable[[], Any], clock: Clock) -> SaasService:
    """The store (PostgreSQL for a fleet, else SQLite for one replica) and the service on it.

    Raises StoreError before any port is bound: an untrusted store never starts from zero."""
    from sidecar.usage.db import open_store
    from sidecar.usage.saas import SAAS_SCHEMA, SaasService

    store = open_store(
        SAAS_SCHEMA, state_dir=settings.state_dir, database_url=settings.usage_database_url
    )
    log.info("usage_store", extra={"backend": store.backend, "where": store.where})
    try:
        return SaasService(
            saas_policy(settings),
            store,
            factory,
            clock=clock,
            entitlements=entitlement_reader(settings) if settings.saas_events_queue_url else None,
        )
    except BaseException:
        store.close()
        raise


def contract_service(
    settings: Settings,
    factory: Callable[[], Any] | None,
    clock: Clock,
    stop: threading.Event,
) -> ContractService:
    """Contract mode's worker, from the settings (validated: SKU and entitlements are set)."""
    from sidecar.config import parse_license_entitlements
    from sidecar.entitlement.contract import ContractService
    from sidecar.entitlement.contract_store import ContractStore
    from sidecar.entitlement.license import Asked

    asked = Asked(
        product_sku=settings.license_product_sku or "",
        key_fingerprint=settings.license_key_fingerprint,
        entitlements=parse_license_entitlements(settings.license_entitlements),
        checkout_type=settings.license_checkout_type,
        node_id=settings.pod_name or None,
    )
    return ContractService(
        asked,
        factory or license_gateway(settings),
        clock,
        stop,
        check_seconds=settings.license_check_seconds,
        deadline=settings.register_deadline_seconds,
        backoff=Backoff(settings.backoff_base_seconds, settings.backoff_cap_seconds),
        on_loss=settings.license_on_loss,
        rng=random.random,
        store=ContractStore(settings.state_dir) if settings.state_dir is not None else None,
    )


def lease_book(settings: Settings, service: ContractService, clock: Clock) -> LeaseBook | None:
    """The product's leases: only with a state directory (they must survive a restart)."""
    if service.store is None:
        return None
    from sidecar.entitlement.leases import LeaseBook

    return LeaseBook(
        service.store,
        service.gateway,
        clock,
        product_sku=service.asked.product_sku,
        key_fingerprint=service.asked.key_fingerprint,
        units_of={e["Name"]: e["Unit"] for e in service.asked.entitlements},
        timeout=settings.license_lease_timeout_seconds,
        node_id=service.asked.node_id,
    )


def license_gate(
    contract: ContractService, clock: Clock, poll: float = 0.2
) -> Callable[[threading.Event], EntitlementResult]:
    """Contract with consumption: the usage pipeline's start check is the license.

    Not meter_zero (a quantity-0 MeterUsage proves a subscription the license already
    proves, and would lock a dimension's first hour), not `none` with readiness alone (the
    pipeline would send usage of a pod that was never licensed, and drain it at SIGTERM).
    It waits for the contract thread's first verdict through the service's public snapshot:
    a live checkout opens sending; "not entitled" or "unavailable" (final for this start)
    keeps every posted unit in the store, unsent. A later loss does not close it again: the
    units were acknowledged under a license and AWS's MeterUsage answer judges them."""
    from sidecar.entitlement.license import HOLDING, LicenseState
    from sidecar.usage.service import EntitlementResult

    def gate(stop: threading.Event) -> EntitlementResult:
        while True:
            snap = contract.snapshot()
            if snap.state in HOLDING:
                log.info("usage_license_checked", extra={"state": snap.state.value})
                return EntitlementResult("entitled")
            if snap.state is LicenseState.NOT_ENTITLED:
                return EntitlementResult("refused", snap.error)
            if snap.state is LicenseState.UNAVAILABLE:
                return EntitlementResult("unavailable", snap.error)
            if clock.wait(stop, poll):
                return EntitlementResult("unavailable", snap.error)

    return gate


def license_gateway(settings: Settings) -> Callable[[], Any]:
    """The License Manager client, built on first use (a setup failure is a failed attempt)."""

    def factory() -> Any:
        from sidecar.aws.license import LicenseCallError, LicenseGateway, classify_license
        from sidecar.aws.region import RegionNotFoundError, resolve_region

        endpoint = os.environ.get("AWS_ENDPOINT_URL_LICENSE_MANAGER")
        try:
            region, source = resolve_region()
        except RegionNotFoundError as exc:
            raise LicenseCallError(for_endpoint(exc.info, endpoint)) from None
        try:
            gateway = LicenseGateway(
                region,
                settings.aws_timeout_seconds,
                token_file=settings.license_token_file,
                role_arn=settings.license_role_arn,
            )
        except Exception as exc:  # botocore setup errors are configuration problems
            info = classify_license(type(exc).__name__, str(exc))
            raise LicenseCallError(for_endpoint(info, endpoint)) from None
        log.info(
            "aws_client",
            extra={"region": region, "region_source": source, "endpoint": gateway.endpoint},
        )
        return gateway

    return factory


def usage_clock(settings: Settings) -> Clock:
    """The system clock; a scaled one only for tests (config refuses it unless on loopback)."""
    if settings.test_only_time_scale is None or settings.test_only_time_origin is None:
        return SystemClock()
    from sidecar.usage.hours import ScaledClock

    log.warning("test_only_clock", extra={"scale": settings.test_only_time_scale})
    return ScaledClock(settings.test_only_time_scale, settings.test_only_time_origin)


def aws_gateway(settings: Settings) -> Callable[[], Any]:
    """The boto3 gateway, built lazily on first use (RegisterUsage or MeterUsage)."""

    def factory() -> Any:
        from sidecar.aws.metering import MeteringGateway
        from sidecar.aws.region import RegionNotFoundError, resolve_region

        endpoint = os.environ.get(ENDPOINT_ENV)
        try:
            region, source = resolve_region()
        except RegionNotFoundError as exc:
            raise GatewaySetupError(for_endpoint(exc.info, endpoint)) from None
        try:
            gateway = MeteringGateway(
                region, settings.aws_timeout_seconds, settings.first_call_timeout_seconds
            )
        except Exception as exc:  # botocore setup errors are configuration problems
            info = classify(type(exc).__name__, str(exc))
            raise GatewaySetupError(for_endpoint(info, endpoint)) from None
        log.info(
            "aws_client",
            extra={"region": region, "region_source": source, "endpoint": gateway.endpoint},
        )
        # botocore's models live as long as the process: keep the cyclic GC from re-scanning
        # them on every full collection while the API serves polls.
        gc.collect()
        gc.freeze()
        return gateway

    return factory


def credential_warnings(env: Mapping[str, str]) -> list[str]:
    """AWS metering on EKS accepts IRSA only; say so before the first call fails."""
    irsa = env.get("AWS_ROLE_ARN") and env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
    pod_identity = "169.254.170.23" in env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI", "")
    if pod_identity and not irsa:
        return [
            "EKS Pod Identity credentials detected: AWS Marketplace metering does not accept "
            "them; use IRSA (serviceAccount annotation eks.amazonaws.com/role-arn)"
        ]
    local = env.get(ENDPOINT_ENV) or env.get("AWS_ENDPOINT_URL_LICENSE_MANAGER")
    if env.get("AWS_ACCESS_KEY_ID") and not local:
        return [
            "static AWS access keys in the environment: AWS Marketplace metering expects the "
            "ECS task role or IRSA, and AWS advises against keys in containers"
        ]
    return []


def kube_mirrors(
    settings: Settings, machine: Entitlement, clock: Clock, stop: threading.Event
) -> list[Mirror]:
    """The opt-in Kubernetes mirrors: readiness-gate condition and/or Events."""
    target = KubeTarget(
        settings.pod_name, settings.pod_namespace, settings.serviceaccount_dir, clock
    )
    mirrors = []
    if settings.readiness_gate:
        gate = settings.readiness_gate
        mirrors.append(
            Mirror(
                "readiness_gate",
                "patch on pods/status",
                desired_key,
                lambda snap: target.patch_condition(gate, snap),
                machine.snapshot,
                clock,
                stop,
                random.random,
            )
        )
    if settings.kube_events:
        mirrors.append(
            Mirror(
                "events",
                "create on events",
                event_key,
                target.record_event,
                machine.snapshot,
                clock,
                stop,
                random.random,
            )
        )
    return mirrors


def desired_key(snap: Snapshot) -> Hashable:
    return desired(snap)


def event_key(snap: Snapshot) -> Hashable:
    """One Event per state change (or change of error code), not per re-registration."""
    return (snap.state, snap.error.code if snap.error else None)


class ListenError(Exception):
    """A listener could not bind; the message names its variable and what to do."""

    def __init__(self, variable: str, address: str, reason: str) -> None:
        super().__init__(f"{variable}: cannot listen on {address}: {reason}")
        self.variable, self.address, self.reason = variable, address, reason


_BIND_HINTS = {
    errno.EADDRINUSE: "address already in use: another process (or another container in "
    "the pod, which shares its network) holds this port; choose a free port",
    errno.EADDRNOTAVAIL: "no interface of this host has that address; use 127.0.0.1 "
    "(or 0.0.0.0 for the probe listener)",
    errno.EACCES: "permission denied: ports below 1024 need privileges the sidecar does not "
    "have (it runs as non-root); use a port from 1024 up",
}


def bind(variable: str, value: str, make: Callable[[tuple[str, int]], LocalServer]) -> LocalServer:
    """Create a listener, turning a failed bind into a `ListenError` that names `variable`."""
    try:
        return make(parse_hostport(value))
    except socket.gaierror as exc:
        raise ListenError(variable, value, f"cannot resolve the host: {exc.strerror}") from None
    except OSError as exc:
        reason = _BIND_HINTS.get(exc.errno or 0, exc.strerror or str(exc))
        raise ListenError(variable, value, reason) from None


class Daemon:
    """Owns the threads; `start` binds the ports, `stop` closes them."""

    def __init__(
        self,
        settings: Settings,
        keys: Mapping[int, RSAPublicKey],
        *,
        clock: Clock | None = None,
        gateway_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.stop_event = threading.Event()
        self.machine = Entitlement()
        saas = settings.mode == "saas"
        contract = settings.mode == "contract"
        # SaaS mode has no entitlement state: no state gauges that would say "registering".
        # Contract mode's state is the license's (sidecar.entitlement.license).
        self.metrics = Metrics(None if saas or contract else self.machine.snapshot, ROUTES)
        custom = settings.mode == "custom"
        self.clock = clock or (usage_clock(settings) if custom or saas else SystemClock())
        factory = gateway_factory or aws_gateway(settings)
        self.saas: SaasService | None = None
        if saas:
            self.saas = open_saas(settings, factory, self.clock)
            self.metrics.watch_saas(self.saas.counters, frozenset(settings.dimension_list))
        # In custom mode the registrar never runs: the Router reads its state machine only.
        # SaaS mode has none at all (no RegisterUsage, no key, no verdict files).
        self.registrar: Registrar | None = None
        self.contract: ContractService | None = None
        self.leases: LeaseBook | None = None
        if contract:
            self.contract = contract_service(settings, gateway_factory, self.clock, self.stop_event)
            self.leases = lease_book(settings, self.contract, self.clock)
            self.metrics.watch_contract(self.contract_counts)
        elif not saas:
            self.registrar = Registrar(
                policy_from(settings, keys),
                factory,
                self.machine,
                self.clock,
                random.random,
                self.stop_event,
                verdicts=(
                    VerdictStore(settings.state_dir, settings.product_code or "")
                    if settings.state_dir is not None and not custom
                    else None
                ),
                observer=self.metrics,
                marker=FirstCallMarker(settings.state_dir),
            )
        self.usage: UsageService | None = None
        self._entitlement_check = "none"
        consumption = contract and bool(settings.dimensions)
        if custom or consumption:
            from sidecar.usage.service import UsageService

            # Raises StoreError before any port is bound: never a silent reset to zero.
            self.usage = UsageService(
                usage_policy(settings),
                factory,
                clock=self.clock,
                on_entitlement=None if consumption else self._entitled,
                gate=license_gate(self.contract, self.clock) if self.contract else None,
            )
            usage = self.usage
            self.metrics.watch_usage(usage.counters, frozenset(settings.dimension_list))
        self._crash: str | None = None
        self._worker = threading.Thread(
            target=self._work_saas
            if saas
            else self._work_usage
            if custom
            else self._work_contract
            if contract
            else self._work,
            name="saas" if saas else "usage" if custom else "contract" if contract else "registrar",
            daemon=True,
        )
        # Contract with consumption: the usage pipeline beside the license thread.
        self._usage_worker: threading.Thread | None = None
        self._checkin_thread: threading.Thread | None = None
        if consumption:
            self._usage_worker = threading.Thread(
                target=self._work_consumption, name="usage", daemon=True
            )
        self.mirrors: list[Mirror] = []
        if settings.readiness_gate or settings.kube_events:
            self.mirrors = kube_mirrors(settings, self.machine, self.clock, self.stop_event)
        # SaaS mode: no registrar behind the routes (hourly and custom mode keep theirs).
        registrar = self.registrar
        readiness = self.saas.ready if self.saas is not None else None
        if self.contract is not None:
            readiness = self.contract.readiness
        notices = (
            self.usage.notices
            if self.usage is not None
            else self.saas.notices
            if self.saas is not None
            else None
        )
        api_router = Router(
            registrar,
            self.health,
            extras=self.extras,
            metrics=self.metrics,
            warnings=config_warnings(settings),
            usage=self.usage,
            saas=self.saas,
            readiness=readiness,
            notices=notices,
            contract=self.contract,
            leases=self.leases,
        )
        self.api = bind(
            f"{PREFIX}LISTEN",
            settings.listen,
            lambda address: LocalServer(address, api_router, API_LIMITS, name="api"),
        )
        self.servers = [self.api]
        try:
            self.probe = bind(
                f"{PREFIX}PROBE_LISTEN",
                settings.probe_listen,
                lambda address: LocalServer(
                    address,
                    Router(
                        registrar,
                        self.health,
                        listener="probe",
                        serve_metrics=settings.metrics_listen == "probe",
                        metrics=self.metrics,
                        readiness=readiness,
                        notices=notices,
                        contract=self.contract,
                    ),
                    PROBE_LIMITS,
                    name="probe",
                ),
            )
            self.servers.append(self.probe)
            if settings.metrics_listen not in ("probe", "off"):
                metrics_router = Router(
                    registrar,
                    self.health,
                    listener="metrics",
                    metrics=self.metrics,
                    readiness=readiness,
                )
                self.servers.append(
                    bind(
                        f"{PREFIX}METRICS_LISTEN",
                        settings.metrics_listen,
                        lambda address: LocalServer(
                            address, metrics_router, METRICS_LIMITS, name="metrics"
                        ),
                    )
                )
        except ListenError:
            for server in self.servers:
                server.server_close()
            if self.usage is not None:
                self.usage.close()
            if self.saas is not None:
                self.saas.close()
            raise

    def health(self) -> str | None:
        return self._crash

    def extras(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.usage is not None:
            out["metering"] = {
                "mode": "custom",
                "entitlement_check": self.settings.entitlement_check,
                # dry_run and none serve before AWS has said anything about the subscription.
                "subscription_checked": self._entitlement_check == "entitled",
            }
        for m in self.mirrors:
            st = m.status
            out[m.name] = {
                "applied": st.applied,
                "error": st.error,
                "consecutive_failures": st.failures,
            }
        return out

    def _entitled(self, result: EntitlementResult) -> None:
        """Map the usage pipeline's entitlement answers onto the same states as hourly mode."""
        now = self.clock.time()
        before = self.machine.snapshot()
        outcome = result.outcome
        if outcome in ("entitled", "permitted", "skipped"):
            self._entitlement_check = outcome
            self.machine.succeeded(None, None, now, None)
        elif outcome == "retrying" and result.error is not None:
            # a retryable failure of the start check (AWS 5xx, throttling, a clock AWS
            # disagrees with, a full state volume): not ready, the error and count shown
            self.machine.failed(result.error, now)
        elif outcome == "refused" and result.error is not None:
            if before.last_success_at is None:
                self.machine.failed(result.error, now)  # before any success: final
            else:
                self.machine.revoked(result.error, now)  # dry_run/none: first real send refused
        elif result.error is not None:  # unavailable: retryable errors until the deadline
            self.machine.failed(result.error, now)
            self.machine.give_up(now)
        after = self.machine.snapshot()
        if after.state is not before.state:
            log.info(
                "state_changed",
                extra={
                    "from": before.state.value,
                    "to": after.state.value,
                    "code": after.error.code if after.error else None,
                    "entitlement_check": self.settings.entitlement_check,
                },
            )

    def _work(self) -> None:
        try:
            if self.registrar is not None:
                self.registrar.run()
        except Exception as exc:
            self._crash = f"registration loop crashed: {type(exc).__name__}"
            log.exception("registrar_crashed")

    def _work_usage(self) -> None:
        if self.usage is None:
            return
        try:
            result = self.usage.check_entitlement(self.stop_event)
            self._entitled(result)
            if result.outcome != "refused":  # unsent hours still go out after an outage
                self.usage.run(self.stop_event)
        except Exception as exc:
            self._crash = f"usage loop crashed: {type(exc).__name__}"
            log.exception("usage_crashed")

    def _work_consumption(self) -> None:
        """Contract with consumption: send usage only after the license gate opened."""
        if self.usage is None:
            return
        try:
            result = self.usage.check_entitlement(self.stop_event)
            if result.outcome == "entitled":
                self.usage.run(self.stop_event)
            else:
                log.warning(
                    "usage_held",
                    extra={
                        "outcome": result.outcome,
                        "code": result.error.code if result.error else None,
                        "detail": "no license: posted usage stays in the state dir, unsent",
                    },
                )
        except Exception as exc:
            self._crash = f"usage loop crashed: {type(exc).__name__}"
            log.exception("usage_crashed")

    def _work_contract(self) -> None:
        if self.contract is None:
            return
        try:
            self.contract.run()
        except Exception as exc:
            self._crash = f"license loop crashed: {type(exc).__name__}"
            log.exception("contract_crashed")

    def _work_leases(self) -> None:
        """The lease keeper: time out, extend and finish the product's leases."""
        leases = self.leases
        while leases is not None and not self.stop_event.is_set():
            try:
                pause = leases.tick()
            except Exception:  # one bad tick must not end the keeper: log and go on
                log.exception("lease_keeper_failed")
                pause = 1.0
            leases.wake.wait(pause)  # close() sets it too
            leases.wake.clear()

    def contract_counts(self) -> ContractCounts:
        """What /metrics shows of contract mode, read at scrape time."""
        assert self.contract is not None  # nosec B101 # registered in contract mode only
        results = dict(self.contract.results)
        leases: dict[str, int] = {}
        owed = {"checkout": self.contract.checkins_owed()}
        if self.leases is not None:
            for key, n in self.leases.results.items():
                results[key] = results.get(key, 0) + n
            leases = self.leases.held_by_entitlement()
            owed["lease"] = self.leases.checkins_owed()
        doc = self.contract.document()
        # A PERPETUAL checkout is never extended and never expires here: no time left to show.
        left = doc["expires_in_seconds"] if doc["checkout_type"] == "PROVISIONAL" else None
        return ContractCounts(doc["state"], left, results, leases, owed)

    def _checkin(self, budget: float) -> None:
        """CheckInLicense at stop, never past `budget` seconds (a hung call is left behind)."""
        contract = self.contract
        if contract is None:
            return
        if self._usage_worker is not None and self._checkin_thread is None:
            # Contract with consumption: beside the usage drain, both inside one budget (a
            # hung MeterUsage must not cost the seat's return, nor the reverse); `close`
            # joins it before the servers go.
            self._checkin_thread = threading.Thread(
                target=self._checkin, args=(budget,), name="stop-checkin", daemon=True
            )
            self._checkin_thread.start()
            return

        # The check-in runs at once, beside the worker: a worker stuck in a call (a hung
        # extension, a re-check out) must not spend the budget the seat's return needs. A
        # checkout the worker has answered after this is checked in by the worker itself
        # (`ContractService._adopt`), inside what is left of the budget.
        # The pod's seat and the product's leases go back side by side: a lease whose
        # check-in hangs must not cost the pod's own (nor the reverse).
        started = time.monotonic()
        jobs = [threading.Thread(target=contract.checkin_at_stop, args=(budget,), daemon=True)]
        if self.leases is not None:
            jobs.append(threading.Thread(target=self.leases.checkin_all, daemon=True))
        for job in jobs:
            job.start()
        for job in jobs:
            job.join(timeout=max(0.0, budget - (time.monotonic() - started)))
        if any(job.is_alive() for job in jobs):
            log.warning("license_checkin_abandoned", extra={"budget_seconds": budget})
        self._worker.join(timeout=max(0.0, budget - (time.monotonic() - started)))
        if self._worker.is_alive():
            log.warning("license_call_abandoned_at_stop", extra={"budget_seconds": budget})

    def _consume_events(self) -> None:
        """The lifecycle queue's consumer (saas mode with MARKETPLACE_SAAS_EVENTS_QUEUE_URL)."""
        url = self.settings.saas_events_queue_url
        if self.saas is None or not url:
            return
        from sidecar.aws.sqs import EventQueue

        try:
            queue = EventQueue(url, queue_region(url))
            self.saas.consume(queue, self.stop_event)
        except Exception as exc:
            self._crash = f"lifecycle consumer crashed: {type(exc).__name__}"
            log.exception("saas_lifecycle_crashed")

    def _work_saas(self) -> None:
        if self.saas is None:
            return
        try:
            self.saas.run(self.stop_event)
        except Exception as exc:
            self._crash = f"saas loop crashed: {type(exc).__name__}"
            log.exception("saas_crashed")

    def start(self) -> None:
        for server in self.servers:
            server.serve_in_thread(server.name)
        if self._usage_worker is not None:
            self._usage_worker.start()  # its gate waits for the license thread's verdict
        self._worker.start()
        if self.leases is not None:
            threading.Thread(target=self._work_leases, name="leases", daemon=True).start()
        if self.saas is not None and self.settings.saas_events_queue_url:
            threading.Thread(target=self._consume_events, name="lifecycle", daemon=True).start()
        for mirror in self.mirrors:
            threading.Thread(target=mirror.run, name=mirror.name, daemon=True).start()

    def close(self) -> None:
        self.stop_event.set()
        if self.leases is not None:
            self.leases.wake.set()
        self._checkin(self.settings.drain_seconds)
        pipeline = self.usage or self.saas
        if pipeline is not None:
            # The API stays up while draining: a classic sidecar's product may still report.
            started = time.monotonic()
            budget = self.settings.drain_seconds
            worker = self._usage_worker or self._worker
            worker.join(timeout=min(2.0, budget))
            left = max(0.0, budget - (time.monotonic() - started))
            log.info("draining", extra={"budget_seconds": round(left, 1)})
            try:
                pipeline.drain(left)
            except Exception:
                log.exception("drain_failed")  # unsent hours stay in the store
        if self._checkin_thread is not None:
            self._checkin_thread.join()  # bounded by the same budget inside `_checkin`
        for server in self.servers:
            server.shutdown()
            server.server_close()
        if pipeline is not None:
            pipeline.close()


def run(
    settings: Settings,
    keys: Mapping[int, RSAPublicKey],
    *,
    stop_requested: Callable[[], bool] = lambda: False,
) -> int:
    """Bind, serve until SIGTERM/SIGINT, exit 0. `stop_requested` reports a signal that the
    command line caught before this function could install its own handler."""
    logs.setup(settings.log_format, settings.log_level)
    log.info("starting", extra={"version": __version__, "config": describe(settings)})
    for warning in config_warnings(settings):
        log.warning("config", extra={"detail": warning})
    for warning in credential_warnings(os.environ):
        log.warning("credentials", extra={"detail": warning})
    for ignored in settings.ignored():
        log.warning("config_ignored", extra={"detail": ignored})
    store_errors: tuple[type[Exception], ...] = ()
    if settings.mode == "custom" or (settings.mode == "contract" and settings.dimensions):
        # hourly mode (and contract mode without dimensions) never load the usage pipeline
        from sidecar.usage.service import StoreError

        store_errors = (StoreError,)
    elif settings.mode == "saas":
        from sidecar.usage.db import StoreError as DbStoreError

        store_errors = (DbStoreError,)
    try:
        daemon = Daemon(settings, keys)
    except ListenError as exc:
        # A taken or impossible address is a configuration error like any other: exit 2,
        # naming the variable, before any thread starts or any AWS call is made.
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        log.error(
            "bind_failed",
            extra={"variable": exc.variable, "address": exc.address, "detail": exc.reason},
        )
        return 2
    except OSError as exc:  # a listener not wrapped in `bind`: still a configuration error
        print(f"config error: cannot listen: {exc}", file=sys.stderr, flush=True)
        log.error("bind_failed", extra={"detail": str(exc)})
        return 2
    except store_errors as exc:  # corrupt or unreadable: say so, never start from zero
        detail = scrub_url_secret(str(exc), settings.usage_database_url)
        log.error("usage_store_unusable", extra={"detail": detail})
        return 1
    # The handler only stores a flag (a second signal may land inside it, see stopsignals);
    # this thread sets the daemon's stop event, outside any handler.
    signals = StopSignals.install()
    try:
        return _serve(daemon, signals, stop_requested)
    finally:
        signals.close()


def _serve(daemon: Daemon, signals: StopSignals, stop_requested: Callable[[], bool]) -> int:
    settings = daemon.settings
    if stop_requested() or signals.requested:  # arrived while starting: close, call no AWS
        log.info("stopping", extra={"before": "start"})
        daemon.stop_event.set()
        for server in daemon.servers:
            server.server_close()
        if daemon.usage is not None:
            daemon.usage.close()
        if daemon.saas is not None:
            daemon.saas.close()
        return 0
    daemon.start()
    log.info(
        "listening",
        extra={
            "api": settings.listen,
            "probe": settings.probe_listen,
            "metrics": settings.metrics_listen,
        },
    )
    while not signals.wait(1.0):
        pass
    log.info("stopping")
    daemon.close()
    return 0
