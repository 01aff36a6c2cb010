"""The execution store against real Redis: transitions that start from the state an engine
remembers, and what happens when another replica changed it meanwhile."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from orchestrator import store
from orchestrator.config import Settings
from orchestrator.engine.machine import Execution, Transition, new_execution
from orchestrator.engine.service import Engine
from orchestrator.engine.store import Commit, ExecutionStore
from schemas import ExecutionRequested, FlowDefinition, StepResult
from tests.integration.helpers import (
    ECHO_CHAIN,
    forget_redis,
    fresh_settings,
    register_flows,
    reset_queues,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

FLOW = FlowDefinition.model_validate(
    {
        "tenant": "acme",
        "id": "pair",
        "overlap": "allow",
        "steps": [{"id": "a", "type": "demo.echo"}, {"id": "b", "type": "demo.echo"}],
    }
)


def _store(settings: Settings) -> ExecutionStore:
    return ExecutionStore(store.connect(settings), store.Keys(settings.redis_prefix), 60)


async def _commit(
    executions: ExecutionStore, transition: Transition, started_from: str | None
) -> Commit:
    commit = await executions.commit(
        transition.x,
        transition.effects,
        started_from=started_from,
        now_ms=int(transition.now.timestamp() * 1000),
        gates=[],
    )
    if commit.claimed is not None:  # this test publishes nothing: free the flush lock
        await executions.finish(transition.x.execution_id, [], commit.token)
    return commit


async def _started(executions: ExecutionStore) -> Execution:
    now = datetime.now(UTC)
    execution = new_execution(
        execution_id=str(uuid.uuid4()),
        fire_id=f"acme/pair#{uuid.uuid4()}",
        definition=FLOW,
        execution_input={},
        now=now,
    )
    transition = Transition(execution, now)
    transition.start()
    commit = await _commit(executions, transition, None)
    assert not commit.conflict
    return transition.x


async def test_a_transition_starts_from_the_state_this_engine_committed(
    settings: Settings,
) -> None:
    executions = _store(settings)
    execution = await _started(executions)
    stored = await executions.read(execution.execution_id)
    # Somebody else's write this engine has not seen: a transition starts from what the
    # engine committed (no read), the query path reads what is stored.
    other = _store(settings)
    current = await other.parse(str(stored))
    transition = Transition(current, datetime.now(UTC))
    transition.cancel("by the other replica", None)
    assert not (await _commit(other, transition, stored)).conflict

    assert await executions.current(execution.execution_id) == (stored, True)
    assert await executions.read(execution.execution_id) != stored
    loaded = await executions.load(execution.execution_id)
    assert loaded is not None
    assert loaded.status == transition.x.status


async def test_a_remembered_state_another_replica_changed_is_a_conflict_with_the_newer_one(
    settings: Settings,
) -> None:
    mine, theirs = _store(settings), _store(settings)
    execution = await _started(mine)
    execution_id = execution.execution_id
    stale, remembered = await mine.current(execution_id)
    assert remembered

    # The other replica moves the execution on.
    raw = await theirs.read(execution_id)
    moved = Transition(await theirs.parse(str(raw)), datetime.now(UTC))
    moved.cancel("moved on", None)
    assert not (await _commit(theirs, moved, raw)).conflict
    newer = await theirs.read(execution_id)

    # This replica's transition from its remembered state is refused, with the newer state.
    late = Transition(await mine.parse(str(stale)), datetime.now(UTC))
    late.cancel("too late", None)
    commit = await _commit(mine, late, stale)
    assert commit.conflict
    assert commit.current == newer
    # and it forgot the stale state: the next transition reads what is stored
    assert await mine.current(execution_id) == (newer, False)


async def test_a_result_is_applied_by_an_engine_whose_remembered_state_is_stale(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    """Replicas share the results queue: engine A starts an execution (and remembers it),
    engine B applies the first step's result, then the second step's result reaches A. On
    the state A remembers the second step was never dispatched, so the result would change
    nothing: A must ask the stored state before it drops it."""
    test_settings = fresh_settings(settings)
    await reset_queues(channel)
    redis = store.connect(test_settings)
    await register_flows(redis, test_settings, ECHO_CHAIN)
    first, second = Engine(test_settings, redis, amqp), Engine(test_settings, redis, amqp)
    execution_id = str(uuid.uuid4())
    try:
        await first.start(
            ExecutionRequested(
                execution_id=execution_id,
                fire_id=f"acme/chain#{execution_id}",
                tenant="acme",
                flow_id="chain",
                trigger="manual",
            )
        )

        def result(step: str) -> StepResult:
            return StepResult(
                task_id=f"{execution_id}:{step}:1",
                execution_id=execution_id,
                tenant="acme",
                flow_id="chain",
                step_id=step,
                attempt=1,
                outcome="succeeded",
                output={"step": step},
                worker_id="test",
                started_at=datetime.now(UTC),
            )

        await second.apply_result(result("a"))
        await first.apply_result(result("b"))
        execution = await second.execution(execution_id)
        assert execution is not None
        assert execution.status == "succeeded", {s: v.status for s, v in execution.steps.items()}
    finally:
        await forget_redis(redis, test_settings)
