"""Cron firing: every due tick fires exactly once across replicas.

Each round claims the due flows (one pipeline), plans their ticks (`ticks.plan_ticks`: run,
coalesce or skip as missed), fires them at their time, and completes the claims with each
flow's next due time (one pipeline). A replica that dies mid-round holds its claims only until
their lease lapses; another replica then fires those ticks, with the same ids.
"""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter, Histogram
from tenacity import RetryCallState

from orchestrator import tracing
from orchestrator.amqp import publish
from orchestrator.clock import from_ms, to_ms
from orchestrator.cron import CronSchedule, fire_at_ms
from orchestrator.outage import OUTAGES, dependency_of, retrying, sleep_unless
from orchestrator.scheduler.admitting import Admitting, cron_fire_id, execution_id_for, iso_ms
from orchestrator.scheduler.ticks import plan_ticks
from orchestrator.store.admission import Admission, Claim
from orchestrator.telemetry import bound_context, get_logger
from schemas import ExecutionRequested, FlowDefinition

log = get_logger(__name__)

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
DEFINITION_CACHE_SIZE = 20_000
# Ticks due within this window are claimed and planned ahead, then fired on time.
LOOKAHEAD_MS = 250

TICKS = Counter("orchestrator_ticks_total", "Cron ticks by outcome", ["outcome"])
LATENESS = Histogram(
    "orchestrator_tick_lateness_seconds",
    "Publish time minus nominal fire time of fired ticks",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class CronFiring:
    def __init__(self, ctx: Admitting) -> None:
        self.ctx = ctx
        self.claim_ms = int(ctx.settings.tick_claim_lease_s * 1000)
        self.grace = timedelta(seconds=ctx.settings.misfire_grace_s)
        self._slots = asyncio.Semaphore(ctx.settings.scheduler_concurrency)
        self._schedules: dict[tuple[str, str], CronSchedule] = {}
        self._definitions: dict[str, FlowDefinition] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds until stopped."""
        while not stop.is_set():
            try:
                processed, next_ms = await self._round(stop)
            except Exception as exc:
                if dependency_of(exc) is None:
                    raise  # a bug: end the process, a supervisor restarts it clean
                return  # stopped while a broker was away
            if processed:
                continue
            now_ms = to_ms(self.ctx.clock.now())
            wait_s = MAX_IDLE_S if next_ms is None else (next_ms - LOOKAHEAD_MS - now_ms) / 1000
            wait_s = min(max(wait_s, 0.0), MAX_IDLE_S)
            await sleep_unless(stop, wait_s, self.ctx.clock)

    async def _round(self, stop: asyncio.Event) -> tuple[int, int | None]:
        """One round: (due entries claimed, the next due time when none were). A Redis or
        RabbitMQ outage costs rounds, never the loop: retried with capped backoff, it carries
        on where the due index says (claims that a failed round held lapse, so another
        replica or the next round fires those ticks)."""

        def failed(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            if error is not None:
                OUTAGES.failed(dependency_of(error) or "unknown", error)

        tries, processed, next_ms = 0, 0, None
        async for attempt in retrying(
            stop,
            first_s=RETRY_DELAY_S,
            max_s=MAX_RETRY_DELAY_S,
            retry_on=lambda error: dependency_of(error) is not None,
            before_sleep=failed,
        ):
            with attempt:
                tries += 1
                processed = await self.process_due_once()
                await self.promote_buffered()
                next_ms = None if processed else await self.ctx.admission.next_due_ms()
        if tries > 1:
            OUTAGES.recovered_all()
        return processed, next_ms

    async def process_due_once(self) -> int:
        """Handles every tick due now; returns how many due entries this replica claimed.

        Redis work is batched per round: one pipeline claims, one completes, so a round of
        hundreds of due flows costs a few round trips, not hundreds.
        """
        due = await self.ctx.admission.due(to_ms(self.ctx.clock.now()) + LOOKAHEAD_MS, DUE_BATCH)
        if not due:
            return 0
        # Replicas see the same due list; shuffling spreads their claims instead of having all
        # of them race for the same first entries.
        random.shuffle(due)
        claims = await self.ctx.admission.claim_ticks(due, self.ctx.replica, self.claim_ms)
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
        await self.ctx.admission.complete_ticks(done, self.ctx.replica)
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

    async def _process(self, flow: str, due_ms: int, claim: Claim) -> tuple[int, int] | None:
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
            fire_at = from_ms(due_ms)
            now = max(self.ctx.clock.now(), fire_at)
            plan = plan_ticks(
                schedule, from_ms(claim.nominal_ms), now, definition.catch_up, self.grace
            )
            early_s = (fire_at - self.ctx.clock.now()).total_seconds()
            if early_s > 0:
                await self.ctx.clock.sleep(early_s)
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
        return fire_at_ms(flow, plan.next_nominal, definition.jitter_s)

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
            await self.ctx.status(
                "tick", "skipped", definition, fire_id, {**data, "reason": "paused"}
            )
            TICKS.labels("paused").inc()
            return
        decision = await self.ctx.admit(definition, execution)
        if decision is Admission.RUN:
            with tracing.span(
                "scheduler.fire",
                attributes={
                    "orchestrator.tenant": definition.tenant,
                    "orchestrator.flow": definition.id,
                    "orchestrator.execution": execution.execution_id,
                },
            ):
                await publish(await self.ctx.channel(), execution)
            LATENESS.observe(max(0.0, (self.ctx.clock.now() - nominal).total_seconds()))
            await self.ctx.status(
                "tick", "fired", definition, fire_id, data, subject=execution.execution_id
            )
        elif decision is Admission.BUFFERED:
            await self.ctx.status(
                "tick", "buffered", definition, fire_id, data, subject=execution.execution_id
            )
        else:
            await self.ctx.status(
                "tick", "skipped", definition, fire_id, {**data, "reason": decision.value}
            )
        TICKS.labels(decision.value).inc()

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
            await self.ctx.status("tick", state, definition, fire_id, data)
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
            await self.ctx.status("tick", state, definition, f"{first_id}+{len(ticks)}", summary)
        TICKS.labels(reason if state == "skipped" else state).inc(len(ticks))

    # ------------------------------------------------------------------ buffer_one
    async def promote_buffered(self) -> None:
        """Starts a waiting (buffer_one) execution once its flow's running lease is free."""
        for flow in await self.ctx.admission.buffered_flows():
            payload = await self.ctx.admission.promote_buffered(flow, self.ctx.lease_ms)
            if payload is None:
                continue
            execution = ExecutionRequested.model_validate_json(payload)
            await publish(await self.ctx.channel(), execution)
            await self.ctx.admission.finish_buffered(flow, execution.execution_id)
            TICKS.labels("promoted").inc()
