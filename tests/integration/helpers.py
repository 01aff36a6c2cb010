"""Small tools the integration tests share: reading queues, fresh state, status capture."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from orchestrator import topology
from orchestrator.amqp import publish
from orchestrator.config import Settings
from schemas import ExecutionRequested


def fresh_settings(settings: Settings, **overrides: Any) -> Settings:
    """The session's brokers with a Redis prefix of this test's own."""
    prefix = f"{settings.redis_prefix}{uuid.uuid4().hex[:8]}:"
    return settings.model_copy(update={"redis_prefix": prefix, **overrides})


async def get_one(queue: AbstractQueue, wait_s: float = 10.0) -> AbstractIncomingMessage:
    """The next message of a queue (acked), polling with basic.get."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        if loop.time() > deadline:
            raise TimeoutError(f"nothing arrived in {queue.name} within {wait_s}s")
        await asyncio.sleep(0.02)


async def drain(queue: AbstractQueue, settle_s: float = 0.3) -> list[AbstractIncomingMessage]:
    """Everything in the queue now (acked), after waiting `settle_s` for stragglers."""
    await asyncio.sleep(settle_s)
    out = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        out.append(message)
    return out


async def purged(channel: AbstractChannel, name: str) -> AbstractQueue:
    queue = await channel.get_queue(name)
    await queue.purge()
    return queue


async def status_feed(channel: AbstractChannel, pattern: str = "#") -> AbstractQueue:
    """An exclusive queue bound to the status exchange: what a subscriber would see."""
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(topology.STATUS, routing_key=pattern)
    return queue


async def depths(channel: AbstractChannel, names: list[str]) -> dict[str, int]:
    """Messages ready in each queue (passive declares): where steps a test misses are."""
    counts = {}
    for name in names:
        declared = await channel.declare_queue(name, passive=True)
        counts[name] = declared.declaration_result.message_count or 0
    return counts


def body(message: AbstractIncomingMessage) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(message.body)
    return decoded


async def reset_queues(channel: AbstractChannel, tenant: str = "acme") -> None:
    """Empties every queue a step passes through, so a test starts from nothing."""
    await topology.declare_tenant_queue(channel, tenant)
    await topology.declare_ingress_queue(channel, tenant)
    for name in (
        topology.ingress_queue_name(tenant),
        topology.EXECUTIONS_QUEUE,
        topology.RESULTS_QUEUE,
        topology.COMPLETIONS_QUEUE,
        topology.work_queue_name(topology.DEFAULT_POOL),
        topology.tenant_queue_name(tenant),
    ):
        await purged(channel, name)


async def request_execution(channel: AbstractChannel, flow_id: str, tenant: str = "acme") -> str:
    """Asks the engine for an execution directly (as the scheduler would after admission)."""
    execution_id = str(uuid.uuid4())
    await publish(
        channel,
        ExecutionRequested(
            execution_id=execution_id,
            fire_id=f"{tenant}/{flow_id}#{execution_id}",
            tenant=tenant,
            flow_id=flow_id,
            trigger="manual",
        ),
    )
    return execution_id
