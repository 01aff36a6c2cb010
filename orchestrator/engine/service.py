"""The engine process: starts executions, applies step results and timers, publishes effects."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

import aiormq
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import Counter

from orchestrator import topology, tracing
from orchestrator.accounts import tenant_of_user
from orchestrator.amqp import InvalidMessage, decode, decode_any, open_channel, publish, send
from orchestrator.clock import Clock, SystemClock, from_ms, to_ms
from orchestrator.config import Settings
from orchestrator.consumer import Consumer
from orchestrator.engine.machine import Effects, Execution, Timer, Transition, new_execution
from orchestrator.engine.store import Attempt, BreakerPolicy, ExecutionStore, Gate, OutboxEntry
from orchestrator.engine.views import execution_page, execution_view
from orchestrator.outage import sleep_unless
from orchestrator.store import Keys
from orchestrator.store.admission import AdmissionStore
from orchestrator.store.flows import FlowRegistry
from orchestrator.store.tenants import TenantStore
from orchestrator.telemetry import bound_context, get_logger
from schemas import (
    ExecutionCancel,
    ExecutionList,
    ExecutionPage,
    ExecutionQuery,
    ExecutionRequested,
    ExecutionView,
    Message,
    StatusEvent,
    StepResult,
)

log = get_logger(__name__)

TIMER_BATCH = 500
MAX_IDLE_S = 0.5
OUTBOX_SWEEP_S = 5.0
COUNT_S = 1.0  # executions per state and second, to Redis this often
COUNTS_KEPT_S = 120
LIST_SCAN_MAX = 5_000  # executions read per list request with filters

EXECUTIONS = Counter("orchestrator_executions_total", "Executions reaching a state", ["state"])


class Engine:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        connection: AbstractRobustConnection,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.connection = connection
        self.clock: Clock = clock or SystemClock()
        keys = Keys(settings.redis_prefix)
        self.store = ExecutionStore(
            redis,
            keys,
            settings.execution_ttl_s,
            BreakerPolicy(
                threshold=settings.breaker_threshold,
                cooldown_ms=int(settings.breaker_cooldown_s * 1000),
            ),
        )
        self.flows = FlowRegistry(redis, keys, batched=self.store.batched)
        self.admission = AdmissionStore(redis, keys, batched=self.store.batched)
        self.lease_ms = int(settings.running_lease_s * 1000)
        self._channel: AbstractChannel | None = None
        self._tenants_declared: set[str] = set()
        self.tenants = TenantStore(redis, keys)
        self.keys = keys
        self._reached: collections.Counter[str] = collections.Counter()  # since the last count

    async def channel(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await open_channel(
                self.connection, prefetch=self.settings.engine_prefetch
            )
        return self._channel

    # ------------------------------------------------------------------ process
    async def run(self, stop: asyncio.Event) -> None:
        channel = await self.channel()
        await topology.apply(channel, role="engine")
        inputs: list[tuple[str, Callable[[AbstractIncomingMessage], Any], Any]] = [
            (
                topology.EXECUTIONS_QUEUE,
                lambda m: decode(m, ExecutionRequested),
                self._on_execution,
            ),
            (topology.RESULTS_QUEUE, lambda m: decode(m, StepResult), self._on_result),
            (
                topology.QUERIES_QUEUE,
                lambda m: decode_any(m, (ExecutionQuery, ExecutionList)),
                self._on_query,
            ),
            (topology.CANCELS_QUEUE, lambda m: decode(m, ExecutionCancel), self._on_cancel),
        ]
        consumers: list[Consumer[Any]] = [
            Consumer(queue, decoder, handler, stop=stop, retry_limit_s=self.settings.outage_limit_s)
            for queue, decoder, handler in inputs
        ]
        for consumer in consumers:
            await consumer.start(channel)
        log.info("engine.started")
        loops = [
            asyncio.create_task(self._timer_loop(stop)),
            asyncio.create_task(self._heartbeat_loop(stop)),
            asyncio.create_task(self._sweep_loop(stop)),
            asyncio.create_task(self._count_loop(stop)),
        ]
        try:
            await stop.wait()
        finally:
            for consumer in consumers:
                await consumer.cancel()
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            log.info("engine.stopped")

    # ------------------------------------------------------------------ inputs
    async def _on_execution(
        self, request: ExecutionRequested, incoming: AbstractIncomingMessage
    ) -> None:
        with bound_context(
            tenant=request.tenant, flow=request.flow_id, execution=request.execution_id
        ):
            await self.start(request)

    async def start(self, request: ExecutionRequested) -> None:
        definition = await self.flows.get(request.tenant, request.flow_id)
        if definition is None:
            await self._fail_unknown_flow(request)
            return
        now = self.clock.now()

        def begin(current: Execution | None) -> Transition | None:
            if current is not None:
                return None  # a duplicate request: the execution exists
            execution = new_execution(
                execution_id=request.execution_id,
                fire_id=request.fire_id,
                definition=definition,
                execution_input=request.input,
                now=now,
                traceparent=tracing.current_traceparent() or None,
            )
            transition = Transition(execution, now)
            transition.start()
            return transition

        if await self._transact(request.execution_id, begin, now=now, new=True):
            EXECUTIONS.labels("started").inc()
            self._reached["started"] += 1
        else:
            await self._flush(request.execution_id)  # a duplicate: its effects may be pending

    def _authorize(self, incoming: AbstractIncomingMessage, tenant: str | None, key: str) -> None:
        """A tenant account acts for its own tenant only: the broker lets it publish with its
        own routing key alone (`query.T`, `cancel.T`); the body must agree with the key, and
        with the account. Questions about every tenant (`tenant` none) are operators'."""
        if incoming.routing_key != key:
            raise InvalidMessage(
                "forbidden", f"a request for tenant {tenant!r} under another tenant's key"
            )
        owner = tenant_of_user(incoming.user_id or "", self.settings.account_prefix)
        if owner is not None and owner != tenant:
            raise InvalidMessage("forbidden", f"account of {owner!r} asked about {tenant!r}")

    async def _on_query(
        self, query: ExecutionQuery | ExecutionList, incoming: AbstractIncomingMessage
    ) -> None:
        """Answers on the asker's reply_to; learns nothing of other tenants' executions."""
        if not incoming.reply_to:
            raise InvalidMessage("no_reply_to", "a query needs reply_to (and a correlation_id)")
        answer: ExecutionView | ExecutionPage
        key = topology.query_key(query.tenant or topology.NO_TENANT)
        self._authorize(incoming, query.tenant, key)
        if isinstance(query, ExecutionQuery):
            execution = await self.store.load(query.execution_id)
            answer = execution_view(execution, query.tenant, query.execution_id)
        else:
            tenants = [query.tenant] if query.tenant else await self.tenants.tenants()
            filtered = query.flow_id is not None or query.state is not None
            scan = min(query.limit * 20, LIST_SCAN_MAX) if filtered else query.limit
            since_ms = to_ms(query.since) if query.since else None
            executions, more = await self.store.recent(tenants, since_ms, scan)
            answer = execution_page(executions, query, more)
        await self._reply(incoming, answer)

    async def _on_cancel(self, request: ExecutionCancel, incoming: AbstractIncomingMessage) -> None:
        key = topology.cancel_key(request.tenant or topology.NO_TENANT)
        self._authorize(incoming, request.tenant, key)
        with bound_context(tenant=request.tenant, execution=request.execution_id):
            execution = await self.store.load(request.execution_id)
            if execution is not None and request.tenant in (None, execution.tenant):
                requested_by = request.requested_by or incoming.user_id
                await self._advance(
                    request.execution_id, lambda t: t.cancel(request.reason, requested_by)
                )
                execution = await self.store.load(request.execution_id)
                log.info("engine.cancel", state=execution.status if execution else None)
            if incoming.reply_to:
                view = execution_view(execution, request.tenant, request.execution_id)
                await self._reply(incoming, view)

    async def _reply(self, incoming: AbstractIncomingMessage, answer: Message) -> None:
        """To the asker's reply_to through the default exchange (direct reply-to has no
        confirms; the asker retries a lost answer)."""
        underlay = cast(aiormq.Channel, await (await self.channel()).get_underlay_channel())
        await underlay.basic_publish(
            answer.to_bytes(),
            exchange="",
            routing_key=incoming.reply_to or "",
            properties=aiormq.spec.Basic.Properties(
                content_type=answer.content_type,
                message_type=answer.message_type,
                message_id=answer.message_id(),
                correlation_id=incoming.correlation_id,
            ),
            timeout=10,
        )

    async def _fail_unknown_flow(self, request: ExecutionRequested) -> None:
        event = StatusEvent.build(
            "execution",
            "failed",
            event_id=f"{request.execution_id}:unknown-flow",
            tenant=request.tenant,
            flow=request.flow_id,
            subject=request.execution_id,
            sequence=1,
            data={"failure": {"reason": "unknown_flow", "detail": "the flow was deleted"}},
        )
        await publish(await self.channel(), event)
        flow = f"{request.tenant}/{request.flow_id}"
        await self.admission.release_running(flow, request.execution_id)

    async def _on_result(self, result: StepResult, incoming: AbstractIncomingMessage) -> None:
        with bound_context(
            tenant=result.tenant, flow=result.flow_id, execution=result.execution_id
        ):
            await self.apply_result(result)

    async def apply_result(self, result: StepResult) -> None:
        def attempt(execution: Execution) -> Attempt | None:
            """The attempt's outcome, for its step type's breaker (actions only)."""
            if result.kind != "action":
                return None
            step_type = execution.definition.step(result.step_id).type
            return Attempt(execution.tenant, step_type, success=result.outcome == "succeeded")

        await self._advance(result.execution_id, lambda t: t.result(result), attempt)

    async def fire_timer(self, member: str) -> None:
        execution_id, kind, step_id, attempt = member.split("|")
        timer = Timer(kind, step_id, int(attempt), self.clock.now())  # type: ignore[arg-type]
        await self._advance(execution_id, lambda t: t.timer(timer))
        await self.store.drop_timer(member)

    async def _advance(
        self,
        execution_id: str,
        move: Callable[[Transition], Effects],
        attempt: Callable[[Execution], Attempt | None] | None = None,
    ) -> None:
        """One transition of an existing execution, committed with its effects, then flushed.
        A move that changes nothing (duplicate, stale attempt) commits nothing."""
        now = self.clock.now()

        def advance(current: Execution | None) -> Transition | None:
            if current is None:
                return None
            transition = Transition(current, now)
            return transition if move(transition) else None

        if not await self._transact(execution_id, advance, now=now, attempt=attempt):
            # Nothing to change (a duplicate, a stale attempt): what an earlier delivery
            # committed may still wait to be published, as after a crash.
            await self._flush(execution_id)

    async def _transact(
        self,
        execution_id: str,
        build: Callable[[Execution | None], Transition | None],
        *,
        now: datetime,
        attempt: Callable[[Execution], Attempt | None] | None = None,
        new: bool = False,
    ) -> bool:
        """Builds a transition on the stored state and commits it with its effects (again on
        the newer state if another replica changed it meanwhile), then flushes its outbox.
        Dispatches that their step type's open breaker refuses are deferred (`step.waiting`)
        and the rest committed. False when `build` found nothing to change."""
        raw, remembered = (None, False) if new else await self.store.current(execution_id)
        current = None if raw is None else await self.store.parse(raw)
        # In the delivery's span (which continues the trace of its sender); a transition that
        # no message starts (a timer) continues the execution's own trace.
        stored = current.traceparent if current is not None else None
        with tracing.span(
            "engine.transition",
            parent=None if tracing.current_traceparent() else stored,
            attributes={"orchestrator.execution": execution_id},
        ):
            return await self._commit_and_flush(
                execution_id, raw, current, build, now=now, attempt=attempt, remembered=remembered
            )

    async def _commit_and_flush(
        self,
        execution_id: str,
        raw: str | None,
        current: Execution | None,
        build: Callable[[Execution | None], Transition | None],
        *,
        now: datetime,
        attempt: Callable[[Execution], Attempt | None] | None,
        remembered: bool = False,
    ) -> bool:
        while True:
            transition = build(current)
            if transition is None:
                if not remembered:
                    return False
                # Nothing to change, judged on a remembered state: only the stored one may
                # say so (another replica may have moved the execution on meanwhile).
                remembered = False
                raw = await self.store.read(execution_id)
                current = None if raw is None else await self.store.parse(raw)
                continue
            outcome = attempt(transition.x) if attempt is not None else None
            while True:
                actions = [t for t in transition.effects.tasks if t.kind == "action"]
                commit = await self.store.commit(
                    transition.x,
                    transition.effects,
                    started_from=raw,
                    now_ms=to_ms(now),
                    gates=[Gate(t.tenant, t.step_type) for t in actions],
                    attempt=outcome,
                )
                if not commit.refused:
                    break
                outcome = attempt = None  # recorded by the refused commit already
                for index, retry_at in commit.refused.items():
                    transition.defer(actions[index].step_id, from_ms(retry_at))
            if not commit.conflict:
                break
            raw = commit.current
            current = None if raw is None else await self.store.parse(raw)
        self._count(transition.x)
        if not await self.store.flush(execution_id, self._send, commit):
            raise TimeoutError(f"outbox of {execution_id} is held by another engine")
        return True

    def _count(self, execution: Execution) -> None:
        if execution.terminal:
            EXECUTIONS.labels(execution.status).inc()
            self._reached[execution.status] += 1

    # ------------------------------------------------------------------ effects
    async def _flush(self, execution_id: str) -> None:
        if not await self.store.flush(execution_id, self._send):
            raise TimeoutError(f"outbox of {execution_id} is held by another engine")

    async def _send(self, entries: list[OutboxEntry]) -> None:
        """Publishes the entries in order and waits for all their confirms. The publishes are
        started one after another on one channel, so the broker receives them in order; only
        the waits for confirms overlap. The entries are rendered already: nothing is parsed."""
        channel = await self.channel()
        publishes = []
        for entry in entries:
            if entry.outgoing is None:
                continue  # a lease release: the store does it once these are out
            if entry.kind == "task":
                await self._ensure_tenant_queue(entry.outgoing.routing_key)
            publishes.append(asyncio.ensure_future(send(channel, entry.outgoing)))
            await asyncio.sleep(0)  # let it write its frames before the next one starts
        await asyncio.gather(*publishes)

    async def _ensure_tenant_queue(self, tenant: str) -> None:
        """A tenant's fair queue exists before its first step is published to it."""
        if tenant in self._tenants_declared:
            return
        await topology.declare_tenant_queue(await self.channel(), tenant)
        await self.tenants.register(tenant)
        self._tenants_declared.add(tenant)

    # ------------------------------------------------------------------ loops
    async def _timer_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                due = await self.store.due_timers(to_ms(self.clock.now()), TIMER_BATCH)
                await asyncio.gather(*(self._guarded_timer(member) for member in due))
                if due:
                    continue
                next_ms = await self.store.next_timer_ms()
            except (OSError, aioredis.RedisError) as exc:
                log.warning("engine.timers_failed", error=repr(exc))
                next_ms = None
            wait_s = MAX_IDLE_S if next_ms is None else (next_ms - to_ms(self.clock.now())) / 1000
            await sleep_unless(stop, min(max(wait_s, 0.0), MAX_IDLE_S), self.clock)

    async def _guarded_timer(self, member: str) -> None:
        try:
            await self.fire_timer(member)
        except Exception:
            log.exception("engine.timer_failed", timer=member)  # it comes back after its lease

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        """Keeps the running leases of live executions from expiring (overlap protection)."""
        interval = max(0.5, self.settings.running_lease_s / 3)
        while not stop.is_set():
            try:
                for execution_id, flow in (await self.store.live()).items():
                    await self.admission.extend_running(flow, execution_id, self.lease_ms)
            except (OSError, aioredis.RedisError) as exc:
                log.warning("engine.heartbeat_failed", error=repr(exc))
            await sleep_unless(stop, interval, self.clock)

    async def _sweep_loop(self, stop: asyncio.Event) -> None:
        """Flushes outboxes a crashed engine left behind where no redelivery will come."""
        while not stop.is_set():
            await sleep_unless(stop, OUTBOX_SWEEP_S, self.clock)
            try:
                for execution_id in await self.store.pending_outboxes():
                    await self.store.flush(execution_id, self._send)
            except Exception:
                log.exception("engine.sweep_failed")

    async def _count_loop(self, stop: asyncio.Event) -> None:
        """Adds what this engine's executions reached to the per-second counts every engine
        shares in Redis (the live views' executions per second)."""
        while not stop.is_set():
            await sleep_unless(stop, COUNT_S, self.clock)
            reached, self._reached = self._reached, collections.Counter()
            if not reached:
                continue
            key = self.keys.execution_counts(int(self.clock.now().timestamp()))
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for state, count in reached.items():
                        pipe.hincrby(key, state, count)
                    pipe.expire(key, COUNTS_KEPT_S)
                    await pipe.execute()
            except (OSError, aioredis.RedisError) as exc:
                log.debug("engine.count_failed", error=repr(exc))  # a live view's figure

    async def execution(self, execution_id: str) -> Execution | None:
        return await self.store.load(execution_id)
