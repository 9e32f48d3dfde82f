"""The SaaS alerting rules: they parse, name only metrics the sidecar exports (CONTRACT list
kept here), pass a real `promtool check rules`, and fire, or stay quiet, on synthetic series in
`promtool test rules` (Prometheus's own rule engine, from Debian's prometheus package)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

RULES = ROOT / "manifests" / "prometheus" / "marketplace-saas-rules.yaml"
OPERATOR = ROOT / "manifests" / "kubernetes" / "marketplace-saas-prometheusrule.yaml"
PROMTOOL = ROOT / ".tools" / "bin" / "promtool"

# What the sidecar exports in SaaS mode (metric -> allowed values of its label), per the
# shared contract. A rule naming anything else would never fire.
METRICS: dict[str, tuple[str, set[str]] | None] = {
    "marketplace_saas_records": (
        "state",
        {
            "open",
            "sealed",
            "sent",
            "not_subscribed",
            "conflict",
            "expired",
            "rejected",
            "quarantined",
        },
    ),
    "marketplace_saas_customers": ("state", {"active", "not_subscribed"}),
    "marketplace_saas_oldest_unsent_hour_age_seconds": None,
    "marketplace_saas_batch_calls_total": ("result", set()),  # values not fixed by the contract
    "marketplace_usage_units_accepted_total": ("dimension", set()),
    "marketplace_saas_leader": None,
    "marketplace_saas_send_headroom_low": None,
    # The lifecycle consumer's messages by outcome (a per-process counter): the name the
    # s19-events consumer exports (sidecar/ops/metrics.py, SAAS_LIFECYCLE_OUTCOMES).
    "marketplace_saas_lifecycle_messages_total": (
        "outcome",
        {
            "applied",
            "duplicate",
            "stale",
            "dead_letter",
            "queue_error",
            "store_error",
            "consumer_error",
        },
    ),
    # Deprovisionings learned after their final window (sidecar/ops/metrics.py, per process).
    "marketplace_saas_final_windows_missed_total": None,
    # Contract mode (sidecar/ops/metrics.py, _ContractCollector).
    "marketplace_license_expires_in_seconds": None,
    "marketplace_license_checkins_owed": ("source", {"checkout", "lease"}),
}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "without", "by", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "bool", "rate", "increase", "delta", "absent",
    "time", "offset", "clamp_min", "max_over_time", "min_over_time",
}  # fmt: skip


@pytest.fixture(scope="session")
def promtool() -> Path:
    """promtool from Debian's prometheus package: only the binary is unpacked (no service)."""
    if not PROMTOOL.exists():
        with tempfile.TemporaryDirectory() as tmp:
            got = subprocess.run(
                ["apt-get", "download", "prometheus"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert got.returncode == 0, f"apt-get download prometheus: {got.stderr}"
            (deb,) = Path(tmp).glob("prometheus_*.deb")
            subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True, timeout=60)
            PROMTOOL.parent.mkdir(parents=True, exist_ok=True)
            # Parallel workers may fetch it at once: copy beside it, then rename over it
            # (atomic), so no worker ever runs a half-copied binary.
            part = PROMTOOL.with_name(f".promtool.{os.getpid()}")
            shutil.copy(f"{tmp}/x/usr/bin/promtool", part)
            os.replace(part, PROMTOOL)
    return PROMTOOL


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def test_the_operator_manifest_carries_the_same_groups() -> None:
    doc = yaml.safe_load(OPERATOR.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["spec"] == yaml.safe_load(RULES.read_text())


def names_in(expr: str) -> set[str]:
    """The metric names an expression reads; raises on a label or value the sidecar never sets."""
    for metric, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        label = METRICS[metric]  # KeyError: not a metric the sidecar exports
        for name, value in re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', matchers):
            assert label is not None and name == label[0], f"{metric} has no label {name}"
            assert not label[1] or value in label[1], f"{metric}: {name}={value!r} never set"
    bare = re.sub(r'\{[^}]*\}|\[[^\]]*\]|"[^"]*"', " ", expr)
    bare = re.sub(r"\b(without|by|on|ignoring)\s*\([^)]*\)", " ", bare)
    return set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", bare)) - PROMQL_WORDS


def test_rules_name_only_exported_metrics_and_label_values() -> None:
    used: set[str] = set()
    for rule in rules():
        names = names_in(rule["expr"])
        assert names <= METRICS.keys(), (rule["alert"], names - METRICS.keys())
        used |= names
    # The four: unsent records, not-subscribed customers, conflicts, oldest unsent hour.
    assert {
        "marketplace_saas_records",
        "marketplace_saas_customers",
        "marketplace_saas_oldest_unsent_hour_age_seconds",
    } <= used
    exprs = " ".join(r["expr"] for r in rules())
    for state in ('"sealed"', '"conflict"', '"not_subscribed"', '"expired"'):
        assert state in exprs


def test_every_rule_has_severity_summary_and_description() -> None:
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_metric_checker_catches_a_misspelt_metric_label_or_state() -> None:
    with pytest.raises(KeyError):
        names_in('max(marketplace_saas_record{state="sealed"}) > 0')
    with pytest.raises(AssertionError, match="never set"):
        names_in('max(marketplace_saas_records{state="unsent"}) > 0')
    with pytest.raises(AssertionError, match="no label"):
        names_in('max(marketplace_saas_records{status="sealed"}) > 0')
    assert names_in("max without (pod) (marketplace_saas_unsent) > 0") == {
        "marketplace_saas_unsent"
    }


def test_promtool_accepts_both_files(promtool: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [str(promtool), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(yaml.safe_load(OPERATOR.read_text())["spec"]))
    out = subprocess.run(
        [str(promtool), "check", "rules", str(spec)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(RULES.read_text().replace("> 0", "> > 0", 1))
    out = subprocess.run(
        [str(promtool), "check", "rules", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0  # the check is real


def rendered_annotations(alert: str, value: str) -> dict[str, str]:
    rule = next(r for r in rules() if r["alert"] == alert)
    out = {}
    for k, v in rule["annotations"].items():
        out[k] = v.replace("{{ $value | humanizeDuration }}", value).replace("{{ $value }}", value)
    return out


SERIES = 'marketplace_saas_{}{{job="saas-backend",namespace="shop",pod="{}",instance="{}"{}}}'


def series(metric: str, pod: str, values: str, state: str | None = None) -> dict[str, str]:
    extra = f',state="{state}"' if state else ""
    return {"series": SERIES.format(metric, pod, f"10.0.0.{pod[-1]}:8788", extra), "values": values}


def expected(alert: str, value: str, severity: str, state: str | None = None) -> dict[str, Any]:
    labels = {"job": "saas-backend", "namespace": "shop", "severity": severity}
    if state:
        labels["state"] = state
    return {"exp_labels": labels, "exp_annotations": rendered_annotations(alert, value)}


def test_alerts_fire_on_trouble_and_stay_quiet_on_a_healthy_fleet(
    promtool: Path, tmp_path: Path
) -> None:
    """Two replicas report the same shared store: alerts carry the store's value, not twice it."""
    both = ("backend-1", "backend-2")
    healthy = [
        *(series("records", p, "0x12", "sealed") for p in both),
        *(series("records", p, "120x12", "sent") for p in both),
        *(series("records", p, "0x12", s) for p in both for s in ("conflict", "expired")),
        *(series("records", p, "0x12", "rejected") for p in both),
        *(series("customers", p, "40x12", "active") for p in both),
        *(series("customers", p, "0x12", "not_subscribed") for p in both),
        *(series("oldest_unsent_hour_age_seconds", p, "0x12") for p in both),
        series("leader", "backend-1", "1x12"),
        series("leader", "backend-2", "0x12"),
    ]
    # Trouble, every 5 minutes: 3 records stay sealed; the oldest unsent hour ages past 3 h;
    # one DuplicateRecord conflict; 2 customers not subscribed; the sender gone from 5m on.
    trouble = [
        *(series("records", p, "3x12", "sealed") for p in both),
        *(series("records", p, "1x12", "conflict") for p in both),
        *(series("records", p, "0x12", s) for p in both for s in ("expired", "rejected")),
        *(series("records", p, "100x12", "quarantined") for p in both),
        *(series("customers", p, "2x12", "not_subscribed") for p in both),
        *(series("oldest_unsent_hour_age_seconds", p, "10000+300x12") for p in both),
        series("leader", "backend-1", "1 0x11"),
        series("leader", "backend-2", "0x12"),
    ]
    quiet = [
        {"eval_time": t, "alertname": a, "exp_alerts": []}
        for t in ("10m", "55m")
        for a in [r["alert"] for r in rules()]
    ]
    loud = [
        {"eval_time": "20m", "alertname": "MarketplaceSaasUsageUnsent", "exp_alerts": []},
        {
            "eval_time": "35m",
            "alertname": "MarketplaceSaasUsageUnsent",
            "exp_alerts": [expected("MarketplaceSaasUsageUnsent", "3", "warning", "sealed")],
        },
        {
            "eval_time": "0m",
            "alertname": "MarketplaceSaasUsageConflict",
            "exp_alerts": [expected("MarketplaceSaasUsageConflict", "1", "critical", "conflict")],
        },
        {
            "eval_time": "0m",
            "alertname": "MarketplaceSaasDimensionQuarantined",
            "exp_alerts": [
                expected("MarketplaceSaasDimensionQuarantined", "100", "critical", "quarantined")
            ],
        },
        {
            "eval_time": "0m",
            "alertname": "MarketplaceSaasCustomerNotSubscribed",
            "exp_alerts": [
                expected("MarketplaceSaasCustomerNotSubscribed", "2", "warning", "not_subscribed")
            ],
        },
        # 10000 s + 300 s per 5 min: past 3 h (10800 s) at 15m, firing from 20m; 11500 s at 25m.
        {"eval_time": "15m", "alertname": "MarketplaceSaasOldestUnsentHourAging", "exp_alerts": []},
        {
            "eval_time": "25m",
            "alertname": "MarketplaceSaasOldestUnsentHourAging",
            "exp_alerts": [
                expected("MarketplaceSaasOldestUnsentHourAging", "3h 11m 40s", "critical")
            ],
        },
        {"eval_time": "15m", "alertname": "MarketplaceSaasNoSender", "exp_alerts": []},
        {
            "eval_time": "25m",
            "alertname": "MarketplaceSaasNoSender",
            "exp_alerts": [
                {
                    "exp_labels": {
                        "job": "saas-backend",
                        "namespace": "shop",
                        "severity": "critical",
                    },
                    "exp_annotations": rendered_annotations("MarketplaceSaasNoSender", "0"),
                }
            ],
        },
        {"eval_time": "30m", "alertname": "MarketplaceSaasUsageExpired", "exp_alerts": []},
    ]
    spec: dict[str, Any] = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "5m", "input_series": healthy, "alert_rule_test": quiet},
            {"interval": "5m", "input_series": trouble, "alert_rule_test": loud},
        ],
    }
    test_file = tmp_path / "alerts.test.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run(
        [str(promtool), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # And promtool really compares: a wrong expectation fails.
    spec["tests"][1]["alert_rule_test"][1]["exp_alerts"][0]["exp_annotations"] = (
        rendered_annotations("MarketplaceSaasUsageUnsent", "6")
    )
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run(
        [str(promtool), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0


def lifecycle(pod: str, outcome: str, values: str) -> dict[str, str]:
    labels = f'job="saas-backend",namespace="shop",pod="{pod}",instance="10.0.0.{pod[-1]}:8788"'
    return {
        "series": f'marketplace_saas_lifecycle_messages_total{{{labels},outcome="{outcome}"}}',
        "values": values,
    }


def test_lifecycle_alerts_fire_on_a_dead_letter_and_a_failing_queue(
    promtool: Path, tmp_path: Path
) -> None:
    """Per-process counters, summed over the replicas: one dead letter on one replica fires at
    once; a receive failing every 5 minutes fires after 10 minutes; applied events and a
    single failed receive that recovers stay quiet."""
    both = ("backend-1", "backend-2")
    healthy = [
        *(lifecycle(p, "applied", "0+3x24") for p in both),
        *(lifecycle(p, "dead_letter", "0x24") for p in both),
        lifecycle("backend-1", "queue_error", "0 1x23"),  # one blip, then fine
        lifecycle("backend-2", "queue_error", "0x24"),
    ]
    trouble = [
        lifecycle("backend-1", "dead_letter", "0 0 1x22"),
        lifecycle("backend-2", "dead_letter", "0x24"),
        *(lifecycle(p, "queue_error", "0+1x24") for p in both),
    ]
    names = ("MarketplaceSaasEventDeadLettered", "MarketplaceSaasEventsQueueUnreachable")
    quiet: list[dict[str, Any]] = [
        {"eval_time": t, "alertname": a, "exp_alerts": []}
        for t in ("5m", "30m", "100m")
        for a in names
    ]
    labels = {"job": "saas-backend", "namespace": "shop", "severity": "critical"}
    loud = [
        {"eval_time": "5m", "alertname": names[0], "exp_alerts": []},
        {
            "eval_time": "15m",
            "alertname": names[0],
            "exp_alerts": [
                {
                    "exp_labels": {**labels, "outcome": "dead_letter"},
                    "exp_annotations": rendered_annotations(names[0], "1"),
                }
            ],
        },
        {"eval_time": "10m", "alertname": names[1], "exp_alerts": []},
        {
            "eval_time": "30m",
            "alertname": names[1],
            "exp_alerts": [
                {
                    "exp_labels": {**labels, "outcome": "queue_error"},
                    "exp_annotations": rendered_annotations(names[1], "4"),
                }
            ],
        },
    ]
    spec: dict[str, Any] = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "5m", "input_series": healthy, "alert_rule_test": quiet},
            {"interval": "5m", "input_series": trouble, "alert_rule_test": loud},
        ],
    }
    test_file = tmp_path / "lifecycle.test.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run(
        [str(promtool), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_final_window_missed_on_any_replica_pages_once_for_an_hour(
    promtool: Path, tmp_path: Path
) -> None:
    """The counter is per process: one missed window on one replica pages at once, and the
    alert clears an hour later; replicas that missed nothing stay quiet."""
    alert = "MarketplaceSaasFinalWindowMissed"
    quiet = [series("final_windows_missed_total", p, "0x24") for p in ("backend-1", "backend-2")]
    one = [
        series("final_windows_missed_total", "backend-1", "0 0 1x22"),
        series("final_windows_missed_total", "backend-2", "0x24"),
    ]
    spec: dict[str, Any] = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "5m",
                "input_series": quiet,
                "alert_rule_test": [
                    {"eval_time": t, "alertname": alert, "exp_alerts": []}
                    for t in ("5m", "30m", "100m")
                ],
            },
            {
                "interval": "5m",
                "input_series": one,
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": alert, "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": alert,
                        "exp_alerts": [expected(alert, "1", "critical")],
                    },
                    {"eval_time": "75m", "alertname": alert, "exp_alerts": []},
                ],
            },
        ],
    }
    test_file = tmp_path / "final-window.test.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run(
        [str(promtool), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_contract_alert_fires_on_a_checkout_nobody_extends(
    promtool: Path, tmp_path: Path
) -> None:
    """Per pod: a healthy checkout saws between 60 and 30 minutes left (extended half-way);
    one whose extensions fail runs down, and pages once under 15 minutes for 2 minutes."""
    name = "marketplace_license_expires_in_seconds"

    def pod(p: str, values: str) -> dict[str, str]:
        labels = f'job="product",namespace="shop",pod="{p}",instance="10.0.0.{p[-1]}:8788"'
        return {"series": f"{name}{{{labels}}}", "values": values}

    alert = "MarketplaceLicenseCheckoutExpiring"
    labels = {
        "job": "product",
        "namespace": "shop",
        "pod": "product-2",
        "instance": "10.0.0.2:8788",
        "severity": "critical",
    }
    spec: dict[str, Any] = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "5m",
                "input_series": [
                    pod("product-1", "3600-300x6 3600-300x6"),  # extended every 30 minutes
                    pod("product-2", "2000-300x8"),  # 2000 s, then 300 s less every 5 minutes
                ],
                "alert_rule_test": [
                    {"eval_time": "15m", "alertname": alert, "exp_alerts": []},  # 1100 s
                    {"eval_time": "20m", "alertname": alert, "exp_alerts": []},  # 800 s: pending
                    {
                        "eval_time": "25m",
                        "alertname": alert,
                        "exp_alerts": [
                            {
                                "exp_labels": labels,
                                "exp_annotations": rendered_annotations(alert, "8m 20s"),
                            }
                        ],
                    },
                ],
            }
        ],
    }
    test_file = tmp_path / "contract.test.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run(
        [str(promtool), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
