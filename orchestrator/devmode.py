"""`orchestrator up`: every service in this one process, for development and the demo.

Each service runs on its own connection with its own service account, as in production, so
dev exercises the production permissions. Optional parts: the violations consumer (with a
policy), the dashboard, and the demo's load driver and live view.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection

from orchestrator import accounts_cli, demo, top
from orchestrator.accounts import Role, user_of
from orchestrator.amqp import connect
from orchestrator.config import Settings
from orchestrator.dashboard import serve_dashboard
from orchestrator.dispatcher.service import Dispatcher
from orchestrator.engine.service import Engine
from orchestrator.scheduler.service import Scheduler
from orchestrator.violations.service import ViolationsConsumer
from workers import Worker

ROLES: list[Role] = ["scheduler", "engine", "dispatcher", "worker", "violations"]


@dataclass
class DevMode:
    settings: Settings
    accounts_dir: Path
    concurrency: int = 4
    violations: bool = False  # with the violations consumer (it needs a policy)
    dashboard_port: int = 0  # 0: no dashboard
    demo_flows: list[str] = field(default_factory=list)  # the demo's load and live view

    def describe(self) -> str:
        running = "scheduler, engine, dispatcher, worker"
        if self.violations:
            running += ", violations consumer"
        if self.dashboard_port:
            running += f", dashboard at http://127.0.0.1:{self.dashboard_port}/"
        return running

    async def run(
        self, redis: aioredis.Redis, connection: AbstractRobustConnection, stop: asyncio.Event
    ) -> None:
        """Until `stop`; `connection` (the operator's) serves the dashboard and the demo."""
        settings = self.settings
        connections: dict[str, AbstractRobustConnection] = {}
        try:
            for role in ROLES:
                env = accounts_cli.service_env(self.accounts_dir, role)
                url = env.get("ORCH_RABBITMQ_URL", settings.rabbitmq_url)
                role_settings = settings.model_copy(update={"rabbitmq_url": url})
                connections[role] = await connect(role_settings, f"orchestrator-up-{role}")
            parts: list[Awaitable[None]] = []
            if self.dashboard_port:
                parts.append(
                    serve_dashboard(settings, redis, connection, stop, port=self.dashboard_port)
                )
            if self.demo_flows:
                user = user_of(str(settings.rabbitmq_url))
                parts.append(demo.LoadDriver(connection, self.demo_flows, user_id=user).run(stop))
                parts.append(top.run(settings, stop=stop))
            if self.violations:
                parts.append(
                    ViolationsConsumer(settings, redis, connections["violations"]).run(stop)
                )
            async with Worker(
                settings, connections["worker"], redis, concurrency=self.concurrency
            ) as worker:
                await asyncio.gather(
                    Scheduler(settings, redis, connections["scheduler"]).run(stop),
                    Engine(settings, redis, connections["engine"]).run(stop),
                    Dispatcher(settings, redis, connections["dispatcher"]).run(stop),
                    worker.run(stop),
                    *parts,
                )
        finally:
            for opened in connections.values():
                with contextlib.suppress(Exception):
                    await opened.close()
