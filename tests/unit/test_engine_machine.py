"""The execution state machine without any broker: DAG order, retries, deadlines, saga."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator.engine.machine import Execution, Timer, Transition, backoff, new_execution
from schemas import FlowDefinition, StepResult
from schemas.flows import RetryPolicy
from schemas.steps import StepError

NOW = datetime(2026, 5, 1, 12, tzinfo=UTC)


def flow(steps: list[dict[str, Any]]) -> FlowDefinition:
    return FlowDefinition.model_validate({"tenant": "acme", "id": "f", "steps": steps})


DIAMOND = flow(
    [
        {"id": "a", "type": "demo.echo"},
        {"id": "b", "type": "demo.echo", "depends_on": ["a"]},
        {"id": "c", "type": "demo.echo", "depends_on": ["a"]},
        {"id": "d", "type": "demo.echo", "depends_on": ["b", "c"]},
    ]
)


def execution(definition: FlowDefinition = DIAMOND) -> Execution:
    return new_execution(
        execution_id="e1",
        fire_id="acme/f#k",
        definition=definition,
        execution_input={"x": 1},
        now=NOW,
    )


def result(
    x: Execution,
    step_id: str,
    ok: bool = True,
    *,
    output: dict[str, Any] | None = None,
    retryable: bool = True,
    kind: str = "action",
) -> StepResult:
    state = x.steps[step_id]
    attempt = state.attempt if kind == "action" else state.compensation_attempt
    return StepResult(
        task_id=state.task_id or "?",
        execution_id=x.execution_id,
        tenant="acme",
        flow_id="f",
        step_id=step_id,
        kind=kind,  # type: ignore[arg-type]
        attempt=attempt,
        outcome="succeeded" if ok else "failed",
        output=output if ok else None,
        error=None if ok else StepError(type="Boom", message="no", retryable=retryable),
        worker_id="w",
        started_at=NOW,
    )


def types(effects: Any) -> list[str]:
    return [e.type.removeprefix("io.orchestrator.") for e in effects.statuses]


def test_diamond_runs_in_dependency_order_and_passes_outputs() -> None:
    x = execution()
    fx = Transition(x, NOW).start()
    assert [t.step_id for t in fx.tasks] == ["a"]
    fx = Transition(x, NOW).result(result(x, "a", output={"a": 1}))
    assert sorted(t.step_id for t in fx.tasks) == ["b", "c"]  # b and c in parallel
    Transition(x, NOW).result(result(x, "b", output={"b": 2}))
    fx = Transition(x, NOW).result(result(x, "c", output={"c": 3}))
    (d_task,) = fx.tasks
    assert d_task.input["deps"] == {"b": {"b": 2}, "c": {"c": 3}}
    assert d_task.input["x"] == 1
    fx = Transition(x, NOW).result(result(x, "d"))
    assert x.status == "succeeded"
    assert fx.release_lease
    assert types(fx)[-1] == "execution.succeeded"
    assert [int(e.sequence or 0) for e in fx.statuses] == sorted(
        int(e.sequence or 0) for e in fx.statuses
    )


def test_duplicate_and_stale_results_change_nothing() -> None:
    x = execution()
    Transition(x, NOW).start()
    first = result(x, "a")
    Transition(x, NOW).result(first)
    before = x.model_dump()
    assert not Transition(x, NOW).result(first)
    assert x.model_dump() == before


def test_retries_with_growing_backoff_then_success() -> None:
    policy = {"max_attempts": 3, "initial_backoff_s": 1, "multiplier": 2, "jitter": 0}
    x = execution(flow([{"id": "a", "type": "demo.fail", "retry": policy}]))
    Transition(x, NOW).start()
    delays = []
    for attempt in (1, 2):
        fx = Transition(x, NOW).result(result(x, "a", ok=False))
        assert types(fx)[-1] == "step.retrying"
        (timer,) = [t for t in fx.timers if t.kind == "retry"]
        delays.append((timer.at - NOW).total_seconds())
        fx = Transition(x, timer.at).timer(timer)
        assert fx.tasks[0].attempt == attempt + 1
    assert delays == [1.0, 2.0]
    Transition(x, NOW).result(result(x, "a"))
    assert x.status == "succeeded"


def test_non_retryable_error_fails_at_once() -> None:
    x = execution(flow([{"id": "a", "type": "demo.fail"}]))
    Transition(x, NOW).start()
    fx = Transition(x, NOW).result(result(x, "a", ok=False, retryable=False))
    assert x.status == "failed"
    assert "execution.failed" in types(fx)


def test_final_failure_compensates_completed_steps_in_reverse() -> None:
    steps = [
        {"id": "a", "type": "demo.echo", "compensation": "demo.undo"},
        {"id": "b", "type": "demo.echo", "depends_on": ["a"], "compensation": "demo.undo"},
        {"id": "c", "type": "demo.fail", "depends_on": ["b"], "retry": {"max_attempts": 1}},
    ]
    x = execution(flow(steps))
    Transition(x, NOW).start()
    Transition(x, NOW).result(result(x, "a", output={"id": 7}))
    Transition(x, NOW).result(result(x, "b"))
    fx = Transition(x, NOW).result(result(x, "c", ok=False))
    (undo_b,) = fx.tasks
    assert (undo_b.step_id, undo_b.kind, undo_b.step_type) == ("b", "compensation", "demo.undo")
    fx = Transition(x, NOW).result(result(x, "b", kind="compensation"))
    (undo_a,) = fx.tasks
    assert undo_a.step_id == "a"
    assert undo_a.input["output"] == {"id": 7}
    fx = Transition(x, NOW).result(result(x, "a", kind="compensation"))
    assert x.status == "compensated"
    assert types(fx)[-1] == "execution.compensated"


def test_failed_compensation_fails_the_execution_with_detail() -> None:
    steps = [
        {"id": "a", "type": "demo.echo", "compensation": "demo.undo", "retry": {"max_attempts": 1}},
        {"id": "b", "type": "demo.fail", "depends_on": ["a"], "retry": {"max_attempts": 1}},
    ]
    x = execution(flow(steps))
    Transition(x, NOW).start()
    Transition(x, NOW).result(result(x, "a"))
    Transition(x, NOW).result(result(x, "b", ok=False))
    fx = Transition(x, NOW).result(result(x, "a", ok=False, kind="compensation"))
    assert x.status == "failed"
    assert x.failure is not None
    assert x.failure["compensation_failed"] == "a"
    assert types(fx)[-1] == "execution.failed"


def test_deadline_without_result_retries_and_late_result_is_ignored() -> None:
    x = execution(
        flow([{"id": "a", "type": "demo.sleep", "timeout_s": 10, "retry": {"jitter": 0}}])
    )
    fx = Transition(x, NOW).start()
    (deadline,) = [t for t in fx.timers if t.kind == "deadline"]
    stale = result(x, "a")
    fx = Transition(x, deadline.at).timer(deadline)
    assert types(fx) == ["step.retrying"]
    assert not Transition(x, NOW).result(stale)  # the vanished worker's late answer


def test_waiting_on_open_breaker_then_dispatch() -> None:
    x = execution(flow([{"id": "a", "type": "demo.echo"}]))
    transition = Transition(x, NOW)
    transition.start()
    transition.defer("a", NOW + timedelta(seconds=30))
    fx = transition.effects
    assert fx.tasks == []
    assert x.steps["a"].status == "waiting"
    (timer,) = fx.timers
    fx = Transition(x, timer.at).timer(Timer("breaker", "a", 0, timer.at))
    assert fx.tasks[0].attempt == 1


def test_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_backoff_s=1, multiplier=10, max_backoff_s=50, jitter=0.2)
    rng = random.Random(1)
    assert 40 <= backoff(policy, 5, rng) <= 60
    assert backoff(RetryPolicy(jitter=0, initial_backoff_s=2), 1) == 2


# ---------------------------------------------------------------- cancel
SAGA = flow(
    [
        {"id": "a", "type": "demo.echo", "compensation": "demo.undo"},
        {"id": "b", "type": "demo.echo", "depends_on": ["a"], "compensation": "demo.undo"},
        {"id": "c", "type": "demo.echo", "depends_on": ["a"]},
        {"id": "d", "type": "demo.echo", "depends_on": ["b", "c"]},
    ]
)


def test_cancel_mid_dag_waits_for_in_flight_then_compensates_and_ends_cancelled() -> None:
    x = execution(SAGA)
    Transition(x, NOW).start()
    Transition(x, NOW).result(result(x, "a", output={"id": 1}))  # b and c now in flight
    fx = Transition(x, NOW).cancel("not needed", "ops")
    assert x.status == "cancelling"
    assert types(fx) == ["execution.cancelling"]
    assert not fx.tasks  # nothing new starts, and nothing is undone while b, c run
    fx = Transition(x, NOW).result(result(x, "b"))
    assert not fx.tasks  # d does not start: c is still in flight
    fx = Transition(x, NOW).result(result(x, "c"))
    (undo_b,) = fx.tasks  # latest completed first: b (c has no compensation)
    assert (undo_b.step_id, undo_b.kind) == ("b", "compensation")
    assert x.steps["d"].status == "cancelled"
    fx = Transition(x, NOW).result(result(x, "b", kind="compensation"))
    (undo_a,) = fx.tasks
    assert undo_a.step_id == "a"
    fx = Transition(x, NOW).result(result(x, "a", kind="compensation"))
    assert x.status == "cancelled"
    assert x.terminal
    assert fx.release_lease
    terminal = [e for e in fx.statuses if e.type.startswith("io.orchestrator.execution.")]
    assert [e.type for e in terminal] == ["io.orchestrator.execution.cancelled"]
    assert terminal[0].data["cancellation"]["reason"] == "not needed"
    assert x.outcome is not None
    assert x.outcome["type"] == "io.orchestrator.execution.cancelled"


def test_cancel_with_nothing_in_flight_or_to_undo_ends_at_once() -> None:
    x = execution(flow([{"id": "a", "type": "demo.echo", "retry": {"max_attempts": 3}}]))
    Transition(x, NOW).start()
    fx = Transition(x, NOW).result(result(x, "a", ok=False))  # a waits for its retry
    (retry,) = [t for t in fx.timers if t.kind == "retry"]
    fx = Transition(x, NOW).cancel("stop", None)
    assert x.status == "cancelled"
    assert types(fx) == ["execution.cancelling", "execution.cancelled"]
    assert f"retry|a|{retry.attempt}" in fx.cancel_timers
    assert not Transition(x, retry.at).timer(retry)  # the retry never runs


def test_cancel_of_an_ending_or_ended_execution_changes_nothing() -> None:
    x = execution(flow([{"id": "a", "type": "demo.echo"}]))
    Transition(x, NOW).start()
    Transition(x, NOW).result(result(x, "a"))
    assert x.status == "succeeded"
    before = x.model_dump()
    assert not Transition(x, NOW).cancel("late", None)
    assert x.model_dump() == before
    failing = execution(SAGA)
    Transition(failing, NOW).start()
    Transition(failing, NOW).result(result(failing, "a"))
    Transition(failing, NOW).result(result(failing, "b", ok=False, retryable=False))
    assert failing.status == "failing"
    assert not Transition(failing, NOW).cancel("late", None)
    assert failing.cancellation is None


def test_cancel_in_flight_step_that_fails_is_not_retried() -> None:
    x = execution(flow([{"id": "a", "type": "demo.echo", "retry": {"max_attempts": 5}}]))
    Transition(x, NOW).start()
    Transition(x, NOW).cancel("stop", None)
    fx = Transition(x, NOW).result(result(x, "a", ok=False))
    assert not fx.tasks
    assert not [t for t in fx.timers if t.kind == "retry"]
    assert x.status == "cancelled"
