"""What the engine answers about an execution (ExecutionQuery -> ExecutionView): the stored
state, shaped for clients. Pure."""

from __future__ import annotations

from orchestrator.engine.machine import Execution
from schemas import ExecutionQuery, ExecutionView, StepView


def execution_view(execution: Execution | None, query: ExecutionQuery) -> ExecutionView:
    """The view of `execution` for the tenant that asked: not found unless it is theirs (a
    tenant learns nothing of another's executions, not even that they exist)."""
    if execution is None or execution.tenant != query.tenant:
        return ExecutionView(found=False, execution_id=query.execution_id, tenant=query.tenant)
    return ExecutionView(
        found=True,
        execution_id=execution.execution_id,
        tenant=execution.tenant,
        flow_id=execution.flow_id,
        status=execution.status,
        started_at=execution.started_at,
        finished_at=execution.finished_at,
        steps={
            step_id: StepView(
                status=state.status,
                attempt=state.attempt,
                output=state.output,
                error=state.error,
                dispatched_at=state.dispatched_at,
                finished_at=state.finished_at,
            )
            for step_id, state in execution.steps.items()
        },
        failure=execution.failure,
        outcome=execution.outcome,
    )
