"""The worker registry as readers see it: live workers, from their expiring heartbeats."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from orchestrator.store import Keys


async def live_workers(redis: aioredis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """Heartbeat entries of the workers alive now; ids whose entry expired leave the index."""
    ids = sorted(str(i) for i in await redis.smembers(keys.workers))
    if not ids:
        return []
    raws = await redis.mget([keys.worker(i) for i in ids])
    gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
    if gone:
        await redis.srem(keys.workers, *gone)
    return [json.loads(raw) for raw in raws if raw is not None]
