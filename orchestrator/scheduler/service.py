"""The scheduler process: fires due ticks exactly once across replicas (`firing`), admits
flow starts from other services (`ingress`). Two jobs on one shared admission path
(`admitting`); a deployment may run them in separate processes (`--no-ingress`)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection

from orchestrator import topology
from orchestrator.clock import Clock
from orchestrator.config import Settings
from orchestrator.scheduler.admitting import Admitting
from orchestrator.scheduler.firing import CronFiring
from orchestrator.scheduler.ingress import Ingress
from orchestrator.telemetry import get_logger

log = get_logger(__name__)


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        connection: AbstractRobustConnection,
        clock: Clock | None = None,
        replica: str | None = None,
    ) -> None:
        self.admitting = Admitting(settings, redis, connection, clock, replica)
        self.cron = CronFiring(self.admitting)
        self.ingress = Ingress(self.admitting)

    async def run(self, stop: asyncio.Event, ingress: bool = True) -> None:
        """Fires ticks (and consumes flow-start requests) until `stop` is set."""
        await topology.apply(await self.admitting.channel(), role="scheduler")
        jobs = [self.cron.run(stop)]
        if ingress:
            await self.ingress.start(stop)
            jobs.append(self.ingress.run(stop))
        log.info("scheduler.started", replica=self.admitting.replica)
        tasks = [asyncio.ensure_future(job) for job in jobs]
        try:
            # The first to end (cron firing on a bug) ends the process; both stop on `stop`.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            log.info("scheduler.stopped", replica=self.admitting.replica)
