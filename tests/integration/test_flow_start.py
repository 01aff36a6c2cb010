"""Flow-start requests from other services: admission, idempotency, refusal with a reason."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from cloudevents.core.bindings.rabbitmq import RabbitMQMessage, from_rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from orchestrator import store, topology
from orchestrator.amqp import REASON_HEADER, publish
from orchestrator.config import Settings
from orchestrator.scheduler.service import Scheduler
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import wait_for_consumers
from schemas import FlowDefinition, FlowStartRequested
from tests.integration.helpers import body, drain, fresh_settings, get_one, purged, status_feed

pytestmark = pytest.mark.asyncio(loop_scope="session")

FLOW = FlowDefinition.model_validate(
    {
        "tenant": "acme",
        "id": "import",
        "overlap": "allow",
        "input": {"source": "sftp", "limit": 10},
        "steps": [{"id": "a", "type": "demo.echo"}],
    }
)


def request(
    key: str = "order-1", tenant: str = "acme", flow_id: str = "import"
) -> FlowStartRequested:
    return FlowStartRequested(
        tenant=tenant, flow_id=flow_id, idempotency_key=key, input={"limit": 99}
    )


@pytest.fixture
async def running_scheduler(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> AsyncIterator[Settings]:
    test_settings = fresh_settings(settings)
    redis = store.connect(test_settings)
    await FlowRegistry(redis, store.Keys(test_settings.redis_prefix)).apply(
        [FLOW], datetime.now(UTC)
    )
    await topology.declare_ingress_queue(channel, "acme")
    ingress = topology.ingress_queue_name("acme")
    for name in (topology.EXECUTIONS_QUEUE, ingress, ingress + topology.DLQ_SUFFIX):
        await purged(channel, name)
    stop = asyncio.Event()
    scheduler = Scheduler(test_settings, redis, amqp)
    task = asyncio.create_task(scheduler.run(stop))
    await wait_for_consumers(amqp, ingress)
    yield test_settings
    stop.set()
    await task
    async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
        await redis.delete(key)
    await redis.aclose()


async def test_valid_request_starts_an_execution_once(
    running_scheduler: Settings, channel: AbstractChannel
) -> None:
    executions = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    feed = await status_feed(channel, "acme.import.flow_start.*")
    await publish(channel, request())
    started = await get_one(executions)
    execution = body(started)
    assert execution["trigger"] == "request"
    assert execution["input"] == {"source": "sftp", "limit": 99}  # request overrides flow input
    assert started.message_id == execution["fire_id"]

    await publish(channel, request())  # the same idempotency key again
    events = [body(await get_one(feed)) for _ in range(2)]  # decided: the second is announced
    assert await drain(executions) == []
    events += [body(m) for m in await drain(feed, settle_s=0.0)]
    assert [e["type"] for e in events] == ["io.orchestrator.flow_start.accepted"] * 2
    assert events[1]["data"]["duplicate"] is True
    assert events[1]["subject"] == execution["execution_id"]

    await publish(channel, request(key="order-2"))  # a new key is a new execution
    assert body(await get_one(executions))["execution_id"] != execution["execution_id"]


async def _assert_dead_lettered(
    channel: AbstractChannel, reason: str, detail_contains: str
) -> dict[str, Any]:
    dlq = await channel.get_queue(topology.ingress_queue_name("acme") + topology.DLQ_SUFFIX)
    dead = await get_one(dlq)
    assert dead.headers[REASON_HEADER] == reason
    assert detail_contains in str(dead.headers["orch-detail"])
    return dict(dead.headers)


async def test_bad_requests_go_to_the_dlq_with_a_reason(
    running_scheduler: Settings, channel: AbstractChannel
) -> None:
    executions = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    feed = await status_feed(channel, "*.*.flow_start.rejected")
    commands = await channel.get_exchange(topology.COMMANDS)

    await publish(channel, request(flow_id="nope"))
    await _assert_dead_lettered(channel, "unknown_flow", "no flow 'nope'")

    await commands.publish(
        aio_pika.Message(b"{oops", message_id="m1"), routing_key=topology.flow_start_key("acme")
    )
    await _assert_dead_lettered(channel, "malformed_json", "")

    wrong_schema = json.dumps({"tenant": "acme", "flow_id": "import", "surprise": True}).encode()
    await commands.publish(
        aio_pika.Message(wrong_schema, message_id="m2"), routing_key=topology.flow_start_key("acme")
    )
    headers = await _assert_dead_lettered(channel, "schema_violation", "surprise")
    assert "idempotency_key" in str(headers["orch-detail"])

    events = [body(m) for m in await drain(feed)]
    assert [e["data"]["reason"] for e in events] == [
        "unknown_flow",
        "malformed_json",
        "schema_violation",
    ]
    assert events[1]["source"] == "/tenants/acme"  # the ingress queue it came from
    # The consumer is still running: a valid request goes through.
    await publish(channel, request(key="after-bad-input"))
    assert body(await get_one(executions))["flow_id"] == "import"


async def test_status_events_read_with_the_cloudevents_rabbitmq_binding(
    running_scheduler: Settings, channel: AbstractChannel
) -> None:
    """Structured content mode (`application/cloudevents+json`), no null attributes, and a
    new id for the duplicate's acceptance: what the SDK's RabbitMQ reader needs."""
    feed = await status_feed(channel, "acme.import.flow_start.*")
    await publish(channel, request(key="ce-1"))
    await publish(channel, request(key="ce-1"))
    messages = [await get_one(feed), await get_one(feed)]
    events = []
    for message in messages:
        assert message.content_type == "application/cloudevents+json"
        assert None not in json.loads(message.body).values()
        raw = RabbitMQMessage(headers={}, content_type=message.content_type, body=message.body)
        events.append(from_rabbitmq(raw, JSONFormat(), CloudEvent))
    flags = [bool(e.get_data().get("duplicate")) for e in events]  # type: ignore[union-attr]
    assert flags == [False, True]
    assert events[0].get_id() != events[1].get_id()
    assert events[0].get_subject() == events[1].get_subject()  # the same execution


async def test_identical_requests_at_once_run_once_and_say_so(
    running_scheduler: Settings, channel: AbstractChannel
) -> None:
    """Twenty copies of one request published together (two consumers could take them at
    the same moment): one execution, one acceptance, nineteen flagged duplicates."""
    executions = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    feed = await status_feed(channel, "acme.import.flow_start.*")
    await asyncio.gather(*(publish(channel, request(key="burst-1")) for _ in range(20)))
    events = []
    for _ in range(20):
        events.append(body(await get_one(feed)))
    assert sum(1 for e in events if not e["data"].get("duplicate")) == 1
    assert len({e["id"] for e in events}) == 20
    # Every copy is decided (announced above): one execution, and no other behind it.
    assert len([await get_one(executions), *await drain(executions)]) == 1
