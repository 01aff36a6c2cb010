"""The worker registry: one expiring heartbeat entry per live worker (service discovery).

`WorkerEntry` is the entry's contract: workers write it (workers.runtime), the dispatcher
sizes its window from the live ones, operators list them (CLI, `top`, the dashboard). An
entry expires when its worker stops beating; readers drop expired ids from the index.
"""

from __future__ import annotations

from datetime import datetime

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, ValidationError

from orchestrator.store import Keys


class WorkerEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    host: str
    pool: str
    steps: list[str]
    concurrency: int  # slots for steps
    # Python code runs one thread at a time (the GIL): one process is one CPU for CPU-bound
    # steps, shared by all its step threads (express slots included).
    cpus: int = 1
    threads: int | None = None  # step threads, express slots included (None: concurrency)
    in_flight: int = 0
    last_heartbeat: datetime

    @property
    def step_threads(self) -> int:
        return self.threads if self.threads is not None else self.concurrency


async def publish_worker(redis: aioredis.Redis, keys: Keys, entry: WorkerEntry, ttl_s: int) -> None:
    """Writes (renews) the worker's entry and indexes it, in one transaction."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.worker(entry.id), entry.model_dump_json(), ex=ttl_s)
        pipe.sadd(keys.workers, entry.id)
        await pipe.execute()


async def live_workers(redis: aioredis.Redis, keys: Keys) -> list[WorkerEntry]:
    """Entries of the workers alive now; ids whose entry expired leave the index. An entry
    that does not parse (a worker of another version) is skipped, not fatal."""
    ids = sorted(str(i) for i in await redis.smembers(keys.workers))
    if not ids:
        return []
    raws = await redis.mget([keys.worker(i) for i in ids])
    gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
    if gone:
        await redis.srem(keys.workers, *gone)
    entries = []
    for raw in raws:
        if raw is None:
            continue
        try:
            entries.append(WorkerEntry.model_validate_json(raw))
        except ValidationError:
            continue
    return entries


def capacity(workers: list[WorkerEntry]) -> tuple[int, int, int]:
    """The live workers' slots, step threads and CPUs, summed (what the dispatcher sizes by)."""
    return (
        sum(entry.concurrency for entry in workers),
        sum(entry.step_threads for entry in workers),
        sum(entry.cpus for entry in workers),
    )
