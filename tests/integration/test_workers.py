"""Workers: usage measured and shipped to Kafka, the registry, graceful drain, Kafka outages."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiokafka import AIOKafkaConsumer

from orchestrator import store, topology
from orchestrator.config import Settings
from orchestrator.dispatcher.service import Dispatcher
from orchestrator.engine.service import Engine
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import process_env, spawn, stop_all, wait_for_pipeline
from schemas import FlowDefinition, UsageEvent
from tests.integration.helpers import (
    body,
    fresh_settings,
    get_one,
    request_execution,
    reset_queues,
    status_feed,
)
from workers import Worker
from workers import builtin as _builtin  # noqa: F401 - registers demo.* steps
from workers.usage import UsageReporter

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _setup(settings: Settings, channel: AbstractChannel, steps: list[dict[str, Any]]) -> Any:
    await reset_queues(channel)
    redis = store.connect(settings)
    definition = FlowDefinition.model_validate(
        {"tenant": "acme", "id": "w", "overlap": "allow", "steps": steps}
    )
    await FlowRegistry(redis, store.Keys(settings.redis_prefix)).apply(
        [definition], datetime.now(UTC)
    )
    return redis


async def _wait_terminal(feed: Any, *execution_ids: str) -> set[str]:
    """The terminal states the given executions reached (reads the feed until all ended)."""
    states: dict[str, str] = {}
    while set(states) != set(execution_ids):
        event = body(await get_one(feed, wait_s=60))
        state = event["type"].rsplit(".", 1)[1]
        if event["subject"] in execution_ids and state != "started":
            states[event["subject"]] = state
    return set(states.values())


async def test_usage_of_each_attempt_reaches_kafka(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    test_settings = fresh_settings(settings, usage_topic=f"test.usage.{uuid.uuid4().hex[:8]}")
    redis = await _setup(
        test_settings, channel, [{"id": "burn", "type": "demo.cpu", "input": {"ms": 150}}]
    )
    feed = await channel.declare_queue(exclusive=True)
    await feed.bind(topology.STATUS, routing_key="acme.w.execution.*")
    stop = asyncio.Event()
    async with Worker(test_settings, amqp, redis, concurrency=2) as worker:
        tasks = [
            asyncio.create_task(Engine(test_settings, redis, amqp).run(stop)),
            asyncio.create_task(worker.run(stop)),
            asyncio.create_task(Dispatcher(test_settings, redis, amqp).run(stop)),
        ]
        execution_id = await request_execution(channel, "w")
        assert await _wait_terminal(feed, execution_id) == {"succeeded"}
        stop.set()
        await asyncio.gather(*tasks)
    consumer = AIOKafkaConsumer(
        test_settings.usage_topic,
        bootstrap_servers=test_settings.kafka_servers,
        auto_offset_reset="earliest",
        group_id=f"test-{uuid.uuid4().hex[:6]}",
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 30)
    finally:
        await consumer.stop()
        await redis.aclose()
    usage = UsageEvent.from_bytes(record.value)
    assert record.key == b"acme"
    assert usage.execution_id == execution_id
    assert usage.step_type == "demo.cpu"
    assert usage.outcome == "succeeded"
    assert usage.cpu_s >= 0.15  # the handler burns 150 ms of its own thread's CPU
    assert usage.wall_s >= usage.cpu_s * 0.9
    assert usage.bytes_in > 0
    assert usage.bytes_out > 0


async def test_step_completes_while_kafka_is_unreachable(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    test_settings = fresh_settings(settings)
    redis = await _setup(test_settings, channel, [{"id": "a", "type": "demo.echo"}])
    feed = await channel.declare_queue(exclusive=True)
    await feed.bind(topology.STATUS, routing_key="acme.w.execution.*")
    reporter = UsageReporter(["127.0.0.1:1"], "orchestrator.usage", buffer_limit=3)
    stop = asyncio.Event()
    async with Worker(test_settings, amqp, redis, concurrency=2, usage=reporter) as worker:
        tasks = [
            asyncio.create_task(Engine(test_settings, redis, amqp).run(stop)),
            asyncio.create_task(worker.run(stop)),
            asyncio.create_task(Dispatcher(test_settings, redis, amqp).run(stop)),
        ]
        try:
            ids = [await request_execution(channel, "w") for _ in range(5)]
            # Usage could not be sent, the steps ran anyway.
            assert await _wait_terminal(feed, *ids) == {"succeeded"}
            assert len(reporter.buffer) == 3  # kept for a retry, bounded: oldest dropped
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    await redis.aclose()


async def test_registry_lists_workers_and_sigterm_drains(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    test_settings = fresh_settings(settings)
    redis = await _setup(
        test_settings, channel, [{"id": "a", "type": "demo.sleep", "input": {"ms": 2500}}]
    )
    feed = await channel.declare_queue(exclusive=True)
    await feed.bind(topology.STATUS, routing_key="acme.w.execution.*")
    started = await status_feed(channel, "acme.w.step.started")
    engine = spawn(test_settings, "engine")
    dispatcher = spawn(test_settings, "dispatcher")
    worker = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "worker", "--concurrency", "3", "--grace", "20"],
        env=process_env(test_settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        await wait_for_pipeline(test_settings, amqp)
        listed = subprocess.run(
            [sys.executable, "-m", "orchestrator", "workers", "list"],
            env={**process_env(test_settings), "COLUMNS": "250"},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert "demo.sleep" in listed.stdout
        assert "default" in listed.stdout
        execution_id = await request_execution(channel, "w")
        await get_one(started)  # the 2.5 s step is running
        worker.send_signal(signal.SIGTERM)
        assert await _wait_terminal(feed, execution_id) == {"succeeded"}
        assert worker.wait(timeout=30) == 0
        keys = await redis.keys(f"{test_settings.redis_prefix}worker:*")
        assert keys == []  # it left the registry
    finally:
        stop_all([engine, dispatcher, worker])
        await redis.aclose()
