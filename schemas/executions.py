"""Requests to run a flow: from other services (FlowStartRequested) and to the engine."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from schemas.common import (
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
    """Another service asks to start a flow (routing key `flow.start` on orchestrator.commands).

    `idempotency_key` makes a repeated request a no-op. Where RabbitMQ authenticates the
    publisher (AMQP `user_id`), that user decides the tenant, not the `tenant` field.
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
