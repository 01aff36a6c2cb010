"""The topology against a real RabbitMQ: declared as designed, routes deliver, DLQs catch."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import DeliveryError

from orchestrator import topology
from orchestrator.accounts import Management
from orchestrator.amqp import (
    DETAIL_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    InvalidMessage,
    dead_letter,
    decode,
    publish,
)
from orchestrator.testing import wait_until
from schemas import MESSAGES, ExecutionRequested, StatusEvent
from tests.factories import sample

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _get(queue: AbstractQueue, wait_s: float = 10.0) -> AbstractIncomingMessage:
    """The next message of a queue, polling with basic.get (no consumer left behind)."""
    message: AbstractIncomingMessage = await wait_until(
        lambda: queue.get(no_ack=False, fail=False),
        timeout_s=wait_s,
        what=f"a message in {queue.name}",
    )
    return message


async def _drain(channel: AbstractChannel, name: str) -> AbstractQueue:
    queue = await channel.get_queue(name)
    await queue.purge()
    return queue


async def test_topology_applies_twice_without_error(
    channel: AbstractChannel, management: Management, vhost: str
) -> None:
    first = await topology.apply(channel)
    second = await topology.apply(channel)
    assert first == second
    for queue in topology.TOPOLOGY.queues:
        declared = management.queue(vhost, queue.name)
        assert declared["durable"] is True
        assert declared["arguments"] == queue.arguments(), queue.name


async def test_each_binding_delivers_its_message_with_confirms(channel: AbstractChannel) -> None:
    for binding in topology.TOPOLOGY.bindings:
        queue = await _drain(channel, binding.queue)
        if binding.exchange == topology.DEAD_LETTERS:
            exchange = await channel.get_exchange(binding.exchange)
            await exchange.publish(
                aio_pika.Message(b"{}", message_id="dl-probe"), routing_key=binding.routing_key
            )
            assert (await _get(queue)).message_id == "dl-probe"
            continue
        for message_type in binding.messages:
            message = sample(message_type)
            if binding.exchange == topology.WORK:  # the dispatcher's hop, not the engine's
                await publish(
                    channel, message, exchange=binding.exchange, routing_key=binding.routing_key
                )
            else:
                await publish(channel, message)  # returns only after the broker's confirm
            received = await _get(queue)
            await received.ack()
            assert received.message_id == message.message_id()
            assert received.type == message_type
            assert received.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert decode(received, MESSAGES[message_type]) == message


async def test_unroutable_mandatory_publish_raises(channel: AbstractChannel) -> None:
    message = sample(ExecutionRequested.message_type)
    with pytest.raises(DeliveryError):
        await publish(channel, message, routing_key="nobody.listens")


async def test_status_events_reach_pattern_subscribers(channel: AbstractChannel) -> None:
    failures = await channel.declare_queue(exclusive=True)
    await failures.bind(topology.STATUS, routing_key="*.*.execution.failed")
    tenant_feed = await channel.declare_queue(exclusive=True)
    await tenant_feed.bind(topology.STATUS, routing_key="acme.#")
    data = {"failure": {"reason": "test", "detail": "a test event"}}
    failed = StatusEvent.build(
        "execution",
        "failed",
        event_id="e:1",
        tenant="acme",
        flow="f",
        subject="e",
        sequence=1,
        data=data,
    )
    other = StatusEvent.build(
        "execution",
        "failed",
        event_id="e:2",
        tenant="globex",
        flow="f",
        subject="e",
        sequence=1,
        data=data,
    )
    await publish(channel, failed)
    await publish(channel, other)
    got = {(await _get(failures)).message_id, (await _get(failures)).message_id}
    assert got == {"e:1", "e:2"}
    assert (await _get(tenant_feed)).message_id == "e:1"
    assert await tenant_feed.get(fail=False) is None
    # Nobody subscribes to step events: a non-mandatory publish still succeeds.
    started = {
        "step_id": "a",
        "attempt": 1,
        "kind": "action",
        "worker_id": "w",
        "started_at": "2026-12-02T00:00:00+00:00",
    }
    await publish(
        channel, StatusEvent.build("step", "started", event_id="s:1", tenant="acme", data=started)
    )


async def test_invalid_message_lands_in_dlq_with_reason(channel: AbstractChannel) -> None:
    queue = await _drain(channel, topology.EXECUTIONS_QUEUE)
    dlq = await _drain(channel, topology.TOPOLOGY.queue(topology.EXECUTIONS_QUEUE).dlq)
    commands = await channel.get_exchange(topology.COMMANDS)
    bad_bodies = {
        "malformed_json": b"{not json",
        "schema_violation": json.dumps({"tenant": "acme", "surprise": 1}).encode(),
    }
    for expected_reason, body in bad_bodies.items():
        await commands.publish(
            aio_pika.Message(body, message_id=f"bad-{expected_reason}"),
            routing_key="execution.requested",
        )
        incoming = await _get(queue)
        with pytest.raises(InvalidMessage) as info:
            decode(incoming, ExecutionRequested)
        assert info.value.reason == expected_reason
        await dead_letter(channel, incoming, queue.name, info.value.reason, info.value.detail)

        dead = await _get(dlq)
        await dead.ack()
        assert dead.message_id == f"bad-{expected_reason}"
        assert dead.body == body
        assert dead.headers[REASON_HEADER] == expected_reason
        assert dead.headers[QUEUE_HEADER] == topology.EXECUTIONS_QUEUE
        assert dead.headers[DETAIL_HEADER]
    assert await queue.get(fail=False) is None  # acked: not redelivered


async def test_poison_message_is_dead_lettered_by_the_broker(channel: AbstractChannel) -> None:
    """A message whose consumer keeps failing (nack + requeue) stops at the delivery limit."""
    queue = await _drain(channel, topology.RESULTS_QUEUE)
    dlq = await _drain(channel, topology.TOPOLOGY.queue(topology.RESULTS_QUEUE).dlq)
    commands = await channel.get_exchange(topology.COMMANDS)
    await commands.publish(aio_pika.Message(b"poison", message_id="poison-1"), "step.result")
    deliveries = 0
    while True:
        incoming = await queue.get(no_ack=False, fail=False)
        if incoming is None:
            dead = await dlq.get(no_ack=False, fail=False)
            if dead is not None:
                break
            await asyncio.sleep(0.05)  # poll interval: neither queue has it yet
            continue
        deliveries += 1
        await incoming.nack(requeue=True)
    await dead.ack()
    assert dead.message_id == "poison-1"
    assert deliveries == topology.DELIVERY_LIMIT + 1
    death = dead.headers["x-death"][0]
    assert death["queue"] == topology.RESULTS_QUEUE
    assert death["reason"] == "delivery_limit"


async def test_rejected_message_is_dead_lettered_by_the_broker(channel: AbstractChannel) -> None:
    await topology.declare_ingress_queue(channel, "acme")
    queue = await _drain(channel, topology.ingress_queue_name("acme"))
    dlq = await _drain(channel, topology.ingress_queue("acme").dlq)
    commands = await channel.get_exchange(topology.COMMANDS)
    await commands.publish(
        aio_pika.Message(b"x", message_id="reject-1"), topology.flow_start_key("acme")
    )
    incoming = await _get(queue)
    await incoming.reject(requeue=False)
    dead = await _get(dlq)
    await dead.ack()
    assert dead.headers["x-death"][0]["reason"] == "rejected"


async def test_tenant_queue_is_declared_on_demand_and_bounded(
    channel: AbstractChannel, management: Management, vhost: str
) -> None:
    await topology.declare_tenant_queue(channel, "acme")
    await topology.declare_tenant_queue(channel, "acme")  # idempotent
    declared = management.queue(vhost, "fq.acme")
    assert declared["arguments"]["x-max-length"] == topology.TENANT_QUEUE_MAX_LENGTH
    steps = await channel.get_exchange(topology.STEPS)
    task = sample("step.task")
    await steps.publish(aio_pika.Message(task.to_bytes(), message_id="t1"), routing_key="acme")
    queue = await channel.get_queue("fq.acme")
    assert (await _get(queue)).message_id == "t1"
