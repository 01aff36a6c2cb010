"""Measured resource use of one step attempt, sent by workers to Kafka `orchestrator.usage`."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from schemas.common import (
    FlowId,
    Message,
    MessageId,
    Slug,
    StepId,
    StepType,
    TenantId,
    Timestamp,
)

NonNegative = Annotated[float, Field(ge=0)]
ByteCount = Annotated[int, Field(ge=0)]


class UsageEvent(Message):
    """Keyed by tenant on Kafka, so one tenant's events stay in order on one partition."""

    message_type: ClassVar[str] = "usage"

    event_id: MessageId = Field(description="the attempt id (`StepTask.task_id`)")
    tenant: TenantId
    flow_id: FlowId
    execution_id: MessageId
    step_id: StepId
    step_type: StepType
    attempt: Annotated[int, Field(ge=1, le=100)]
    worker_id: Annotated[str, Field(min_length=1, max_length=200)]
    pool: Slug = "default"
    outcome: Literal["succeeded", "failed", "timeout", "cancelled"]
    wall_s: NonNegative
    cpu_s: NonNegative
    peak_memory_bytes: ByteCount = 0
    bytes_in: ByteCount = 0
    bytes_out: ByteCount = 0
    started_at: Timestamp
    finished_at: Timestamp

    def message_id(self) -> str:
        return self.event_id
