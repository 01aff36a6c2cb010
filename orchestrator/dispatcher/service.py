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
import time
from typing import Any

import redis.asyncio as aioredis
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from orchestrator import topology
from orchestrator.amqp import decode, open_channel
from orchestrator.clock import Clock, SystemClock
from orchestrator.config import Settings, instance_id
from orchestrator.consumer import Consumer, Settle
from orchestrator.dispatcher.control import ControlCommands
from orchestrator.dispatcher.ledger import Ledger
from orchestrator.dispatcher.metrics import (
    COST_SERVED,
    IN_FLIGHT,
    LEADING,
    LEASE_CHANGES,
    show_policies,
)
from orchestrator.dispatcher.release import Releaser
from orchestrator.dispatcher.screening import Screening
from orchestrator.dispatcher.stats import RecentService, publish_stats
from orchestrator.outage import OUTAGES, dependency_of, sleep_unless
from orchestrator.store import Keys
from orchestrator.store.lease import Lease
from orchestrator.store.tenants import TenantPolicy, TenantStore
from orchestrator.store.workers import capacity, live_workers
from orchestrator.telemetry import get_logger
from schemas import (
    StepResult,
    StepTask,
)

log = get_logger(__name__)

HEAD_BUFFER = 16  # prefetch per tenant queue: the candidates the fair order chooses among
LEASE_S = 3.0
RENEW_S = 1.0
LEASE_MARGIN_S = 0.5
REFRESH_S = 0.5


class Dispatcher:
    """The I/O around the `Ledger`: the lease, the consumers (tenant queues, completions,
    control commands), the periodic refresh of policies and capacity, the release of what
    the ledger picks (publish, mark, ack), and the metrics."""

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
        self.id = dispatcher_id or instance_id()
        self.keys = Keys(settings.redis_prefix)
        self.tenants = TenantStore(redis, self.keys)
        self.lease = Lease(redis, self.keys.dispatcher_lease, self.id, LEASE_S, self.clock)
        self.ledger = Ledger(self.clock, settings.dispatcher_headroom)
        self.recent = RecentService()  # the last minute, for the live views
        self.releaser = Releaser(redis, self.keys, self.ledger, self.recent, self.clock)
        self.leader = False
        self._wake = asyncio.Event()  # leadership changes and failures, for the main loop
        self._pass_scheduled = False
        self._stop = asyncio.Event()
        self._channel: AbstractChannel | None = None  # the leader's: tenant queues, releases
        self._consumed: set[str] = set()  # tenants whose queue the leader consumes
        self._publishing: set[asyncio.Task[None]] = set()  # batches being released
        self._refill: asyncio.Task[None] | None = None  # the batch filling the window
        self._screening = self._new_screening()
        self._failure: BaseException | None = None
        self._refreshing = asyncio.Lock()

    # ------------------------------------------------------------------ process
    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        channel = await open_channel(self.connection, prefetch=32)
        await topology.apply(channel, role="dispatcher")
        control = await ControlCommands(self.tenants, self.clock, self._policy_changed).consume(
            channel, stop, self.settings.outage_limit_s
        )
        log.info("dispatcher.started", id=self.id)
        jobs = {  # each on its own task: the dispatch loop never waits for them
            "lease": self.lease.hold(stop, RENEW_S, LEASE_MARGIN_S, self._wake.set),
            "refresh": self._keep_fresh(stop),
            "stats": publish_stats(self.redis, self.keys.dispatcher_stats, self._stats, stop),
        }
        helpers = [asyncio.create_task(job, name=f"dispatcher-{n}") for n, job in jobs.items()]
        try:
            while not stop.is_set():
                if self._failure is not None:
                    raise self._failure
                # A wake (lease change, refresh, command, failure) dispatches; steps and
                # completions dispatch from their callbacks. Nothing here waits for Redis or a
                # confirm: a step that arrives is picked at once.
                holding = self.lease.holding(LEASE_MARGIN_S)
                if holding and not self.leader:
                    try:
                        await self._become_leader()
                    except Exception as exc:
                        self._trouble(exc)
                        await self._step_down()
                elif not holding and self.leader:
                    await self._step_down()
                self._dispatch()
                self._wake.clear()
                await sleep_unless(self._wake, REFRESH_S)
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await control.cancel()
            if self.leader:
                await self._step_down()
                await self.lease.give_up()
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
            self.lease.lost()
        self._wake.set()

    async def _keep_fresh(self, stop: asyncio.Event) -> None:
        """Re-reads tenants, policies and worker capacity every REFRESH_S while leading, on its
        own task: the dispatch loop never waits for these Redis round trips."""
        while not await sleep_unless(stop, REFRESH_S):
            if not self.leader:
                continue
            try:
                await self._refresh()
            except Exception as exc:
                if self.leader:  # else it failed on the channel a step-down closed
                    self._trouble(exc)
            self._wake.set()

    async def _become_leader(self) -> None:
        log.info("dispatcher.leading", id=self.id)
        LEASE_CHANGES.labels("acquired").inc()
        LEADING.set(1)
        # `leader` only once the channel is open: the refresh task acts on `leader` and needs
        # the channel, and opening it can take a while on a loaded host (a refresh that came
        # in between used to kill a freshly taken-over dispatcher).
        self._channel = await open_channel(self.connection, prefetch=HEAD_BUFFER)
        self._screening = self._new_screening()
        self.leader = True
        # Without acks: a completion only corrects the accounting of this leader's in-flight
        # steps, which a new leader does not inherit anyway (and the ledger forgets a
        # completion that never came). Saves an ack per step on both ends.
        consumer = Consumer(
            topology.COMPLETIONS_QUEUE,
            lambda incoming: decode(incoming, StepResult),
            self._on_completion,
            stop=self._stop,
            no_ack=True,
        )
        await consumer.start(self._channel)
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
        if self._publishing:  # their confirms, markers and acks first: a standby may lead next
            _, late = await asyncio.wait(set(self._publishing), timeout=LEASE_MARGIN_S)
            for batch in late:  # unconfirmed: their messages go back with the channel
                batch.cancel()
        self._screening.stop()
        channel, self._channel = self._channel, None
        self._consumed.clear()
        self.ledger.step_down()
        IN_FLIGHT.clear()
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()  # unacked messages go back to their queues

    def _new_screening(self) -> Screening:  # on failure (Redis gone): step down
        return Screening(self.redis, self.keys, self.ledger, self._dispatch_soon, self._trouble)

    # ------------------------------------------------------------------ state
    async def _refresh(self) -> None:
        """Consumes every registered tenant's queue; reads policies and worker capacity."""
        async with self._refreshing:  # the first one (on taking the lead) and the periodic
            channel = self._channel
            if channel is None:
                return  # stepped down meanwhile
            tenants = await self.tenants.tenants()
            for tenant in sorted(set(tenants) - self._consumed):
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
                self._consumed.add(tenant)
            self._apply(await self.tenants.policies(tenants) if tenants else {}, every=True)
            self.ledger.set_capacity(*capacity(await live_workers(self.redis, self.keys)))
            for item in self.ledger.expire():
                IN_FLIGHT.labels(item.tenant).set(self.ledger.per_tenant[item.tenant])
            self.ledger.forget_released()

    def _apply(self, policies: dict[str, TenantPolicy], every: bool = False) -> None:
        self.ledger.set_policies(policies, every=every)
        show_policies(policies)

    # ------------------------------------------------------------------ inputs
    async def _on_task(self, task: StepTask, incoming: AbstractIncomingMessage) -> Settle:
        if not self.leader:
            return Settle.HOLD  # a late delivery of the channel stepped down from: it goes back
        if self.ledger.was_released(task.task_id):
            return Settle.ACK  # a copy of a step this process released (the engine's repeat)
        if self._screening.admit(task, incoming):
            self._dispatch_soon()
        return Settle.HOLD

    async def _on_completion(self, result: StepResult, _: AbstractIncomingMessage) -> None:
        """A copy of a step result (consumed without acks: soft state). An invalid one is
        counted and announced by the consumer; the engine's copy of it is dead-lettered."""
        wall_s = max(0.0, (result.finished_at - result.started_at).total_seconds())
        done = self.ledger.completed(result.task_id, wall_s, result.cpu_s)
        if done is not None:
            tenant = done[0].task.tenant
            IN_FLIGHT.labels(tenant).set(self.ledger.per_tenant[tenant])
            COST_SERVED.labels(tenant).inc(done[1])
            self.recent.served(tenant, done[1], self.clock.monotonic())
        self._dispatch_soon()

    async def _policy_changed(self, tenant: str) -> None:
        if self.leader and tenant in self._consumed:
            self._apply(await self.tenants.policies([tenant]))
        self._wake.set()

    # ------------------------------------------------------------------ dispatch
    def _dispatch_soon(self) -> None:
        """One dispatch pass after the callbacks already due: the steps, completions and
        commands that arrived together are picked together, without a round through the main
        loop (its wake-up costs a task switch and a timer per event)."""
        if not self._pass_scheduled:
            self._pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Takes what the ledger picks and releases it as one batch (`Releaser`), not awaited:
        the loop never waits for I/O. One refill of the window is under way at a time: slots
        that free meanwhile are picked together when it is done (batches grow with the load).
        Express steps do not wait for it."""
        self._pass_scheduled = False
        if not self.leader or self._channel is None or not self.lease.holding(LEASE_MARGIN_S):
            return
        try:
            picks = self.ledger.take(refilling=self._refill is not None)
        except Exception as exc:  # a bug: end the process
            self._trouble(exc)
            return
        if not picks:
            return
        for pick in picks:
            tenant = pick.queued.task.tenant
            IN_FLIGHT.labels(tenant).set(self.ledger.per_tenant[tenant])
        batch = asyncio.create_task(self.releaser.release(self._channel, picks))
        self._publishing.add(batch)
        batch.add_done_callback(self._on_released)
        if not all(pick.express for pick in picks):
            self._refill = batch

    def _on_released(self, batch: asyncio.Task[None]) -> None:
        self._publishing.discard(batch)
        if batch is self._refill:
            self._refill = None
        error = None if batch.cancelled() else batch.exception()
        if error is not None:
            self._trouble(error)
        self._dispatch_soon()

    def _stats(self) -> dict[str, Any] | None:
        recent = self.recent.summary(self.clock.monotonic())
        summary = {"at": time.time(), "id": self.id, **self.ledger.summary(), "recent": recent}
        return summary if self.leader else None
