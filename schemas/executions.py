"""Requests to run a flow: from other services (FlowStartRequested) and to the engine."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from schemas.common import (
    Contract,
    FlowId,
    Message,
    MessageId,
    Name,
    Payload,
    TenantId,
    Timestamp,
    utcnow,
)


class FlowStartRequested(Message):
    """Another service asks to start a flow (routing key `flow.start.<tenant>` on
    orchestrator.commands).

    `idempotency_key` makes a repeated request a no-op. The AMQP `user_id` (checked by
    RabbitMQ) must be the tenant's account or an operator's.
    """

    message_type: ClassVar[str] = "flow.start.requested"

    tenant: TenantId
    flow_id: FlowId
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)]
    trigger: Literal["request", "manual"] = "request"
    input: Payload = {}
    requested_by: Name | None = None
    requested_at: Timestamp = Field(default_factory=utcnow)

    def message_id(self) -> str:
        return f"start:{self.tenant}:{self.flow_id}:{self.idempotency_key}"


class ExecutionRequested(Message):
    """An admitted execution, for the engine. Published only after admission said yes.

    `fire_id` is what makes it unique: `<tenant>/<flow>@<nominal fire time>` for a cron tick,
    `<tenant>/<flow>#<idempotency key>` for a request, so a duplicate is recognisable anywhere.
    """

    message_type: ClassVar[str] = "execution.requested"

    execution_id: MessageId
    fire_id: MessageId
    tenant: TenantId
    flow_id: FlowId
    trigger: Literal["cron", "request", "manual", "catch_up"]
    nominal_time: Timestamp | None = Field(
        default=None, description="the cron time this execution stands for (cron triggers)"
    )
    input: Payload = {}
    requested_at: Timestamp = Field(default_factory=utcnow)

    def message_id(self) -> str:
        return self.fire_id


class ExecutionQuery(Message):
    """Asks the engine for one execution (routing key `query.<tenant>` on
    orchestrator.commands, with `reply_to`, e.g. `amq.rabbitmq.reply-to`, and a
    `correlation_id`). The answer is an ExecutionView on the reply queue. A tenant account
    sees its own tenant's executions only."""

    message_type: ClassVar[str] = "execution.query"

    tenant: TenantId
    execution_id: MessageId
    query_id: MessageId = Field(default_factory=lambda: f"q-{uuid.uuid4().hex}")

    def message_id(self) -> str:
        return self.query_id


class StepView(Contract):
    status: str
    attempt: int = 0
    output: Payload | None = None
    error: dict[str, Any] | None = None
    dispatched_at: Timestamp | None = None
    finished_at: Timestamp | None = None


class ExecutionView(Message):
    """The engine's answer to an ExecutionQuery: `found` false when there is no such
    execution of that tenant (or it expired, after ORCH_EXECUTION_TTL_S)."""

    message_type: ClassVar[str] = "execution.view"

    found: bool
    execution_id: MessageId
    tenant: TenantId
    flow_id: FlowId | None = None
    status: (
        Literal["running", "failing", "compensating", "succeeded", "failed", "compensated"] | None
    ) = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    steps: dict[str, StepView] = {}
    failure: dict[str, Any] | None = None
    # The terminal status event exactly as it was published, once the execution ended.
    outcome: dict[str, Any] | None = None

    def message_id(self) -> str:
        return f"view:{self.execution_id}"
