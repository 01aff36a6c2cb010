"""The `orchestrator` command: every process and every operator tool is a subcommand."""

from __future__ import annotations

import asyncio
from enum import IntEnum
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from orchestrator import apidoc, topology
from orchestrator.amqp import connect, open_channel
from orchestrator.config import ConfigError, Settings, load_settings
from orchestrator.health import check_all
from orchestrator.telemetry import configure_logging


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # the command ran and found a problem (broker down, stale files)
    USAGE = 2  # bad arguments or input files (typer uses 2 for usage errors too)
    CONFIG = 78  # EX_CONFIG from sysexits.h: an ORCH_* variable is invalid


app = typer.Typer(
    help="A fair, message-driven flow orchestrator.", no_args_is_help=True, add_completion=False
)
topology_app = typer.Typer(help="RabbitMQ exchanges, queues and bindings.", no_args_is_help=True)
schemas_app = typer.Typer(help="Message contracts (JSON Schema, AsyncAPI).", no_args_is_help=True)
app.add_typer(topology_app, name="topology")
app.add_typer(schemas_app, name="schemas")

console = Console()
err_console = Console(stderr=True)


def settings_or_exit() -> Settings:
    try:
        settings = load_settings()
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(ExitCode.CONFIG) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


async def _apply_topology(settings: Settings) -> list[str]:
    connection = await connect(settings, "orchestrator-topology")
    async with connection:
        channel = await open_channel(connection)
        return await topology.apply(channel)


def _print_checks(settings: Settings) -> bool:
    statuses = asyncio.run(check_all(settings))
    table = Table("broker", "status", "detail")
    for status in statuses:
        table.add_row(status.name, "[green]up[/]" if status.ok else "[red]down[/]", status.detail)
    console.print(table)
    return all(status.ok for status in statuses)


@app.command()
def check() -> None:
    """Health probe: exit 0 when RabbitMQ, Kafka and Redis all answer, 1 otherwise."""
    settings = settings_or_exit()
    if not _print_checks(settings):
        raise typer.Exit(ExitCode.FAILURE)


@app.command()
def up() -> None:
    """Development mode: checks the brokers and applies the topology."""
    settings = settings_or_exit()
    if not _print_checks(settings):
        err_console.print("[red]error:[/red] a broker is down; start them with `scripts/infra up`")
        raise typer.Exit(ExitCode.FAILURE)
    lines = asyncio.run(_apply_topology(settings))
    console.print(f"topology applied: {len(lines)} objects declared")
    console.print("[green]orchestrator is up[/green]: RabbitMQ, Kafka and Redis answer.")


@topology_app.command("apply")
def topology_apply() -> None:
    """Declares every exchange, queue and binding (idempotent) and prints what it declared."""
    settings = settings_or_exit()
    for line in asyncio.run(_apply_topology(settings)):
        typer.echo(line)


@topology_app.command("show")
def topology_show() -> None:
    """Prints the topology without touching the broker."""
    for exchange in topology.TOPOLOGY.exchanges:
        typer.echo(f"exchange {exchange.name} ({exchange.kind.value}): {exchange.description}")
    for queue in topology.TOPOLOGY.queues:
        typer.echo(f"queue    {queue.name} <- consumed by {queue.consumer}")
    for b in topology.TOPOLOGY.bindings:
        typer.echo(f"binding  {b.exchange} --{b.routing_key}--> {b.queue}")


@schemas_app.command("export")
def schemas_export(
    check_only: Annotated[
        bool, typer.Option("--check", help="exit 1 if the committed files are stale")
    ] = False,
) -> None:
    """Writes schemas/json/*.json and schemas/asyncapi.yaml from the models and the topology."""
    if check_only:
        stale = apidoc.stale_files()
        for path in stale:
            err_console.print(f"stale: {path}")
        if stale:
            err_console.print("run `orchestrator schemas export` and commit the result")
            raise typer.Exit(ExitCode.FAILURE)
        console.print("generated contracts are up to date")
        return
    for path in apidoc.export():
        typer.echo(f"wrote {path}")


def main() -> None:
    app()
