"""The dispatcher's Prometheus metrics (docs/operations.md lists them)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

from orchestrator.dispatcher.ledger import TenantPolicy

DISPATCHED = Counter("orchestrator_dispatched_total", "Steps dispatched", ["tenant"])
COST_SERVED = Counter("orchestrator_cost_served_seconds_total", "Measured cost served", ["tenant"])
DWELL = Histogram(
    "orchestrator_dwell_seconds",
    "Enqueue to dispatch",
    ["tenant"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
EXPRESS = Counter(
    "orchestrator_express_total", "Steps released through the express lane", ["tenant"]
)
IN_FLIGHT = Gauge("orchestrator_in_flight", "Dispatched, not yet completed", ["tenant"])
WEIGHT = Gauge("orchestrator_tenant_weight", "Effective weight (weight x penalty)", ["tenant"])
QUARANTINED = Gauge("orchestrator_tenant_quarantined", "1 while quarantined", ["tenant"])
LEADING = Gauge("orchestrator_dispatcher_leading", "1 while this dispatcher holds the lease")
LEASE_CHANGES = Counter(
    "orchestrator_dispatcher_lease_changes_total",
    "Leadership taken (acquired) or given up (released) by this dispatcher",
    ["change"],
)


def show_policies(policies: Mapping[str, TenantPolicy]) -> None:
    for tenant, policy in policies.items():
        WEIGHT.labels(tenant).set(policy.weight * policy.factor)
        QUARANTINED.labels(tenant).set(1 if policy.quarantined else 0)
