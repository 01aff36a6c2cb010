"""Kafka and Redis are real and reachable: a usage event round trip, a faust agent, a Redis key."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from orchestrator.config import Settings
from schemas import UsageEvent
from tests.factories import sample

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_usage_event_round_trip_through_kafka(settings: Settings) -> None:
    topic = f"test.usage.{uuid.uuid4().hex[:8]}"
    event = sample(UsageEvent.message_type)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_servers, acks="all")
    await producer.start()
    try:
        metadata = await producer.send_and_wait(topic, event.to_bytes(), key=b"acme")
    finally:
        await producer.stop()
    assert metadata.offset >= 0

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_servers,
        auto_offset_reset="earliest",
        group_id=f"test-{uuid.uuid4().hex[:8]}",
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()
    assert record.key == b"acme"
    assert UsageEvent.from_bytes(record.value) == event


async def test_faust_agent_consumes_a_real_topic(settings: Settings, tmp_path: Any) -> None:
    import faust

    suffix = uuid.uuid4().hex[:8]
    app = faust.App(
        f"test-faust-{suffix}",
        broker=[f"kafka://{server}" for server in settings.kafka_servers],
        store="memory://",
        web_enabled=False,
        topic_replication_factor=1,
        topic_partitions=1,
        datadir=str(tmp_path),
        consumer_auto_offset_reset="earliest",
    )
    name = f"test.faust.{suffix}"
    # A consumer that subscribes before its topic exists waits for a metadata refresh (minutes)
    # before it notices the topic; create it first, as the deployment does for real topics.
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    topic = app.topic(name, value_serializer="raw")
    received: list[UsageEvent] = []
    done = asyncio.Event()

    @app.agent(topic)
    async def collect(stream: Any) -> None:
        async for value in stream:
            received.append(UsageEvent.from_bytes(value))
            if len(received) == 3:
                done.set()

    await app.start()
    try:
        for _ in range(3):
            await topic.send(key=b"acme", value=sample(UsageEvent.message_type).to_bytes())
        await asyncio.wait_for(done.wait(), timeout=60)
    finally:
        await app.stop()
    assert len(received) == 3
    assert all(event.tenant == "acme" for event in received)


async def test_redis_keeps_values_under_the_session_prefix(
    settings: Settings, redis_client: Any
) -> None:
    key = f"{settings.redis_prefix}probe"
    assert await redis_client.set(key, "1", nx=True, ex=60)
    assert await redis_client.get(key) == "1"
    assert not await redis_client.set(key, "2", nx=True)  # the claim primitive leases rely on
