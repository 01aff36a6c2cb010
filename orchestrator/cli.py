"""The `orchestrator` command: every process and every operator tool is a subcommand."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import redis.asyncio as aioredis
import typer
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import DeliveryError
from rich.table import Table

from orchestrator import (
    accounts_cli,
    apidoc,
    demo,
    dlq_cli,
    executions_cli,
    kafka,
    runtime,
    status_cli,
    top,
    topology,
)
from orchestrator.accounts import ManagementError, tenant_of_user, user_of
from orchestrator.amqp import connect, open_channel, publish
from orchestrator.cliutil import ExitCode, console, err_console, fail, settings_or_exit
from orchestrator.clock import from_ms
from orchestrator.config import Settings
from orchestrator.dashboard import serve_dashboard
from orchestrator.devmode import DevMode
from orchestrator.dispatcher.service import Dispatcher
from orchestrator.engine.service import Engine
from orchestrator.flowfiles import FlowFileError, load_flow_files
from orchestrator.health import check_all
from orchestrator.operator import Operator
from orchestrator.runtime import Body
from orchestrator.scheduler.admitting import execution_id_for, request_fire_id
from orchestrator.scheduler.service import Scheduler
from orchestrator.telemetry import configure_logging
from orchestrator.violations.policy import PolicyError, load_policy
from orchestrator.violations.service import ViolationsConsumer
from schemas import FlowStartRequested
from workers import Worker
from workers import builtin as _builtin_steps  # noqa: F401 - registers the demo.* step types

T = TypeVar("T")

app = typer.Typer(
    help="A fair, message-driven flow orchestrator.", no_args_is_help=True, add_completion=False
)
topology_app = typer.Typer(help="RabbitMQ exchanges, queues and bindings.", no_args_is_help=True)
schemas_app = typer.Typer(help="Message contracts (JSON Schema, AsyncAPI).", no_args_is_help=True)
flows_app = typer.Typer(help="Register and operate flows.", no_args_is_help=True)
workers_app = typer.Typer(help="The worker registry.", no_args_is_help=True)
app.add_typer(workers_app, name="workers")
tenants_app = typer.Typer(help="Tenant weights, penalties and quarantines.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(topology_app, name="topology")
app.add_typer(accounts_cli.accounts_app, name="accounts")
app.add_typer(dlq_cli.dlq_app, name="dlq")
app.add_typer(status_cli.status_app, name="status")
app.add_typer(executions_cli.executions_app, name="executions")
tenants_app.command("provision")(accounts_cli.tenants_provision)
tenants_app.command("rotate-secret")(accounts_cli.tenants_rotate_secret)
tenants_app.command("revoke")(accounts_cli.tenants_revoke)
app.add_typer(schemas_app, name="schemas")
app.add_typer(flows_app, name="flows")


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
def up(  # noqa: PLR0917 - typer options
    check_only: Annotated[
        bool, typer.Option("--check-only", help="check brokers, apply topology, then exit")
    ] = False,
    concurrency: Annotated[int, typer.Option(help="worker slots")] = 4,
    policy_file: Annotated[
        Path | None,
        typer.Option("--policy", help="also run the violations consumer with this policy"),
    ] = None,
    accounts_dir: Annotated[
        Path, typer.Option("--accounts", help="where the service accounts' files go")
    ] = accounts_cli.DEFAULT_DIR,
    demo_mode: Annotated[
        bool,
        typer.Option(
            "--demo",
            help="apply the demo tenants and flows, drive load, and show the live view "
            "(logs go to --log-file)",
        ),
    ] = False,
    dashboard_port: Annotated[
        int, typer.Option(help="the dashboard's port on 127.0.0.1 (0: no dashboard)")
    ] = 8080,
    log_file: Annotated[
        Path, typer.Option(help="where the processes log while the live view shows (--demo)")
    ] = Path(".orchestrator/up.log"),
) -> None:
    """Development mode: checks the brokers, applies the topology, then runs a scheduler, an
    engine, a dispatcher, a worker, the dashboard (and with --policy or --demo the violations
    consumer) in this one process until Ctrl-C, which drains and stops them all."""
    if demo_mode and policy_file is None:
        policy_file = demo.POLICY_FILE
    settings = _prepare_up(policy_file, accounts_dir)
    if check_only:
        return
    flows: list[str] = []
    if demo_mode:
        flows = asyncio.run(_demo_prepare(settings))
        console.print(f"demo: {', '.join(flows)} applied; weights {demo.WEIGHTS}")

    dev = DevMode(
        settings,
        accounts_dir,
        concurrency=concurrency,
        violations=policy_file is not None,
        dashboard_port=dashboard_port,
        demo_flows=flows,
    )
    console.print(f"{dev.describe()} running; Ctrl-C stops them")
    if demo_mode:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        console.print(f"logs in {log_file}; the live view follows")
        configure_logging(settings.log_level, "json", file=log_file)
    serve(settings, "up", dev.run, critical=runtime.WITHOUT_KAFKA)


def _prepare_up(policy_file: Path | None, accounts_dir: Path) -> Settings:
    """What `up` does before it runs anything: the policy checked, the brokers answering, the
    topology applied, the service accounts provisioned."""
    settings = settings_or_exit()
    if policy_file is not None:
        settings = settings.model_copy(update={"violations_policy": policy_file})
        try:
            load_policy(policy_file)
        except PolicyError as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(ExitCode.USAGE) from None
    if not _print_checks(settings):
        err_console.print("[red]error:[/red] a broker is down; start them with `scripts/infra up`")
        raise typer.Exit(ExitCode.FAILURE)
    lines = asyncio.run(_apply_topology(settings))
    partitions = asyncio.run(kafka.ensure_topics(settings))
    console.print(
        f"topology applied: {len(lines)} objects declared; "
        f"{settings.usage_topic}: {partitions} partition(s)"
    )
    try:
        accounts_cli.provision_services(settings, accounts_dir)
    except (ManagementError, OSError) as exc:
        err_console.print(f"[red]error:[/red] provisioning the service accounts failed: {exc}")
        raise typer.Exit(ExitCode.FAILURE) from None
    console.print(f"service accounts in {accounts_dir}/ (each process runs with its own)")
    console.print("[green]orchestrator is up[/green]: RabbitMQ, Kafka and Redis answer.")
    return settings


async def _demo_prepare(settings: Settings) -> list[str]:
    async with Operator(settings) as operator:
        return await demo.prepare(operator)


@app.command("top")
def top_command(
    interval: Annotated[float, typer.Option(min=0.2, help="seconds between refreshes")] = 1.0,
    once: Annotated[bool, typer.Option(help="print one frame and exit")] = False,
) -> None:
    """Live view: tenants (weight against share of cost served, dwell, in flight, backlog,
    penalty or quarantine), workers, executions per second, DLQ depths, violations."""
    settings = settings_or_exit()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(top.run(settings, interval_s=interval, once=once))


@app.command()
def dashboard(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
) -> None:
    """The web dashboard: tenants' shares over time, executions and their DAGs, DLQs (with
    replay), violations; live (server-sent events). Runs with the operator's account."""
    settings = settings_or_exit()

    async def body(
        redis: aioredis.Redis, connection: AbstractRobustConnection, stop: asyncio.Event
    ) -> None:
        await serve_dashboard(settings, redis, connection, stop, host=host, port=port)

    serve(settings, "dashboard", body)


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


# ---------------------------------------------------------------- processes
def serve(
    settings: Settings, name: str, body: Body, *, critical: frozenset[str] | None = None
) -> None:
    """Runs a long-lived process (orchestrator.runtime) and exits with its code."""
    code = runtime.serve(settings, name, body, critical=critical)
    if code:
        raise typer.Exit(code)


@app.command()
def scheduler(
    ingress: Annotated[
        bool, typer.Option(help="also consume flow-start requests from other services")
    ] = True,
) -> None:
    """Runs a scheduler replica (run several: each tick still fires once)."""
    settings = settings_or_exit()
    serve(
        settings,
        "scheduler",
        lambda redis, amqp, stop: Scheduler(settings, redis, amqp).run(stop, ingress=ingress),
    )


@app.command()
def engine() -> None:
    """Runs an engine replica (run several: any replica continues any execution)."""
    settings = settings_or_exit()
    serve(settings, "engine", lambda redis, amqp, stop: Engine(settings, redis, amqp).run(stop))


@app.command()
def dispatcher() -> None:
    """Runs a dispatcher (run two: one is active, the other takes over within seconds)."""
    settings = settings_or_exit()
    serve(
        settings,
        "dispatcher",
        lambda redis, amqp, stop: Dispatcher(settings, redis, amqp).run(stop),
    )


@app.command()
def violations(
    policy_file: Annotated[
        Path | None, typer.Option("--policy", help="policy YAML (default: ORCH_VIOLATIONS_POLICY)")
    ] = None,
    check: Annotated[bool, typer.Option(help="only validate the policy file, then exit")] = False,
) -> None:
    """Runs the violations consumer (faust-streaming over the usage topic): judges usage per
    window against the policy and issues warnings, penalties and quarantines."""
    settings = settings_or_exit()
    if policy_file is not None:
        settings = settings.model_copy(update={"violations_policy": policy_file})
    try:
        loaded = load_policy(settings.violations_policy)
    except PolicyError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(ExitCode.USAGE) from None
    if check:
        typer.echo(
            f"{settings.violations_policy}: ok ({len(loaded.plans)} plans, "
            f"window {loaded.window_s} s)"
        )
        return
    for noisy in ("faust", "mode", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    serve(
        settings,
        "violations",
        lambda redis, amqp, stop: ViolationsConsumer(settings, redis, amqp).run(stop),
    )


@app.command()
def worker(  # noqa: PLR0917 - typer options
    pool: Annotated[str, typer.Option(help="worker pool (queue work.<pool>)")] = "default",
    concurrency: Annotated[int, typer.Option(min=1, max=1000, help="attempts at once")] = 8,
    steps: Annotated[
        list[str] | None, typer.Option(help="module(s) whose @step handlers to load")
    ] = None,
    grace: Annotated[float, typer.Option(help="seconds to finish in-flight work on SIGTERM")] = 30,
    queue: Annotated[
        list[str] | None,
        typer.Option(help="consume these queues instead of work.<pool> (comparisons only)"),
    ] = None,
    express_slots: Annotated[
        int,
        typer.Option(
            min=0,
            max=100,
            help="extra slots for tenants with nothing running (express lane): how many "
            "newly active tenants start at once while the regular slots are busy",
        ),
    ] = 2,
) -> None:
    """Runs a step worker with the built-in steps plus those of --steps modules."""
    settings = settings_or_exit()
    for module in steps or []:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            err_console.print(f"[red]error:[/red] cannot import step module {module!r}: {exc}")
            raise typer.Exit(ExitCode.USAGE) from None

    async def work(
        redis: aioredis.Redis, connection: AbstractRobustConnection, stop: asyncio.Event
    ) -> None:
        async with Worker(
            settings,
            connection,
            redis,
            pool=pool,
            concurrency=concurrency,
            grace_s=grace,
            queues=queue,
            express_slots=express_slots,
        ) as running:
            await running.run(stop)

    serve(settings, "worker", work, critical=runtime.WITHOUT_KAFKA)


def _operate(settings: Settings, action: Callable[[Operator], Awaitable[T]]) -> T:
    async def run() -> T:
        async with Operator(settings) as operator:
            return await action(operator)

    return asyncio.run(run())


@workers_app.command("list")
def workers_list() -> None:
    """Live workers from the registry: id, host, pool, step types, in-flight, last heartbeat."""
    settings = settings_or_exit()
    table = Table("id", "host", "pool", "steps", "in-flight", "last heartbeat")
    for entry in _operate(settings, lambda ops: ops.workers()):
        table.add_row(
            entry.id,
            entry.host,
            entry.pool,
            ", ".join(entry.steps),
            f"{entry.in_flight}/{entry.concurrency}",
            entry.last_heartbeat.isoformat(),
        )
    console.print(table)


# ---------------------------------------------------------------- tenants
@tenants_app.command("list")
def tenants_list() -> None:
    """Every known tenant with its weight, penalty and quarantine."""
    settings = settings_or_exit()
    policies = _operate(settings, lambda ops: ops.tenants())
    table = Table("tenant", "weight", "penalty factor", "cap", "rate/s", "quarantined")
    for name, policy in policies.items():
        quarantined = (
            "tenant" if policy.quarantined else ", ".join(sorted(policy.quarantined_flows))
        )
        table.add_row(
            name,
            f"{policy.weight:g}",
            f"{policy.factor:g}",
            str(policy.concurrency_cap or "-"),
            f"{policy.rate_per_s:g}" if policy.rate_per_s else "-",
            quarantined or "no",
        )
    console.print(table)


@tenants_app.command("show")
def tenants_show(tenant: str) -> None:
    """The tenant's current state as JSON."""
    settings = settings_or_exit()
    typer.echo(json.dumps(_operate(settings, lambda ops: ops.describe_tenant(tenant)), indent=2))


@tenants_app.command("set-weight")
def tenants_set_weight(
    tenant: str,
    weight: Annotated[float, typer.Argument(min=0.01, max=10_000)],
    cap: Annotated[int | None, typer.Option(help="max steps in flight")] = None,
    rate: Annotated[float | None, typer.Option(help="max steps dispatched per second")] = None,
) -> None:
    """Sets the tenant's weight (and optional concurrency cap and rate limit)."""
    settings = settings_or_exit()
    _operate(
        settings,
        lambda ops: ops.set_weight(tenant, weight, concurrency_cap=cap, rate_per_s=rate),
    )
    typer.echo(f"{tenant}: weight {weight:g}")


@tenants_app.command("penalize")
def tenants_penalize(  # noqa: PLR0917 - typer maps each parameter to an option
    tenant: str,
    factor: Annotated[float, typer.Option(min=0.001, max=1.0, help="weight factor")] = 0.5,
    minutes: Annotated[float, typer.Option(min=0.01, help="how long")] = 10,
    cap: Annotated[int | None, typer.Option(help="max steps in flight")] = None,
    rate: Annotated[float | None, typer.Option(help="max steps per second")] = None,
    reason: str = "operator",
) -> None:
    """Shrinks a tenant's share for a while (a PenaltyCommand, like the violations consumer's)."""
    settings = settings_or_exit()
    _operate(
        settings,
        lambda ops: ops.penalize(
            tenant,
            factor=factor,
            minutes=minutes,
            concurrency_cap=cap,
            rate_per_s=rate,
            reason=reason,
        ),
    )
    typer.echo(f"{tenant}: penalized (factor {factor:g}) for {minutes:g} min")


@tenants_app.command("quarantine")
def tenants_quarantine(
    tenant: str,
    flow: Annotated[str | None, typer.Option(help="only this flow")] = None,
    minutes: Annotated[float, typer.Option(min=0.01, help="how long")] = 30,
    reason: str = "operator",
) -> None:
    """Stops dispatching and scheduling the tenant (or one flow) for a while."""
    settings = settings_or_exit()
    _operate(
        settings, lambda ops: ops.quarantine(tenant, flow=flow, minutes=minutes, reason=reason)
    )
    typer.echo(f"{tenant}{'/' + flow if flow else ''}: quarantined for {minutes:g} min")


@tenants_app.command("release")
def tenants_release(
    tenant: str,
    flow: Annotated[str | None, typer.Option(help="only this flow")] = None,
    what: Annotated[str, typer.Option(help="penalty, quarantine or all")] = "all",
) -> None:
    """Ends a penalty and/or quarantine early."""
    settings = settings_or_exit()
    if what not in ("penalty", "quarantine", "all"):
        raise fail("--what must be penalty, quarantine or all", ExitCode.USAGE)
    _operate(settings, lambda ops: ops.release(tenant, flow=flow, what=what))  # type: ignore[arg-type]
    typer.echo(f"{tenant}: released ({what})")


# ---------------------------------------------------------------- flows
def _flow_ref(ref: str) -> tuple[str, str]:
    tenant, sep, flow_id = ref.partition("/")
    if not sep or not tenant or not flow_id:
        raise fail(f"expected TENANT/FLOW, got {ref!r}", ExitCode.USAGE)
    return tenant, flow_id


@flows_app.command("apply")
def flows_apply(files: Annotated[list[Path], typer.Argument(help="YAML or JSON files")]) -> None:
    """Validates every flow in FILES, then registers all of them at once (or none)."""
    settings = settings_or_exit()
    try:
        definitions = load_flow_files(files)
    except FlowFileError as exc:
        for problem in exc.problems:
            err_console.print(f"[red]error:[/red] {problem}", highlight=False, soft_wrap=True)
        err_console.print("nothing was applied")
        raise typer.Exit(ExitCode.USAGE) from None
    try:
        results = _operate(settings, lambda ops: ops.apply_flows(definitions))
    except ValueError as exc:
        raise fail(f"{exc}; nothing was applied", ExitCode.USAGE) from None
    for result in results:
        typer.echo(f"{result.tenant}/{result.flow_id}: {result.outcome}")


@flows_app.command("list")
def flows_list(tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None) -> None:
    """Every registered flow with its schedule and next fire time."""
    settings = settings_or_exit()
    table = Table("flow", "cron", "timezone", "overlap", "paused", "next fire (UTC)")
    for definition, next_ms in _operate(settings, lambda ops: ops.flows(tenant)):
        table.add_row(
            f"{definition.tenant}/{definition.id}",
            definition.cron or "-",
            definition.timezone,
            definition.overlap.value,
            "yes" if definition.paused else "no",
            from_ms(next_ms).isoformat() if next_ms else "-",
        )
    console.print(table)


@flows_app.command("show")
def flows_show(flow: Annotated[str, typer.Argument(help="TENANT/FLOW")]) -> None:
    """The flow's definition, next fire time and running execution, as JSON."""
    settings = settings_or_exit()
    tenant, flow_id = _flow_ref(flow)
    found = _operate(settings, lambda ops: ops.flow(tenant, flow_id))
    if found is None:
        raise fail(f"no flow {flow}")
    document = {
        "definition": found.definition.model_dump(mode="json"),
        "next_fire": from_ms(found.next_fire_ms).isoformat() if found.next_fire_ms else None,
        "running_execution": found.running_execution,
    }
    typer.echo(json.dumps(document, indent=2))


def _set_paused(flow: str, paused: bool) -> None:
    settings = settings_or_exit()
    tenant, flow_id = _flow_ref(flow)
    if not _operate(settings, lambda ops: ops.set_paused(tenant, flow_id, paused)):
        raise fail(f"no flow {flow}")
    typer.echo(f"{flow}: {'paused' if paused else 'resumed'}")


@flows_app.command("pause")
def flows_pause(flow: Annotated[str, typer.Argument(help="TENANT/FLOW")]) -> None:
    """Ticks of a paused flow are skipped (and reported) until it is resumed."""
    _set_paused(flow, True)


@flows_app.command("resume")
def flows_resume(flow: Annotated[str, typer.Argument(help="TENANT/FLOW")]) -> None:
    """Resumes a paused flow."""
    _set_paused(flow, False)


@flows_app.command("delete")
def flows_delete(flow: Annotated[str, typer.Argument(help="TENANT/FLOW")]) -> None:
    """Removes the flow and its schedule."""
    settings = settings_or_exit()
    tenant, flow_id = _flow_ref(flow)
    if not _operate(settings, lambda ops: ops.delete_flow(tenant, flow_id)):
        raise fail(f"no flow {flow}")
    typer.echo(f"{flow}: deleted")


@flows_app.command("trigger")
def flows_trigger(
    flow: Annotated[str, typer.Argument(help="TENANT/FLOW")],
    input_json: Annotated[
        str, typer.Option("--input", help="JSON object merged into the input")
    ] = "{}",
    key: Annotated[str | None, typer.Option(help="idempotency key (default: a new one)")] = None,
    wait: Annotated[
        bool, typer.Option(help="print its events until it ends; exit 0 only if it succeeded")
    ] = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="--wait gives up after this (s)")] = 300,
) -> None:
    """Starts the flow now, through the same admission as every flow-start request, and
    prints its execution id. With --wait: its events, then exit 0 (succeeded), 1 (refused,
    failed or compensated) or 124 (timeout)."""
    settings = settings_or_exit()
    tenant, flow_id = _flow_ref(flow)
    try:
        payload = json.loads(input_json)
        request = FlowStartRequested(
            tenant=tenant,
            flow_id=flow_id,
            idempotency_key=key or f"manual-{uuid.uuid4()}",
            trigger="manual",
            input=payload,
            requested_by="orchestrator-cli",
        )
    except (json.JSONDecodeError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] invalid trigger: {exc}")
        raise typer.Exit(ExitCode.USAGE) from None
    # Execution ids derive from the request, so the id is known before anything ran.
    execution_id = execution_id_for(request_fire_id(tenant, flow_id, request.idempotency_key))
    user = user_of(str(settings.rabbitmq_url))
    json_lines = not console.is_terminal

    async def send() -> int:
        connection = await connect(settings, "orchestrator-cli")
        async with connection:
            events = None
            if wait:  # subscribed before the request goes out: no event can be missed
                owner = tenant_of_user(user, settings.account_prefix)
                patterns = [f"{tenant}.{flow_id}.#", f"{tenant}._.flow_start.rejected"]
                events = await status_cli.follow(connection, patterns, owner)
            # Signed with this account (RabbitMQ checks user_id): an operator account may
            # start any tenant's flows, a tenant account its own.
            try:
                await publish(await open_channel(connection), request, user_id=user)
            except DeliveryError:
                err_console.print(
                    f"[red]error:[/red] nothing takes flow starts of tenant {tenant!r}: "
                    "it has no flows (or the scheduler has not seen them yet)"
                )
                return ExitCode.FAILURE
            typer.echo(
                f"{flow}: execution {execution_id} requested (key {request.idempotency_key})"
            )
            if events is None:
                return ExitCode.OK
            return await _until_ended(events, execution_id, request.message_id(), json_lines)

    try:
        code = asyncio.run(asyncio.wait_for(send(), timeout if wait else None))
    except TimeoutError:
        err_console.print(
            f"[red]error:[/red] execution {execution_id} did not end in {timeout:g} s"
        )
        raise typer.Exit(status_cli.TIMEOUT_EXIT) from None
    if code:
        raise typer.Exit(code)


async def _until_ended(
    events: AsyncIterator[dict[str, Any]],
    execution_id: str,
    message_id: str,
    json_lines: bool,
) -> int:
    """Prints the execution's events; its exit code once it ends (or the request is refused)."""
    async for event in events:
        data = event.get("data") or {}
        kind = str(event.get("type", "")).removeprefix("io.orchestrator.")
        mine = event.get("subject") == execution_id or data.get("execution_id") == execution_id
        refused = kind == "flow_start.rejected" and data.get("message_id") == message_id
        if mine or refused:
            status_cli.show(event, json_lines)
        if refused:
            return ExitCode.FAILURE
        if mine and kind in status_cli.TERMINAL:
            return status_cli.TERMINAL[kind]
    return ExitCode.FAILURE  # the subscription ended (the broker went away)


def main() -> None:
    app()
