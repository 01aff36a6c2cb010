"""Scheduler benchmark: firing lateness and CPU per 1k fires at 1k, 10k and 100k flows.

    python -m bench.scheduler [--flows 1000,10000,100000] [--rate 200] [--seconds 10]

Each size registers N flows of which `rate` fire every second (the others fire once a day,
outside the run), so the fire rate is the same at every size and only the registry grows. A
real `orchestrator scheduler` process fires them; lateness is the time this process receives
the ExecutionRequested minus its nominal time (an upper bound of publish time minus nominal).
CPU is the scheduler process's own user+system time.

The baseline, measured in the same run: the CPU one process spends publishing the same
messages (an ExecutionRequested and a status event per fire) with confirms and no
scheduling at all. "x raw" is the scheduler's CPU per fire over that floor; "x 1k" compares
each size with the 1k-flow run (flat means cost per tick does not grow with the flow count).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

from bench.common import env_for, isolated_settings, percentile, print_table, process_cpu_s
from orchestrator import store, topology
from orchestrator.amqp import connect, open_channel, publish
from orchestrator.config import Settings
from orchestrator.store.flows import FlowRegistry
from schemas import ExecutionRequested, FlowDefinition, StatusEvent

APPLY_CHUNK = 5_000
WARMUP_S = 3.0


def _flows(total: int, firing: int) -> list[FlowDefinition]:
    now = datetime.now(UTC)
    flows = []
    for i in range(total):
        if i < firing:
            cron = "* * * * * *"
        else:  # daily, at a time more than two hours away from now
            at = now + timedelta(hours=2, seconds=random.randrange(20 * 3600))
            cron = f"{at.minute} {at.hour} * * *"
        flows.append(
            FlowDefinition.model_validate(
                {
                    "tenant": f"t{i % 50}",
                    "id": f"f{i}",
                    "cron": cron,
                    "overlap": "allow",
                    "steps": [{"id": "a", "type": "demo.echo"}],
                }
            )
        )
    return flows


async def _register(settings: Settings, flows: list[FlowDefinition]) -> None:
    redis = store.connect(settings)
    registry = FlowRegistry(redis, store.Keys(settings.redis_prefix))
    for start in range(0, len(flows), APPLY_CHUNK):
        await registry.apply(flows[start : start + APPLY_CHUNK], datetime.now(UTC))
    await redis.aclose()


async def _cleanup(settings: Settings) -> None:
    redis = store.connect(settings)
    batch = []
    async for key in redis.scan_iter(match=f"{settings.redis_prefix}*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            await redis.delete(*batch)
            batch = []
    if batch:
        await redis.delete(*batch)
    await redis.aclose()


async def measure_scheduler(settings: Settings, total: int, rate: int, seconds: float) -> dict[str, float]:
    await _register(settings, _flows(total, rate))
    connection = await connect(settings, "bench")
    channel = await open_channel(connection, prefetch=2000)
    await topology.apply(channel)
    queue = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    await queue.purge()
    lateness: list[float] = []
    measuring = False

    async def on_message(message: object) -> None:
        received = time.time()
        execution = ExecutionRequested.model_validate_json(message.body)  # type: ignore[attr-defined]
        if measuring and execution.nominal_time is not None:
            lateness.append(received - execution.nominal_time.timestamp())
        await message.ack()  # type: ignore[attr-defined]

    await queue.consume(on_message)
    process = subprocess.Popen(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "orchestrator", "scheduler", "--no-ingress"],
        env=env_for(settings),
        stdout=subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(WARMUP_S)
        cpu_start = process_cpu_s(process.pid)
        measuring = True
        await asyncio.sleep(seconds)
        measuring = False
        cpu = process_cpu_s(process.pid) - cpu_start
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        await connection.close()
        await _cleanup(settings)
    fires = len(lateness)
    return {
        "fires": fires,
        "p50_ms": percentile(lateness, 50) * 1000,
        "p99_ms": percentile(lateness, 99) * 1000,
        "cpu_ms_per_1k": cpu / max(fires, 1) * 1_000_000,
    }


async def measure_raw_publish(settings: Settings, fires: int) -> float:
    """CPU ms per 1k fires for publishing just the messages (2 per fire) with confirms."""
    connection = await connect(settings, "bench-raw")
    channel = await open_channel(connection)
    await topology.apply(channel)
    now = datetime.now(UTC)
    semaphore = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with semaphore:
            fire_id = f"t/f{i}@{i}"
            await publish(
                channel,
                ExecutionRequested(
                    execution_id=f"e{i}",
                    fire_id=fire_id,
                    tenant="t",
                    flow_id=f"f{i % 100}",
                    trigger="cron",
                    nominal_time=now,
                ),
            )
            await publish(
                channel,
                StatusEvent.build("tick", "fired", event_id=fire_id, tenant="t", flow="f"),
            )

    cpu_start = time.process_time()
    await asyncio.gather(*(one(i) for i in range(fires)))
    cpu = time.process_time() - cpu_start
    queue = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    await queue.purge()
    await connection.close()
    return cpu / fires * 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", default="1000,10000,100000")
    parser.add_argument("--rate", type=int, default=200, help="fires per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    sizes = [int(x) for x in args.flows.split(",")]
    results = []
    with isolated_settings("scheduler") as settings:
        raw = asyncio.run(measure_raw_publish(settings, args.rate * int(args.seconds)))
        for size in sizes:
            print(f"measuring {size} flows ...", file=sys.stderr)
            results.append((size, asyncio.run(measure_scheduler(settings, size, args.rate, args.seconds))))
    base = results[0][1]["cpu_ms_per_1k"]
    rows = [
        [
            f"{size:,}",
            f"{r['fires']:.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['cpu_ms_per_1k']:.0f}",
            f"{r['cpu_ms_per_1k'] / raw:.2f}",
            f"{r['cpu_ms_per_1k'] / base:.2f}",
        ]
        for size, r in results
    ]
    rows.append(["raw publish", "-", "-", "-", f"{raw:.0f}", "1.00", "-"])
    print_table(
        f"scheduler: {args.rate} fires/s for {args.seconds:.0f}s per size",
        ["flows", "fires", "late p50 ms", "late p99 ms", "CPU ms/1k fires", "x raw", "x 1k"],
        rows,
    )


if __name__ == "__main__":
    main()
