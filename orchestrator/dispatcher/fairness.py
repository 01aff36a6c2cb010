"""Two-level start-time fair queueing (SFQ) with virtual time: pure, no I/O.

Level one shares the workers between tenants in proportion to `weight x penalty factor`;
level two shares a tenant's part between its flows equally, so spreading load over many
flows (a sybil tenant) earns no more than one tenant's share. Costs are estimates of the
resource a step will use, corrected when it completes.

Rules, with their reasons:
* serve the backlogged, eligible tenant with the smallest start tag; the virtual time becomes
  that tag (SFQ: bounded lag between any two backlogged tenants, whatever their costs);
* a tenant that becomes backlogged, or eligible again after a filter held it back, starts at
  max(virtual time, its last finish): no credit for idle time, so no burst on return (for a
  newcomer the virtual time is also capped by the backlogged tenants' start tags, which a
  refunded estimate can lower: it never starts behind a busy tenant);
* ties break on the order tenants were first seen, never on tenant-chosen strings;
* eligibility (quarantine, caps, rate limits) is a filter applied at pick time, not a change
  of the ordering.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MIN_COST = 1e-6


def step_cost(wall_s: float, cpu_s: float | None, slots_per_cpu: float) -> float:
    """A step's cost in slot-seconds, by its dominant resource (as in dominant resource
    fairness): the worker slot it held for `wall_s`, or the CPU it burnt, scaled by how many
    slots share one CPU. A step waiting on I/O is charged its slot time; a CPU-bound one, whose
    slot time stretches while it competes for the CPU, is charged the CPU it took from others."""
    return max(wall_s, (cpu_s or 0.0) * slots_per_cpu)


@dataclass
class Item:
    key: str
    tenant: str
    flow: str
    cost: float
    payload: Any = None


@dataclass
class _Flow:
    index: int
    items: deque[Item] = field(default_factory=deque)
    start: float = 0.0
    finish: float = 0.0


@dataclass
class _Tenant:
    index: int
    weight: float = 1.0
    factor: float = 1.0
    start: float = 0.0
    finish: float = 0.0
    vtime: float = 0.0  # the tenant's own virtual time, for its flows
    held: bool = False  # skipped by a filter: restart at the virtual time when released
    flows: dict[str, _Flow] = field(default_factory=dict)
    backlog: int = 0

    @property
    def rate(self) -> float:
        return max(self.weight * self.factor, MIN_COST)


class FairQueue:
    def __init__(self) -> None:
        self.vtime = 0.0
        self._tenants: dict[str, _Tenant] = {}
        self._order = itertools.count()
        self._flow_order = itertools.count()

    def _tenant(self, name: str) -> _Tenant:
        tenant = self._tenants.get(name)
        if tenant is None:
            tenant = self._tenants[name] = _Tenant(index=next(self._order))
        return tenant

    def set_weight(self, tenant: str, weight: float, factor: float = 1.0) -> None:
        state = self._tenant(tenant)
        state.weight = weight
        state.factor = factor

    def push(self, item: Item) -> None:
        tenant = self._tenant(item.tenant)
        if tenant.backlog == 0:
            tenant.start = max(self._virtual_time(), tenant.finish)
        flow = tenant.flows.get(item.flow)
        if flow is None:
            flow = tenant.flows[item.flow] = _Flow(index=next(self._flow_order))
        if not flow.items:
            flow.start = max(tenant.vtime, flow.finish)
        flow.items.append(item)
        tenant.backlog += 1

    def _virtual_time(self) -> float:
        """Where a tenant that becomes backlogged starts: the last served start tag, or lower
        if a backlogged tenant's start has since dropped below it (a completion refunded an
        estimate that ran high). A newcomer must not queue behind such a refund."""
        starts = [t.start for t in self._tenants.values() if t.backlog and not t.held]
        return min([self.vtime, *starts])

    def backlog(self, tenant: str | None = None) -> int:
        if tenant is not None:
            state = self._tenants.get(tenant)
            return state.backlog if state else 0
        return sum(t.backlog for t in self._tenants.values())

    def pick(
        self,
        eligible: Callable[[str, str], bool] | None = None,
        estimate: Callable[[Item], float] | None = None,
    ) -> Item | None:
        """The next item to dispatch, or None when no eligible tenant has work. `estimate`
        re-prices the item now: an item that waited was priced with what was known when it
        arrived, and charging a stale figure that `complete` later refunds would let its
        tenant run ahead of (or behind) a tenant arriving in between."""
        name = self._head(eligible, serving=True)
        if name is None:
            return None
        tenant = self._tenants[name]
        flow = self._pick_flow(name, tenant, eligible)
        item = flow.items.popleft()
        if estimate is not None:
            item.cost = estimate(item)
        tenant.backlog -= 1
        self.vtime = tenant.start
        tenant.finish = tenant.start + max(item.cost, MIN_COST) / tenant.rate
        tenant.start = tenant.finish
        tenant.vtime = flow.start
        flow.finish = flow.start + max(item.cost, MIN_COST)
        flow.start = flow.finish
        return item

    def peek(self, eligible: Callable[[str, str], bool] | None = None) -> str | None:
        """The tenant `pick` would serve next, without serving it (no state changes)."""
        return self._head(eligible, serving=False)

    def _head(self, eligible: Callable[[str, str], bool] | None, *, serving: bool) -> str | None:
        """The backlogged, eligible tenant with the smallest start tag. When `serving`, a
        tenant skipped by the filter is marked held, and a held one that is eligible again
        restarts at the virtual time."""
        best: tuple[float, int, str] | None = None
        for name, tenant in self._tenants.items():
            if tenant.backlog == 0:
                continue
            if eligible is not None and not any(
                flow.items and eligible(name, flow_name) for flow_name, flow in tenant.flows.items()
            ):
                if serving:
                    tenant.held = True
                continue
            start = max(tenant.start, self.vtime) if tenant.held else tenant.start
            if serving and tenant.held:
                tenant.held = False
                tenant.start = start
            candidate = (start, tenant.index, name)
            if best is None or candidate < best:
                best = candidate
        return None if best is None else best[2]

    def _pick_flow(
        self, name: str, tenant: _Tenant, eligible: Callable[[str, str], bool] | None
    ) -> _Flow:
        best: _Flow | None = None
        for flow_name, flow in tenant.flows.items():
            if not flow.items or (eligible is not None and not eligible(name, flow_name)):
                continue
            flow.start = max(flow.start, tenant.vtime) if flow.start < tenant.vtime else flow.start
            if best is None or (flow.start, flow.index) < (best.start, best.index):
                best = flow
        assert best is not None  # the tenant was eligible through one of its flows
        return best

    def complete(self, item: Item, actual_cost: float) -> None:
        """Charges the difference between the estimate and the measured cost."""
        tenant = self._tenants.get(item.tenant)
        if tenant is None:
            return
        delta = (max(actual_cost, MIN_COST) - max(item.cost, MIN_COST)) / tenant.rate
        tenant.finish += delta
        if tenant.backlog:
            # The whole difference, refunds included: clamping a refund at the virtual time
            # took more from low-weight tenants (bigger refunds per unit of cost) and flattened
            # a 5:3:2 split towards equal shares whenever estimates ran high.
            tenant.start += delta
        flow = tenant.flows.get(item.flow)
        if flow is not None:
            flow_delta = max(actual_cost, MIN_COST) - max(item.cost, MIN_COST)
            flow.finish += flow_delta
            if flow.items:
                flow.start += flow_delta

    def forget_idle_flows(self) -> None:
        """Drops empty flow entries (flows come and go; tenants are few and kept)."""
        for tenant in self._tenants.values():
            for name in [
                n for n, f in tenant.flows.items() if not f.items and f.finish <= tenant.vtime
            ]:
                del tenant.flows[name]
