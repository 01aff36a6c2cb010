"""The engine and workers against real RabbitMQ, Redis and Kafka, in this process."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from orchestrator import store, topology
from orchestrator.amqp import REASON_HEADER, publish
from orchestrator.config import Settings
from orchestrator.dispatcher.service import Dispatcher
from orchestrator.engine.service import Engine
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import wait_for_pipeline
from schemas import ExecutionRequested, FlowDefinition, StepResult
from tests.integration.helpers import body, fresh_settings, get_one, purged, reset_queues
from workers import Worker
from workers import builtin as _builtin  # noqa: F401 - registers demo.* steps

pytestmark = pytest.mark.asyncio(loop_scope="session")

TERMINAL = {"succeeded", "failed", "compensated"}


@dataclass
class System:
    settings: Settings
    channel: AbstractChannel
    registry: FlowRegistry
    feed: AbstractQueue
    engine: Engine

    async def run(self, doc: dict[str, Any], input: dict[str, Any] | None = None) -> str:
        definition = FlowDefinition.model_validate({"tenant": "acme", "overlap": "allow", **doc})
        await self.registry.apply([definition], datetime.now(UTC))
        execution_id = str(uuid.uuid4())
        await publish(
            self.channel,
            ExecutionRequested(
                execution_id=execution_id,
                fire_id=f"acme/{definition.id}#{execution_id}",
                tenant="acme",
                flow_id=definition.id,
                trigger="manual",
                input=input or {},
            ),
        )
        return execution_id

    async def events_until_done(
        self, execution_id: str, wait_s: float = 60
    ) -> list[dict[str, Any]]:
        """This execution's status events, in arrival order, up to its terminal one."""
        events: list[dict[str, Any]] = []
        deadline = asyncio.get_running_loop().time() + wait_s
        while asyncio.get_running_loop().time() < deadline:
            message = await get_one(self.feed, wait_s=wait_s)
            event = body(message)
            if event["subject"] != execution_id:
                continue
            events.append(event)
            entity, state = event["type"].removeprefix("io.orchestrator.").split(".")
            if entity == "execution" and state in TERMINAL:
                return events
        raise TimeoutError(f"{execution_id} did not finish: {[e['type'] for e in events]}")


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("io.orchestrator.") for e in events]


@pytest.fixture
async def system(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> AsyncIterator[System]:
    test_settings = fresh_settings(settings, breaker_threshold=3, breaker_cooldown_s=2.0)
    await reset_queues(channel)
    redis = store.connect(test_settings)
    feed = await channel.declare_queue(exclusive=True)
    await feed.bind(topology.STATUS, routing_key="acme.#")
    stop = asyncio.Event()
    engine = Engine(test_settings, redis, amqp)
    async with Worker(test_settings, amqp, redis, concurrency=8) as worker:
        tasks = [
            asyncio.create_task(engine.run(stop)),
            asyncio.create_task(worker.run(stop)),
            asyncio.create_task(Dispatcher(test_settings, redis, amqp).run(stop)),
        ]
        await wait_for_pipeline(test_settings, amqp)
        yield System(
            test_settings,
            channel,
            FlowRegistry(redis, store.Keys(test_settings.redis_prefix)),
            feed,
            engine,
        )
        stop.set()
        await asyncio.gather(*tasks)
    async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
        await redis.delete(key)
    await redis.aclose()


async def test_diamond_runs_b_and_c_in_parallel_and_d_sees_both(system: System) -> None:
    execution_id = await system.run(
        {
            "id": "diamond",
            "steps": [
                {"id": "a", "type": "demo.echo"},
                {"id": "b", "type": "demo.sleep", "depends_on": ["a"], "input": {"ms": 400}},
                {"id": "c", "type": "demo.sleep", "depends_on": ["a"], "input": {"ms": 400}},
                {"id": "d", "type": "demo.echo", "depends_on": ["b", "c"]},
            ],
        },
        input={"customer": 42},
    )
    events = await system.events_until_done(execution_id)
    assert kinds(events)[-1] == "execution.succeeded"
    outputs = events[-1]["data"]["outputs"]
    b, c = outputs["b"], outputs["c"]
    assert b["started"] < c["finished"]
    assert c["started"] < b["finished"]
    assert outputs["d"]["deps"] == ["b", "c"]
    assert outputs["d"]["echo"] == {"customer": 42}

    # Status events of one execution arrive in sequence order, each a valid CloudEvent.
    sequences = [int(e["sequence"]) for e in events]
    assert sequences == list(range(1, len(events) + 1))
    for event in events:
        parsed = JSONFormat().read(CloudEvent, json.dumps(event).encode())
        assert parsed.get_subject() == execution_id
    dispatched = [e["data"]["step_id"] for e in events if e["type"].endswith("step.dispatched")]
    assert dispatched[0] == "a"
    assert dispatched[-1] == "d"


async def test_retries_with_growing_backoff_then_success(system: System) -> None:
    retry = {"max_attempts": 3, "initial_backoff_s": 0.3, "multiplier": 3, "jitter": 0}
    execution_id = await system.run(
        {
            "id": "flaky",
            "steps": [{"id": "a", "type": "demo.fail", "input": {"times": 2}, "retry": retry}],
        }
    )
    events = await system.events_until_done(execution_id)
    assert kinds(events)[-1] == "execution.succeeded"
    retrying = [e for e in events if e["type"].endswith("step.retrying")]
    assert [e["data"]["delay_s"] for e in retrying] == [0.3, 0.9]
    dispatch_times = [
        datetime.fromisoformat(e["time"]) for e in events if e["type"].endswith("step.dispatched")
    ]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(dispatch_times)]
    assert gaps[0] >= 0.3
    assert gaps[1] >= 0.9
    assert gaps[1] > gaps[0]


async def test_final_failure_runs_compensation(system: System) -> None:
    execution_id = await system.run(
        {
            "id": "saga",
            "steps": [
                {"id": "reserve", "type": "demo.echo", "compensation": "demo.echo"},
                {
                    "id": "charge",
                    "type": "demo.fail",
                    "depends_on": ["reserve"],
                    "input": {"retryable": False},
                },
            ],
        }
    )
    events = await system.events_until_done(execution_id)
    assert kinds(events)[-1] == "execution.compensated"
    compensated = [e["data"]["step_id"] for e in events if e["type"].endswith("step.compensated")]
    assert compensated == ["reserve"]
    assert events[-1]["data"]["failure"]["step_id"] == "charge"


async def test_circuit_breaker_makes_steps_wait_instead_of_burning_retries(system: System) -> None:
    retry = {"max_attempts": 20, "initial_backoff_s": 0.05, "multiplier": 1, "jitter": 0}
    execution_id = await system.run(
        {"id": "broken-dep", "steps": [{"id": "a", "type": "demo.fail", "retry": retry}]}
    )
    seen: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    until = loop.time() + 3.0
    while loop.time() < until:
        try:
            event = body(await get_one(system.feed, wait_s=until - loop.time()))
        except TimeoutError:
            break
        if event["subject"] == execution_id:
            seen.append(event)
    waiting = [e for e in seen if e["type"].endswith("step.waiting")]
    assert waiting, kinds(seen)
    assert waiting[0]["data"]["reason"] == "circuit_open"
    attempts = [e for e in seen if e["type"].endswith("step.dispatched")]
    # Threshold 3, cool-down 2 s: three attempts open the breaker, then one probe after the
    # cool-down. Without the breaker, 3 s of 50 ms backoffs would be ~20 attempts.
    assert len(attempts) <= 5, kinds(seen)


async def test_invalid_messages_are_dead_lettered_and_reported(system: System) -> None:
    dlq = await purged(system.channel, topology.EXECUTIONS_QUEUE + ".dlq")
    rejected_feed = await system.channel.declare_queue(exclusive=True)
    await rejected_feed.bind(topology.STATUS, routing_key="_._.message.rejected")
    commands = await system.channel.get_exchange(topology.COMMANDS)
    await commands.publish(
        aio_pika.Message(b'{"tenant": 1}', message_id="junk"), "execution.requested"
    )
    dead = await get_one(dlq)
    assert dead.headers[REASON_HEADER] == "schema_violation"
    event = body(await get_one(rejected_feed))
    assert event["data"]["queue"] == topology.EXECUTIONS_QUEUE
    # The engine is still consuming.
    execution_id = await system.run(
        {"id": "after-junk", "steps": [{"id": "a", "type": "demo.echo"}]}
    )
    assert kinds(await system.events_until_done(execution_id))[-1] == "execution.succeeded"


async def test_a_finished_execution_keeps_its_definition_once_for_all(system: System) -> None:
    """Retention: a finished execution's record refers to its flow's definition by digest
    (stored once, living at least as long as every record that refers to it); a process
    that never saw the definition reads the record back whole, and a late duplicate result
    against it changes nothing."""
    doc = {"id": "tiny", "steps": [{"id": "a", "type": "demo.echo"}]}
    first, second = await system.run(doc), await system.run(doc)
    for execution_id in (first, second):
        await system.events_until_done(execution_id)
    redis = system.engine.redis
    keys = system.engine.store.keys
    records = [await redis.get(keys.execution(eid)) for eid in (first, second)]
    assert all(r is not None and "demo.echo" not in r for r in records), records
    digests = {json.loads(r)["definition_ref"] for r in records if r is not None}
    assert len(digests) == 1
    digest = digests.pop()
    assert 0 < await redis.ttl(keys.execution(first)) <= await redis.ttl(keys.definition(digest))

    fresh = Engine(system.settings, redis, system.engine.connection)  # an empty cache
    execution = await fresh.store.load(first)
    assert execution is not None
    assert execution.status == "succeeded"
    assert execution.definition.steps[0].type == "demo.echo"
    assert execution.steps["a"].status == "succeeded"

    before = await redis.get(keys.execution(first))
    await fresh.apply_result(
        StepResult(
            task_id=f"{first}:a:1",
            execution_id=first,
            tenant="acme",
            flow_id="tiny",
            step_id="a",
            attempt=1,
            outcome="succeeded",
            output={"late": True},
            worker_id="late-worker",
            started_at=datetime.now(UTC),
        )
    )
    assert await redis.get(keys.execution(first)) == before
