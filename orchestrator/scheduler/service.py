"""The scheduler process: fires due ticks exactly once across replicas, admits flow starts."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import random
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from orchestrator import topology, tracing
from orchestrator.accounts import tenant_of_user
from orchestrator.amqp import InvalidMessage, decode, open_channel, publish, rejection_id, valid_id
from orchestrator.clock import Clock, SystemClock, from_ms, to_ms
from orchestrator.config import Settings
from orchestrator.consumer import Consumer
from orchestrator.outage import OUTAGES, dependency_of, sleep_unless
from orchestrator.scheduler.cron import CronSchedule
from orchestrator.scheduler.ticks import plan_ticks
from orchestrator.store import Keys, member
from orchestrator.store.admission import (
    Admission,
    AdmissionStore,
    Claim,
    RateLimit,
    idempotency_digest,
)
from orchestrator.store.batch import Batcher
from orchestrator.store.flows import FlowRegistry, jitter_ms
from orchestrator.telemetry import bound_context, get_logger
from schemas import ExecutionRequested, FlowDefinition, FlowStartRequested, StatusEvent

log = get_logger(__name__)

# Execution ids are UUIDv5 of the fire id: a re-fired tick or a re-sent request yields the
# same execution id, which is what makes every admission step safe to repeat.
EXECUTION_NAMESPACE = uuid.UUID("6f1c2d4e-8a8b-4c1e-9a43-0f5d2b7c9e11")
# Due entries taken per round; the rest wait for the next round (no round starves: the
# due index is ordered by fire time, so the oldest go first).
DUE_BATCH = 1_000
# Upper bound on one idle sleep, so newly applied flows are noticed quickly.
MAX_IDLE_S = 0.5
# Missed or coalesced ticks reported one by one, per round; beyond that, one summary event.
REPORT_LIMIT = 100
# Back-off of the tick loop while Redis or RabbitMQ is away: doubling, capped.
RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 5.0
INGRESS_REFRESH_S = 1.0
# A flow-start request being handled holds its idempotency key this long at most (handling
# takes milliseconds; a handler that died lets go of the key when the lease lapses).
REQUEST_LEASE_MS = 10_000
REQUEST_POLL_S = 0.02
DEFINITION_CACHE_SIZE = 20_000
# Ticks due within this window are claimed and planned ahead, then fired on time.
LOOKAHEAD_MS = 250

TICKS = Counter("orchestrator_ticks_total", "Cron ticks by outcome", ["outcome"])
LATENESS = Histogram(
    "orchestrator_tick_lateness_seconds",
    "Publish time minus nominal fire time of fired ticks",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FLOW_STARTS = Counter(
    "orchestrator_flow_starts_total", "Flow-start requests by outcome", ["outcome"]
)


def iso_ms(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def cron_fire_id(tenant: str, flow_id: str, nominal: datetime) -> str:
    return f"{tenant}/{flow_id}@{iso_ms(nominal)}"


def request_fire_id(tenant: str, flow_id: str, idempotency_key: str) -> str:
    return f"{tenant}/{flow_id}#{idempotency_digest(idempotency_key)}"


def execution_id_for(fire_id: str) -> str:
    return str(uuid.uuid5(EXECUTION_NAMESPACE, fire_id))


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        connection: AbstractRobustConnection,
        clock: Clock | None = None,
        replica: str | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.connection = connection
        self.clock: Clock = clock or SystemClock()
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.keys = Keys(settings.redis_prefix)
        self.flows = FlowRegistry(redis, self.keys)
        self.admission = AdmissionStore(redis, self.keys, batched=Batcher(redis))
        self.claim_ms = int(settings.tick_claim_lease_s * 1000)
        self.lease_ms = int(settings.running_lease_s * 1000)
        self.grace = timedelta(seconds=settings.misfire_grace_s)
        self._slots = asyncio.Semaphore(settings.scheduler_concurrency)
        self._schedules: dict[tuple[str, str], CronSchedule] = {}
        self._definitions: dict[str, FlowDefinition] = {}
        self._channel: AbstractChannel | None = None
        self._ingress: dict[str, Consumer[FlowStartRequested]] = {}
        self.operators = settings.operator_accounts
        self.rate = RateLimit(settings.ingress_rate_per_s, settings.ingress_burst)

    async def channel(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await open_channel(
                self.connection, prefetch=self.settings.ingress_prefetch
            )
        return self._channel

    # ------------------------------------------------------------------ process
    async def run(self, stop: asyncio.Event, ingress: bool = True) -> None:
        """Fires ticks (and consumes flow-start requests) until `stop` is set."""
        channel = await self.channel()
        await topology.apply(channel, role="scheduler")
        watcher = None
        if ingress:
            await self._refresh_ingress_safely(stop)
            watcher = asyncio.create_task(self._ingress_loop(stop))
        log.info("scheduler.started", replica=self.replica)
        try:
            await self._tick_loop(stop)
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            for consumer in self._ingress.values():
                await consumer.cancel()
            log.info("scheduler.stopped", replica=self.replica)

    # ------------------------------------------------------------------ ingress queues
    async def refresh_ingress(self, stop: asyncio.Event) -> None:
        """Consumes the ingress queue of every registered tenant (declaring it first): each
        tenant's requests wait in their own queue, each queue has its own prefetch, so one
        tenant's flood fills only its own share of this replica's attention."""
        tenants = sorted(str(t) for t in await self.redis.smembers(self.keys.tenants))
        for tenant in tenants:
            if tenant in self._ingress:
                continue
            channel = await self.channel()
            await topology.declare_ingress_queue(channel, tenant)
            consumer = Consumer(
                topology.ingress_queue_name(tenant),
                lambda incoming: decode(incoming, FlowStartRequested),
                functools.partial(self.handle_flow_start, queue_tenant=tenant),
                stop=stop,
                retry_limit_s=self.settings.outage_limit_s,
                entity="flow_start",
            )
            await consumer.start(channel)
            self._ingress[tenant] = consumer

    async def _ingress_loop(self, stop: asyncio.Event) -> None:
        """Newly registered tenants get their ingress consumed within a second."""
        while not stop.is_set():
            await sleep_unless(stop, INGRESS_REFRESH_S)
            await self._refresh_ingress_safely(stop)

    async def _refresh_ingress_safely(self, stop: asyncio.Event) -> None:
        """A broker outage (also at start) costs a refresh, never the process: the next
        round tries again."""
        try:
            await self.refresh_ingress(stop)
        except Exception as exc:
            dependency = dependency_of(exc)
            if dependency is None:
                log.exception("scheduler.ingress_refresh_failed")
            else:
                OUTAGES.failed(dependency, exc)

    async def _tick_loop(self, stop: asyncio.Event) -> None:
        """Rounds until stopped. A Redis or RabbitMQ outage costs rounds, never the loop: it
        waits with capped backoff and carries on where the due index says (claims that a
        failed round held lapse, so another replica or the next round fires those ticks)."""
        delay = RETRY_DELAY_S
        while not stop.is_set():
            try:
                processed = await self.process_due_once()
                await self.promote_buffered()
                if not processed:
                    next_ms = await self.admission.next_due_ms()
            except Exception as exc:
                dependency = dependency_of(exc)
                if dependency is None:
                    raise  # a bug: end the process, a supervisor restarts it clean
                OUTAGES.failed(dependency, exc)
                await sleep_unless(stop, delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
                continue
            if delay != RETRY_DELAY_S:
                OUTAGES.recovered_all()
                delay = RETRY_DELAY_S
            if processed:
                continue
            now_ms = to_ms(self.clock.now())
            wait_s = MAX_IDLE_S if next_ms is None else (next_ms - LOOKAHEAD_MS - now_ms) / 1000
            wait_s = min(max(wait_s, 0.0), MAX_IDLE_S)
            sleeper = asyncio.ensure_future(self.clock.sleep(wait_s))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for future in (sleeper, stopper):
                future.cancel()

    async def process_due_once(self) -> int:
        """Handles every tick due now; returns how many due entries this replica claimed.

        Redis work is batched per round: one pipeline claims, one completes, so a round of
        hundreds of due flows costs a few round trips, not hundreds.
        """
        due = await self.admission.due(to_ms(self.clock.now()) + LOOKAHEAD_MS, DUE_BATCH)
        if not due:
            return 0
        # Replicas see the same due list; shuffling spreads their claims instead of having all
        # of them race for the same first entries.
        random.shuffle(due)
        claims = await self.admission.claim_ticks(due, self.replica, self.claim_ms)
        claimed = [
            (flow, at, claim) for (flow, at), claim in zip(due, claims, strict=True) if claim
        ]
        outcomes = await asyncio.gather(
            *(self._guarded(flow, at, claim) for flow, at, claim in claimed)
        )
        done = [
            (flow, at, next_due)
            for (flow, at, _), (ok, next_due) in zip(claimed, outcomes, strict=True)
            if ok
        ]
        # A flow whose processing failed keeps its claim until the lease lapses; then any
        # replica retries the tick (same ids, so a partial first attempt is harmless).
        await self.admission.complete_ticks(done, self.replica)
        return len(claimed)

    async def _guarded(
        self, flow: str, fire_at_ms: int, claim: Claim
    ) -> tuple[bool, tuple[int, int] | None]:
        async with self._slots:
            try:
                return True, await self._process(flow, fire_at_ms, claim)
            except Exception as exc:
                dependency = dependency_of(exc)
                if dependency is None:
                    log.exception("scheduler.tick_failed", flow=flow)
                else:  # retried once its claim lapses; the outage is reported once
                    OUTAGES.failed(dependency, exc)
                return False, None

    def _definition(self, raw: str) -> FlowDefinition:
        """Parsed definitions by their stored JSON: validating the same flow every second
        is the largest CPU cost of a tick otherwise."""
        definition = self._definitions.get(raw)
        if definition is None:
            if len(self._definitions) >= DEFINITION_CACHE_SIZE:
                self._definitions.clear()
            definition = self._definitions[raw] = FlowDefinition.model_validate_json(raw)
        return definition

    def _schedule(self, definition: FlowDefinition) -> CronSchedule:
        key = (definition.cron or "", definition.timezone)
        schedule = self._schedules.get(key)
        if schedule is None:
            schedule = self._schedules[key] = CronSchedule(key[0], key[1])
        return schedule

    async def _process(self, flow: str, fire_at_ms: int, claim: Claim) -> tuple[int, int] | None:
        """Fires or reports every tick of one claimed flow; returns its next (fire-at, nominal).

        Ticks are claimed and planned up to LOOKAHEAD_MS early and fired at their time, so
        the claim and planning work is off the critical path of a burst of simultaneous ticks.
        """
        if not claim.definition_json:  # deleted flow
            return None
        definition = self._definition(claim.definition_json)
        if definition.cron is None:
            return None
        with bound_context(tenant=definition.tenant, flow=definition.id):
            schedule = self._schedule(definition)
            fire_at = from_ms(fire_at_ms)
            now = max(self.clock.now(), fire_at)
            plan = plan_ticks(
                schedule, from_ms(claim.nominal_ms), now, definition.catch_up, self.grace
            )
            early_s = (fire_at - self.clock.now()).total_seconds()
            if early_s > 0:
                await self.clock.sleep(early_s)
            firing = [self._tick(definition, nominal, "cron") for nominal in plan.run]
            if plan.catch_up is not None:
                firing.append(self._tick(definition, plan.catch_up, "catch_up", plan.coalesced))
            await asyncio.gather(*firing)
            await self._report_unrun(
                definition,
                state="coalesced",
                ticks=plan.coalesced,
                truncated=False,
                reason="catch_up",
            )
            await self._report_unrun(
                definition,
                state="skipped",
                ticks=plan.missed,
                truncated=plan.truncated,
                reason="missed",
            )
        if plan.next_nominal is None:
            return None
        nominal_ms = to_ms(plan.next_nominal)
        return nominal_ms + jitter_ms(flow, nominal_ms, definition.jitter_s), nominal_ms

    async def _tick(
        self,
        definition: FlowDefinition,
        nominal: datetime,
        trigger: str,
        coalesced: list[datetime] | None = None,
    ) -> None:
        fire_id = cron_fire_id(definition.tenant, definition.id, nominal)
        execution = ExecutionRequested(
            execution_id=execution_id_for(fire_id),
            fire_id=fire_id,
            tenant=definition.tenant,
            flow_id=definition.id,
            trigger="catch_up" if trigger == "catch_up" else "cron",
            nominal_time=nominal,
            input=definition.input,
        )
        data: dict[str, Any] = {
            "fire_id": fire_id,
            "nominal_time": iso_ms(nominal),
            "execution_id": execution.execution_id,
            "trigger": execution.trigger,
        }
        if coalesced:
            data["coalesced"] = len(coalesced)
        if definition.paused:
            await self._status("tick", "skipped", definition, fire_id, {**data, "reason": "paused"})
            TICKS.labels("paused").inc()
            return
        decision = await self._admit(definition, execution)
        if decision is Admission.RUN:
            with tracing.span(
                "scheduler.fire",
                attributes={
                    "orchestrator.tenant": definition.tenant,
                    "orchestrator.flow": definition.id,
                    "orchestrator.execution": execution.execution_id,
                },
            ):
                await publish(await self.channel(), execution)
            LATENESS.observe(max(0.0, (self.clock.now() - nominal).total_seconds()))
            await self._status(
                "tick", "fired", definition, fire_id, data, subject=execution.execution_id
            )
        elif decision is Admission.BUFFERED:
            await self._status(
                "tick", "buffered", definition, fire_id, data, subject=execution.execution_id
            )
        else:
            await self._status(
                "tick", "skipped", definition, fire_id, {**data, "reason": decision.value}
            )
        TICKS.labels(decision.value).inc()

    async def _admit(self, definition: FlowDefinition, execution: ExecutionRequested) -> Admission:
        return await self.admission.admit(
            member(definition.tenant, definition.id),
            tenant=definition.tenant,
            flow_id=definition.id,
            execution_id=execution.execution_id,
            policy=definition.overlap,
            lease_ms=self.lease_ms,
            payload=execution.model_dump_json(),
        )

    async def _report_unrun(
        self,
        definition: FlowDefinition,
        *,
        state: str,
        ticks: list[datetime],
        truncated: bool,
        reason: str,
    ) -> None:
        for nominal in ticks[:REPORT_LIMIT]:
            fire_id = cron_fire_id(definition.tenant, definition.id, nominal)
            data = {"fire_id": fire_id, "nominal_time": iso_ms(nominal), "reason": reason}
            await self._status("tick", state, definition, fire_id, data)
        if len(ticks) > REPORT_LIMIT or truncated:
            summary: dict[str, Any] = {
                "reason": reason,
                "summary": True,
                "count": len(ticks),
                "count_is_lower_bound": truncated,
                "first": iso_ms(ticks[0]),
                "last": iso_ms(ticks[-1]),
            }
            first_id = cron_fire_id(definition.tenant, definition.id, ticks[0])
            await self._status("tick", state, definition, f"{first_id}+{len(ticks)}", summary)
        TICKS.labels(reason if state == "skipped" else state).inc(len(ticks))

    async def _status(
        self,
        entity: str,
        state: str,
        definition: FlowDefinition | None,
        event_key: str,
        data: dict[str, Any],
        *,
        subject: str | None = None,
        tenant: str | None = None,
    ) -> None:
        event = StatusEvent.build(
            entity,
            state,
            event_id=f"{event_key}:{entity}.{state}",
            tenant=definition.tenant if definition else tenant,
            flow=definition.id if definition else None,
            subject=subject,
            data=data,
        )
        await publish(await self.channel(), event)

    # ------------------------------------------------------------------ buffer_one
    async def promote_buffered(self) -> None:
        """Starts a waiting (buffer_one) execution once its flow's running lease is free."""
        for flow in await self.admission.buffered_flows():
            payload = await self.admission.promote_buffered(flow, self.lease_ms)
            if payload is None:
                continue
            execution = ExecutionRequested.model_validate_json(payload)
            await publish(await self.channel(), execution)
            await self.admission.finish_buffered(flow, execution.execution_id)
            TICKS.labels("promoted").inc()

    # ------------------------------------------------------------------ flow-start ingress
    def _authorize(
        self, request: FlowStartRequested, incoming: AbstractIncomingMessage, queue_tenant: str
    ) -> None:
        """The request's tenant is the authenticated one: a tenant account starts its own
        flows, an operator account anybody's. RabbitMQ has checked `user_id` against the
        publishing connection's account; without one the sender is unknown."""
        tenant = request.tenant
        user = incoming.user_id
        if tenant != queue_tenant:
            detail = f"a request for tenant {tenant!r} on the ingress of {queue_tenant!r}"
            FLOW_STARTS.labels("forbidden").inc()
            raise InvalidMessage("forbidden", detail, tenant=queue_tenant)
        if user:
            owner = tenant_of_user(user, self.settings.account_prefix)
            if owner != tenant and user not in self.operators:
                detail = f"account {user!r} may not start flows of tenant {tenant!r}"
                FLOW_STARTS.labels("forbidden").inc()
                raise InvalidMessage("forbidden", detail, tenant=tenant)
        elif self.settings.require_auth:
            detail = "the request has no AMQP user_id and authentication is required"
            FLOW_STARTS.labels("unauthenticated").inc()
            raise InvalidMessage("unauthenticated", detail, tenant=tenant)

    async def handle_flow_start(
        self,
        request: FlowStartRequested,
        incoming: AbstractIncomingMessage,
        *,
        queue_tenant: str | None = None,
    ) -> None:
        """Admits one decoded flow-start request. Bad requests raise InvalidMessage (the
        consumer skeleton announces and dead-letters them); policy refusals (rate limited,
        paused, quarantined...) are announced and acked here."""
        tenant = request.tenant
        self._authorize(request, incoming, queue_tenant or tenant)
        with bound_context(tenant=tenant, flow=request.flow_id):
            if not await self.rate.take(self.admission, tenant, to_ms(self.clock.now())):
                detail = (
                    f"more than {self.rate.burst} flow starts at once or "
                    f"{self.rate.per_s:g}/s for tenant {tenant!r}"
                )
                await self._refuse(incoming, "rate_limited", detail, None, tenant=tenant)
                return
            definition = await self.flows.get(tenant, request.flow_id)
            if definition is None:
                detail = f"tenant {tenant!r} has no flow {request.flow_id!r}"
                FLOW_STARTS.labels("unknown_flow").inc()
                raise InvalidMessage("unknown_flow", detail, tenant=tenant, flow=request.flow_id)
            await self._admit_request(incoming, request, definition)

    async def _admit_request(
        self,
        incoming: AbstractIncomingMessage,
        request: FlowStartRequested,
        definition: FlowDefinition,
    ) -> None:
        flow = member(definition.tenant, definition.id)
        fire_id = request_fire_id(definition.tenant, definition.id, request.idempotency_key)
        execution_id = execution_id_for(fire_id)
        data: dict[str, Any] = {
            "idempotency_key": request.idempotency_key,
            "execution_id": execution_id,
            "fire_id": fire_id,
        }
        seen = await self._claim_request(flow, request.idempotency_key, incoming)
        if seen.startswith("done:"):
            FLOW_STARTS.labels("duplicate").inc()
            # A new event (its own id, from this very request message), not a copy of the
            # first acceptance: subscribers that drop repeated ids still see it.
            queue = topology.ingress_queue_name(definition.tenant)
            await self._status(
                "flow_start",
                "accepted",
                definition,
                f"{fire_id}:duplicate:{rejection_id(queue, incoming)}",
                {**data, "duplicate": True},
                subject=execution_id,
            )
            return
        if definition.paused:
            await self.admission.forget_request(flow, request.idempotency_key)
            await self._refuse(incoming, "paused", "the flow is paused", definition)
            return
        try:
            execution = ExecutionRequested(
                execution_id=execution_id,
                fire_id=fire_id,
                tenant=definition.tenant,
                flow_id=definition.id,
                trigger=request.trigger,
                input={**definition.input, **request.input},
            )
        except ValidationError as exc:
            await self.admission.forget_request(flow, request.idempotency_key)
            FLOW_STARTS.labels("schema_violation").inc()
            raise InvalidMessage(
                "schema_violation", str(exc)[:500], tenant=definition.tenant, flow=definition.id
            ) from None
        decision = await self._admit(definition, execution)
        FLOW_STARTS.labels(decision.value).inc()
        if decision not in (Admission.RUN, Admission.BUFFERED):
            # Refused by policy, not for bad input: the key is forgotten so the caller may
            # retry the same request later (once the flow is free or released).
            await self.admission.forget_request(flow, request.idempotency_key)
            detail = f"admission refused the request: {decision.value}"
            await self._refuse(incoming, decision.value, detail, definition)
            return
        if decision is Admission.RUN:
            await publish(await self.channel(), execution)
        else:
            data["buffered"] = True
        await self._status(
            "flow_start", "accepted", definition, fire_id, data, subject=execution_id
        )
        await self.admission.finish_request(flow, request.idempotency_key, execution_id)

    async def _claim_request(
        self, flow: str, idempotency_key: str, incoming: AbstractIncomingMessage
    ) -> str:
        """Claims the idempotency key; a concurrent delivery of the same key (another replica,
        another consumer) is waited for, so exactly one of them runs and the other reports the
        duplicate. The owner is this delivery: the consumer retrying it in place after an
        outage finds its own claim."""
        delivery = f"{self.replica}/{incoming.consumer_tag}/{incoming.delivery_tag}"
        owner = hashlib.sha256(delivery.encode()).hexdigest()[:24]
        deadline = time.monotonic() + REQUEST_LEASE_MS / 1000 * 2
        while True:
            seen = await self.admission.begin_request(
                flow,
                idempotency_key,
                ttl_s=self.settings.idempotency_ttl_s,
                owner=owner,
                now_ms=to_ms(self.clock.now()),
                lease_ms=REQUEST_LEASE_MS,
            )
            if seen != "busy" or time.monotonic() > deadline:
                return seen
            await asyncio.sleep(REQUEST_POLL_S)

    async def _refuse(
        self,
        incoming: AbstractIncomingMessage,
        reason: str,
        detail: str,
        definition: FlowDefinition | None,
        *,
        tenant: str | None = None,
    ) -> None:
        """A valid request that policy refuses (rate limited, paused, quarantined, running):
        announced, then acked by the consumer. Not a dead letter: the same request may
        succeed later."""
        FLOW_STARTS.labels(reason).inc()
        queue = topology.ingress_queue_name(definition.tenant if definition else str(tenant))
        data = {"reason": reason, "detail": detail, "queue": queue}
        if (message_id := valid_id(incoming.message_id)) is not None:
            data["message_id"] = message_id
        key = rejection_id(queue, incoming)
        await self._status("flow_start", "rejected", definition, key, data, tenant=tenant)
        log.info("flow_start.rejected", reason=reason, detail=detail)
