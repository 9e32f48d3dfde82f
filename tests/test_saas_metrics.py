"""SaaS metrics: read from SaasService.counters() at scrape time, label values bounded, and a
store that cannot be read makes the scrape say so instead of failing."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sidecar.ops.metrics import Metrics
from sidecar.usage.saas import SaasCounters


def Counts(**over: Any) -> SaasCounters:  # noqa: N802 - reads as the counters it builds
    """SaasService.counters()'s own type, zero unless given."""
    base: dict[str, Any] = {
        "units_accepted": {},
        "records_by_state": {},
        "customers_by_state": {},
        "oldest_unsent_hour_age_seconds": 0.0,
        "batch_calls": {},
        "leader": False,
        "alerts": {},
    }
    return SaasCounters(**{**base, **over})


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_saas_counters_are_exported_at_scrape_time() -> None:
    now = Counts()
    metrics = Metrics(None, frozenset())
    metrics.watch_saas(lambda: now, frozenset({"users", "scans"}))
    first = samples(metrics)
    assert first[("marketplace_saas_leader", ())] == 0.0
    assert first[("marketplace_saas_records", (("state", "not_subscribed"),))] == 0.0
    assert first[("marketplace_usage_units_accepted_total", (("dimension", "users"),))] == 0.0
    now = Counts(
        units_accepted={"users": 7, "other-dim": 3},
        records_by_state={"sealed": 4, "sent": 10, "conflict": 1, "weird": 9},
        customers_by_state={"active": 2, "not_subscribed": 1},
        oldest_unsent_hour_age_seconds=1800.0,
        batch_calls={"ok": 3, "throttled": 2, "made-up": 5, "error": 1},
        leader=True,
    )
    got = samples(metrics)
    assert got[("marketplace_saas_leader", ())] == 1.0
    assert got[("marketplace_usage_units_accepted_total", (("dimension", "users"),))] == 7.0
    assert got[("marketplace_saas_records", (("state", "sealed"),))] == 4.0
    assert got[("marketplace_saas_records", (("state", "conflict"),))] == 1.0
    assert got[("marketplace_saas_customers", (("state", "not_subscribed"),))] == 1.0
    assert got[("marketplace_saas_oldest_unsent_hour_age_seconds", ())] == 1800.0
    assert got[("marketplace_saas_batch_calls_total", (("result", "ok"),))] == 3.0
    assert got[("marketplace_saas_batch_calls_total", (("result", "other"),))] == 5.0
    assert got[("marketplace_saas_counters_available", ())] == 1.0
    labels = {dict(k[1]).get("state") for k in got} | {dict(k[1]).get("dimension") for k in got}
    assert "weird" not in labels and "other-dim" not in labels  # bounded by config and code
    assert not any(name.startswith("marketplace_entitlement") for name, _ in got)


def test_a_store_that_cannot_be_read_does_not_break_the_scrape() -> None:
    def down() -> SaasCounters:
        raise OSError("database unreachable")

    metrics = Metrics(None, frozenset())
    metrics.watch_saas(down, frozenset({"users"}))
    got = samples(metrics)
    assert got[("marketplace_saas_counters_available", ())] == 0.0
    assert ("marketplace_saas_leader", ()) not in got
    assert any(name.startswith("process_") for name, _ in got)  # the rest is still served
