"""What the engine answers about executions (ExecutionQuery -> ExecutionView, ExecutionList
-> ExecutionPage): the stored state, shaped for clients. Pure."""

from __future__ import annotations

from orchestrator.engine.machine import Execution
from schemas import ExecutionList, ExecutionPage, ExecutionSummary, ExecutionView, StepView


def execution_view(
    execution: Execution | None, tenant: str | None, execution_id: str
) -> ExecutionView:
    """The view of `execution` for the tenant that asked (None: an operator, any tenant):
    not found unless it is theirs (a tenant learns nothing of another's executions, not even
    that they exist)."""
    if execution is None or tenant not in (None, execution.tenant):
        return ExecutionView(found=False, execution_id=execution_id, tenant=tenant)
    return ExecutionView(
        found=True,
        execution_id=execution.execution_id,
        tenant=execution.tenant,
        flow_id=execution.flow_id,
        status=execution.status,
        started_at=execution.started_at,
        finished_at=execution.finished_at,
        steps={
            step.id: StepView(
                type=step.type,
                depends_on=list(step.depends_on),
                status=state.status,
                attempt=state.attempt,
                output=state.output,
                error=state.error,
                dispatched_at=state.dispatched_at,
                finished_at=state.finished_at,
            )
            for step in execution.definition.steps
            for state in (execution.steps[step.id],)
        },
        failure=execution.failure,
        cancellation=execution.cancellation,
        outcome=execution.outcome,
    )


def matches(execution: Execution, query: ExecutionList) -> bool:
    return (
        (query.tenant is None or execution.tenant == query.tenant)
        and (query.flow_id is None or execution.flow_id == query.flow_id)
        and (query.state is None or execution.status == query.state)
    )


def execution_page(executions: list[Execution], query: ExecutionList, more: bool) -> ExecutionPage:
    """The newest `query.limit` of `executions` (newest first) that match the filters."""
    chosen = [x for x in executions if matches(x, query)]
    return ExecutionPage(
        query_id=query.query_id,
        items=[
            ExecutionSummary(
                execution_id=x.execution_id,
                tenant=x.tenant,
                flow_id=x.flow_id,
                status=x.status,
                started_at=x.started_at,
                finished_at=x.finished_at,
            )
            for x in chosen[: query.limit]
        ],
        truncated=more or len(chosen) > query.limit,
    )
