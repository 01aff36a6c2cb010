"""An execution's state machine: pure transitions that return the effects to carry out.

No I/O here. The engine adapter loads an `Execution`, calls one transition, stores the new
state together with the effects (outbox and timers) atomically, then carries the effects out.

Lifecycle: running -> succeeded, or, when a step finally fails: failing (in-flight steps
finish, nothing new starts) -> compensating (completed steps with a compensation are undone
in reverse completion order, one at a time) -> compensated, or failed when there was nothing
to compensate or a compensation failed. A cancel request takes a running execution the same
way, through cancelling -> compensating, to cancelled (failed if a compensation fails).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from schemas import TERMINAL_STATES, FlowDefinition, StatusEvent, StepResult, StepTask
from schemas.executions import ExecutionState
from schemas.flows import RetryPolicy, StepDefinition
from schemas.steps import attempt_id

StepStatus = Literal[
    "pending",  # dependencies not done yet
    "waiting",  # ready, but its step type's circuit breaker is open
    "dispatched",  # a StepTask for `attempt` is out
    "retry_wait",  # failed attempt, next one after a backoff
    "succeeded",
    "failed",
    "cancelled",  # never ran because the execution failed or was cancelled first
    "compensating",
    "compensated",
]
ExecutionStatus = ExecutionState
TERMINAL: frozenset[str] = frozenset(TERMINAL_STATES)
# The engine retries an attempt whose result has not arrived this long after its deadline
# (the worker enforces the deadline itself; this covers a worker that vanished).
DEADLINE_GRACE = timedelta(seconds=5)


class StepState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: StepStatus = "pending"
    attempt: int = 0
    task_id: str | None = None
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    finished: int | None = None  # completion order, for compensation in reverse
    compensation_attempt: int = 0
    dispatched_at: datetime | None = None  # of its latest attempt
    finished_at: datetime | None = None


class Execution(BaseModel):
    model_config = ConfigDict(extra="forbid")

    execution_id: str
    fire_id: str
    tenant: str
    flow_id: str
    definition: FlowDefinition
    input: dict[str, Any]
    status: ExecutionStatus = "running"
    steps: dict[str, StepState]
    sequence: int = 0
    finished_count: int = 0
    failure: dict[str, Any] | None = None
    cancellation: dict[str, Any] | None = None  # reason, requested_by, at
    started_at: datetime
    finished_at: datetime | None = None
    # The terminal status event as published: clients asking after the end get it as it was.
    outcome: dict[str, Any] | None = None
    # W3C trace context of the request that started it: transitions no message starts
    # (timers) continue the execution's trace (orchestrator.tracing).
    traceparent: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Timer:
    """Wake the execution at `at` for (`kind`, `step_id`, `attempt`)."""

    kind: Literal["retry", "deadline", "breaker"]
    step_id: str
    attempt: int
    at: datetime

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.step_id}|{self.attempt}"


@dataclass
class Effects:
    tasks: list[StepTask] = field(default_factory=list)
    statuses: list[StatusEvent] = field(default_factory=list)
    timers: list[Timer] = field(default_factory=list)
    cancel_timers: list[str] = field(default_factory=list)
    release_lease: bool = False
    created: bool = False  # the transition that started the execution

    def __bool__(self) -> bool:
        return bool(
            self.tasks or self.statuses or self.timers or self.cancel_timers or self.release_lease
        )


def backoff(policy: RetryPolicy, failed_attempt: int, rng: random.Random | None = None) -> float:
    """Seconds before the attempt after `failed_attempt`: exponential, capped, with jitter."""
    base = min(
        policy.max_backoff_s, policy.initial_backoff_s * policy.multiplier ** (failed_attempt - 1)
    )
    spread = base * policy.jitter
    return max(0.0, base + (rng or random).uniform(-spread, spread))


class Transition:
    """One transition of one execution: mutate `execution`, collect `effects`."""

    def __init__(self, execution: Execution, now: datetime) -> None:
        self.x = execution
        self.now = now
        self.effects = Effects()

    # ------------------------------------------------------------------ helpers
    def status(self, entity: str, state: str, data: dict[str, Any] | None = None) -> None:
        self.x.sequence += 1
        self.effects.statuses.append(
            StatusEvent.build(
                entity,
                state,
                event_id=f"{self.x.execution_id}:{self.x.sequence}",
                tenant=self.x.tenant,
                flow=self.x.flow_id,
                subject=self.x.execution_id,
                sequence=self.x.sequence,
                data=data or {},
            )
        )

    def step_def(self, step_id: str) -> StepDefinition:
        return self.x.definition.step(step_id)

    def dispatch(self, step_id: str, kind: Literal["action", "compensation"] = "action") -> None:
        step = self.step_def(step_id)
        state = self.x.steps[step_id]
        if kind == "action":
            state.attempt += 1
            attempt, step_type = state.attempt, step.type
            task_input = self.task_input(step)
        else:
            state.compensation_attempt += 1
            attempt, step_type = state.compensation_attempt, step.compensation or step.type
            task_input = {**self.x.input, **step.input, "output": state.output or {}}
        task_id = attempt_id(self.x.execution_id, step_id, attempt, kind)
        deadline = self.now + timedelta(seconds=step.timeout_s)
        try:
            task = StepTask(
                task_id=task_id,
                execution_id=self.x.execution_id,
                tenant=self.x.tenant,
                flow_id=self.x.flow_id,
                step_id=step_id,
                step_type=step_type,
                kind=kind,
                attempt=attempt,
                input=task_input,
                pool=step.pool,
                timeout_s=step.timeout_s,
                deadline=deadline,
                enqueued_at=self.now,
            )
        except ValidationError as exc:  # e.g. the dependencies' outputs exceed the payload bound
            state.task_id = task_id
            self.attempt_failed(
                step_id,
                kind,
                {"type": "InvalidInput", "message": str(exc)[:500], "retryable": False},
            )
            return
        state.task_id = task_id
        state.dispatched_at = self.now
        state.status = "dispatched" if kind == "action" else "compensating"
        self.effects.tasks.append(task)
        self.effects.timers.append(Timer("deadline", step_id, attempt, deadline + DEADLINE_GRACE))
        self.status(
            "step",
            "dispatched",
            {
                "step_id": step_id,
                "step_type": step_type,
                "attempt": attempt,
                "kind": kind,
                "task_id": task_id,
            },
        )

    def task_input(self, step: StepDefinition) -> dict[str, Any]:
        """Flow input, the step's own parameters, and each dependency's output under `deps`."""
        deps = {dep: self.x.steps[dep].output or {} for dep in step.depends_on}
        return {**self.x.input, **step.input, "deps": deps}

    def ready_steps(self) -> list[str]:
        return [
            step.id
            for step in self.x.definition.steps
            if self.x.steps[step.id].status == "pending"
            and all(self.x.steps[d].status == "succeeded" for d in step.depends_on)
        ]

    def in_flight(self) -> bool:
        return any(s.status in ("dispatched", "compensating") for s in self.x.steps.values())

    # ------------------------------------------------------------------ transitions
    def start(self) -> Effects:
        self.effects.created = True
        self.status("execution", "started", {"fire_id": self.x.fire_id, "steps": len(self.x.steps)})
        for step_id in self.ready_steps():
            self.dispatch(step_id)
        return self.effects

    def result(self, result: StepResult) -> Effects:
        """Applies a worker's result; duplicates and stale attempts change nothing."""
        state = self.x.steps.get(result.step_id)
        if state is None or self.x.terminal or state.task_id != result.task_id:
            return self.effects
        expected = "dispatched" if result.kind == "action" else "compensating"
        if state.status != expected:
            return self.effects
        self.effects.cancel_timers.append(
            Timer("deadline", result.step_id, result.attempt, self.now).key
        )
        self.status(
            "step",
            "started",
            {
                "step_id": result.step_id,
                "attempt": result.attempt,
                "kind": result.kind,
                "worker_id": result.worker_id,
                "started_at": result.started_at.isoformat(),
            },
        )
        if result.outcome == "succeeded":
            self.attempt_succeeded(result.step_id, result.kind, result.output or {}, result)
        else:
            error = (
                result.error.model_dump()
                if result.error
                else {"type": "Unknown", "retryable": True}
            )
            self.attempt_failed(result.step_id, result.kind, error)
        return self.effects

    def cancel(self, reason: str, requested_by: str | None) -> Effects:
        """Stops a running execution: nothing new starts, what is in flight finishes, what
        completed is compensated. An execution already on its way out is left to end so."""
        if self.x.status != "running":
            return self.effects
        self.x.status = "cancelling"
        self.x.cancellation = {
            "reason": reason,
            "requested_by": requested_by,
            "at": self.now.isoformat(),
        }
        self.status("execution", "cancelling", {"cancellation": self.x.cancellation})
        self.maybe_begin_compensation()
        return self.effects

    def timer(self, timer: Timer) -> Effects:
        state = self.x.steps.get(timer.step_id)
        if state is None or self.x.terminal:
            return self.effects
        if timer.kind == "deadline":
            current = state.attempt if state.status == "dispatched" else state.compensation_attempt
            if state.status in ("dispatched", "compensating") and current == timer.attempt:
                kind: Literal["action", "compensation"] = (
                    "action" if state.status == "dispatched" else "compensation"
                )
                error = {
                    "type": "DeadlineExceeded",
                    "message": "no result before the step deadline",
                    "retryable": True,
                }
                self.attempt_failed(timer.step_id, kind, error)
        elif (
            timer.kind == "retry"
            and state.status == "retry_wait"
            and state.attempt == timer.attempt
        ):
            if self.x.status == "running":
                self.dispatch(timer.step_id)
            elif self.x.status == "compensating":
                self.dispatch(timer.step_id, "compensation")
        elif timer.kind == "breaker" and state.status == "waiting" and self.x.status == "running":
            self.dispatch(timer.step_id)
        return self.effects

    def defer(self, step_id: str, until: datetime) -> None:
        """The breaker of the step's type is open: wait (not fail) and try again at `until`.
        Called by the adapter on a dispatch the breaker refused; undoes that dispatch."""
        state = self.x.steps[step_id]
        self.effects.tasks = [t for t in self.effects.tasks if t.step_id != step_id]
        self.effects.timers = [t for t in self.effects.timers if t.step_id != step_id]
        state.attempt -= 1
        state.status = "waiting"
        state.task_id = None
        self.effects.timers.append(Timer("breaker", step_id, state.attempt, until))
        self.status(
            "step",
            "waiting",
            {"step_id": step_id, "reason": "circuit_open", "until": until.isoformat()},
        )

    # ------------------------------------------------------------------ outcomes
    def attempt_succeeded(
        self, step_id: str, kind: str, output: dict[str, Any], result: StepResult
    ) -> None:
        state = self.x.steps[step_id]
        if kind == "compensation":
            state.status = "compensated"
            self.status("step", "compensated", {"step_id": step_id, "attempt": result.attempt})
            self.compensate_next()
            return
        state.status = "succeeded"
        state.output = output
        state.finished_at = self.now
        self.x.finished_count += 1
        state.finished = self.x.finished_count
        self.status("step", "succeeded", {"step_id": step_id, "attempt": result.attempt})
        if self.x.status in ("failing", "cancelling"):
            self.maybe_begin_compensation()
            return
        for ready in self.ready_steps():
            self.dispatch(ready)
        if all(s.status == "succeeded" for s in self.x.steps.values()):
            self.finish("succeeded")

    def attempt_failed(self, step_id: str, kind: str, error: dict[str, Any]) -> None:
        state = self.x.steps[step_id]
        step = self.step_def(step_id)
        attempt = state.attempt if kind == "action" else state.compensation_attempt
        retryable = (
            bool(error.get("retryable", True))
            and error.get("type") not in step.retry.non_retryable_errors
        )
        if (
            retryable
            and attempt < step.retry.max_attempts
            and self.x.status in ("running", "compensating")
        ):
            delay = backoff(step.retry, attempt)
            state.status = "retry_wait"
            if kind == "compensation":
                state.attempt = state.compensation_attempt  # retry timers match on `attempt`
            self.effects.timers.append(
                Timer("retry", step_id, state.attempt, self.now + timedelta(seconds=delay))
            )
            self.status(
                "step",
                "retrying",
                {
                    "step_id": step_id,
                    "attempt": attempt,
                    "kind": kind,
                    "delay_s": round(delay, 3),
                    "error": error,
                },
            )
            return
        if kind == "compensation":
            state.status = "failed"
            state.error = error
            state.finished_at = self.now
            self.status(
                "step",
                "failed",
                {"step_id": step_id, "attempt": attempt, "kind": kind, "error": error},
            )
            self.x.failure = {
                **(self.x.failure or {}),
                "compensation_failed": step_id,
                "compensation_error": error,
            }
            self.finish("failed")
            return
        state.status = "failed"
        state.error = error
        state.finished_at = self.now
        self.status(
            "step", "failed", {"step_id": step_id, "attempt": attempt, "kind": kind, "error": error}
        )
        if self.x.status == "running":
            self.x.status = "failing"
            self.x.failure = {"step_id": step_id, "error": error}
        self.maybe_begin_compensation()

    def maybe_begin_compensation(self) -> None:
        """Once nothing is in flight, cancel what never started and undo what completed."""
        if self.in_flight():
            return
        for step_id, state in self.x.steps.items():
            if state.status in ("pending", "waiting", "retry_wait"):
                state.status = "cancelled"
                self.effects.cancel_timers.extend(
                    Timer(kind, step_id, state.attempt, self.now).key
                    for kind in ("retry", "breaker")
                )
        self.x.status = "compensating"
        self.compensate_next()

    def compensate_next(self) -> None:
        candidates = [
            (state.finished or 0, step_id)
            for step_id, state in self.x.steps.items()
            if state.status == "succeeded" and self.step_def(step_id).compensation
        ]
        if candidates:
            _, step_id = max(candidates)
            self.dispatch(step_id, "compensation")
            return
        if self.x.cancellation is not None:
            self.finish("cancelled")
            return
        compensated = any(s.status == "compensated" for s in self.x.steps.values())
        self.finish("compensated" if compensated else "failed")

    def finish(self, outcome: ExecutionStatus) -> None:
        self.x.status = outcome
        data: dict[str, Any] = {
            "fire_id": self.x.fire_id,
            "duration_s": round((self.now - self.x.started_at).total_seconds(), 3),
        }
        if self.x.failure:
            data["failure"] = self.x.failure
        if self.x.cancellation:
            data["cancellation"] = self.x.cancellation
        if outcome == "succeeded":
            data["outputs"] = {sid: s.output for sid, s in self.x.steps.items()}
        self.status("execution", outcome, data)
        self.x.finished_at = self.now
        self.x.outcome = self.effects.statuses[-1].model_dump(mode="json", exclude_none=False)
        self.effects.release_lease = True


def new_execution(
    *,
    execution_id: str,
    fire_id: str,
    definition: FlowDefinition,
    execution_input: dict[str, Any],
    now: datetime,
    traceparent: str | None = None,
) -> Execution:
    return Execution(
        traceparent=traceparent,
        execution_id=execution_id,
        fire_id=fire_id,
        tenant=definition.tenant,
        flow_id=definition.id,
        definition=definition,
        input=execution_input,
        steps={step.id: StepState() for step in definition.steps},
        started_at=now,
    )
