"""What the leading dispatcher knows and decides, without I/O: the fair queue of held steps,
the steps in flight, each tenant's policy and rate bucket, cost estimates, the window of slots
to fill, and the attempt ids already released.

The service (`orchestrator.dispatcher.service`) feeds it deliveries, completions, policies and
worker capacity, and does what `take` decides: publish, mark, ack. Time comes from an injected
clock (`Clock.monotonic` for intervals, `Clock.now` for deadlines), so every rule here is unit
tested with a `ManualClock` (tests/unit/test_dispatcher_ledger.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from orchestrator.clock import Clock
from orchestrator.dispatcher.fairness import FairQueue, Item, step_cost
from schemas import StepTask

EWMA_ALPHA = 0.2
DEFAULT_COST_S = 0.1  # a step type nobody has run yet
DEFAULT_MAX_PARALLEL = 1_000  # a flow whose definition is gone
# A dispatched step whose completion never came (a worker died, a result went astray) is
# forgotten this long after its deadline, so a lost completion cannot shrink the window.
IN_FLIGHT_GRACE = timedelta(seconds=30)
# Attempt ids this process released, remembered as long as the Redis markers and bounded.
RELEASED_MEMORY_S = 600
RELEASED_MEMORY = 100_000


class TenantPolicy(Protocol):
    """What the ledger applies to a tenant (orchestrator.store.tenants.TenantPolicy reads it
    from Redis)."""

    @property
    def weight(self) -> float: ...
    @property
    def factor(self) -> float: ...  # the penalty's weight factor
    @property
    def concurrency_cap(self) -> int | None: ...
    @property
    def rate_per_s(self) -> float | None: ...
    @property
    def quarantined(self) -> bool: ...
    @property
    def quarantined_flows(self) -> frozenset[str]: ...


@dataclass(slots=True)
class Queued:
    """A step held for the fair order: the task and whatever settles its delivery."""

    task: StepTask
    delivery: Any


@dataclass(slots=True)
class Flight:
    item: Item  # its payload is the Queued
    since: float  # monotonic, when it was taken


@dataclass(slots=True)
class Pick:
    queued: Queued
    express: bool  # its tenant had nothing in flight: it does not wait for the window


class Bucket:
    """A token bucket: `rate` tokens a second, at most max(1, rate) saved up."""

    def __init__(self, rate: float, clock: Clock) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = 1.0
        self.stamp = clock.monotonic()

    def ready(self) -> bool:
        now = self.clock.monotonic()
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens >= 1.0

    def take(self) -> None:
        self.tokens -= 1.0


class Ledger:
    def __init__(self, clock: Clock, headroom: float) -> None:
        self.clock = clock
        self.headroom = headroom  # at most this fraction of the live slots waits queued
        self.queue = FairQueue()
        self.policies: dict[str, TenantPolicy] = {}
        self.buckets: dict[str, Bucket] = {}
        self.max_parallel: dict[tuple[str, str], int] = {}  # (tenant, flow) -> limit
        self.estimates: dict[tuple[str, str], float] = {}  # (tenant or "", step type) -> cost
        self.in_flight: dict[str, Flight] = {}  # attempt id -> flight
        self.per_tenant: dict[str, int] = {}  # in flight
        self.per_flow: dict[tuple[str, str], int] = {}  # in flight
        self.window = 1  # steps in flight wanted: live slots plus headroom
        self.step_s = DEFAULT_COST_S  # EWMA of a step's slot time
        self.round_trip_s = 0.01  # EWMA of dispatch -> completion seen, minus the step itself
        self.slots_per_cpu = 1.0
        self.released: dict[str, float] = {}  # attempt id -> released at, in release order

    # ---------------------------------------------------------------- what it is told
    def set_policies(self, policies: Mapping[str, TenantPolicy], *, every: bool = False) -> None:
        """Policies as read from the store: of some tenants, or of `every` tenant there is."""
        if every:
            self.policies = {}
        self.policies.update(policies)
        for tenant, policy in policies.items():
            self.queue.set_weight(tenant, policy.weight, policy.factor)
            if policy.rate_per_s:
                bucket = self.buckets.get(tenant)
                if bucket is None or bucket.rate != policy.rate_per_s:
                    self.buckets[tenant] = Bucket(policy.rate_per_s, self.clock)
            else:
                self.buckets.pop(tenant, None)

    def set_capacity(self, slots: int, step_threads: int, cpus: int) -> None:
        """The live workers: their slots size the window, threads per CPU scale CPU costs."""
        self.slots_per_cpu = step_threads / cpus if cpus else 1.0
        self.window = self.window_for(slots)

    def knows_flow(self, tenant: str, flow: str) -> bool:
        return (tenant, flow) in self.max_parallel

    def learn_flow(self, tenant: str, flow: str, max_parallel: int | None) -> None:
        self.max_parallel[(tenant, flow)] = (
            DEFAULT_MAX_PARALLEL if max_parallel is None else max_parallel
        )

    def push(self, task: StepTask, delivery: Any) -> None:
        self.queue.push(
            Item(task.task_id, task.tenant, task.flow_id, DEFAULT_COST_S, Queued(task, delivery))
        )

    # ---------------------------------------------------------------- rules
    def window_for(self, slots: int) -> int:
        """Live slots plus headroom: steps that wait in the work queue so a freed slot does
        not idle for the completion -> release -> delivery round trip. By Little's law the
        round trip holds throughput x round trip = slots x round trip / step time steps; both
        are measured (EWMAs), and the headroom is capped at a fraction of the slots. Every
        headroom step is one a newly active tenant may wait behind, so no more than that."""
        ratio = self.round_trip_s / max(self.step_s, 1e-3)
        wanted = math.ceil(slots * min(ratio, self.headroom))
        return max(1, slots + wanted)

    def estimate(self, item: Item) -> float:
        """A tenant's own history of the step type, else everyone's, else a default: a new
        tenant is charged the typical cost, not a guess that under- or over-serves it."""
        step_type = item.payload.task.step_type
        return self.estimates.get(
            (item.tenant, step_type), self.estimates.get(("", step_type), DEFAULT_COST_S)
        )

    def eligible(self, tenant: str, flow: str) -> bool:
        policy = self.policies.get(tenant)
        if policy is not None:
            if policy.quarantined or flow in policy.quarantined_flows:
                return False
            if (
                policy.concurrency_cap is not None
                and self.per_tenant.get(tenant, 0) >= policy.concurrency_cap
            ):
                return False
        limit = self.max_parallel.get((tenant, flow))
        if limit is not None and self.per_flow.get((tenant, flow), 0) >= limit:
            return False
        bucket = self.buckets.get(tenant)
        return bucket is None or bucket.ready()

    def take(self, refilling: bool = False) -> list[Pick]:
        """Every step the window has room for, in fair order, now counted in flight. While
        the window is full (or a refill is still being published, `refilling`), only the fair
        order's next step whose tenant has nothing in flight: the express lane, where a newly
        active or quiet tenant takes the next free slot instead of waiting behind the headroom
        queued for the busy tenants."""
        picks: list[Pick] = []
        while True:
            if refilling or len(self.in_flight) >= self.window:
                head = self.queue.peek(self.eligible)
                if head is None or self.per_tenant.get(head, 0) != 0:
                    return picks
            item = self.queue.pick(self.eligible, self.estimate)
            if item is None:
                return picks
            queued: Queued = item.payload
            tenant = item.tenant
            express = self.per_tenant.get(tenant, 0) == 0
            self.in_flight[item.key] = Flight(item, self.clock.monotonic())
            self.per_tenant[tenant] = self.per_tenant.get(tenant, 0) + 1
            flow_key = (tenant, item.flow)
            self.per_flow[flow_key] = self.per_flow.get(flow_key, 0) + 1
            bucket = self.buckets.get(tenant)
            if bucket is not None:
                bucket.take()
            picks.append(Pick(queued, express))

    def completed(
        self, task_id: str, wall_s: float, cpu_s: float | None
    ) -> tuple[Queued, float] | None:
        """A step of ours finished after `wall_s` of slot time: its cost (by its dominant
        resource) corrects the fair order and the estimates, its slot time and the round trip
        around it the window. None for a step this ledger does not hold in flight."""
        flight = self.in_flight.get(task_id)
        if flight is None or self.forget(task_id) is None:
            return None
        item = flight.item
        queued: Queued = item.payload
        cost = step_cost(wall_s, cpu_s, self.slots_per_cpu)
        overhead = max(0.0, self.clock.monotonic() - flight.since - wall_s)
        self.step_s += EWMA_ALPHA * (wall_s - self.step_s)
        self.round_trip_s += EWMA_ALPHA * (min(overhead, 1.0) - self.round_trip_s)
        for key in ((item.tenant, queued.task.step_type), ("", queued.task.step_type)):
            previous = self.estimates.get(key, cost)
            self.estimates[key] = (1 - EWMA_ALPHA) * previous + EWMA_ALPHA * cost
        self.queue.complete(item, cost)
        return queued, cost

    def forget(self, task_id: str) -> Item | None:
        """Drops a step from the in-flight accounting (completed, or its publish failed)."""
        flight = self.in_flight.pop(task_id, None)
        if flight is None:
            return None
        item = flight.item
        self.per_tenant[item.tenant] = self.per_tenant.get(item.tenant, 1) - 1
        flow_key = (item.tenant, item.flow)
        self.per_flow[flow_key] = self.per_flow.get(flow_key, 1) - 1
        return item

    def expire(self) -> list[Item]:
        """Forgets the steps in flight long past their deadline (their completion is lost)."""
        now = self.clock.now()
        late = [
            task_id
            for task_id, flight in self.in_flight.items()
            if now > flight.item.payload.task.deadline + IN_FLIGHT_GRACE
        ]
        return [item for item in map(self.forget, late) if item is not None]

    # ---------------------------------------------------------------- released ids
    def mark_released(self, task_ids: Iterable[str]) -> None:
        stamp = self.clock.monotonic()
        for task_id in task_ids:
            self.released[task_id] = stamp

    def was_released(self, task_id: str) -> bool:
        """A copy of a step this process released (the engine's repeat): drop it."""
        return task_id in self.released

    def forget_released(self) -> None:
        """Keeps the released ids as long as the Redis markers, and bounded (oldest first)."""
        horizon = self.clock.monotonic() - RELEASED_MEMORY_S
        ids = self.released
        while ids and (len(ids) > RELEASED_MEMORY or next(iter(ids.values())) < horizon):
            del ids[next(iter(ids))]

    def summary(self) -> dict[str, Any]:
        """For the live views: the window and what is in flight, in all and per tenant."""
        return {
            "window": self.window,
            "in_flight_total": len(self.in_flight),
            "in_flight": {tenant: n for tenant, n in self.per_tenant.items() if n > 0},
        }

    def step_down(self) -> None:
        """No longer leading: the held steps went back to their queues, and a new leader does
        not inherit this one's flights. Policies, estimates and released ids stay."""
        self.queue = FairQueue()
        for tenant, policy in self.policies.items():
            self.queue.set_weight(tenant, policy.weight, policy.factor)
        self.in_flight.clear()
        self.per_tenant.clear()
        self.per_flow.clear()
