"""The Grafana dashboard and the Prometheus alert rules under examples/ use metrics that exist
(documented in docs/operations.md, each exposed by some process: tests/integration/
test_health.py), and are well-formed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
STANDARD = {"up", "process_start_time_seconds"}  # Prometheus' own and the client library's
SUFFIXES = ("_bucket", "_count", "_sum")


def _documented() -> set[str]:
    return set(re.findall(r"`(orchestrator_[a-z_]+)`", (ROOT / "docs/operations.md").read_text()))


def _metrics(expr: str) -> set[str]:
    """The metric names an expression reads (histogram series by their histogram's name)."""
    found = re.findall(r"\b(orchestrator_[a-z_]+|up|process_start_time_seconds)\b", expr)
    return {next((n.removesuffix(s) for s in SUFFIXES if n.endswith(s)), n) for n in found}


def test_alert_rules_name_documented_metrics_and_say_what_to_do() -> None:
    rules = yaml.safe_load((ROOT / "examples/prometheus/alerts.yaml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in alerts}
    for wanted in (
        "DeadLettersWaiting",
        "TenantQuarantined",
        "DwellHigh",
        "DispatcherLeadershipFlapping",
        "UsageConsumerLagging",
        "BrokerOutage",
        "ProcessRestarted",
    ):
        assert wanted in names
    documented = _documented() | STANDARD
    for rule in alerts:
        assert rule["annotations"]["summary"]
        used = _metrics(rule["expr"])
        assert used, rule["alert"]
        assert used <= documented, (rule["alert"], used - documented)


def test_grafana_panels_query_documented_metrics() -> None:
    dashboard = json.loads((ROOT / "examples/grafana/orchestrator.json").read_text())
    documented = _documented() | STANDARD
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = _metrics(target["expr"])
            assert used, panel["title"]
            assert used <= documented, (panel["title"], used - documented)
