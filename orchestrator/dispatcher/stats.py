"""What the dispatcher served over the last minute, per tenant: pure, clock-given.

The live views (`orchestrator top`, the dashboard) show each tenant's share of the served cost
next to its share of the weights, and how long its steps waited. Prometheus counters give
the same over any range, for those who scrape; this is the answer without a Prometheus: the
leading dispatcher keeps a minute of events and publishes a summary (`Snapshot`) to Redis
every second (`orchestrator.store.Keys.dispatcher_stats`).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from orchestrator.outage import sleep_unless
from orchestrator.telemetry import get_logger

log = get_logger(__name__)

WINDOW_S = 60.0
PUBLISH_S = 1.0  # the leader's last-minute summary, to Redis this often
PUBLISH_TTL_S = 10.0  # and gone this long after its leader


@dataclass
class _Tenant:
    served: deque[tuple[float, float]] = field(default_factory=deque)  # (at, cost)
    dwell: deque[tuple[float, float]] = field(default_factory=deque)  # (at, seconds)


def _trim(events: deque[tuple[float, float]], since: float) -> None:
    while events and events[0][0] < since:
        events.popleft()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class RecentService:
    """Served cost (at completion: the measured one) and dwell (at dispatch) per tenant, over
    the last `window_s` seconds of the clock the caller passes in."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._tenants: dict[str, _Tenant] = {}

    def _tenant(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant()
        return state

    def served(self, tenant: str, cost: float, now: float) -> None:
        served = self._tenant(tenant).served
        served.append((now, cost))
        _trim(served, now - self.window_s)  # bounded even if nobody asks for a summary

    def dispatched(self, tenant: str, dwell_s: float, now: float) -> None:
        dwell = self._tenant(tenant).dwell
        dwell.append((now, dwell_s))
        _trim(dwell, now - self.window_s)

    def summary(self, now: float) -> dict[str, dict[str, Any]]:
        """Per tenant with anything in the window: cost served, steps completed, its share of
        all cost served, steps dispatched and their dwell p50/p99 (ms). Tenants whose window
        emptied are forgotten."""
        since = now - self.window_s
        out: dict[str, dict[str, Any]] = {}
        for name, state in list(self._tenants.items()):
            _trim(state.served, since)
            _trim(state.dwell, since)
            if not state.served and not state.dwell:
                del self._tenants[name]
                continue
            dwell = [seconds for _, seconds in state.dwell]
            p50, p99 = percentile(dwell, 50), percentile(dwell, 99)
            out[name] = {
                "cost_s": sum(cost for _, cost in state.served),
                "completed": len(state.served),
                "dispatched": len(dwell),
                "dwell_p50_ms": None if p50 is None else round(p50 * 1000, 1),
                "dwell_p99_ms": None if p99 is None else round(p99 * 1000, 1),
            }
        total = sum(row["cost_s"] for row in out.values())
        for row in out.values():
            row["share"] = row["cost_s"] / total if total > 0 else 0.0
        return out


async def publish_stats(
    redis: aioredis.Redis,
    key: str,
    summary: Callable[[], dict[str, Any] | None],
    stop: asyncio.Event,
) -> None:
    """Writes `summary()` (None: nothing to say) to `key` every PUBLISH_S until `stop`,
    expiring, so a dead leader's figures vanish. Best effort: the live views do without."""
    while not await sleep_unless(stop, PUBLISH_S):
        stats = summary()
        if stats is None:
            continue
        try:
            await redis.set(key, json.dumps(stats), px=int(PUBLISH_TTL_S * 1000))
        except (OSError, aioredis.RedisError) as exc:
            log.debug("dispatcher.stats_failed", error=repr(exc))
