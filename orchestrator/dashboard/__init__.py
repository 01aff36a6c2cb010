"""`orchestrator dashboard`: the live view in a browser (Starlette, server-sent events).

    GET  /                              the page (static HTML + one JS module, no build step)
    GET  /events                        an `overview` event every second (orchestrator.overview)
    GET  /api/overview                  the same, once
    GET  /api/executions                recent executions (?tenant= &flow= &state= &limit=)
    GET  /api/executions/{id}           one execution: its steps, states, timings (?tenant=)
    GET  /api/dlqs                      every DLQ: depth, and its letters counted by reason
    POST /api/dlqs/{queue}/replay       {"confirm": true, "filters": {...}}: replay to the origin
    GET  /healthz, /readyz

Executions come from the engine's query API (as `OrchestratorClient` asks it, with the
operator's account), DLQs from the broker (as `orchestrator dlq`), the rest from an Overview:
what the page shows is what the APIs answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import redis.asyncio as aioredis
import uvicorn
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import Gauge
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from orchestrator import dlq, topology
from orchestrator.accounts import user_of
from orchestrator.client import OrchestratorClient, OrchestratorError
from orchestrator.config import Settings
from orchestrator.outage import sleep_unless
from orchestrator.overview import Overview, gather
from orchestrator.runtime import CannotStart
from orchestrator.telemetry import get_logger

log = get_logger(__name__)

DLQ_MESSAGES = Gauge(
    "orchestrator_dlq_messages", "Messages in each dead-letter queue (dashboard)", ["queue"]
)
BACKLOG = Gauge(
    "orchestrator_tenant_backlog", "Steps waiting in a tenant's fair queue (dashboard)", ["tenant"]
)
EXPORT_S = 15.0

STATIC = Path(__file__).parent / "static"
INTERVAL_S = 1.0
REASONS_PEEK = 200  # letters read per DLQ to count reasons
# A DLQ's reasons are read again only when its depth changed or they are this old: reading
# them takes up to REASONS_PEEK letters off the queue and gives them back, and every open
# page asks every 10 s.
REASONS_FRESH_S = 30.0
ENGINE_TIMEOUT_S = 5.0  # a page waits no longer for an answer about executions


class Dashboard:
    def __init__(
        self, settings: Settings, redis: aioredis.Redis, connection: AbstractRobustConnection
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.connection = connection
        self._latest: tuple[float, Overview] | None = None
        self._gathering = asyncio.Lock()
        self._reasons: dict[str, tuple[float, int, dict[str, int]]] = {}  # at, depth, counts
        self._peeking = asyncio.Lock()
        self.client = OrchestratorClient(
            str(settings.rabbitmq_url),
            account_prefix=settings.account_prefix,
            connection_name="orchestrator-dashboard",
            timeout_s=ENGINE_TIMEOUT_S,
        )

    async def current(self) -> Overview:
        """The latest Overview, gathered at most once per INTERVAL_S however many pages
        watch (each would otherwise ask Redis and the management API every second)."""
        async with self._gathering:
            now = time.monotonic()
            if self._latest is None or now - self._latest[0] >= INTERVAL_S * 0.9:
                self._latest = (now, await gather(self.settings, self.redis))
            return self._latest[1]

    async def overview(self, _: Request) -> JSONResponse:
        return JSONResponse((await self.current()).to_dict())

    async def events(self, request: Request) -> EventSourceResponse:
        async def stream() -> AsyncIterator[dict[str, str]]:
            while not await request.is_disconnected():
                try:
                    data = json.dumps((await self.current()).to_dict())
                except Exception as exc:  # a broker away: say so, keep the stream
                    data = json.dumps({"error": repr(exc)})
                    yield {"event": "error", "data": data}
                else:
                    yield {"event": "overview", "data": data}
                await asyncio.sleep(INTERVAL_S)

        return EventSourceResponse(stream(), ping=15)

    async def executions(self, request: Request) -> JSONResponse:
        params = request.query_params
        try:
            limit = max(1, min(int(params.get("limit", "50")), 500))
            page = await self.client.list_executions(
                params.get("tenant") or None,
                flow=params.get("flow") or None,
                state=params.get("state") or None,
                limit=limit,
            )
        except (OrchestratorError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(json.loads(page.model_dump_json()))

    async def execution(self, request: Request) -> JSONResponse:
        execution_id = request.path_params["execution_id"]
        try:
            view = await self.client.get_execution(
                execution_id, request.query_params.get("tenant") or None
            )
        except (OrchestratorError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(
            json.loads(view.model_dump_json()), status_code=200 if view.found else 404
        )

    async def dlqs(self, _: Request) -> JSONResponse:
        overview = await self.current()
        queues = []
        async with self._peeking:  # one reader at a time: a peek hides what it holds
            for name, depth in overview.dlqs.items():
                queues.append(
                    {"queue": name, "depth": depth, "reasons": await self._reasons_of(name, depth)}
                )
        return JSONResponse({"queues": queues})

    async def _reasons_of(self, name: str, depth: int) -> dict[str, int]:
        """The reasons of the first REASONS_PEEK letters, counted; read again when the depth
        changed or REASONS_FRESH_S passed."""
        now = time.monotonic()
        known = self._reasons.get(name)
        if known is not None and known[1] == depth and now - known[0] < REASONS_FRESH_S:
            return known[2]
        reasons: Counter[str] = Counter()
        if depth:
            letters = await dlq.peek(self.connection, name, REASONS_PEEK, {})
            reasons.update(letter.reason for letter in letters)
        self._reasons[name] = (now, depth, dict(reasons))
        return dict(reasons)

    async def replay(self, request: Request) -> JSONResponse:
        queue = request.path_params["queue"]
        try:
            body = await request.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict) or body.get("confirm") is not True:
            return JSONResponse({"error": 'a replay needs {"confirm": true}'}, status_code=400)
        if not queue.endswith(topology.DLQ_SUFFIX):
            return JSONResponse({"error": f"{queue!r} is not a DLQ"}, status_code=400)
        try:
            filters = dlq.parse_filters(f"{k}={v}" for k, v in (body.get("filters") or {}).items())
            summary = await dlq.move(
                self.connection,
                queue,
                target=dlq.Target.parse("original"),
                filters=filters,
                user_id=user_of(str(self.settings.rabbitmq_url)),
            )
        except dlq.DlqError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        self._reasons.pop(queue, None)  # what is left there is read again
        log.info("dashboard.replay", queue=queue, **summary.as_dict())
        answer = summary.as_dict()
        return JSONResponse({**answer, "kept": answer["skipped"] + answer["failed"]})

    def app(self) -> Starlette:
        async def index(_: Request) -> FileResponse:
            return FileResponse(STATIC / "index.html")

        async def healthz(_: Request) -> JSONResponse:
            return JSONResponse({"status": "ok"})

        async def readyz(_: Request) -> Response:
            try:
                await asyncio.wait_for(self.redis.ping(), 2)
                ready = self.connection.connected.is_set()
            except Exception:
                ready = False
            return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            await self.client.__aenter__()
            try:
                yield
            finally:
                await self.client.__aexit__(None, None, None)

        return Starlette(
            routes=[
                Route("/", index),
                Route("/events", self.events),
                Route("/api/overview", self.overview),
                Route("/api/executions", self.executions),
                Route("/api/executions/{execution_id}", self.execution),
                Route("/api/dlqs", self.dlqs),
                Route("/api/dlqs/{queue}/replay", self.replay, methods=["POST"]),
                Route("/healthz", healthz),
                Route("/readyz", readyz),
                Mount("/static", StaticFiles(directory=STATIC), name="static"),
            ],
            lifespan=lifespan,
        )


async def _export(settings: Settings, redis: aioredis.Redis, stop: asyncio.Event) -> None:
    """What the alert rules need that no service process knows: DLQ depths and backlogs, as
    Prometheus gauges of this process (/metrics with ORCH_METRICS_PORT)."""
    while not stop.is_set():
        try:
            overview = await gather(settings, redis)
        except Exception as exc:  # a broker away: the gauges keep their last values
            log.debug("dashboard.export_failed", error=repr(exc))
        else:
            for queue, depth in overview.dlqs.items():
                DLQ_MESSAGES.labels(queue).set(depth)
            for row in overview.tenants:
                BACKLOG.labels(row.tenant).set(row.backlog)
        await sleep_unless(stop, EXPORT_S)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process's own (orchestrator.runtime) stop it,
    together with everything else running in the loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_dashboard(
    settings: Settings,
    redis: aioredis.Redis,
    connection: AbstractRobustConnection,
    stop: asyncio.Event,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
) -> None:
    """Runs the dashboard (uvicorn, in this event loop) until `stop`."""
    config = uvicorn.Config(
        Dashboard(settings, redis, connection).app(),
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
    )
    server = _Server(config)
    try:  # bound here, so a port in use is said plainly (uvicorn would exit the process)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listening = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise CannotStart(
            f"the dashboard cannot listen on {host}:{port}: {exc.strerror or exc} "
            "(choose another port, or 0 for no dashboard where the command offers it)"
        ) from exc
    task = asyncio.create_task(server.serve(sockets=[listening]))
    exporter = asyncio.create_task(_export(settings, redis, stop))
    log.info("dashboard.started", url=f"http://{host}:{port}/")
    try:
        await stop.wait()
    finally:
        exporter.cancel()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
