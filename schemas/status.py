"""Status events: CloudEvents 1.0 (structured JSON) on the `orchestrator.status` topic exchange.

Routing key `<tenant>.<flow>.<entity>.<state>`, e.g. `acme.daily-sync.execution.failed`, so a
subscriber binds `acme.#` or `*.*.execution.failed`. Events about a whole tenant, or about a
message whose tenant could not be read, use `_` for the missing words (slugs never start
with `_`, so the placeholder cannot collide with a real id).
"""

from __future__ import annotations

import os
from typing import Annotated, ClassVar, Literal, Self

from pydantic import ConfigDict, Field, model_validator

from schemas.common import (
    FlowId,
    Message,
    MessageId,
    Payload,
    SchemaVersion,
    TenantId,
    Timestamp,
    utcnow,
)
from schemas.status_data import check_data

TYPE_PREFIX = "io.orchestrator."
# With ORCH_CONTRACT_CHECKS=1 (the test suite sets it, for every process it starts) each event's
# `data` is validated against its type's schema (schemas/status_data.py) when it is built, so a
# data shape that drifts from the published contract fails a test. Off in production: building
# an event must never fail there (rejection paths build them).
CONTRACT_CHECKS_VARIABLE = "ORCH_CONTRACT_CHECKS"
NO_ID = "_"

# Every (entity, state) the system reports. Adding one is a contract change: regenerate the docs.
STATES: dict[str, tuple[str, ...]] = {
    "execution": ("started", "cancelling", "succeeded", "failed", "compensated", "cancelled"),
    "step": ("dispatched", "started", "succeeded", "failed", "retrying", "waiting", "compensated"),
    "tick": ("fired", "skipped", "coalesced", "buffered"),
    "flow_start": ("accepted", "rejected"),
    "tenant": ("warned", "penalized", "quarantined", "released"),
    "message": ("rejected",),
    "dlq": ("replayed", "purged"),  # an operator's run over a dead-letter queue (audit)
}

SEQUENCE_DIGITS = 12


def routing_key(tenant: str | None, flow: str | None, entity: str, state: str) -> str:
    return f"{tenant or NO_ID}.{flow or NO_ID}.{entity}.{state}"


class StatusEvent(Message):
    """One CloudEvent. `sequence` follows the CloudEvents sequence extension: a zero-padded
    decimal string, lexicographically ordered, counting per `subject` (the execution id)."""

    message_type: ClassVar[str] = "status"
    # Structured content mode of the CloudEvents AMQP binding: the whole event is the body.
    content_type: ClassVar[str] = "application/cloudevents+json"
    # Optional attributes without a value are left out, never sent as null (CloudEvents
    # readers refuse null attributes).
    OPTIONAL: ClassVar[tuple[str, ...]] = ("subject", "sequence", "tenant", "flow")

    # CloudEvents 1.0 context attributes (https://github.com/cloudevents/spec).
    specversion: Literal["1.0"] = "1.0"
    id: MessageId
    source: Annotated[str, Field(pattern=r"^/tenants/[^/]+(/flows/[^/]+)?$|^/orchestrator$")]
    type: Annotated[str, Field(pattern=r"^io\.orchestrator\.[a-z_]+\.[a-z_]+$")]
    subject: MessageId | None = None
    time: Timestamp = Field(default_factory=utcnow)
    datacontenttype: Literal["application/json"] = "application/json"
    sequence: Annotated[str, Field(pattern=rf"^[0-9]{{{SEQUENCE_DIGITS}}}$")] | None = None
    # Extension attributes (lower-case alphanumeric names, as CloudEvents requires).
    tenant: TenantId | None = None
    flow: FlowId | None = None
    data: Payload = {}

    # Ours, not CloudEvents'. It travels as the extension attribute `schemaversion`, since
    # extension names may hold only lower-case letters and digits.
    schema_version: SchemaVersion = Field(default=1, alias="schemaversion")

    model_config = ConfigDict(
        extra="forbid", frozen=True, serialize_by_alias=True, validate_by_name=True
    )

    @model_validator(mode="after")
    def _known_type(self) -> Self:
        entity, state = self.entity_state
        if state not in STATES.get(entity, ()):
            raise ValueError(f"unknown status type {self.type!r}")
        return self

    @property
    def entity_state(self) -> tuple[str, str]:
        entity, _, state = self.type.removeprefix(TYPE_PREFIX).partition(".")
        return entity, state

    @property
    def sequence_number(self) -> int | None:
        return None if self.sequence is None else int(self.sequence)

    @property
    def routing_key(self) -> str:
        return routing_key(self.tenant, self.flow, *self.entity_state)

    def message_id(self) -> str:
        return self.id

    def to_bytes(self) -> bytes:
        absent = {name for name in self.OPTIONAL if getattr(self, name) is None}
        return self.model_dump_json(exclude=absent).encode()

    @classmethod
    def build(
        cls,
        entity: str,
        state: str,
        *,
        event_id: str,
        tenant: str | None = None,
        flow: str | None = None,
        subject: str | None = None,
        sequence: int | None = None,
        data: dict[str, object] | None = None,
    ) -> StatusEvent:
        if tenant is None:
            source = "/orchestrator"
        elif flow is None:
            source = f"/tenants/{tenant}"
        else:
            source = f"/tenants/{tenant}/flows/{flow}"
        event = cls.model_validate(
            {
                "id": event_id,
                "source": source,
                "type": f"{TYPE_PREFIX}{entity}.{state}",
                "subject": subject,
                "sequence": None if sequence is None else f"{sequence:0{SEQUENCE_DIGITS}d}",
                "tenant": tenant,
                "flow": flow,
                "data": data or {},
            }
        )
        if os.environ.get(CONTRACT_CHECKS_VARIABLE) == "1":
            check_data(entity, state, event.data)
        return event
