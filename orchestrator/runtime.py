"""How a long-running process lives and dies: its broker connections, its health endpoints,
its outage watchdog, and SIGTERM/SIGINT for a graceful stop.

Exit codes (for supervisors): 0 stopped on a signal; 69 (EX_UNAVAILABLE) a broker did not
answer for longer than `ORCH_OUTAGE_LIMIT_S`; 1 anything else (a bug: see the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from orchestrator import store, tracing
from orchestrator.amqp import connect
from orchestrator.config import Settings
from orchestrator.outage import EXIT_OUTAGE, OUTAGES, OutageExceeded, sleep_unless
from orchestrator.telemetry import get_logger

log = get_logger(__name__)

# Processes that keep working through a Kafka outage (workers buffer usage, bounded) do not
# give up on it: exiting would only lose what they buffered.
WITHOUT_KAFKA = frozenset({"rabbitmq", "redis", "network"})

EXIT_OK = 0
EXIT_FAILURE = 1
WATCH_S = 1.0
PROBE_TIMEOUT_S = 2.0


class CannotStart(Exception):
    """The process cannot start as configured (a port in use, say): said in one line on
    stderr and in the log, exit code 1, no traceback."""


Body = Callable[[aioredis.Redis, AbstractRobustConnection, asyncio.Event], Awaitable[None]]


async def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Runs `main(stop)`; the first SIGTERM or SIGINT sets `stop`, the second cancels."""
    # Long-lived processes allocate their big structures at start; moving them out of the
    # collector's view (and collecting less often) removes most multi-ms GC pauses from the
    # hot path, which showed up as tick-lateness outliers.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and task is not None:
            task.cancel()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await main(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def watch_outages(
    settings: Settings,
    redis: aioredis.Redis,
    connection: AbstractRobustConnection,
    stop: asyncio.Event,
    critical: frozenset[str] | None = None,
) -> None:
    """Probes RabbitMQ and Redis once a second (a process that is idle notices an outage
    too), ends the outages the probes see over (that is what makes the process ready again),
    and raises OutageExceeded past the configured limit. Kafka is reported by its users."""
    while not await sleep_unless(stop, WATCH_S):
        rabbit_up = connection.connected.is_set()
        if rabbit_up:
            OUTAGES.recovered("rabbitmq")
        else:
            OUTAGES.failed("rabbitmq", "connection lost, reconnecting")
        try:
            await asyncio.wait_for(redis.ping(), PROBE_TIMEOUT_S)
        except Exception as exc:
            OUTAGES.failed("redis", exc)
        else:
            OUTAGES.recovered("redis")
            if rabbit_up:
                OUTAGES.recovered("network")
        OUTAGES.check(settings.outage_limit_s, critical)


async def start_health_server(port: int) -> web.AppRunner | None:
    """`/healthz` (the process runs), `/readyz` (its brokers answer) and Prometheus `/metrics`
    on `port`; 0 disables it."""
    if port <= 0:
        return None

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        failing = {name: OUTAGES.last_error.get(name, "") for name in OUTAGES.since}
        status = 200 if not failing else 503
        return web.json_response({"ready": not failing, "failing": failing}, status=status)

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(REGISTRY))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    app = web.Application()
    app.add_routes(
        [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()  # noqa: S104 - scraped from outside
    return runner


def serve(
    settings: Settings, name: str, body: Body, *, critical: frozenset[str] | None = None
) -> int:
    """Runs a long-lived process: health and metrics endpoints, one Redis pool and one
    RabbitMQ connection, `body` until SIGTERM/SIGINT, then a clean close. Returns its exit
    code: EXIT_OUTAGE when a broker it cannot work without (`critical`; default: every one
    it reports) stayed away too long."""
    code = EXIT_OK

    async def main(stop: asyncio.Event) -> None:
        nonlocal code
        tracing.configure(f"orchestrator-{name}", settings.traces)
        health = await start_health_server(settings.metrics_port)
        redis = store.connect(settings)
        connection = await connect(settings, f"orchestrator-{name}")
        watchdog = asyncio.create_task(watch_outages(settings, redis, connection, stop, critical))
        work: asyncio.Future[None] = asyncio.ensure_future(body(redis, connection, stop))
        try:
            await asyncio.wait({watchdog, work}, return_when=asyncio.FIRST_COMPLETED)
            if watchdog.done() and isinstance(watchdog.exception(), OutageExceeded):
                log.error("process.outage_limit", error=str(watchdog.exception()))
                code = EXIT_OUTAGE
                stop.set()  # a graceful stop: held messages go back, leases are released
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(work, settings.outage_limit_s)
            else:
                await work
        finally:
            watchdog.cancel()
            work.cancel()
            await asyncio.gather(watchdog, work, return_exceptions=True)
            with contextlib.suppress(Exception):
                await connection.close()
            with contextlib.suppress(Exception):
                await redis.aclose()
            if health is not None:
                await health.cleanup()
            tracing.shutdown()

    try:
        asyncio.run(run_until_signalled(main))
    except CannotStart as exc:
        log.error("process.cannot_start", error=str(exc))  # noqa: TRY400 - no traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return code
