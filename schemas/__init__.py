"""The message contracts of the orchestrator: every message on every broker, as pydantic models.

Other services import only this package (plus `orchestrator.client`) to talk to the system.
"""

from schemas.catalog import MESSAGES, message_model
from schemas.common import SCHEMA_VERSION, Message
from schemas.control import PenaltyCommand, QuarantineCommand, ReleaseCommand
from schemas.executions import (
    TERMINAL_STATES,
    ExecutionCancel,
    ExecutionList,
    ExecutionPage,
    ExecutionQuery,
    ExecutionRequested,
    ExecutionSummary,
    ExecutionView,
    FlowStartRequested,
    StepView,
)
from schemas.flows import (
    CatchUpPolicy,
    FlowDefinition,
    OverlapPolicy,
    RetryPolicy,
    StepDefinition,
)
from schemas.status import StatusEvent
from schemas.steps import StepError, StepResult, StepTask
from schemas.usage import UsageEvent

__all__ = [
    "MESSAGES",
    "SCHEMA_VERSION",
    "TERMINAL_STATES",
    "CatchUpPolicy",
    "ExecutionCancel",
    "ExecutionList",
    "ExecutionPage",
    "ExecutionQuery",
    "ExecutionRequested",
    "ExecutionSummary",
    "ExecutionView",
    "FlowDefinition",
    "FlowStartRequested",
    "Message",
    "OverlapPolicy",
    "PenaltyCommand",
    "QuarantineCommand",
    "ReleaseCommand",
    "RetryPolicy",
    "StatusEvent",
    "StepDefinition",
    "StepError",
    "StepResult",
    "StepTask",
    "StepView",
    "UsageEvent",
    "message_model",
]
