"""Step attempts: the engine's StepTask to a worker and the worker's StepResult back."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import Field, model_validator

from schemas.common import (
    Contract,
    FlowId,
    Message,
    MessageId,
    Name,
    Payload,
    ShortText,
    Slug,
    StepId,
    StepType,
    TenantId,
    Timestamp,
    utcnow,
)


def attempt_id(execution_id: str, step_id: str, attempt: int, kind: str = "action") -> str:
    """The id of one attempt of one step: workers and the engine deduplicate on it."""
    suffix = "" if kind == "action" else f":{kind}"
    return f"{execution_id}:{step_id}:{attempt}{suffix}"


class StepTask(Message):
    """One attempt of one step, routed by tenant into the fair queues, then to a worker pool."""

    message_type: ClassVar[str] = "step.task"

    task_id: MessageId = Field(description="attempt id: `<execution>:<step>:<attempt>`")
    execution_id: MessageId
    tenant: TenantId
    flow_id: FlowId
    step_id: StepId
    step_type: StepType
    kind: Literal["action", "compensation"] = "action"
    attempt: Annotated[int, Field(ge=1, le=100)]
    input: Payload = {}
    pool: Slug = "default"
    timeout_s: Annotated[float, Field(gt=0, le=86_400)]
    deadline: Timestamp = Field(description="the engine retries the attempt after this time")
    cost_estimate: Annotated[float, Field(ge=0)] = 1.0
    enqueued_at: Timestamp = Field(default_factory=utcnow)

    def message_id(self) -> str:
        return self.task_id


class StepError(Contract):
    type: Name = Field(examples=["TimeoutError"])
    message: ShortText = ""
    retryable: bool = True
    reason: Slug | None = Field(
        default=None,
        description="set when the runtime, not the step, decided the failure: `poison` (the "
        "step crashed its worker), `timeout`, `unknown_step_type`",
    )


class StepResult(Message):
    """A worker's report of one attempt. Duplicates and late results change nothing."""

    message_type: ClassVar[str] = "step.result"

    task_id: MessageId
    execution_id: MessageId
    tenant: TenantId
    flow_id: FlowId
    step_id: StepId
    kind: Literal["action", "compensation"] = "action"
    attempt: Annotated[int, Field(ge=1, le=100)]
    outcome: Literal["succeeded", "failed"]
    output: Payload | None = None
    error: StepError | None = None
    worker_id: Annotated[str, Field(min_length=1, max_length=200)]
    started_at: Timestamp
    finished_at: Timestamp = Field(default_factory=utcnow)
    cpu_s: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="CPU seconds the attempt used (its own thread's), if measured"
    )

    @model_validator(mode="after")
    def _outcome_matches(self) -> Self:
        if self.outcome == "succeeded" and self.error is not None:
            raise ValueError("a succeeded result carries no error")
        if self.outcome == "failed" and self.error is None:
            raise ValueError("a failed result must carry an error")
        return self

    def message_id(self) -> str:
        return f"result:{self.task_id}"
