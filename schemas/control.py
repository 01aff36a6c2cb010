"""Commands against a tenant or flow, from the violations consumer or an operator.

Ids are deterministic (`<rule>:<tenant>[:<flow>]:<window start>`), so a command re-published
after a restart or rebalance is recognised and applied once.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import Field, model_validator

from schemas.common import (
    FlowId,
    Message,
    MessageId,
    Name,
    ShortText,
    TenantId,
    Timestamp,
    utcnow,
)


class _TenantCommand(Message):
    command_id: MessageId
    tenant: TenantId
    flow_id: FlowId | None = Field(default=None, description="absent: the whole tenant")
    rule: Name = Field(examples=["cpu_share"])
    reason: ShortText = ""
    issued_by: Name = "violations"
    issued_at: Timestamp = Field(default_factory=utcnow)

    def message_id(self) -> str:
        return self.command_id


class PenaltyCommand(_TenantCommand):
    """Shrinks a tenant's (or flow's) share of the workers until `expires_at`."""

    message_type: ClassVar[str] = "control.penalty"

    weight_factor: Annotated[float, Field(gt=0, le=1)] = 0.5
    concurrency_cap: Annotated[int, Field(ge=0)] | None = None
    rate_per_s: Annotated[float, Field(gt=0)] | None = None
    expires_at: Timestamp

    @model_validator(mode="after")
    def _expires_after_issue(self) -> Self:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        return self


class QuarantineCommand(_TenantCommand):
    """Stops dispatching and scheduling for a tenant (or flow) until `expires_at`."""

    message_type: ClassVar[str] = "control.quarantine"

    expires_at: Timestamp

    @model_validator(mode="after")
    def _expires_after_issue(self) -> Self:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        return self


class ReleaseCommand(_TenantCommand):
    """Ends a penalty, a quarantine or both before their expiry."""

    message_type: ClassVar[str] = "control.release"

    releases: Literal["penalty", "quarantine", "all"] = "all"
