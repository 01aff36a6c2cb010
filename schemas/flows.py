"""Flow definitions: the DAG of steps a tenant registers, with its schedule and policies."""

from __future__ import annotations

import zoneinfo
from enum import StrEnum
from typing import Annotated

from croniter import croniter
from pydantic import Field, field_validator

from schemas.common import (
    Contract,
    FlowId,
    Name,
    Payload,
    ShortText,
    Slug,
    StepId,
    StepType,
    TenantId,
)

MAX_STEPS = 200
DAY_S = 86_400.0


class OverlapPolicy(StrEnum):
    """What a tick does while the flow's previous execution is still running."""

    SKIP = "skip"  # the tick is skipped and reported
    BUFFER_ONE = "buffer_one"  # at most one execution waits for the running one
    ALLOW = "allow"  # executions run in parallel


class RetryPolicy(Contract):
    """Exponential backoff with jitter: min(cap, initial * multiplier**(n-1)), ± jitter."""

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    initial_backoff_s: Annotated[float, Field(ge=0, le=3600)] = 1.0
    max_backoff_s: Annotated[float, Field(ge=0, le=DAY_S)] = 300.0
    multiplier: Annotated[float, Field(ge=1, le=10)] = 2.0
    jitter: Annotated[float, Field(ge=0, le=1, description="fraction of the delay")] = 0.2
    non_retryable_errors: Annotated[list[Name], Field(max_length=50)] = []


class StepDefinition(Contract):
    id: StepId
    type: StepType
    depends_on: Annotated[list[StepId], Field(max_length=MAX_STEPS)] = []
    input: Payload = {}
    timeout_s: Annotated[float, Field(gt=0, le=DAY_S)] = 300.0
    retry: RetryPolicy = RetryPolicy()
    compensation: StepType | None = Field(
        default=None, description="step type run to undo this step when a later step fails"
    )
    pool: Slug = "default"

    @field_validator("depends_on")
    @classmethod
    def _unique_dependencies(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("depends_on lists a step twice")
        return value


class CatchUpPolicy(Contract):
    """What happens to ticks missed while no scheduler ran."""

    window_s: Annotated[float, Field(ge=0, le=7 * DAY_S)] = 3600.0
    coalesce: bool = Field(
        default=True,
        description="missed ticks inside the window run once (true) or are all skipped (false)",
    )


def validate_cron(expression: str) -> str:
    """5 fields (minute precision) or 6 with a trailing seconds field, as croniter reads them."""
    fields = expression.split()
    if expression.startswith("@"):
        fields = ["alias"]
    elif len(fields) not in (5, 6):
        raise ValueError(f"cron {expression!r} has {len(fields)} fields, expected 5 or 6")
    if not croniter.is_valid(expression):
        raise ValueError(f"cron {expression!r} is not a valid cron expression")
    return expression


def validate_timezone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"timezone {name!r} is not an IANA timezone") from exc
    return name


def topological_order(steps: list[StepDefinition]) -> list[str]:
    """Step ids so that every step comes after its dependencies; ValueError names a cycle."""
    by_id = {step.id: step for step in steps}
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in by_id:
        if state.get(root) == 2:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = []
        while stack:
            node, index = stack.pop()
            if index == 0:
                state[node] = 1
                path.append(node)
            deps = by_id[node].depends_on
            if index < len(deps):
                stack.append((node, index + 1))
                dep = deps[index]
                if state.get(dep) == 1:
                    cycle = [*path[path.index(dep) :], dep]
                    raise ValueError(f"steps form a cycle: {' -> '.join(cycle)}")
                if state.get(dep) != 2:
                    stack.append((dep, 0))
            else:
                state[node] = 2
                path.pop()
                order.append(node)
    return order


class FlowDefinition(Contract):
    """A tenant's flow as registered with `orchestrator flows apply`."""

    schema_version: int = Field(default=1, ge=1, le=1)
    tenant: TenantId
    id: FlowId
    description: ShortText = ""
    cron: Annotated[str, Field(max_length=200, examples=["*/5 * * * *"])] | None = None
    timezone: Annotated[str, Field(max_length=64)] = "UTC"
    overlap: OverlapPolicy = OverlapPolicy.SKIP
    catch_up: CatchUpPolicy = CatchUpPolicy()
    jitter_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    max_parallel: Annotated[int, Field(ge=1, le=1000)] = 10
    paused: bool = False
    input: Payload = {}
    steps: Annotated[list[StepDefinition], Field(min_length=1, max_length=MAX_STEPS)]

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else validate_cron(value)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        return validate_timezone(value)

    @field_validator("steps")
    @classmethod
    def _dag(cls, steps: list[StepDefinition]) -> list[StepDefinition]:
        ids = [step.id for step in steps]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"step ids must be unique, repeated: {', '.join(duplicates)}")
        known = set(ids)
        for step in steps:
            unknown = [dep for dep in step.depends_on if dep not in known]
            if unknown:
                raise ValueError(f"step {step.id!r} depends on unknown step(s) {unknown}")
        topological_order(steps)
        return steps

    def step(self, step_id: str) -> StepDefinition:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)
