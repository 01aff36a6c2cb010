"""`orchestrator executions list / show / cancel`: what ran, how each step went, and stopping
one. Everything goes through OrchestratorClient (AMQP request/reply with the engine), so a
tenant account sees and cancels its own tenant's executions only."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, TypeVar

import typer
from rich.table import Table

from orchestrator.client import OrchestratorClient, OrchestratorError, UnknownExecution
from orchestrator.cliutil import ExitCode, console, fail, settings_or_exit
from orchestrator.config import Settings
from schemas import ExecutionView
from schemas.executions import ExecutionState

executions_app = typer.Typer(
    help="Executions: list, show one step by step, cancel.", no_args_is_help=True
)

T = TypeVar("T")
Tenant = Annotated[
    str | None, typer.Option(help="the execution's tenant (an operator may leave it out)")
]
AsJson = Annotated[
    bool | None, typer.Option("--json/--text", help="default: text on a terminal, else JSON")
]
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`15m`, `2h`, `1d` (ago), or an ISO 8601 time (UTC unless it says otherwise)."""
    if match := _RELATIVE.match(text.strip()):
        amount, unit = match.groups()
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: float(amount)})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: expected e.g. 15m, 2h, 1d or an ISO time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _with_client(settings: Settings, action: Callable[[OrchestratorClient], Awaitable[T]]) -> T:
    async def run() -> T:
        async with OrchestratorClient(
            str(settings.rabbitmq_url),
            account_prefix=settings.account_prefix,
            connection_name="orchestrator-cli",
            timeout_s=15,
        ) as client:
            return await action(client)

    try:
        return asyncio.run(run())
    except UnknownExecution as exc:
        raise fail(str(exc)) from None
    except OrchestratorError as exc:
        raise fail(f"{exc} ({exc.reason}); is the engine running?") from None


def _json_wanted(as_json: bool | None) -> bool:
    return (not console.is_terminal) if as_json is None else as_json


def _time(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if moment else "-"


def _duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "-"
    return f"{(end - start).total_seconds():.3f} s"


@executions_app.command("list")
def executions_list(  # noqa: PLR0917 - typer maps each parameter to an option
    tenant: Tenant = None,
    flow: Annotated[str | None, typer.Option(help="only this flow")] = None,
    state: Annotated[str | None, typer.Option(help="only executions in this state")] = None,
    since: Annotated[
        str | None, typer.Option(help="started since: 15m, 2h, 1d or an ISO time")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    as_json: AsJson = None,
) -> None:
    """Recent executions, newest first (kept for ORCH_EXECUTION_TTL_S after they started)."""
    settings = settings_or_exit()
    try:
        since_at = parse_since(since) if since else None
    except ValueError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    if state is not None and state not in ExecutionState.__args__:  # type: ignore[attr-defined]
        states = ", ".join(ExecutionState.__args__)  # type: ignore[attr-defined]
        raise fail(f"--state {state!r}: expected one of {states}", ExitCode.USAGE)
    if tenant is None and flow is not None:
        raise fail("--flow needs --tenant", ExitCode.USAGE)
    page = _with_client(
        settings,
        lambda c: c.list_executions(tenant, flow=flow, state=state, since=since_at, limit=limit),
    )
    if _json_wanted(as_json):
        typer.echo(page.model_dump_json())
        return
    table = Table("execution", "flow", "state", "started (UTC)", "duration")
    for item in page.items:
        table.add_row(
            item.execution_id,
            f"{item.tenant}/{item.flow_id}",
            item.status,
            _time(item.started_at),
            _duration(item.started_at, item.finished_at),
        )
    console.print(table)
    if page.truncated:
        console.print(f"(more than {len(page.items)}; narrow with --since, --flow or --state)")


def _show(view: ExecutionView) -> None:
    console.print(
        f"[bold]{view.execution_id}[/]  {view.tenant}/{view.flow_id}  [bold]{view.status}[/]"
        f"  started {_time(view.started_at)}  duration "
        f"{_duration(view.started_at, view.finished_at)}",
        highlight=False,
    )
    table = Table("step", "type", "after", "state", "attempt", "dispatched", "finished", "took")
    for step_id, step in view.steps.items():
        table.add_row(
            step_id,
            step.type or "-",
            ", ".join(step.depends_on) or "-",
            step.status,
            str(step.attempt),
            _time(step.dispatched_at),
            _time(step.finished_at),
            _duration(step.dispatched_at, step.finished_at),
        )
    console.print(table)
    for label, value in (("failure", view.failure), ("cancellation", view.cancellation)):
        if value:
            console.print(f"{label}: {json.dumps(value)}", highlight=False, soft_wrap=True)


@executions_app.command("show")
def executions_show(
    execution_id: Annotated[str, typer.Argument(help="the execution id")],
    tenant: Tenant = None,
    as_json: AsJson = None,
) -> None:
    """One execution: its steps in DAG order with state, attempts and timings."""
    settings = settings_or_exit()
    view = _with_client(settings, lambda c: c.get_execution(execution_id, tenant))
    if not view.found:
        raise fail(f"no execution {execution_id}" + (f" of tenant {tenant!r}" if tenant else ""))
    if _json_wanted(as_json):
        typer.echo(view.model_dump_json())
    else:
        _show(view)


@executions_app.command("cancel")
def executions_cancel(
    execution_id: Annotated[str, typer.Argument(help="the execution id")],
    tenant: Tenant = None,
    reason: Annotated[str, typer.Option(help="recorded with the cancellation")] = "operator",
) -> None:
    """Cancels a running execution: no new step starts, steps in flight finish, completed
    steps are compensated; it ends `cancelled`. Exit 1 if it had already ended (or was
    ending after a failure)."""
    settings = settings_or_exit()
    view = _with_client(settings, lambda c: c.cancel(execution_id, reason, tenant))
    if view.status in ("cancelling", "cancelled") and view.cancellation:
        typer.echo(f"{execution_id}: {view.status}")
        return
    raise fail(f"{execution_id} was not cancelled: it is {view.status}")
