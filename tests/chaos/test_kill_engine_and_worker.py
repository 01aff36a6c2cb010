"""kill -9 in the middle of work: a worker mid-step, an engine under 200 executions."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from orchestrator import store, topology
from orchestrator.config import Settings
from orchestrator.engine.store import ExecutionStore
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import consumers, spawn, stop_all, wait_for_pipeline, wait_until
from schemas import FlowDefinition
from tests.integration.helpers import (
    body,
    drain,
    forget_redis,
    fresh_settings,
    get_one,
    request_execution,
    reset_queues,
    terminal_states,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _prepare(settings: Settings, channel: AbstractChannel, flow: dict[str, Any]) -> Any:
    await reset_queues(channel)
    redis = store.connect(settings)
    definition = FlowDefinition.model_validate({"tenant": "acme", "overlap": "allow", **flow})
    await FlowRegistry(redis, store.Keys(settings.redis_prefix)).apply(
        [definition], datetime.now(UTC)
    )
    return redis


async def test_killed_worker_step_is_redelivered_and_execution_succeeds(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    test_settings = fresh_settings(settings)
    flow = {"id": "slow", "steps": [{"id": "a", "type": "demo.sleep", "input": {"ms": 3000}}]}
    redis = await _prepare(test_settings, channel, flow)
    feed = await channel.declare_queue(exclusive=True)
    await feed.bind(topology.STATUS, routing_key="acme.slow.#")
    engine = spawn(test_settings, "engine")
    first = spawn(test_settings, "worker", "--concurrency", "2")
    processes = [engine, spawn(test_settings, "dispatcher"), first]
    try:
        await wait_for_pipeline(test_settings, amqp)
        execution_id = await request_execution(channel, "slow")
        # Wait until the worker holds the step: it announces it started it (a 3 s step, the
        # work queue's message unacked meanwhile).
        work = await channel.get_queue(topology.work_queue_name("default"))
        dispatched = body(await get_one(feed, wait_s=30))
        assert dispatched["type"].endswith("execution.started")
        events = []
        while not (events and events[-1]["type"].endswith("step.started")):
            events.append(body(await get_one(feed, wait_s=30)))
        declared = await channel.declare_queue(work.name, passive=True)
        assert declared.declaration_result.message_count == 0  # taken, not waiting
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        second = spawn(test_settings, "worker", "--concurrency", "2")
        processes.append(second)
        while True:
            event = body(await get_one(feed, wait_s=60))
            events.append(event)
            if event["type"].startswith("io.orchestrator.execution.") and not event[
                "type"
            ].endswith("started"):
                break
        assert events[-1]["type"] == "io.orchestrator.execution.succeeded"
        # The same attempt was redelivered (no retry was needed), and a live worker ran it.
        assert [e for e in events if e["type"].endswith("step.retrying")] == []
        started = [e for e in events if e["type"].endswith("step.started")]
        assert started[0]["data"]["attempt"] == 1
        assert execution_id == events[-1]["subject"]
    finally:
        stop_all(processes)
        await forget_redis(redis, test_settings)


async def test_killed_engine_under_load_every_execution_ends_once(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    test_settings = fresh_settings(settings)
    flow = {
        "id": "chain",
        "steps": [
            {"id": "a", "type": "demo.echo"},
            {"id": "b", "type": "demo.sleep", "depends_on": ["a"], "input": {"ms": 20}},
        ],
    }
    redis = await _prepare(test_settings, channel, flow)
    feed = await channel.declare_queue(exclusive=True)
    await feed.bind(topology.STATUS, routing_key="acme.chain.execution.*")
    engines = [spawn(test_settings, "engine") for _ in range(2)]
    workers = [spawn(test_settings, "worker", "--concurrency", "16") for _ in range(2)]
    workers.append(spawn(test_settings, "dispatcher"))
    executions: list[str] = []
    try:
        await wait_for_pipeline(test_settings, amqp)

        async def all_up() -> bool:  # both engines and both workers, not just one of each
            engines_up = await consumers(amqp, topology.EXECUTIONS_QUEUE)
            workers_up = await consumers(amqp, topology.work_queue_name("default"))
            return engines_up >= len(engines) and workers_up >= 2

        await wait_until(all_up, what="both engines and both workers consuming")
        executions = [await request_execution(channel, "chain") for _ in range(200)]
        # the wait is the behaviour under test: the engine is killed 1 s into the load
        await asyncio.sleep(1.0)
        engines[0].send_signal(signal.SIGKILL)
        engines[0].wait(timeout=10)
        engine_store = ExecutionStore(redis, store.Keys(test_settings.redis_prefix), 3600)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        states: dict[str, str] = {}
        while loop.time() < deadline:
            for execution_id in executions:
                if states.get(execution_id) in ("succeeded", "failed", "compensated"):
                    continue
                execution = await engine_store.load(execution_id)
                states[execution_id] = execution.status if execution else "missing"
            if all(s in ("succeeded", "failed", "compensated") for s in states.values()):
                break
            await asyncio.sleep(0.5)  # poll interval: some executions still running
        unfinished = {
            e: s for e, s in states.items() if s not in ("succeeded", "failed", "compensated")
        }
        assert unfinished == {}, f"{len(unfinished)} executions did not finish"
        # Counted per execution, every distinct event: a second terminal state shows as two
        # (a copy of the same event, which the killed engine's unfinished flush republishes,
        # is one state: subscribers deduplicate on its id).
        # The store says how they ended; their terminal events follow once their outboxes are
        # flushed: a killed engine's unfinished flush is taken up by a redelivery or by the
        # other engine's sweep (every 5 s, once the dead one's flush lock lapses).
        events: list[dict[str, Any]] = []

        async def announced() -> bool:
            events.extend(body(m) for m in await drain(feed, settle_s=0))
            return set(terminal_states(events)) >= set(executions)

        await wait_until(announced, timeout_s=60, every_s=0.5, what="every terminal event")
        # the wait is the behaviour under test: a duplicate terminal event would arrive now
        events.extend(body(m) for m in await drain(feed, settle_s=2.0))
        terminal = terminal_states(events)
        assert set(terminal) == set(executions)
        doubled = {e: seen for e, seen in terminal.items() if seen != ["succeeded"]}
        assert doubled == {}, f"{len(doubled)} executions without exactly one terminal event"
    finally:
        stop_all(engines + workers)
        await forget_redis(redis, test_settings)
