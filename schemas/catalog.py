"""The list of every message type, so decoders and doc generators never hard-code one."""

from __future__ import annotations

from schemas.common import Contract, Message
from schemas.control import PenaltyCommand, QuarantineCommand, ReleaseCommand
from schemas.executions import (
    ExecutionCancel,
    ExecutionList,
    ExecutionPage,
    ExecutionQuery,
    ExecutionRequested,
    ExecutionView,
    FlowStartRequested,
)
from schemas.flows import FlowDefinition
from schemas.status import StatusEvent
from schemas.steps import StepResult, StepTask
from schemas.usage import UsageEvent

MESSAGES: dict[str, type[Message]] = {
    model.message_type: model
    for model in (
        FlowStartRequested,
        ExecutionRequested,
        StepTask,
        StepResult,
        UsageEvent,
        StatusEvent,
        PenaltyCommand,
        QuarantineCommand,
        ReleaseCommand,
        ExecutionQuery,
        ExecutionView,
        ExecutionList,
        ExecutionPage,
        ExecutionCancel,
    )
}

# Contracts that are documents, not messages (files given to `orchestrator flows apply`).
DOCUMENTS: dict[str, type[Contract]] = {"flow.definition": FlowDefinition}


def message_model(message_type: str) -> type[Message]:
    try:
        return MESSAGES[message_type]
    except KeyError:
        raise KeyError(f"unknown message type {message_type!r}") from None
