"""`orchestrator dlq list / show / replay / purge`: the operator's dead-letter tools
(orchestrator.dlq does the work)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from orchestrator import dlq, topology
from orchestrator.accounts import Management, ManagementError, user_of, vhost_of
from orchestrator.amqp import connect, open_channel, publish
from orchestrator.cliutil import ExitCode, console, fail, settings_or_exit
from orchestrator.config import Settings
from schemas import StatusEvent

dlq_app = typer.Typer(
    help="Dead-letter queues: what is in them and why; replay or purge.", no_args_is_help=True
)

Filters = Annotated[
    list[str] | None,
    typer.Option("--filter", help=f"key=value, repeatable; keys: {', '.join(dlq.FILTER_KEYS)}"),
]


def _filters(items: list[str] | None) -> dict[str, str]:
    try:
        return dlq.parse_filters(items or [])
    except dlq.DlqError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None


def _broker_dlqs(settings: Settings) -> dict[str, int]:
    """Every DLQ on the broker (the topology's and the per-tenant ones) with its depth, from
    the management API (its counts lag by a few seconds)."""
    with Management(settings.rabbitmq_management_url) as management:
        depths = management.queue_depths(vhost_of(str(settings.rabbitmq_url)))
    return {name: depth for name, depth in depths.items() if name.endswith(topology.DLQ_SUFFIX)}


async def _kafka_dlq(settings: Settings) -> tuple[int, datetime | None, Counter[str]]:
    """The usage topic's DLQ: records, the oldest one's time, reasons of the first 200."""
    topic = f"{settings.usage_topic}.dlq"
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return 0, None, Counter()
        consumer.assign(tps)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        count = sum(end[tp] - begin[tp] for tp in tps)
        reasons: Counter[str] = Counter()
        oldest: datetime | None = None
        if count:
            await consumer.seek_to_beginning(*tps)
            batch = await consumer.getmany(*tps, timeout_ms=2000, max_records=200)
            for records in batch.values():
                for record in records:
                    when = datetime.fromtimestamp(record.timestamp / 1000, UTC)
                    oldest = when if oldest is None or when < oldest else oldest
                    headers = dict(record.headers or [])
                    reasons[headers.get("orch-reason", b"unknown").decode("utf-8", "replace")] += 1
        return count, oldest, reasons
    finally:
        await consumer.stop()


@dlq_app.command("list")
def dlq_list(
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
) -> None:
    """Every DLQ with its depth, its oldest letter's age and its top reasons."""
    settings = settings_or_exit()
    try:
        depths = _broker_dlqs(settings)
    except ManagementError as exc:
        raise fail(str(exc)) from None
    rows: list[dict[str, Any]] = []

    async def gather() -> None:
        connection = await connect(settings, "orchestrator-dlq")
        async with connection:
            for name in sorted(depths):
                letters = await dlq.peek(connection, name, 200, {}) if depths[name] else []
                rows.append(_row(name, depths[name], letters))
        try:
            count, oldest, reasons = await asyncio.wait_for(_kafka_dlq(settings), 20)
        except Exception as exc:  # Kafka away: say so, the RabbitMQ part still stands
            rows.append({"queue": f"kafka:{settings.usage_topic}.dlq", "error": str(exc)})
            return
        rows.append(
            {
                "queue": f"kafka:{settings.usage_topic}.dlq",
                "messages": count,
                "oldest_age_s": _age(oldest),
                "reasons": dict(reasons.most_common(3)),
            }
        )

    asyncio.run(gather())
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    table = Table("dead-letter queue", "messages", "oldest", "top reasons")
    for row in rows:
        if "error" in row:
            table.add_row(row["queue"], "?", "-", f"[red]{row['error']}[/]")
            continue
        age = row["oldest_age_s"]
        reasons = ", ".join(f"{k} {v}" for k, v in row["reasons"].items()) or "-"
        table.add_row(row["queue"], str(row["messages"]), _human(age), reasons)
    console.print(table)


def _row(name: str, depth: int, letters: list[dlq.Letter]) -> dict[str, Any]:
    dated = [letter.dead_since for letter in letters if letter.dead_since]
    reasons = Counter(letter.reason for letter in letters)
    return {
        "queue": name,
        "messages": max(depth, len(letters)),
        "oldest_age_s": _age(min(dated)) if dated else None,
        "reasons": dict(reasons.most_common(3)),
    }


def _age(when: datetime | None) -> float | None:
    return None if when is None else round((datetime.now(UTC) - when).total_seconds(), 1)


def _human(age: float | None) -> str:
    if age is None:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if age >= size:
            return f"{age / size:.1f}{unit}"
    return f"{age:.0f}s"


async def _checked(settings: Settings, queue: str) -> None:
    connection = await connect(settings, "orchestrator-dlq")
    async with connection:
        await dlq.ensure_dlq(connection, queue)


def _check_queue(settings: Settings, queue: str) -> None:
    try:
        asyncio.run(_checked(settings, queue))
    except dlq.DlqError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None


@dlq_app.command("show")
def dlq_show(
    queue: Annotated[str, typer.Argument(help="a DLQ, e.g. engine.executions.dlq")],
    limit: Annotated[int, typer.Option(min=1, help="at most this many")] = 20,
    filters: Filters = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, bodies included")] = False,
) -> None:
    """The letters of one DLQ, oldest first, without taking them out."""
    settings = settings_or_exit()
    wanted = _filters(filters)
    _check_queue(settings, queue)

    async def read() -> list[dlq.Letter]:
        connection = await connect(settings, "orchestrator-dlq")
        async with connection:
            return await dlq.peek(connection, queue, limit, wanted)

    letters = asyncio.run(read())
    if as_json:
        for letter in letters:
            typer.echo(json.dumps(letter.as_dict()))
        return
    table = Table("message id", "reason", "from", "tenant", "replays", "dead since", "detail")
    for letter in letters:
        table.add_row(
            letter.message_id or "-",
            letter.reason,
            letter.queue or "?",
            letter.tenant or "-",
            str(letter.replays),
            letter.dead_since.isoformat(timespec="seconds") if letter.dead_since else "-",
            letter.detail[:80],
        )
    console.print(table)
    console.print(f"{len(letters)} shown (nothing was taken out)")


def _run_move(
    settings: Settings,
    queue: str,
    *,
    action: str,
    target: dlq.Target | None,
    filters: dict[str, str],
    limit: int | None,
    rate: float | None,
    max_replays: int,
    dry_run: bool,
) -> dlq.Summary:
    user = user_of(str(settings.rabbitmq_url))

    async def run() -> dlq.Summary:
        connection = await connect(settings, "orchestrator-dlq")
        async with connection:
            total = await dlq.ensure_dlq(connection, queue)
            with Progress(
                TextColumn(f"{action} {queue}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=console,
                disable=not console.is_terminal,
            ) as bar:
                task = bar.add_task(action, total=limit or total or None)
                summary = await dlq.move(
                    connection,
                    queue,
                    target=target,
                    filters=filters,
                    limit=limit,
                    rate_per_s=rate,
                    max_replays=max_replays,
                    dry_run=dry_run,
                    user_id=user,
                    progress=lambda n: bar.update(task, completed=n),
                )
            if not dry_run:  # an audit event per run
                event = StatusEvent.build(
                    "dlq",
                    "replayed" if target is not None else "purged",
                    event_id=f"dlq:{queue}:{uuid.uuid4().hex}",
                    data={
                        "queue": queue,
                        "by": user,
                        "filters": filters,
                        "to": _destination(target),
                        **summary.as_dict(),
                    },
                )
                await publish(await open_channel(connection), event)
            return summary

    try:
        return asyncio.run(run())
    except dlq.DlqError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None


def _destination(target: dlq.Target | None) -> str | None:
    if target is None:
        return None
    if not target.routing_key:
        return "original"
    # As --to takes it: a queue through the default exchange is `queue:NAME`.
    return f"{target.exchange or 'queue'}:{target.routing_key}"


def _report(summary: dlq.Summary, verb: str, dry_run: bool) -> None:
    prefix = "dry run: would have " if dry_run else ""
    console.print(
        f"{prefix}{verb} {summary.moved}, skipped {summary.skipped}, failed {summary.failed} "
        f"in {summary.seconds:.1f} s"
    )
    if summary.over_limit:
        shown = ", ".join(summary.over_limit[:10])
        console.print(
            f"{len(summary.over_limit)} left in the DLQ, replayed too often already: {shown}"
            + (" ..." if len(summary.over_limit) > 10 else "")
        )


@dlq_app.command("replay")
def dlq_replay(  # noqa: PLR0917 - typer maps each parameter to an option
    queue: Annotated[str, typer.Argument(help="a DLQ, e.g. ingress.acme.dlq")],
    to: Annotated[
        str,
        typer.Option(
            help="'original' (the queue each came from), 'queue:NAME' or EXCHANGE:ROUTING_KEY"
        ),
    ] = "original",
    filters: Filters = None,
    limit: Annotated[int | None, typer.Option(min=1, help="at most this many")] = None,
    rate: Annotated[float | None, typer.Option(min=0.001, help="messages per second")] = None,
    dry_run: Annotated[bool, typer.Option(help="say what would move; move nothing")] = False,
    max_replays: Annotated[
        int, typer.Option(min=1, help="leave letters replayed this often already")
    ] = 3,
) -> None:
    """Publishes each letter (confirmed) to its destination, then takes it out of the DLQ."""
    settings = settings_or_exit()
    wanted = _filters(filters)
    try:
        target = dlq.Target.parse(to)
    except dlq.DlqError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    summary = _run_move(
        settings,
        queue,
        action="replaying",
        target=target,
        filters=wanted,
        limit=limit,
        rate=rate,
        max_replays=max_replays,
        dry_run=dry_run,
    )
    _report(summary, "replayed", dry_run)
    if summary.failed:
        raise typer.Exit(ExitCode.FAILURE)


@dlq_app.command("purge")
def dlq_purge(
    queue: Annotated[str, typer.Argument(help="a DLQ")],
    filters: Filters = None,
    yes: Annotated[bool, typer.Option("--yes", help="really delete them")] = False,
) -> None:
    """Deletes the (matching) letters of a DLQ for good."""
    settings = settings_or_exit()
    wanted = _filters(filters)
    if not yes:
        raise fail("purging deletes letters for good: add --yes", ExitCode.USAGE)
    summary = _run_move(
        settings,
        queue,
        action="purging",
        target=None,
        filters=wanted,
        limit=None,
        rate=None,
        max_replays=0,
        dry_run=False,
    )
    _report(summary, "purged", False)
