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
    sees its own tenant's executions only; an operator may leave `tenant` out (routing key
    `query._`) to ask about any tenant's."""

    message_type: ClassVar[str] = "execution.query"

    tenant: TenantId | None = None
    execution_id: MessageId
    query_id: MessageId = Field(default_factory=lambda: f"q-{uuid.uuid4().hex}")

    def message_id(self) -> str:
        return self.query_id


ExecutionState = Literal[
    "running",
    "failing",  # a step failed: in-flight steps finish, nothing new starts
    "cancelling",  # cancelled: in-flight steps finish, nothing new starts
    "compensating",  # completed steps are being undone, latest first
    "succeeded",
    "failed",
    "compensated",
    "cancelled",
]
TERMINAL_STATES: tuple[str, ...] = ("succeeded", "failed", "compensated", "cancelled")


class ExecutionList(Message):
    """Asks the engine for a tenant's recent executions, newest first (routing key
    `query.<tenant>`, request/reply like ExecutionQuery). Operators may leave `tenant` out
    (routing key `query._`) to list every tenant's. The engine remembers executions for
    ORCH_EXECUTION_TTL_S after they started."""

    message_type: ClassVar[str] = "execution.list"

    tenant: TenantId | None = None
    flow_id: FlowId | None = None
    state: ExecutionState | None = None
    since: Timestamp | None = Field(default=None, description="started at or after")
    limit: Annotated[int, Field(ge=1, le=1000)] = 50
    query_id: MessageId = Field(default_factory=lambda: f"q-{uuid.uuid4().hex}")

    def message_id(self) -> str:
        return self.query_id


class ExecutionSummary(Contract):
    execution_id: MessageId
    tenant: TenantId
    flow_id: FlowId
    status: ExecutionState
    started_at: Timestamp
    finished_at: Timestamp | None = None


class ExecutionPage(Message):
    """The engine's answer to an ExecutionList. `truncated`: there are more than `limit`
    (or more than the engine looked at; narrow the filters or `since`)."""

    message_type: ClassVar[str] = "execution.page"

    items: list[ExecutionSummary] = []
    truncated: bool = False
    query_id: MessageId

    def message_id(self) -> str:
        return f"page:{self.query_id}"


class ExecutionCancel(Message):
    """Asks the engine to cancel an execution (routing key `cancel.<tenant>` on
    orchestrator.commands; a tenant account cancels its own tenant's only). No new step
    starts; steps in flight finish; completed steps with a compensation are undone, latest
    first; the execution ends `cancelled` (`failed` if a compensation fails). Cancelling an
    execution that already ends (failing, compensating, terminal) changes nothing. With
    `reply_to` the engine answers with the ExecutionView after the change. An operator may
    leave `tenant` out (routing key `cancel._`)."""

    message_type: ClassVar[str] = "execution.cancel"

    tenant: TenantId | None = None
    execution_id: MessageId
    reason: Annotated[str, Field(min_length=1, max_length=500)] = "cancelled by request"
    requested_by: Name | None = None
    request_id: MessageId = Field(default_factory=lambda: f"c-{uuid.uuid4().hex}")

    def message_id(self) -> str:
        return self.request_id


class StepView(Contract):
    type: Name | None = None
    depends_on: list[str] = []
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
    tenant: TenantId | None = None
    flow_id: FlowId | None = None
    status: ExecutionState | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    steps: dict[str, StepView] = {}
    failure: dict[str, Any] | None = None
    cancellation: dict[str, Any] | None = None
    # The terminal status event exactly as it was published, once the execution ended.
    outcome: dict[str, Any] | None = None

    def message_id(self) -> str:
        return f"view:{self.execution_id}"
