"""The Redis batcher on a real Redis: concurrent calls share pipelines, each call gets its own
answer or error, scripts the server lost are loaded again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ResponseError

from orchestrator.config import Settings
from orchestrator.store.batch import Batcher

pytestmark = pytest.mark.asyncio(loop_scope="session")

COUNT_SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


async def test_concurrent_calls_share_one_pipeline(settings: Settings, redis_client: Any) -> None:
    batcher = Batcher(redis_client)
    pipelines = 0
    real = batcher._pipeline

    async def counted(commands: list[tuple[Any, ...]]) -> list[Any]:
        nonlocal pipelines
        pipelines += 1
        return await real(commands)

    batcher._pipeline = counted  # type: ignore[method-assign]
    key = f"{settings.redis_prefix}batch:incr"
    await redis_client.delete(key)
    results = await asyncio.gather(*(batcher.call("INCR", key) for _ in range(200)))
    assert sorted(results) == list(range(1, 201))
    assert pipelines == 1  # 200 handlers, one round trip
    alone = await batcher.call("GET", key)
    assert alone == "200"
    assert pipelines == 2


async def test_an_error_is_its_own_callers_only(settings: Settings, redis_client: Any) -> None:
    batcher = Batcher(redis_client)
    text = f"{settings.redis_prefix}batch:text"
    await redis_client.set(text, "not a number")
    ok_key = f"{settings.redis_prefix}batch:ok"
    await redis_client.delete(ok_key)
    bad, good = await asyncio.gather(
        batcher.call("INCR", text), batcher.call("INCR", ok_key), return_exceptions=True
    )
    assert isinstance(bad, ResponseError)
    assert good == 1


async def test_scripts_the_server_lost_are_loaded_again(
    settings: Settings, redis_client: Any
) -> None:
    batcher = Batcher(redis_client)
    key = f"{settings.redis_prefix}batch:script"
    await redis_client.delete(key)
    await redis_client.script_flush()  # as after a Redis restart: no script is known
    first = await asyncio.gather(*(batcher.script(COUNT_SCRIPT, [key], [2]) for _ in range(5)))
    assert sorted(first) == [2, 4, 6, 8, 10]  # each ran exactly once
    assert await batcher.script(COUNT_SCRIPT, [key], [1]) == 11
