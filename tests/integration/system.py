"""The whole system in the test process: scheduler, engine, dispatcher and a worker on one
connection of their own, so a test can count what happens to that connection."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection

from orchestrator import store
from orchestrator.amqp import connect
from orchestrator.config import Settings
from orchestrator.dispatcher.service import Dispatcher
from orchestrator.engine.service import Engine
from orchestrator.scheduler.service import Scheduler
from orchestrator.store.flows import FlowRegistry
from schemas import FlowDefinition
from workers import Worker
from workers import builtin as _builtin  # noqa: F401 - registers demo.* steps


@dataclass
class System:
    settings: Settings
    redis: aioredis.Redis
    connection: AbstractRobustConnection
    # Every time the services' connection was lost and made again: 0 unless a broker restarts.
    reconnects: list[Any] = field(default_factory=list)

    async def apply(self, *documents: dict[str, Any]) -> None:
        flows = [FlowDefinition.model_validate(doc) for doc in documents]
        await FlowRegistry(self.redis, store.Keys(self.settings.redis_prefix)).apply(
            flows, datetime.now(UTC)
        )


@contextlib.asynccontextmanager
async def running_system(settings: Settings, concurrency: int = 4) -> AsyncIterator[System]:
    redis = store.connect(settings)
    connection = await connect(settings, f"tests-system-{uuid.uuid4().hex[:6]}")
    system = System(settings, redis, connection)
    connection.reconnect_callbacks.add(lambda *args: system.reconnects.append(args))
    stop = asyncio.Event()
    try:
        async with Worker(settings, connection, redis, concurrency=concurrency) as worker:
            tasks = [
                asyncio.create_task(Scheduler(settings, redis, connection).run(stop)),
                asyncio.create_task(Engine(settings, redis, connection).run(stop)),
                asyncio.create_task(Dispatcher(settings, redis, connection).run(stop)),
                asyncio.create_task(worker.run(stop)),
            ]
            try:
                yield system
            finally:
                stop.set()
                await asyncio.gather(*tasks)
    finally:
        if not connection.is_closed:
            await connection.close()
        async for key in redis.scan_iter(match=f"{settings.redis_prefix}*"):
            await redis.delete(key)
        await redis.aclose()
