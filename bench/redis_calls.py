"""What one Redis call costs the calling process, by the way it is made.

    python -m bench.redis_calls [--calls 3000]

CPU of this process (user + system, `time.process_time`) per GET of a 1 KB value, against
the floor measured in the same run: one command written and its reply read on a pooled
connection, nothing else. The engine and the scheduler make their calls through
`orchestrator.store.batch.Batcher`; under load many share a turn of the event loop (the
"50 per turn" row), at light load each goes alone. Best of three rounds per row.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import print_table
from orchestrator import store
from orchestrator.config import load_settings
from orchestrator.store.batch import Batcher


async def _per_call_us(call: Callable[[], Awaitable[Any]], calls: int, per_turn: int = 1) -> float:
    for _ in range(200):  # warm-up: connections made, code paths hot
        await call()
    best = float("inf")
    for _ in range(3):
        began = time.process_time()
        for _ in range(calls // per_turn):
            if per_turn == 1:
                await call()
            else:
                await asyncio.gather(*(call() for _ in range(per_turn)))
        best = min(best, (time.process_time() - began) / calls * 1e6)
    return best


async def main(args: argparse.Namespace) -> None:
    settings = load_settings()
    redis = store.connect(settings)
    key = f"{settings.redis_prefix}bench:redis-calls"
    await redis.set(key, "x" * 1024)
    pool = redis.connection_pool
    batcher = Batcher(redis)

    async def raw() -> Any:
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(connection.pack_commands([("GET", key)]))
            return await connection.read_response()
        finally:
            await pool.release(connection)

    async def pipeline() -> Any:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            return await pipe.execute()

    try:
        floor = await _per_call_us(raw, args.calls)
        rows = [["raw: write the command, read the reply (floor)", floor]]
        rows.append(
            ["redis-py client: redis.get", await _per_call_us(lambda: redis.get(key), args.calls)]
        )
        rows.append(["redis-py pipeline of one", await _per_call_us(pipeline, args.calls)])
        rows.append(
            ["Batcher, alone", await _per_call_us(lambda: batcher.call("GET", key), args.calls)]
        )
        rows.append(
            [
                "Batcher, 50 per turn",
                await _per_call_us(lambda: batcher.call("GET", key), args.calls, per_turn=50),
            ]
        )
    finally:
        await redis.delete(key)
        await redis.aclose()
    print_table(
        "CPU of the calling process per Redis GET (us, best of 3)",
        ["how", "us per call", "x floor"],
        [[how, f"{us:.0f}", f"{us / floor:.2f}"] for how, us in rows],
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    asyncio.run(main(parser.parse_args()))
