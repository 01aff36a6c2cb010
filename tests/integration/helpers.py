"""Small tools the integration tests share: reading queues, fresh state, status capture."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import uuid
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from orchestrator import topology
from orchestrator.accounts import Management, vhost_of
from orchestrator.amqp import publish
from orchestrator.config import Settings
from orchestrator.testing import wait_until
from schemas import ExecutionRequested


def fresh_settings(settings: Settings, **overrides: Any) -> Settings:
    """The session's brokers with a Redis prefix of this test's own."""
    prefix = f"{settings.redis_prefix}{uuid.uuid4().hex[:8]}:"
    return settings.model_copy(update={"redis_prefix": prefix, **overrides})


async def get_one(queue: AbstractQueue, wait_s: float = 10.0) -> AbstractIncomingMessage:
    """The next message of a queue (acked), polling with basic.get."""
    message: AbstractIncomingMessage = await wait_until(
        lambda: queue.get(no_ack=True, fail=False),
        timeout_s=wait_s,
        every_s=0.02,
        what=f"a message in {queue.name}",
    )
    return message


async def drain(queue: AbstractQueue, settle_s: float = 0.3) -> list[AbstractIncomingMessage]:
    """Everything in the queue now (acked), after waiting `settle_s` for stragglers (the
    caller's poll interval, or the quiet period it asserts something in: its choice)."""
    await asyncio.sleep(settle_s)
    out = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        out.append(message)
    return out


async def purged(channel: AbstractChannel, name: str) -> AbstractQueue:
    queue = await channel.get_queue(name)
    await queue.purge()
    return queue


def status_bindings(management: Management, settings: Settings, pattern: str) -> int:
    """How many queues are bound to the status exchange with `pattern`: subscribers to it
    (the management API reads bindings from the broker's metadata, not from sampled stats)."""
    vhost = urllib.parse.quote(vhost_of(str(settings.rabbitmq_url)), safe="")
    found = management.call("GET", f"/exchanges/{vhost}/{topology.STATUS}/bindings/source")
    return sum(1 for binding in found if binding.get("routing_key") == pattern)


async def wait_for_subscriber(
    management: Management, settings: Settings, pattern: str, before: int
) -> None:
    """Until more than `before` queues are bound to the status exchange with `pattern`: a
    subscription started meanwhile receives what is published from now on."""

    async def subscribed() -> bool:
        return await asyncio.to_thread(status_bindings, management, settings, pattern) > before

    await wait_until(subscribed, timeout_s=30, what=f"a new subscriber to {pattern}")


def connections_named(management: Management, settings: Settings, name: str) -> int:
    """How many connections to the session's virtual host carry `name` (an orchestrator
    process names its connection `orchestrator-<role>`)."""
    vhost = urllib.parse.quote(vhost_of(str(settings.rabbitmq_url)), safe="")
    found = management.call("GET", f"/vhosts/{vhost}/connections")
    return sum(
        1
        for connection in found
        if (connection.get("client_properties") or {}).get("connection_name") == name
    )


async def wait_for_connections(
    management: Management, settings: Settings, name: str, count: int
) -> None:
    """Until `count` processes have connected to RabbitMQ as `name`."""

    async def connected() -> bool:
        return await asyncio.to_thread(connections_named, management, settings, name) >= count

    await wait_until(connected, timeout_s=30, what=f"{count} connections named {name}")


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


def terminal_states(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Terminal states per execution, every distinct event counted (a second terminal state
    shows as two). A copy of the same event (same CloudEvents id) is not a second state: an
    outbox whose trim Redis did not answer is published again, and subscribers deduplicate
    on the id (docs/reliability.md)."""
    ended: dict[str, list[str]] = {}
    seen: set[str] = set()
    for event in events:
        kind = event["type"].removeprefix("io.orchestrator.")
        terminal = kind in ("execution.succeeded", "execution.failed", "execution.compensated")
        if terminal and event["id"] not in seen:
            seen.add(event["id"])
            ended.setdefault(event["subject"], []).append(kind.split(".")[1])
    return ended


# Two echo steps, b after a: the smallest flow with a step that depends on another's result.
ECHO_CHAIN: dict[str, Any] = {
    "tenant": "acme",
    "id": "chain",
    "overlap": "allow",
    "steps": [
        {"id": "a", "type": "demo.echo"},
        {"id": "b", "type": "demo.echo", "depends_on": ["a"]},
    ],
}


async def register_flows(redis: Any, settings: Settings, *docs: dict[str, Any]) -> None:
    """Validates flow documents and stores them, as `orchestrator flows apply` would."""
    from orchestrator import store
    from orchestrator.store.flows import FlowRegistry
    from schemas import FlowDefinition

    flows = [FlowDefinition.model_validate(doc) for doc in docs]
    await FlowRegistry(redis, store.Keys(settings.redis_prefix)).apply(flows, datetime.now(UTC))


async def forget_redis(redis: Any, settings: Settings) -> None:
    """Deletes every key of the test's prefix and closes the client."""
    async for key in redis.scan_iter(match=f"{settings.redis_prefix}*"):
        await redis.delete(key)
    await redis.aclose()
