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
  of the ordering: a tenant the filter skips when its turn comes is held, and asked again at
  every pick.

A pick costs O(log n) in the backlogged tenants plus one filter call per held tenant (see
`FairQueue`): about 12 us at 1,000 or 10,000 active tenants (`python -m bench.fairqueue`).
"""

from __future__ import annotations

import heapq
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
    version: int = 0  # of its entry in the heap: an entry of an older version is stale

    @property
    def rate(self) -> float:
        return max(self.weight * self.factor, MIN_COST)


class FairQueue:
    """The tenants with work wait in a heap on (start tag, first-seen order), so a pick costs
    O(log n) in the number of backlogged tenants; an entry whose tenant's tag changed since it
    was pushed (served, refunded, held) is stale and skipped when it surfaces (lazy deletion).
    Tenants the filter held back wait apart, and are asked again at every pick: the filter
    is the caller's and may change its mind at any time."""

    def __init__(self) -> None:
        self.vtime = 0.0
        self._tenants: dict[str, _Tenant] = {}
        self._order = itertools.count()
        self._flow_order = itertools.count()
        self._heap: list[tuple[float, int, int, str]] = []  # start, index, version, name
        self._held: dict[str, _Tenant] = {}
        self._backlog = 0

    def _tenant(self, name: str) -> _Tenant:
        tenant = self._tenants.get(name)
        if tenant is None:
            tenant = self._tenants[name] = _Tenant(index=next(self._order))
        return tenant

    def _enqueue(self, name: str, tenant: _Tenant) -> None:
        """(Re)places the tenant in the heap at its current start tag."""
        tenant.version += 1
        heapq.heappush(self._heap, (tenant.start, tenant.index, tenant.version, name))

    def _top(self) -> tuple[str, _Tenant] | None:
        """The heap's smallest live entry (stale ones popped on the way)."""
        heap = self._heap
        while heap:
            _, _, version, name = heap[0]
            tenant = self._tenants[name]
            if tenant.version == version and tenant.backlog and not tenant.held:
                return name, tenant
            heapq.heappop(heap)
        return None

    def set_weight(self, tenant: str, weight: float, factor: float = 1.0) -> None:
        state = self._tenant(tenant)
        state.weight = weight
        state.factor = factor

    def push(self, item: Item) -> None:
        tenant = self._tenant(item.tenant)
        if tenant.backlog == 0:
            tenant.start = max(self._virtual_time(), tenant.finish)
            tenant.held = False
            self._enqueue(item.tenant, tenant)
        flow = tenant.flows.get(item.flow)
        if flow is None:
            flow = tenant.flows[item.flow] = _Flow(index=next(self._flow_order))
        if not flow.items:
            flow.start = max(tenant.vtime, flow.finish)
        flow.items.append(item)
        tenant.backlog += 1
        self._backlog += 1

    def _virtual_time(self) -> float:
        """Where a tenant that becomes backlogged starts: the last served start tag, or lower
        if a backlogged tenant's start has since dropped below it (a completion refunded an
        estimate that ran high). A newcomer must not queue behind such a refund."""
        top = self._top()
        return self.vtime if top is None else min(self.vtime, top[1].start)

    def backlog(self, tenant: str | None = None) -> int:
        if tenant is not None:
            state = self._tenants.get(tenant)
            return state.backlog if state else 0
        return self._backlog

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
        self._backlog -= 1
        self.vtime = tenant.start
        tenant.finish = tenant.start + max(item.cost, MIN_COST) / tenant.rate
        tenant.start = tenant.finish
        tenant.vtime = flow.start
        flow.finish = flow.start + max(item.cost, MIN_COST)
        flow.start = flow.finish
        if tenant.backlog:
            self._enqueue(name, tenant)
        else:
            tenant.version += 1  # leaves the heap
        return item

    def peek(self, eligible: Callable[[str, str], bool] | None = None) -> str | None:
        """The tenant `pick` would serve next, without serving it (no state changes)."""
        return self._head(eligible, serving=False)

    def _head(self, eligible: Callable[[str, str], bool] | None, *, serving: bool) -> str | None:
        """The backlogged, eligible tenant with the smallest start tag. A held tenant that is
        eligible again restarts at the virtual time; when its turn comes, a tenant the filter
        skips is held (when `serving`; a peek only looks)."""
        released: tuple[float, int, str] | None = None
        for name, tenant in list(self._held.items()):
            if not self._eligible(name, tenant, eligible):
                continue
            start = max(tenant.start, self.vtime)
            if serving:
                del self._held[name]
                tenant.held = False
                tenant.start = start
                self._enqueue(name, tenant)
            elif released is None or (start, tenant.index) < released[:2]:
                released = (start, tenant.index, name)
        skipped: list[tuple[float, int, int, str]] = []
        found: tuple[float, int, str] | None = None
        while (top := self._top()) is not None:
            name, tenant = top
            if self._eligible(name, tenant, eligible):
                found = (tenant.start, tenant.index, name)
                break
            entry = heapq.heappop(self._heap)
            if serving:
                tenant.held = True
                self._held[name] = tenant
            else:
                skipped.append(entry)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        if released is not None and (found is None or released[:2] < found[:2]):
            found = released
        return None if found is None else found[2]

    @staticmethod
    def _eligible(name: str, tenant: _Tenant, eligible: Callable[[str, str], bool] | None) -> bool:
        return eligible is None or any(
            flow.items and eligible(name, flow_name) for flow_name, flow in tenant.flows.items()
        )

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
            if not tenant.held and delta:
                self._enqueue(item.tenant, tenant)
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
