"""The `data` of each status event type: one model per `<entity>.<state>`.

These are the documented fields, the contract subscribers may rely on. A consumer must
ignore fields it does not know (`extra="allow"`): new ones may appear without notice. Fields
with a default are left out by some emitters or in some cases; the others are always there.

Validation is strict, on the JSON form of the data (what a subscriber receives): a number
sent as a string, or a boolean where a count is expected, is refused. Times are RFC 3339
strings with an offset (`format: date-time`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Self

from pydantic import ConfigDict, Field, JsonValue, model_validator

from schemas.common import (
    Contract,
    MessageId,
    Name,
    Slug,
    StepId,
    StepType,
    Timestamp,
)

Attempt = Annotated[int, Field(ge=1, le=100, description="1 for the first attempt")]
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(description="seconds")]
StepKind = Literal["action", "compensation"]
# The violation rules of orchestrator.violations.policy (`Rule`): schemas depend on nothing
# of the orchestrator, so the list is repeated here (a unit test keeps the two equal).
ViolationRule = Literal[
    "cpu_share", "steps_per_min", "error_rate", "memory_per_step", "runtime_vs_interval"
]


class EventData(Contract):
    """Base of every status event's `data`: strict, but open to fields added later."""

    model_config = ConfigDict(extra="allow", strict=True)


# ---------------------------------------------------------------- shared parts
class StepErrorData(EventData):
    """Why an attempt failed: the worker's StepError, or the engine's own (`Unknown`,
    `DeadlineExceeded`, `InvalidInput`)."""

    type: Name = Field(examples=["TimeoutError", "DeadlineExceeded"])
    retryable: bool
    message: str | None = Field(default=None, description="absent in the engine's `Unknown` error")
    reason: Slug | None = Field(
        default=None,
        description="set when the runtime, not the step, decided the failure (`poison`, "
        "`timeout`, `unknown_step_type`)",
    )


class FailureData(EventData):
    """Why an execution failed: the step that failed finally, and/or the compensation that
    failed; for an execution that never ran, a `reason` and `detail` instead."""

    step_id: StepId | None = Field(default=None, description="the step that failed finally")
    error: StepErrorData | None = Field(default=None, description="that step's last error")
    compensation_failed: StepId | None = Field(
        default=None, description="the step whose compensation failed"
    )
    compensation_error: StepErrorData | None = Field(
        default=None, description="that compensation's last error"
    )
    reason: str | None = Field(
        default=None,
        description="why the execution could not run at all, e.g. `unknown_flow`",
        examples=["unknown_flow"],
    )
    detail: str | None = None


class CancellationData(EventData):
    """A cancel request as the engine accepted it."""

    reason: Annotated[str, Field(min_length=1, max_length=500)]
    requested_by: str | None = Field(
        description="the request's `requested_by`, else the AMQP user that sent it; null "
        "when neither is known"
    )
    at: Timestamp = Field(description="when the engine accepted the request")


# ---------------------------------------------------------------- execution.*
class _Finished(EventData):
    fire_id: MessageId
    duration_s: Seconds = Field(description="seconds from start to end")


class ExecutionStartedData(EventData):
    """The engine started an execution: its first steps are being dispatched."""

    fire_id: MessageId = Field(description="the tick or request this execution stands for")
    steps: Annotated[int, Field(ge=1, description="number of steps in the flow")]


class ExecutionCancellingData(EventData):
    """A cancel request was accepted: nothing new starts, steps in flight finish, completed
    steps are compensated, then the execution ends `cancelled` (or `failed`)."""

    cancellation: CancellationData


class ExecutionSucceededData(_Finished):
    """Every step of the execution succeeded."""

    outputs: dict[str, dict[str, JsonValue]] = Field(description="step id -> its output")


class ExecutionFailedData(EventData):
    """The execution failed: a step failed finally and nothing was compensated, a
    compensation failed, or the flow no longer existed when the execution was to start
    (then only `failure` is sent, with `reason` `unknown_flow`)."""

    failure: FailureData
    fire_id: MessageId | None = Field(default=None, description="absent for `unknown_flow`")
    duration_s: Seconds | None = Field(default=None, description="absent for `unknown_flow`")
    cancellation: CancellationData | None = Field(
        default=None, description="set when a cancelled execution failed to compensate"
    )


class ExecutionCompensatedData(_Finished):
    """A step failed finally; the completed steps with a compensation were undone."""

    failure: FailureData


class ExecutionCancelledData(_Finished):
    """The execution was cancelled; the completed steps with a compensation were undone."""

    cancellation: CancellationData


# ---------------------------------------------------------------- step.*
class _Step(EventData):
    step_id: StepId
    attempt: Attempt


class StepDispatchedData(_Step):
    """An attempt of a step (or of its compensation) was sent to the workers."""

    step_type: StepType = Field(description="the handler that runs it (the compensation's)")
    kind: StepKind
    task_id: MessageId = Field(description="the attempt id workers deduplicate on")


class StepStartedData(_Step):
    """A worker reported an attempt (sent with its result: the time it started)."""

    kind: StepKind
    worker_id: Name
    started_at: Timestamp


class StepSucceededData(_Step):
    """A step's action succeeded."""


class StepFailedData(_Step):
    """An attempt failed and will not be retried: the step (or its compensation) failed."""

    kind: StepKind
    error: StepErrorData


class StepRetryingData(_Step):
    """An attempt failed; the next one is dispatched after `delay_s`."""

    kind: StepKind
    delay_s: Annotated[float, Field(ge=0, description="seconds before the next attempt")]
    error: StepErrorData


class StepWaitingData(EventData):
    """The circuit breaker of the step's type is open: the step waits, it does not fail."""

    step_id: StepId
    reason: Literal["circuit_open"]
    until: Timestamp = Field(description="when the dispatch is tried again")


class StepCompensatedData(_Step):
    """A step's compensation succeeded: what the step did is undone."""

    attempt: Attempt = Field(description="the compensation's attempt")


# ---------------------------------------------------------------- tick.*
class _Tick(EventData):
    fire_id: MessageId = Field(examples=["acme/daily-sync@2026-03-29T01:30:00.000Z"])
    nominal_time: Timestamp = Field(description="the cron time of the tick")
    execution_id: MessageId
    trigger: Literal["cron", "catch_up"]
    coalesced: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="catch_up: the number of missed ticks this run stands for"
    )


class _TickReport(EventData):
    """Either one tick (`fire_id`, `nominal_time`) or, past 100 in one round, a summary
    (`summary`: true, `count`, `count_is_lower_bound`, `first`, `last`)."""

    fire_id: MessageId | None = Field(default=None, description="absent in a summary")
    nominal_time: Timestamp | None = Field(default=None, description="absent in a summary")
    summary: bool = Field(default=False, description="true: one event for many ticks")
    count: Count | None = Field(default=None, description="summary: how many ticks")
    count_is_lower_bound: bool | None = Field(
        default=None, description="summary: there were more than could be counted"
    )
    first: Timestamp | None = Field(default=None, description="summary: the first tick")
    last: Timestamp | None = Field(default=None, description="summary: the last tick")

    @model_validator(mode="after")
    def _one_shape(self) -> Self:
        if self.summary:
            missing = [
                name
                for name in ("count", "count_is_lower_bound", "first", "last")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"a summary must have {', '.join(missing)}")
        elif self.fire_id is None or self.nominal_time is None:
            raise ValueError("a tick report must have fire_id and nominal_time")
        return self


class TickFiredData(_Tick):
    """A cron tick was admitted: its execution was requested from the engine."""


class TickBufferedData(_Tick):
    """A cron tick waits (overlap policy `buffer_one`) until the running execution ends."""


class TickSkippedData(_TickReport):
    """A cron tick did not run: the flow was paused, the previous execution still ran
    (`overlap`), the tenant is quarantined, or the tick was missed (`missed`: beyond the
    catch-up window, or catch-up off). `missed` ticks are reported one by one, or past 100 in
    a round as a summary; the others carry the tick's execution id and trigger too."""

    reason: Literal["paused", "overlap", "quarantined", "missed"]
    execution_id: MessageId | None = Field(default=None, description="absent for `missed`")
    trigger: Literal["cron", "catch_up"] | None = Field(
        default=None, description="absent for `missed`"
    )
    coalesced: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="catch_up: the number of missed ticks it stood for"
    )


class TickCoalescedData(_TickReport):
    """A missed cron tick was folded into one catch-up run (reported one by one, or past 100
    in a round as a summary)."""

    reason: Literal["catch_up"]


# ---------------------------------------------------------------- flow_start.*
class FlowStartAcceptedData(EventData):
    """A flow-start request was admitted (or was a repeat of one admitted before)."""

    idempotency_key: Name
    execution_id: MessageId
    fire_id: MessageId
    duplicate: bool = Field(
        default=False, description="true: the key was seen before, nothing new was started"
    )
    buffered: bool = Field(
        default=False, description="true: waits for the flow's running execution to end"
    )


class _Rejected(EventData):
    reason: str = Field(examples=["schema_violation", "rate_limited"])
    message_id: MessageId | None = Field(
        default=None, description="the message's AMQP message_id, when it was a valid id"
    )
    message_id_invalid: str | None = Field(
        default=None, description="an invalid message_id, quoted and bounded"
    )
    dropped: bool = Field(
        default=False, description="true: the message is gone (no dead-letter copy)"
    )


class FlowStartRejectedData(_Rejected):
    """A flow-start request was refused: bad input (dead-lettered) or policy (rate limited,
    paused, overlap, quarantined: the same request may succeed later)."""

    queue: str = Field(description="the ingress queue it came from")
    detail: str


class MessageRejectedData(_Rejected):
    """A message no contract accepts was rejected (and dead-lettered): from a RabbitMQ queue
    (`queue`) or a Kafka topic (`topic`)."""

    queue: str | None = Field(default=None, description="the queue it came from (AMQP)")
    topic: str | None = Field(default=None, description="the topic it came from (Kafka)")
    detail: str | None = Field(default=None, description="absent in the bare fallback event")


# ---------------------------------------------------------------- tenant.*
class _Decision(EventData):
    rule: ViolationRule
    measured: float = Field(description="the rule's figure over the window")
    limit: float = Field(description="the plan's limit it exceeded")
    reason: str
    offences: Annotated[int, Field(ge=1, description="within the look-back, this one too")]
    window_start: Timestamp
    window_s: Seconds
    command_id: MessageId = Field(description="the id of the decision (and of its command)")


class TenantWarnedData(_Decision):
    """A tenant (or one of its flows) broke a plan limit: a warning, nothing is enforced."""

    action: Literal["warn"]
    expires_at: None = Field(default=None, description="always null: a warning never expires")


class TenantPenalizedData(_Decision):
    """A tenant (or one of its flows) is penalized (a smaller fair share) until `expires_at`."""

    action: Literal["penalty"]
    expires_at: Timestamp


class TenantQuarantinedData(_Decision):
    """A tenant (or one of its flows) is quarantined (nothing starts) until `expires_at`."""

    action: Literal["quarantine"]
    expires_at: Timestamp


class TenantReleasedData(EventData):
    """A penalty or quarantine ran out: the tenant (or flow) is released."""

    released: Literal["penalty", "quarantine"]
    command_id: MessageId = Field(description="the decision that ran out")


# ---------------------------------------------------------------- dlq.*
class _DlqRun(EventData):
    queue: str = Field(examples=["ingress.acme.dlq"])
    by: str = Field(description="the AMQP user that ran it")
    filters: dict[str, str]
    moved: Count
    skipped: Count = Field(description="not matching the filters, or over the limit")
    over_limit: Count = Field(description="left in the DLQ: replayed too often already")
    failed: Count
    reasons: dict[str, Count] = Field(description="dead-letter reason -> letters moved")
    seconds: Annotated[float, Field(ge=0)]


class DlqReplayedData(_DlqRun):
    """An operator replayed letters from a dead-letter queue (audit)."""

    to: str = Field(
        description="as `--to` took it: `original` (each letter's own queue), "
        "`queue:NAME`, or `EXCHANGE:ROUTING_KEY`",
        examples=["original", "queue:ingress.acme"],
    )


class DlqPurgedData(_DlqRun):
    """An operator purged letters from a dead-letter queue (audit)."""

    to: None = None


DATA_MODELS: dict[str, type[EventData]] = {
    "execution.started": ExecutionStartedData,
    "execution.cancelling": ExecutionCancellingData,
    "execution.succeeded": ExecutionSucceededData,
    "execution.failed": ExecutionFailedData,
    "execution.compensated": ExecutionCompensatedData,
    "execution.cancelled": ExecutionCancelledData,
    "step.dispatched": StepDispatchedData,
    "step.started": StepStartedData,
    "step.succeeded": StepSucceededData,
    "step.failed": StepFailedData,
    "step.retrying": StepRetryingData,
    "step.waiting": StepWaitingData,
    "step.compensated": StepCompensatedData,
    "tick.fired": TickFiredData,
    "tick.skipped": TickSkippedData,
    "tick.coalesced": TickCoalescedData,
    "tick.buffered": TickBufferedData,
    "flow_start.accepted": FlowStartAcceptedData,
    "flow_start.rejected": FlowStartRejectedData,
    "tenant.warned": TenantWarnedData,
    "tenant.penalized": TenantPenalizedData,
    "tenant.quarantined": TenantQuarantinedData,
    "tenant.released": TenantReleasedData,
    "message.rejected": MessageRejectedData,
    "dlq.replayed": DlqReplayedData,
    "dlq.purged": DlqPurgedData,
}


def check_data(entity: str, state: str, data: dict[str, Any]) -> None:
    """Validates the `data` of an `<entity>.<state>` event as a subscriber would read it (its
    JSON form). Raises pydantic's ValidationError on a mismatch, ValueError for a type
    without a model."""
    model = DATA_MODELS.get(f"{entity}.{state}")
    if model is None:
        raise ValueError(f"no data model for status type {entity}.{state}")
    model.model_validate(json.loads(json.dumps(data, default=str)))
