"""`orchestrator status tail` and the event printing `flows trigger --wait` shares: status
events as they happen, readable on a terminal, JSON lines otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import typer
from aio_pika.abc import AbstractQueue, AbstractRobustConnection

from orchestrator import topology
from orchestrator.accounts import status_queue_name, tenant_of_user, user_of
from orchestrator.amqp import connect, open_channel
from orchestrator.cliutil import console, settings_or_exit
from schemas.status import TYPE_PREFIX

status_app = typer.Typer(help="Status events, live.", no_args_is_help=True)

TERMINAL = {
    "execution.succeeded": 0,
    "execution.failed": 1,
    "execution.compensated": 1,
    "execution.cancelled": 1,
}
TIMEOUT_EXIT = 124  # as timeout(1)


async def follow(
    connection: AbstractRobustConnection, patterns: list[str], owner: str | None
) -> AsyncIterator[dict[str, Any]]:
    """Status events matching any of `patterns`, through a queue of our own (named as a
    tenant account may name it: status.<tenant>.<id>), bound when this returns: no event
    published after that can be missed."""
    channel = await open_channel(connection, prefetch=500)
    name = status_queue_name(owner, f"cli-{uuid.uuid4().hex[:12]}") if owner else ""
    queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
    for pattern in patterns:
        await queue.bind(topology.STATUS, routing_key=pattern)
    return _events(queue)


async def _events(queue: AbstractQueue) -> AsyncIterator[dict[str, Any]]:
    async with queue.iterator() as messages:
        async for message in messages:
            async with message.process():
                try:
                    event = json.loads(message.body)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    event["_routing_key"] = message.routing_key
                    yield event


def line(event: dict[str, Any]) -> str:
    """One event on one line, for people."""
    kind = str(event.get("type", "")).removeprefix(TYPE_PREFIX)
    data = event.get("data") or {}
    where = "/".join(p for p in (event.get("tenant"), event.get("flow")) if p) or "-"
    bits = [str(event.get("time", ""))[11:23], f"{kind:<22}", where]
    for key in ("step_id", "attempt", "reason", "execution_id", "duplicate", "error"):
        if key in data and data[key] not in (None, ""):
            value = data[key]
            if isinstance(value, dict):
                value = value.get("message") or value.get("type") or value
            bits.append(f"{key}={value}")
    if event.get("subject") and "execution_id" not in data:
        bits.append(f"execution={event['subject']}")
    return "  ".join(str(b) for b in bits)


def show(event: dict[str, Any], as_json: bool) -> None:
    printable = {k: v for k, v in event.items() if not k.startswith("_")}
    if as_json:
        typer.echo(json.dumps(printable), nl=True)
    else:
        console.print(line(printable), highlight=False, soft_wrap=True)


@status_app.command("tail")
def status_tail(
    pattern: Annotated[
        str, typer.Argument(help="routing key pattern <tenant>.<flow>.<entity>.<state>")
    ] = "#",
    count: Annotated[int | None, typer.Option(min=1, help="stop after this many")] = None,
    as_json: Annotated[
        bool | None, typer.Option("--json/--text", help="default: text on a terminal")
    ] = None,
) -> None:
    """Prints status events as they happen (Ctrl-C stops). A tenant account sees its own
    tenant's only (`<tenant>.#`)."""
    settings = settings_or_exit()
    owner = tenant_of_user(user_of(str(settings.rabbitmq_url)), settings.account_prefix)
    json_lines = (not console.is_terminal) if as_json is None else as_json

    async def run() -> None:
        connection = await connect(settings, "orchestrator-status-tail")
        async with connection:
            seen = 0
            async for event in await follow(connection, [pattern], owner):
                show(event, json_lines)
                seen += 1
                if count is not None and seen >= count:
                    return

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
