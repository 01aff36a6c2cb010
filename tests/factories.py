"""Valid example messages of every type, for round-trip and broker tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator.testing import cpu_usage  # noqa: F401 - shared with the benches
from schemas import (
    MESSAGES,
    ExecutionCancel,
    ExecutionList,
    ExecutionPage,
    ExecutionQuery,
    ExecutionRequested,
    ExecutionSummary,
    ExecutionView,
    FlowDefinition,
    FlowStartRequested,
    Message,
    PenaltyCommand,
    QuarantineCommand,
    ReleaseCommand,
    StatusEvent,
    StepResult,
    StepTask,
    StepView,
    UsageEvent,
)

NOW = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


def flow_document(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "tenant": "acme",
        "id": "daily-sync",
        "cron": "30 2 * * *",
        "timezone": "Europe/Berlin",
        "steps": [
            {"id": "a", "type": "demo.echo"},
            {"id": "b", "type": "demo.sleep", "depends_on": ["a"], "input": {"ms": 10}},
            {"id": "c", "type": "demo.cpu", "depends_on": ["a"], "compensation": "demo.echo"},
            {"id": "d", "type": "demo.echo", "depends_on": ["b", "c"]},
        ],
    }
    doc.update(overrides)
    return doc


def flow(**overrides: Any) -> FlowDefinition:
    return FlowDefinition.model_validate(flow_document(**overrides))


def sample(message_type: str, tenant: str = "acme") -> Message:
    """One valid instance of each message type."""
    execution = "exec-1"
    builders: dict[str, Any] = {
        FlowStartRequested.message_type: lambda: FlowStartRequested(
            tenant=tenant, flow_id="daily-sync", idempotency_key="order-42", input={"x": 1}
        ),
        ExecutionRequested.message_type: lambda: ExecutionRequested(
            execution_id=execution,
            fire_id=f"{tenant}/daily-sync@{NOW.isoformat()}",
            tenant=tenant,
            flow_id="daily-sync",
            trigger="cron",
            nominal_time=NOW,
        ),
        StepTask.message_type: lambda: StepTask(
            task_id=f"{execution}:a:1",
            execution_id=execution,
            tenant=tenant,
            flow_id="daily-sync",
            step_id="a",
            step_type="demo.echo",
            attempt=1,
            input={"k": [1, 2, {"n": None}]},
            timeout_s=30,
            deadline=NOW + timedelta(seconds=30),
        ),
        StepResult.message_type: lambda: StepResult(
            task_id=f"{execution}:a:1",
            execution_id=execution,
            tenant=tenant,
            flow_id="daily-sync",
            step_id="a",
            attempt=1,
            outcome="succeeded",
            output={"ok": True},
            worker_id="w-1",
            started_at=NOW,
            finished_at=NOW + timedelta(seconds=1),
        ),
        UsageEvent.message_type: lambda: UsageEvent(
            event_id=f"{execution}:a:1",
            tenant=tenant,
            flow_id="daily-sync",
            execution_id=execution,
            step_id="a",
            step_type="demo.cpu",
            attempt=1,
            worker_id="w-1",
            outcome="succeeded",
            wall_s=0.5,
            cpu_s=0.4,
            peak_memory_bytes=1 << 20,
            bytes_in=100,
            bytes_out=200,
            started_at=NOW,
            finished_at=NOW + timedelta(seconds=0.5),
        ),
        StatusEvent.message_type: lambda: StatusEvent.build(
            "execution",
            "succeeded",
            event_id=f"{execution}:7",
            tenant=tenant,
            flow="daily-sync",
            subject=execution,
            sequence=7,
            data={"fire_id": "acme/daily-sync#k", "duration_s": 1.5, "outputs": {"a": {}}},
        ),
        PenaltyCommand.message_type: lambda: PenaltyCommand(
            command_id=f"cpu_share:{tenant}:2026-03-29T01:30",
            tenant=tenant,
            rule="cpu_share",
            weight_factor=0.25,
            issued_at=NOW,
            expires_at=NOW + timedelta(minutes=10),
        ),
        QuarantineCommand.message_type: lambda: QuarantineCommand(
            command_id=f"cpu_share:{tenant}:q",
            tenant=tenant,
            flow_id="daily-sync",
            rule="cpu_share",
            issued_at=NOW,
            expires_at=NOW + timedelta(minutes=30),
        ),
        ReleaseCommand.message_type: lambda: ReleaseCommand(
            command_id=f"release:{tenant}:1", tenant=tenant, rule="operator", issued_by="ops"
        ),
        ExecutionQuery.message_type: lambda: ExecutionQuery(
            tenant=tenant, execution_id=execution, query_id="q-1"
        ),
        ExecutionView.message_type: lambda: ExecutionView(
            found=True,
            execution_id=execution,
            tenant=tenant,
            flow_id="daily-sync",
            status="succeeded",
            started_at=NOW,
            finished_at=NOW + timedelta(seconds=2),
            steps={"a": StepView(status="succeeded", attempt=1, output={"ok": True})},
        ),
        ExecutionList.message_type: lambda: ExecutionList(
            tenant=tenant, flow_id="daily-sync", state="failed", since=NOW, query_id="q-2"
        ),
        ExecutionPage.message_type: lambda: ExecutionPage(
            query_id="q-2",
            items=[
                ExecutionSummary(
                    execution_id=execution,
                    tenant=tenant,
                    flow_id="daily-sync",
                    status="failed",
                    started_at=NOW,
                    finished_at=NOW + timedelta(seconds=2),
                )
            ],
        ),
        ExecutionCancel.message_type: lambda: ExecutionCancel(
            tenant=tenant, execution_id=execution, reason="not needed", request_id="c-1"
        ),
    }
    assert set(builders) == set(MESSAGES), "every message type needs a sample"
    message: Message = builders[message_type]()
    return message
