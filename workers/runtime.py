"""The worker runtime: handlers registered by decorator, run with concurrency, measured,
answered with a StepResult, acked only after the result is confirmed."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import Counter, Histogram

from orchestrator import topology, tracing
from orchestrator.amqp import Outgoing, decode, open_channel, send
from orchestrator.config import Settings
from orchestrator.consumer import Consumer
from orchestrator.outage import sleep_unless
from orchestrator.store import Keys
from orchestrator.store.workers import WorkerEntry, publish_worker
from orchestrator.telemetry import bound_context, get_logger
from schemas import StepResult, StepTask, UsageEvent
from schemas.steps import StepError
from workers.slots import SlotPool
from workers.usage import Metered, UsageReporter, rss_bytes

log = get_logger(__name__)

HEARTBEAT_S = 5.0
# Poison steps (a step that kills its worker: os._exit, OOM, a segfault in a native
# library). A worker that dies takes every step it held down with it, so a redelivered step
# is only a suspect: it runs *alone* on its worker, behind a marker in Redis. If that worker
# dies too, the next delivery finds the marker and reports the attempt failed with reason
# `poison` instead of running it a third time; the engine retries or compensates as for any
# failure. One poison attempt costs at most two worker crashes; an innocent step that shared
# a worker with one runs again (alone, once) and is not blamed.
POISON_CRASHES = 2
# Graceful give-backs (drain on SIGTERM) are remembered this long, so they are not counted as
# crashes; longer than any redelivery takes.
RETURNED_TTL_S = 3600
# A worker missing for this many heartbeats drops out of `orchestrator workers list`.
HEARTBEAT_TTL_S = 3 * HEARTBEAT_S

ATTEMPTS = Counter(
    "orchestrator_step_attempts_total",
    "Step attempts by type and outcome",
    ["step_type", "outcome"],
)
DURATION = Histogram("orchestrator_step_seconds", "Wall time of step attempts", ["step_type"])


class StepFailed(Exception):
    """Raise from a handler to fail the attempt with a chosen type and retryability."""

    def __init__(
        self, message: str, *, retryable: bool = True, error_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.error_type = error_type or type(self).__name__


@dataclass
class StepContext:
    task: StepTask
    worker_id: str
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def input(self) -> dict[str, Any]:
        return self.task.input

    @property
    def idempotency_key(self) -> str:
        """Stable across redeliveries of the same attempt: use it for side effects."""
        return self.task.task_id


Handler = Callable[[StepContext], Awaitable[dict[str, Any] | None] | dict[str, Any] | None]


@dataclass
class StepRegistry:
    handlers: dict[str, Handler] = field(default_factory=dict)

    def step(self, name: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            if name in self.handlers and self.handlers[name] is not handler:
                raise ValueError(f"step type {name!r} is registered twice")
            self.handlers[name] = handler
            return handler

        return register


registry = StepRegistry()
step = registry.step


@dataclass
class Attempt:
    output: dict[str, Any] | None = None
    error: StepError | None = None
    outcome: str = "succeeded"
    cpu_s: float = 0.0
    wall_s: float = 0.0
    memory: int = 0


class Worker:
    """Consumes `work.<pool>`; use as `async with Worker(...) as w: await w.run(stop)`."""

    def __init__(
        self,
        settings: Settings,
        connection: AbstractRobustConnection,
        redis: aioredis.Redis,
        steps: StepRegistry = registry,
        *,
        pool: str = topology.DEFAULT_POOL,
        concurrency: int = 8,
        worker_id: str | None = None,
        grace_s: float = 30.0,
        usage: UsageReporter | None = None,
        queues: list[str] | None = None,
        express_slots: int = 2,
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.redis = redis
        self.steps = steps
        self.pool = pool
        self.concurrency = concurrency
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.grace_s = grace_s
        # Consume these queues instead of work.<pool>: only for comparisons (bench/fairness.py
        # runs workers straight on the tenant queues, RabbitMQ round-robin style).
        self.queues = queues
        self.usage = usage or UsageReporter(settings.kafka_servers, settings.usage_topic)
        # Slots only the express lane may use, beyond `concurrency` (not advertised to the
        # dispatcher): a tenant with nothing running starts at once, never behind a busy
        # tenant's steps, however long those run.
        self.express_slots = express_slots
        self.threads = ThreadPoolExecutor(
            max_workers=concurrency + express_slots, thread_name_prefix="step"
        )
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self._slots = SlotPool(concurrency, express_slots)
        self._channel: AbstractChannel | None = None
        keys = Keys(settings.redis_prefix)
        self._keys = keys
        self._registry_key = keys.worker(self.worker_id)
        self._registry_index = keys.workers

    async def __aenter__(self) -> Worker:
        # Prefetch is per consumer (quorum queues refuse a channel-wide limit); with several
        # queues each gets its part, and the slots semaphore keeps the true concurrency.
        prefetch = -(-self.concurrency // len(self.queues)) if self.queues else self.concurrency
        self._channel = await open_channel(self.connection, prefetch=prefetch)
        await topology.apply(self._channel, topology.build_topology((self.pool,)), role="worker")
        await self.usage.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.usage.stop()
        self.threads.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            await self.redis.delete(self._registry_key)
            await self.redis.srem(self._registry_index, self.worker_id)

    @property
    def channel(self) -> AbstractChannel:
        assert self._channel is not None, "use the worker as an async context manager"
        return self._channel

    async def run(self, stop: asyncio.Event) -> None:
        names = self.queues or [topology.work_queue_name(self.pool)]
        consumers = []
        for name in names:
            consumer = self._consumer(name, stop, express=False)
            await consumer.start(self.channel)
            consumers.append(consumer)
        if self.queues is None:
            # The express lane, on its own channel: its steps wait here for the next free slot,
            # ahead of whatever the normal lane has queued behind the running ones. The
            # dispatcher sends a tenant at most one express step at a time.
            express_channel = await open_channel(self.connection, prefetch=self.concurrency)
            express = self._consumer(topology.express_queue_name(self.pool), stop, express=True)
            await express.start(express_channel)
            consumers.append(express)
        heartbeat = asyncio.create_task(self._heartbeat_loop(stop))
        log.info(
            "worker.started",
            worker=self.worker_id,
            pool=self.pool,
            steps=sorted(self.steps.handlers),
        )
        await stop.wait()
        # Graceful drain: take no more work, let in-flight attempts finish within the grace
        # period, give back (requeue) whatever is still running after it.
        for consumer in consumers:
            await consumer.cancel()
        if self.in_flight:
            log.info("worker.draining", in_flight=len(self.in_flight))
            _, pending = await asyncio.wait(set(self.in_flight.values()), timeout=self.grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        log.info("worker.stopped", worker=self.worker_id)

    def _consumer(self, queue: str, stop: asyncio.Event, *, express: bool) -> Consumer[StepTask]:
        async def handle(task: StepTask, incoming: AbstractIncomingMessage) -> None:
            await self._run_in_slot(task, incoming, express=express)

        return Consumer(
            queue,
            lambda incoming: decode(incoming, StepTask),
            handle,
            stop=stop,
            retry_limit_s=self.settings.outage_limit_s,
        )

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        """The worker registry (service discovery): one key per worker, expiring if it dies."""
        while not stop.is_set():
            entry = WorkerEntry(
                id=self.worker_id,
                host=socket.gethostname(),
                pool=self.pool,
                steps=sorted(self.steps.handlers),
                concurrency=self.concurrency,
                cpus=1,
                threads=self.concurrency + self.express_slots,
                in_flight=len(self.in_flight),
                last_heartbeat=datetime.now(UTC),
            )
            try:
                await publish_worker(self.redis, self._keys, entry, int(HEARTBEAT_TTL_S))
            except (OSError, aioredis.RedisError) as exc:
                log.warning("worker.heartbeat_failed", error=repr(exc))
            await sleep_unless(stop, HEARTBEAT_S)

    async def _run_in_slot(
        self, task: StepTask, incoming: AbstractIncomingMessage, *, express: bool
    ) -> None:
        current = asyncio.current_task()
        if current is not None:
            self.in_flight[task.task_id] = current
        try:
            crashes, ran_alone = await self._suspicion(task, incoming)
            if crashes and ran_alone:
                await self._handle(task, incoming, poison=crashes)
            elif crashes:
                async with self._slots.alone():
                    await self.redis.set(self._keys.alone(task.task_id), "1", ex=RETURNED_TTL_S)
                    try:
                        await self._handle(task, incoming)
                    finally:
                        # This process lives: whatever went wrong (a result publish that failed
                        # and is retried), it was no crash. Only a dead worker leaves the marker.
                        with contextlib.suppress(Exception):
                            await self.redis.delete(self._keys.alone(task.task_id))
            else:
                async with self._slots.slot(express=express):
                    await self._handle(task, incoming)
        except asyncio.CancelledError:
            # Given back during drain: not a crash, so it does not count towards `poison`.
            with contextlib.suppress(Exception):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.incr(self._keys.returned(task.task_id))
                    pipe.expire(self._keys.returned(task.task_id), RETURNED_TTL_S)
                    pipe.delete(self._keys.alone(task.task_id))
                    await asyncio.wait_for(pipe.execute(), 1.0)
            raise
        finally:
            self.in_flight.pop(task.task_id, None)

    async def _suspicion(
        self, task: StepTask, incoming: AbstractIncomingMessage
    ) -> tuple[int, bool]:
        """(deliveries of this attempt that ended without a result, whether one of them ran
        alone). Deliveries: the broker's count (quorum queues) minus the graceful give-backs.
        Costs nothing on a first delivery."""
        count = (incoming.headers or {}).get("x-delivery-count")
        if not incoming.redelivered or not isinstance(count, int) or count < 1:
            return 0, False
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self._keys.returned(task.task_id))
            pipe.exists(self._keys.alone(task.task_id))
            returned, alone = await pipe.execute()
        return max(0, count - int(returned or 0)), bool(alone)

    async def _handle(
        self, task: StepTask, incoming: AbstractIncomingMessage, *, poison: int = 0
    ) -> None:
        with bound_context(tenant=task.tenant, flow=task.flow_id, execution=task.execution_id):
            started_at = datetime.now(UTC)
            context = StepContext(task, self.worker_id, bytes_in=len(incoming.body))
            if poison:
                crashes = poison
                log.warning("worker.poison_step", task_id=task.task_id, crashes=crashes)
                attempt = Attempt(
                    outcome="failed",
                    error=StepError(
                        type="PoisonStep",
                        message=f"the attempt ended its worker {crashes} times without a result",
                        retryable=True,
                        reason="poison",
                    ),
                )
            else:
                with tracing.span(
                    f"step {task.step_type}",
                    attributes={
                        "orchestrator.execution": task.execution_id,
                        "orchestrator.step": task.step_id,
                        "orchestrator.attempt": task.attempt,
                    },
                ):
                    attempt = await self._run(context)
            result = StepResult(
                task_id=task.task_id,
                execution_id=task.execution_id,
                tenant=task.tenant,
                flow_id=task.flow_id,
                step_id=task.step_id,
                kind=task.kind,
                attempt=task.attempt,
                outcome="succeeded" if attempt.error is None else "failed",
                output=attempt.output,
                error=attempt.error,
                worker_id=self.worker_id,
                started_at=started_at,
                cpu_s=round(attempt.cpu_s, 6),
            )
            outgoing = Outgoing.of(result)
            # The consumer acks only after this returns: the result is safe with the broker.
            await send(self.channel, outgoing)
            ATTEMPTS.labels(task.step_type, attempt.outcome).inc()
            DURATION.labels(task.step_type).observe(attempt.wall_s)
            self.usage.report(
                UsageEvent(
                    event_id=task.task_id,
                    tenant=task.tenant,
                    flow_id=task.flow_id,
                    execution_id=task.execution_id,
                    step_id=task.step_id,
                    step_type=task.step_type,
                    attempt=task.attempt,
                    worker_id=self.worker_id,
                    pool=self.pool,
                    outcome=attempt.outcome,
                    wall_s=attempt.wall_s,
                    cpu_s=attempt.cpu_s,
                    peak_memory_bytes=attempt.memory,
                    bytes_in=context.bytes_in,
                    bytes_out=context.bytes_out + len(outgoing.body),
                    started_at=started_at,
                    finished_at=result.finished_at,
                )
            )

    async def _run(self, context: StepContext) -> Attempt:
        task = context.task
        handler = self.steps.handlers.get(task.step_type)
        attempt = Attempt()
        if handler is None:
            attempt.error = StepError(
                type="UnknownStepType",
                message=f"no handler for step type {task.step_type!r} in pool {self.pool!r}",
                retryable=False,
                reason="unknown_step_type",
            )
            attempt.outcome = "failed"
            return attempt
        rss_before = rss_bytes()
        started = time.perf_counter()
        try:
            if inspect.iscoroutinefunction(handler):
                metered = Metered(handler(context))
                try:
                    output = await asyncio.wait_for(_await(metered), task.timeout_s)
                finally:
                    attempt.cpu_s = metered.cpu_s
            else:
                output, attempt.cpu_s = await asyncio.wait_for(
                    asyncio.get_running_loop().run_in_executor(
                        self.threads, _call_sync, handler, context
                    ),
                    task.timeout_s,
                )
            attempt.output = output if isinstance(output, dict) else {"result": output}
        except TimeoutError:
            attempt.outcome = "timeout"
            attempt.error = StepError(
                type="StepTimeout",
                message=f"the step ran over {task.timeout_s}s",
                retryable=True,
                reason="timeout",
            )
        except StepFailed as exc:
            attempt.outcome = "failed"
            attempt.error = StepError(
                type=exc.error_type, message=str(exc)[:1000], retryable=exc.retryable
            )
        except Exception as exc:
            attempt.outcome = "failed"
            attempt.error = StepError(
                type=type(exc).__name__, message=str(exc)[:1000], retryable=True
            )
        attempt.wall_s = time.perf_counter() - started
        attempt.memory = max(0, rss_bytes() - rss_before)
        return attempt


async def _await(metered: Metered) -> Any:
    return await metered


def _call_sync(handler: Handler, context: StepContext) -> tuple[Any, float]:
    started = time.thread_time()
    output = handler(context)
    return output, time.thread_time() - started
