"""The dispatcher process: per-tenant queues in, fair order out, only into free worker slots.

One dispatcher is active (a Redis lease); standbys wait and take over within seconds of its
death. The active one consumes every `fq.<tenant>` with a small prefetch (the tenant's head
buffer), orders the heads with `FairQueue`, and releases a step to `orchestrator.work` only
while the live workers have a free slot. A tenant-queue message is acked only after its
work-queue publish is confirmed; a dispatched marker per attempt id drops the duplicates a
takeover would otherwise re-dispatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from prometheus_client import Counter, Gauge, Histogram

from orchestrator import topology, tracing
from orchestrator.amqp import Outgoing, decode, decode_any, open_channel, send
from orchestrator.clock import Clock, SystemClock
from orchestrator.config import Settings
from orchestrator.consumer import Consumer, Settle
from orchestrator.dispatcher.fairness import FairQueue, Item, step_cost
from orchestrator.dispatcher.stats import RecentService
from orchestrator.outage import OUTAGES, dependency_of, sleep_unless
from orchestrator.store import EXTEND_IF_OWNER, RELEASE_IF_OWNER, Keys
from orchestrator.store.flows import FlowRegistry
from orchestrator.store.tenants import TenantPolicy, TenantStore
from orchestrator.store.workers import live_workers
from orchestrator.telemetry import get_logger
from schemas import (
    PenaltyCommand,
    QuarantineCommand,
    ReleaseCommand,
    StepResult,
    StepTask,
)

log = get_logger(__name__)

HEAD_BUFFER = 16  # prefetch per tenant queue: the candidates the fair order chooses among
LEASE_MS = 3_000
RENEW_S = 1.0
LEASE_MARGIN_S = 0.5
REFRESH_S = 0.5
STATS_S = 1.0  # the leader's last-minute summary, to Redis this often
STATS_TTL_S = 10.0
# A released step's tenant-queue message is acked right after its marker is written, so a
# copy can only come back to a new leader if the old one died in between: it comes back as soon
# as the broker notices the dead connection (at worst a few heartbeat intervals).
DISPATCHED_MEMORY_S = 600
RELEASED_MEMORY = 100_000  # attempt ids this process released, remembered locally (bounded)
EWMA_ALPHA = 0.2
DEFAULT_COST_S = 0.1
IN_FLIGHT_GRACE = timedelta(seconds=30)

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
CONTROL_COMMANDS = (PenaltyCommand, QuarantineCommand, ReleaseCommand)


class ReleaseNotConfirmed(ConnectionError):
    """The broker did not confirm a work-queue publish: RabbitMQ trouble, not a bug."""


@dataclass
class Held:
    task: StepTask
    incoming: AbstractIncomingMessage


def _release_of(held: Held, express: bool) -> Outgoing:
    """The task as it came (its body is not rendered again), to its work queue."""
    exchange, key = topology.work_route(held.task, express=express)
    task = held.task
    headers = held.incoming.headers or {}
    parent = headers.get(tracing.HEADER) if tracing.enabled() else None
    with tracing.span(
        "dispatcher.release",
        parent=parent if isinstance(parent, str) else None,
        attributes={
            "orchestrator.execution": task.execution_id,
            "orchestrator.tenant": task.tenant,
        },
    ):
        return Outgoing(
            exchange,
            key,
            task.message_id(),
            task.message_type,
            task.content_type,
            True,
            held.incoming.body,
            tracing.current_traceparent(),
        )


@dataclass
class Bucket:
    """Token bucket for a tenant's rate limit."""

    rate: float
    tokens: float = 1.0
    stamp: float = field(default_factory=time.monotonic)

    def ready(self) -> bool:
        now = time.monotonic()
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens >= 1.0

    def take(self) -> None:
        self.tokens -= 1.0


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        connection: AbstractRobustConnection,
        clock: Clock | None = None,
        dispatcher_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.connection = connection
        self.clock: Clock = clock or SystemClock()
        self.id = dispatcher_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        keys = Keys(settings.redis_prefix)
        self.keys = keys
        self.tenants = TenantStore(redis, keys)
        self.flows = FlowRegistry(redis, keys)
        self.lease_key = keys.dispatcher_lease
        self._renew = redis.register_script(EXTEND_IF_OWNER)
        self._release_lease = redis.register_script(RELEASE_IF_OWNER)
        self.queue = FairQueue()
        self.recent = RecentService()  # the last minute, for the live views
        self.policies: dict[str, TenantPolicy] = {}
        self.buckets: dict[str, Bucket] = {}
        self.max_parallel: dict[tuple[str, str], int] = {}
        self.estimates: dict[tuple[str, str], float] = {}
        self.in_flight: dict[str, tuple[Item, float]] = {}  # task id -> (item, dispatched at)
        self.per_tenant: dict[str, int] = {}
        self.per_flow: dict[tuple[str, str], int] = {}
        self.window = 1
        self.step_s = DEFAULT_COST_S  # EWMA of step slot time
        self.slots_per_cpu = 1.0
        self.round_trip_s = 0.01  # EWMA of dispatch -> completion seen, minus the step itself
        self.leader = False
        self._lease_until = 0.0  # monotonic deadline of the lease we hold
        self._wake = asyncio.Event()  # leadership changes and failures, for the main loop
        self._kicked = False  # a dispatch pass is scheduled
        self._consumers: list[Consumer[Any]] = []
        self._stop = asyncio.Event()
        self._consumed: set[str] = set()
        self._channel: AbstractChannel | None = None
        self._control: AbstractChannel | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._unchecked: list[Held] = []  # delivered, not yet checked against the markers
        self._checking: asyncio.Task[None] | None = None
        self._released_ids: dict[str, float] = {}  # attempt id -> released at (monotonic)
        self._refilling = False
        self._failure: BaseException | None = None
        self._refreshing = asyncio.Lock()

    # ------------------------------------------------------------------ process
    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self._control = await open_channel(self.connection, prefetch=32)
        await topology.apply(self._control, role="dispatcher")
        control: Consumer[Any] = Consumer(
            topology.CONTROL_QUEUE,
            lambda incoming: decode_any(incoming, CONTROL_COMMANDS),
            self._on_control,
            stop=stop,
            retry_limit_s=self.settings.outage_limit_s,
        )
        await control.start(self._control)
        log.info("dispatcher.started", id=self.id)
        helpers = [
            asyncio.create_task(self._keep_lease(stop), name="dispatcher-lease"),
            asyncio.create_task(self._keep_fresh(stop), name="dispatcher-refresh"),
            asyncio.create_task(self._publish_stats(stop), name="dispatcher-stats"),
        ]
        try:
            while not stop.is_set():
                if self._failure is not None:
                    raise self._failure
                # A wake (new step, completion, command, lease change, refresh) dispatches.
                # Nothing here waits for Redis or a confirm: a step that arrives is picked at
                # once, not after whatever the loop was awaiting.
                if self._holding() and not self.leader:
                    try:
                        await self._become_leader()
                    except Exception as exc:
                        self._trouble(exc)
                        await self._step_down()
                elif not self._holding() and self.leader:
                    await self._step_down()
                if self.leader:
                    self._dispatch()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), REFRESH_S)
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await control.cancel()
            if self.leader:
                await self._step_down()
                with contextlib.suppress(Exception):
                    await self._release_lease(keys=[self.lease_key], args=[self.id])
            log.info("dispatcher.stopped", id=self.id)

    def _trouble(self, exc: BaseException) -> None:
        """A failure off the main loop. A broker outage (Redis or RabbitMQ) makes this process
        step down (its held messages go back to their queues) and compete for the lease again
        once Redis answers; anything else is a bug and ends the process."""
        dependency = dependency_of(exc)
        if dependency is None:
            self._failure = exc
        else:
            OUTAGES.failed(dependency, exc)
            self._lease_until = 0.0
        self._wake.set()

    async def _keep_lease(self, stop: asyncio.Event) -> None:
        """Takes or renews the lease every RENEW_S on its own task, so nothing the dispatch
        loop waits for (a slow confirm, a big batch) can let the lease lapse unnoticed."""
        while not stop.is_set():
            asked = time.monotonic()
            try:
                if self._lease_until > asked:
                    held = await self._renew(keys=[self.lease_key], args=[self.id, LEASE_MS])
                else:
                    held = await self.redis.set(self.lease_key, self.id, nx=True, px=LEASE_MS)
            except (aioredis.RedisError, OSError) as exc:
                OUTAGES.failed("redis", exc)
                held = False
            else:
                OUTAGES.recovered("redis")
            was = self._holding()
            # Counted from when we asked: the lease can only have started later than that.
            self._lease_until = asked + LEASE_MS / 1000 if held else 0.0
            if self._holding() != was:
                self._wake.set()
            await asyncio.sleep(RENEW_S)

    async def _keep_fresh(self, stop: asyncio.Event) -> None:
        """Re-reads tenants, policies and worker capacity every REFRESH_S while leading, on its
        own task: the dispatch loop never waits for these Redis round trips."""
        while not stop.is_set():
            await asyncio.sleep(REFRESH_S)
            if not self.leader:
                continue
            try:
                await self._refresh()
            except Exception as exc:
                if self.leader:  # else it failed on the channel a step-down closed
                    self._trouble(exc)
            self._wake.set()

    def _kick(self) -> None:
        """Schedules one dispatch pass after the callbacks already due: the steps, completions
        and commands that arrived together are picked together, without a round through the
        main loop (its wake-up costs a task switch and a timer per event)."""
        if not self._kicked:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._on_kick)

    def _on_kick(self) -> None:
        self._kicked = False
        if self.leader:
            try:
                self._dispatch()
            except Exception as exc:  # a bug: end the process, as in the main loop
                self._trouble(exc)

    def _holding(self) -> bool:
        # A safety margin: stop releasing before the lease could have passed to a standby.
        return time.monotonic() < self._lease_until - LEASE_MARGIN_S

    async def _become_leader(self) -> None:
        log.info("dispatcher.leading", id=self.id)
        LEASE_CHANGES.labels("acquired").inc()
        LEADING.set(1)
        # `leader` only once the channel is open: the refresh task acts on `leader` and needs
        # the channel, and opening it can take a while on a loaded host (a refresh that came
        # in between used to kill a freshly taken-over dispatcher).
        self._channel = await open_channel(self.connection, prefetch=HEAD_BUFFER)
        self.leader = True
        # Without acks: a completion only corrects the accounting of this leader's in-flight
        # steps, which a new leader does not inherit anyway (and `_expire_in_flight` forgets a
        # completion that never came). Saves an ack per step on both ends.
        consumer = Consumer(
            topology.COMPLETIONS_QUEUE,
            lambda incoming: decode(incoming, StepResult),
            self._on_completion,
            stop=self._stop,
            no_ack=True,
        )
        await consumer.start(self._channel)
        self._consumers.append(consumer)
        await self._refresh()

    async def _step_down(self) -> None:
        """Lost the lease (or stopping): stop consuming and give back every held message."""
        if self._stop.is_set():
            log.info("dispatcher.standing_down", id=self.id, reason="stopping")
        else:
            log.warning("dispatcher.standing_down", id=self.id)
        LEASE_CHANGES.labels("released").inc()
        LEADING.set(0)
        self.leader = False
        await self._settle_releases()
        if self._checking is not None:
            self._checking.cancel()
        self._unchecked.clear()
        channel, self._channel = self._channel, None
        self._consumers.clear()
        self._consumed.clear()
        self.queue = FairQueue()
        self.in_flight.clear()
        self.per_tenant.clear()
        self.per_flow.clear()
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()  # unacked messages go back to their queues

    # ------------------------------------------------------------------ state
    async def _refresh(self) -> None:
        async with self._refreshing:  # the first one (on taking the lead) and the periodic
            await self._refresh_once()

    async def _refresh_once(self) -> None:
        channel = self._channel
        if channel is None:
            return  # stepped down meanwhile
        tenants = await self.tenants.tenants()
        for tenant in tenants:
            if tenant not in self._consumed:
                await topology.declare_tenant_queue(channel, tenant)
                consumer = Consumer(
                    topology.tenant_queue_name(tenant),
                    lambda incoming: decode(incoming, StepTask),
                    self._on_task,
                    stop=self._stop,
                    retry_limit_s=self.settings.outage_limit_s,
                )
                await consumer.start(channel)
                if self._channel is not channel:
                    return  # stepped down meanwhile: that channel and its consumers are gone
                self._consumers.append(consumer)
                self._consumed.add(tenant)
        if tenants:
            self.policies = await self.tenants.policies(tenants)
        for tenant, policy in self.policies.items():
            self.queue.set_weight(tenant, policy.weight, policy.factor)
            WEIGHT.labels(tenant).set(policy.weight * policy.factor)
            QUARANTINED.labels(tenant).set(1 if policy.quarantined else 0)
            if policy.rate_per_s:
                bucket = self.buckets.get(tenant)
                if bucket is None or bucket.rate != policy.rate_per_s:
                    self.buckets[tenant] = Bucket(policy.rate_per_s)
            else:
                self.buckets.pop(tenant, None)
        workers = await live_workers(self.redis, self.keys)
        capacity = sum(entry.concurrency for entry in workers)
        threads = sum(entry.step_threads for entry in workers)
        cpus = sum(entry.cpus for entry in workers)
        self.slots_per_cpu = threads / cpus if cpus else 1.0
        self.window = self._window(capacity)
        self._expire_in_flight()
        self._forget_released()

    def _forget_released(self) -> None:
        """Keeps the local memory of released attempt ids as long as the Redis markers, and
        bounded (oldest first: the dict is in release order)."""
        horizon = time.monotonic() - DISPATCHED_MEMORY_S
        ids = self._released_ids
        while ids and (len(ids) > RELEASED_MEMORY or next(iter(ids.values())) < horizon):
            del ids[next(iter(ids))]

    def _window(self, capacity: int) -> int:
        """Live slots plus headroom: steps that wait in the work queue so a freed slot does
        not idle for the completion -> release -> delivery round trip. By Little's law the
        round trip holds throughput x round trip = capacity x round trip / step time steps;
        both are measured (EWMAs), and the headroom is capped at a fraction of the slots.
        Every headroom step is one a newly active tenant may wait behind, so no more than that."""
        ratio = self.round_trip_s / max(self.step_s, 1e-3)
        wanted = math.ceil(capacity * min(ratio, self.settings.dispatcher_headroom))
        return max(1, capacity + wanted)

    def _estimate(self, item: Item) -> float:
        """A tenant's own history of the step type, else everyone's, else a default: a new
        tenant is charged the typical cost, not a guess that under- or over-serves it."""
        step_type = item.payload.task.step_type
        return self.estimates.get(
            (item.tenant, step_type), self.estimates.get(("", step_type), DEFAULT_COST_S)
        )

    def _eligible(self, tenant: str, flow: str) -> bool:
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

    # ------------------------------------------------------------------ inputs
    async def _on_task(self, task: StepTask, incoming: AbstractIncomingMessage) -> Settle:
        if task.task_id in self._released_ids:
            return Settle.ACK  # a copy of a step this process released (the engine's repeat)
        held = Held(task, incoming)
        if incoming.redelivered or (task.tenant, task.flow_id) not in self.max_parallel:
            self._unchecked.append(held)
            if self._checking is None or self._checking.done():
                self._checking = asyncio.create_task(self._check(self._channel))
                self._checking.add_done_callback(self._checked)
        elif not self._unchecked:  # else behind those, to keep the order of arrival
            self._push(held)
            self._kick()
        else:
            self._unchecked.append(held)
        return Settle.HOLD

    def _push(self, held: Held) -> None:
        task = held.task
        self.queue.push(Item(task.task_id, task.tenant, task.flow_id, DEFAULT_COST_S, held))

    async def _check(self, channel: AbstractChannel | None) -> None:
        """Queues redelivered steps, minus copies a leader already released: a takeover
        redelivers what the old leader had not acked yet (one Redis round trip for every such
        delivery that arrived meanwhile). Also learns the flow's `max_parallel` the first time."""
        while self._unchecked:
            batch, self._unchecked = self._unchecked, []
            checked = [h for h in batch if h.incoming.redelivered]
            markers = (
                await self.redis.mget([self.keys.dispatched(h.task.task_id) for h in checked])
                if checked
                else []
            )
            released = {
                h.task.task_id for h, marker in zip(checked, markers, strict=True) if marker
            }
            for held in batch:
                key = (held.task.tenant, held.task.flow_id)
                if key not in self.max_parallel:
                    definition = await self.flows.get(*key)
                    self.max_parallel[key] = definition.max_parallel if definition else 1_000
            if self._channel is not channel:
                return  # stepped down meanwhile: these went back to their queues
            for held in batch:
                if held.task.task_id in released:
                    await held.incoming.ack()  # already released
                else:
                    self._push(held)
            self._kick()

    def _checked(self, check: asyncio.Task[None]) -> None:
        error = None if check.cancelled() else check.exception()
        if error is not None:
            self._trouble(error)  # Redis is gone: step down, the held steps go back

    async def _on_completion(self, result: StepResult, _: AbstractIncomingMessage) -> None:
        """A copy of a step result (consumed without acks: soft state). An invalid one is
        counted and announced by the consumer; the engine's copy of it is dead-lettered."""
        entry = self.in_flight.get(result.task_id)
        item = self._forget(result.task_id)
        if item is not None and entry is not None:
            wall = max(0.0, (result.finished_at - result.started_at).total_seconds())
            cost = step_cost(wall, result.cpu_s, self.slots_per_cpu)
            overhead = max(0.0, time.monotonic() - entry[1] - wall)
            self.step_s += EWMA_ALPHA * (wall - self.step_s)
            self.round_trip_s += EWMA_ALPHA * (min(overhead, 1.0) - self.round_trip_s)
            held: Held = item.payload
            estimate_key = (item.tenant, held.task.step_type)
            for key in (estimate_key, ("", held.task.step_type)):
                previous = self.estimates.get(key, cost)
                self.estimates[key] = (1 - EWMA_ALPHA) * previous + EWMA_ALPHA * cost
            self.queue.complete(item, cost)
            COST_SERVED.labels(item.tenant).inc(cost)
            self.recent.served(item.tenant, cost, time.monotonic())
        self._kick()

    async def _on_control(
        self,
        command: PenaltyCommand | QuarantineCommand | ReleaseCommand,
        _: AbstractIncomingMessage,
    ) -> None:
        """Applies penalty/quarantine/release commands to Redis, once per command id."""
        applied = await self.tenants.apply(command, self.clock.now())
        if applied and self.leader and command.tenant in self._consumed:
            self.policies.update(await self.tenants.policies([command.tenant]))
        log.info(
            "dispatcher.control",
            command=command.message_type,
            tenant=command.tenant,
            applied=applied,
        )
        self._wake.set()

    def _forget(self, task_id: str) -> Item | None:
        """Drops a task from the in-flight accounting (completed, or its publish failed)."""
        entry = self.in_flight.pop(task_id, None)
        if entry is None:
            return None
        item, _ = entry
        self.per_tenant[item.tenant] = self.per_tenant.get(item.tenant, 1) - 1
        flow_key = (item.tenant, item.flow)
        self.per_flow[flow_key] = self.per_flow.get(flow_key, 1) - 1
        IN_FLIGHT.labels(item.tenant).dec()
        return item

    def _expire_in_flight(self) -> None:
        """Forgets tasks whose completion never came (a worker died, a result went astray)
        once their deadline has long passed, so a lost completion cannot shrink the window."""
        now = self.clock.now()
        for task_id, (item, _) in list(self.in_flight.items()):
            held: Held = item.payload
            if now > held.task.deadline + IN_FLIGHT_GRACE:
                self._forget(task_id)

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self) -> None:
        """Picks, in fair order, every step the workers have room for, and hands them to a
        release task: published together (their confirms overlap), their dispatched markers
        written in one round trip, and only then acked. Not awaited, so the loop never waits
        for I/O. One refill of the window is under way at a time: slots that free meanwhile
        are picked together when it is done (batches grow with the load, as they did when the
        loop awaited them). Express steps do not wait for it."""
        if self._channel is not None and self._holding():
            batch: list[tuple[Item, bool]] = []
            while True:
                # A full window still releases the fair order's next step when its tenant has
                # nothing in flight (newly active, or quiet): through the express lane, where
                # it takes the next free slot instead of waiting for a completion and then
                # behind the headroom queued for the busy tenants. Otherwise: wait for a slot.
                if len(self.in_flight) >= self.window or self._refilling:
                    head = self.queue.peek(self._eligible)
                    if head is None or self.per_tenant.get(head, 0) != 0:
                        break
                item = self.queue.pick(self._eligible, self._estimate)
                if item is None:
                    break
                task: StepTask = item.payload.task
                express = self.per_tenant.get(task.tenant, 0) == 0
                # Counted in flight *before* the publish: a fast step's completion can arrive
                # while we still wait for the confirm, and must find its entry.
                self.in_flight[task.task_id] = (item, time.monotonic())
                self.per_tenant[task.tenant] = self.per_tenant.get(task.tenant, 0) + 1
                flow_key = (task.tenant, task.flow_id)
                self.per_flow[flow_key] = self.per_flow.get(flow_key, 0) + 1
                IN_FLIGHT.labels(task.tenant).inc()
                bucket = self.buckets.get(task.tenant)
                if bucket is not None:
                    bucket.take()
                batch.append((item, express))
            if not batch:
                return
            release = asyncio.create_task(self._release(self._channel, batch))
            self._releases.add(release)
            release.add_done_callback(self._released)
            if not all(express for _, express in batch):
                self._refilling = True
                release.add_done_callback(self._refilled)

    def _refilled(self, _: asyncio.Task[None]) -> None:
        self._refilling = False
        self._kick()

    async def _release(self, channel: AbstractChannel, batch: list[tuple[Item, bool]]) -> None:
        outcomes = await asyncio.gather(
            *(send(channel, _release_of(item.payload, express)) for item, express in batch),
            return_exceptions=True,
        )
        items = [item for item, _ in batch]
        released = [item for item, outcome in zip(items, outcomes, strict=True) if outcome is None]
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome is not None:
                # Not confirmed: forget it here; its tenant-queue message stays unacked and
                # goes back to its queue when the error raised below ends this process.
                self._forget(item.key)
                log.warning("dispatcher.publish_failed", task_id=item.key, error=str(outcome))
        if len(released) == 1:  # the common case below saturation: no pipeline machinery
            key = self.keys.dispatched(released[0].key)
            await self.redis.set(key, "1", ex=DISPATCHED_MEMORY_S)
        elif released:
            async with self.redis.pipeline(transaction=False) as pipe:
                for item in released:
                    pipe.set(self.keys.dispatched(item.key), "1", ex=DISPATCHED_MEMORY_S)
                await pipe.execute()
        stamp = time.monotonic()
        for item in released:
            self._released_ids[item.key] = stamp
        now = self.clock.now()
        for (item, express), outcome in zip(batch, outcomes, strict=True):
            if outcome is not None:
                continue
            held: Held = item.payload
            # Without waiting for the frame to be written: the confirm and marker came first,
            # so an ack lost with this process only brings back a copy that gets dropped.
            tag = held.incoming.delivery_tag
            assert tag is not None  # a delivery, not a basic.get
            await held.incoming.channel.basic_ack(tag, wait=False)
            DISPATCHED.labels(held.task.tenant).inc()
            if express:
                EXPRESS.labels(held.task.tenant).inc()
            dwell_s = max(0.0, (now - held.task.enqueued_at).total_seconds())
            DWELL.labels(held.task.tenant).observe(dwell_s)
            self.recent.dispatched(held.task.tenant, dwell_s, stamp)
        if len(released) < len(batch):
            raise ReleaseNotConfirmed("work-queue publish not confirmed")

    def _released(self, release: asyncio.Task[None]) -> None:
        self._releases.discard(release)
        error = None if release.cancelled() else release.exception()
        if error is not None:
            self._trouble(error)

    async def _settle_releases(self) -> None:
        """Waits for the releases under way, so their confirms, markers and acks are done
        before the channel closes (a standby may lead next)."""
        if self._releases:
            _, late = await asyncio.wait(set(self._releases), timeout=LEASE_MARGIN_S)
            for release in late:  # unconfirmed: their messages go back with the channel
                release.cancel()

    async def _publish_stats(self, stop: asyncio.Event) -> None:
        """The leader's last minute (orchestrator.dispatcher.stats), for `top` and the
        dashboard: to Redis every STATS_S, expiring, so a dead leader's figures vanish."""
        while not await sleep_unless(stop, STATS_S):
            if not self.leader:
                continue
            stats = {
                "at": time.time(),
                "id": self.id,
                "window": self.window,
                "in_flight_total": len(self.in_flight),
                "in_flight": {t: n for t, n in self.per_tenant.items() if n > 0},
                "recent": self.recent.summary(time.monotonic()),
            }
            try:
                await self.redis.set(
                    self.keys.dispatcher_stats, json.dumps(stats), px=int(STATS_TTL_S * 1000)
                )
            except (OSError, aioredis.RedisError) as exc:
                log.debug("dispatcher.stats_failed", error=repr(exc))

    def snapshot(self) -> dict[str, Any]:
        return {
            "leader": self.leader,
            "window": self.window,
            "in_flight": len(self.in_flight),
            "backlog": self.queue.backlog(),
        }
