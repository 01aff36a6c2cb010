"""The system at a glance: what `orchestrator top` and the dashboard show, as data.

One `Overview` is gathered from what the processes already publish: tenant policies
(weights, penalties, quarantines) and violations from Redis, the leading dispatcher's
last-minute summary (shares of served cost, dwell, in flight), the worker registry, the
engines' per-second execution counts, and queue depths from the RabbitMQ management API
(each tenant's backlog in `fq.<tenant>`, every DLQ). Reading it changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from orchestrator import topology
from orchestrator.accounts import Management, ManagementError, vhost_of
from orchestrator.config import Settings
from orchestrator.store import Keys
from orchestrator.store.tenants import TenantStore
from orchestrator.store.workers import live_workers

RATE_WINDOW_S = 10  # executions per second: the mean over the last complete seconds
STATS_STALE_S = 5.0  # a dispatcher summary older than this: no dispatcher leads


@dataclass
class TenantRow:
    tenant: str
    weight: float
    factor: float  # penalty weight factor (1 = none)
    weight_share: float  # its effective weight over the sum of the active tenants'
    served_share: float  # of the cost served in the last minute
    cost_s: float  # served in the last minute (slot-seconds, dominant resource)
    completed: int
    dispatched: int
    dwell_p50_ms: float | None
    dwell_p99_ms: float | None
    in_flight: int
    backlog: int  # in fq.<tenant>: waiting for the dispatcher
    state: str  # "ok" | "penalised" | "quarantined"
    until: str | None  # when the penalty or quarantine ends
    reason: str | None


@dataclass
class Overview:
    at: str
    dispatcher: dict[str, Any] | None  # leader, window, in flight; None if none leads
    tenants: list[TenantRow]
    workers: list[dict[str, Any]]
    dlqs: dict[str, int]  # depth of every DLQ on the broker
    violations: list[dict[str, Any]]  # newest first, every tenant
    executions_per_s: dict[str, float]  # by state reached, mean over RATE_WINDOW_S
    errors: list[str] = field(default_factory=list)  # parts that could not be read

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _state(policy: Any) -> tuple[str, str | None, str | None]:
    if policy.quarantined:
        return "quarantined", None, None
    if policy.penalty:
        return "penalised", policy.penalty.get("expires_at"), policy.penalty.get("reason")
    return "ok", None, None


async def _quarantine(
    redis: aioredis.Redis, keys: Keys, tenant: str
) -> tuple[str | None, str | None]:
    raw = await redis.get(keys.quarantine(tenant))
    if not raw or not str(raw).startswith("{"):
        return None, None
    entry = json.loads(str(raw))
    return entry.get("expires_at"), entry.get("reason")


def _queue_depths(settings: Settings) -> dict[str, int]:
    with Management(settings.rabbitmq_management_url) as management:
        return management.queue_depths(vhost_of(str(settings.rabbitmq_url)))


async def executions_per_s(redis: aioredis.Redis, keys: Keys, now: float) -> dict[str, float]:
    """Mean executions per second reaching each state over the last complete seconds."""
    last = int(now) - 1
    seconds = range(last - RATE_WINDOW_S + 1, last + 1)
    async with redis.pipeline(transaction=False) as pipe:
        for second in seconds:
            pipe.hgetall(keys.execution_counts(second))
        buckets = await pipe.execute()
    totals: dict[str, float] = {}
    for bucket in buckets:
        for state, count in bucket.items():
            totals[str(state)] = totals.get(str(state), 0.0) + int(count)
    return {state: count / RATE_WINDOW_S for state, count in sorted(totals.items())}


async def gather(settings: Settings, redis: aioredis.Redis) -> Overview:
    keys = Keys(settings.redis_prefix)
    errors: list[str] = []
    tenants = TenantStore(redis, keys)
    names = await tenants.tenants()
    policies = await tenants.policies(names) if names else {}
    raw_stats = await redis.get(keys.dispatcher_stats)
    stats = json.loads(str(raw_stats)) if raw_stats else None
    now = time.time()
    if stats is not None and now - float(stats.get("at", 0)) > STATS_STALE_S:
        stats = None
    recent: dict[str, dict[str, Any]] = (stats or {}).get("recent", {})
    in_flight: dict[str, int] = (stats or {}).get("in_flight", {})
    try:
        depths = await asyncio.to_thread(_queue_depths, settings)
    except ManagementError as exc:
        errors.append(f"queue depths: {exc}")
        depths = {}
    # The weight share is among the tenants with anything going on (work waiting, in flight
    # or served in the window): an idle tenant's weight takes nobody's share.
    active = {
        t
        for t in names
        if depths.get(topology.tenant_queue_name(t), 0) or in_flight.get(t) or t in recent
    }
    effective = {
        t: policies[t].weight * policies[t].factor
        for t in active
        if t in policies and not policies[t].quarantined
    }
    total_weight = sum(effective.values())
    rows = []
    for name in names:
        policy = policies[name]
        state, until, reason = _state(policy)
        if state == "quarantined":
            until, reason = await _quarantine(redis, keys, name)
        served = recent.get(name, {})
        rows.append(
            TenantRow(
                tenant=name,
                weight=policy.weight,
                factor=policy.factor,
                weight_share=effective.get(name, 0.0) / total_weight if total_weight else 0.0,
                served_share=float(served.get("share", 0.0)),
                cost_s=float(served.get("cost_s", 0.0)),
                completed=int(served.get("completed", 0)),
                dispatched=int(served.get("dispatched", 0)),
                dwell_p50_ms=served.get("dwell_p50_ms"),
                dwell_p99_ms=served.get("dwell_p99_ms"),
                in_flight=int(in_flight.get(name, 0)),
                backlog=depths.get(topology.tenant_queue_name(name), 0),
                state=state,
                until=until,
                reason=reason,
            )
        )
    violations: list[dict[str, Any]] = []
    for name in names:
        violations += [{"tenant": name, **v} for v in await tenants.violations(name)]
    violations.sort(key=lambda v: str(v.get("window_start", "")), reverse=True)
    dispatcher = None
    if stats is not None:
        dispatcher = {k: stats[k] for k in ("id", "window", "in_flight_total") if k in stats}
    return Overview(
        at=datetime.now(UTC).isoformat(),
        dispatcher=dispatcher,
        tenants=rows,
        workers=[json.loads(w.model_dump_json()) for w in await live_workers(redis, keys)],
        dlqs={n: d for n, d in sorted(depths.items()) if n.endswith(topology.DLQ_SUFFIX)},
        violations=violations[:50],
        executions_per_s=await executions_per_s(redis, keys, now),
        errors=errors,
    )
