"""The usage pipeline as one object the wiring (app.py) holds.

CONTRACT with the wiring (agreed with H6b; change only together):

    from sidecar.usage.service import UsageService, UsagePolicy, EntitlementResult, StoreError

    policy = UsagePolicy(
        product_code=settings.product_code,
        dimensions=settings.dimension_list,          # tuple[str, ...], 1..24
        state_dir=settings.state_dir,                # Path, required in custom mode
        entitlement_check=settings.entitlement_check,  # "meter_zero" | "dry_run" | "none"
        drain_seconds=settings.drain_seconds,
        entitlement_deadline=settings.register_deadline_seconds,
        backoff_base=settings.backoff_base_seconds, backoff_cap=settings.backoff_cap_seconds,
    )                                                 # other fields have defaults
    service = UsageService(policy, gateway_factory, clock=clock, on_entitlement=callback)
        # raises StoreError (a clear message, never a silent reset) when the store cannot be
        # opened: the wiring logs it and exits non-zero before binding.
        # gateway_factory: Callable[[], MeterGateway]; sidecar.aws.metering.MeteringGateway
        # satisfies MeterGateway (meter_usage(...)); it may raise GatewaySetupError-like
        # exceptions carrying `.info: ErrorInfo` (any exception with an `info` attribute).
        # clock: sidecar.core.clock.Clock; for tests only, sidecar.usage.hours.ScaledClock
        # (env MARKETPLACE_TEST_ONLY_TIME_SCALE, refused unless the metering endpoint is loopback).

    service.post(body: bytes) -> tuple[int, dict[str, Any]]
        # POST /v1/usage. 202 after fsync; 200 idempotent repeat; 400/409/413 client mistakes;
        # 503 with body["retry_after"] (seconds) when the store cannot write.
    service.report() -> dict[str, Any]           # GET /v1/usage
    service.check_entitlement(stop: threading.Event) -> EntitlementResult   # blocking, retries
        # EntitlementResult.outcome: "entitled" | "permitted" (dry_run: permission only)
        #   | "refused" (final; .error: ErrorInfo; remembered in the store across restarts)
        #   | "unavailable" (retryable errors until the deadline; .error) | "skipped" (none)
        # on_entitlement(result) is also called later if an hourly send learns a refusal
        # (dry_run/none modes: CustomerNotEntitledException on the pod's first real call).
    service.run(stop: threading.Event) -> None     # sealing/sending loop; run in a thread
    service.drain(budget_seconds: float) -> None   # SIGTERM: seal partial hour, send pending
    service.close() -> None                        # stop the writer thread, close the store
    service.counters() -> UsageCounters            # for metrics, read at scrape time:
        # .units_accepted: dict[dimension, int]; .hours_by_state: dict[state, int];
        # .oldest_unsent_age_seconds: float; .send_attempts: dict[(result, code), int]
        # states: open, sealed, sent, conflict, expired, rejected
"""
