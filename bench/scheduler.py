"""Scheduler benchmark: firing lateness and CPU per 1k fires at 1k, 10k and 100k flows.

    python -m bench.scheduler [--flows 1000,10000,100000] [--rate 200] [--seconds 10]

Each size registers N flows of which `rate` fire every second (the others fire once a day,
outside the run), so the fire rate is the same at every size and only the registry grows. A
real `orchestrator scheduler` process fires them. Lateness is the ExecutionRequested's
`requested_at` (stamped just before its publish) minus its nominal time; "delivered" adds the
broker's delivery to this process (received here minus nominal).
CPU is the scheduler process's own user+system time.

The baseline, measured in the same run and the same way: a "raw publisher" process that, at
every second boundary, publishes the same messages (an ExecutionRequested and a status event
per fire) with confirms and no scheduling at all, every second's fires even when the one
before is not done yet (as the scheduler must). It is the floor the broker and client set
on this machine; "x raw" columns are the scheduler over that floor. "CPU x 1k" compares each
size with the 1k-flow run: flat means the cost per tick does not grow with the flow count.
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

from aio_pika.abc import AbstractIncomingMessage

from bench.common import env_for, isolated_settings, percentile, print_table, process_cpu_s
from orchestrator import store, topology
from orchestrator.amqp import connect, open_channel, publish
from orchestrator.config import Settings, load_settings
from orchestrator.store.flows import FlowRegistry
from schemas import ExecutionRequested, FlowDefinition, StatusEvent

APPLY_CHUNK = 5_000
# The firing flows' first tick comes this long after they are registered: the scheduler
# process starts meanwhile (a few seconds on a loaded host). Otherwise every tick of its start
# is due at once when it comes up (within the misfire grace, each one fires), and the window
# measures how fast that backlog drains instead of the steady burst every second.
FIRST_TICK_S = 6.0
WARMUP_S = FIRST_TICK_S + 3.0


def _flows(total: int, firing: int) -> list[FlowDefinition]:
    """Idle flows first, the firing ones last: registering 100k flows takes a while, and the
    firing flows must not fall behind before the scheduler even starts."""
    now = datetime.now(UTC)
    flows = []
    for i in reversed(range(total)):
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
        first = datetime.now(UTC) + timedelta(seconds=FIRST_TICK_S)
        await registry.apply(flows[start : start + APPLY_CHUNK], first)
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


async def _measure(settings: Settings, command: list[str], seconds: float) -> dict[str, float]:
    """Runs `command` (a process that fires ExecutionRequested messages on the second) and
    measures the lateness of what arrives in engine.executions and the process's CPU."""
    connection = await connect(settings, "bench")
    channel = await open_channel(connection, prefetch=2000)
    await topology.apply(channel)
    queue = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    await queue.purge()
    lateness: list[float] = []  # publish (requested_at) - nominal
    delivered: list[float] = []  # received here - nominal
    measuring = False

    async def on_message(message: AbstractIncomingMessage) -> None:
        received = time.time()
        execution = ExecutionRequested.model_validate_json(message.body)
        if measuring and execution.nominal_time is not None:
            nominal = execution.nominal_time.timestamp()
            lateness.append(execution.requested_at.timestamp() - nominal)
            delivered.append(received - nominal)

    await queue.consume(on_message, no_ack=True)
    process = subprocess.Popen(command, env=env_for(settings), stdout=subprocess.DEVNULL)  # noqa: ASYNC220 - started once, before measuring
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
    fires = len(lateness)
    return {
        "fires": fires,
        "p50_ms": percentile(lateness, 50) * 1000,
        "p99_ms": percentile(lateness, 99) * 1000,
        "delivered_p99_ms": percentile(delivered, 99) * 1000,
        "cpu_ms_per_1k": cpu / max(fires, 1) * 1_000_000,
    }


async def measure_scheduler(
    settings: Settings, total: int, rate: int, seconds: float
) -> dict[str, float]:
    await _register(settings, _flows(total, rate))
    try:
        command = [sys.executable, "-m", "orchestrator", "scheduler", "--no-ingress"]
        return await _measure(settings, command, seconds)
    finally:
        await _cleanup(settings)


async def raw_publisher(rate: int) -> None:
    """The baseline process: at every second boundary, publish `rate` ExecutionRequested and
    `rate` status events with confirms, as the scheduler would, but with no scheduling."""
    settings = load_settings()
    connection = await connect(settings, "bench-raw")
    channel = await open_channel(connection)
    semaphore = asyncio.Semaphore(64)

    async def one(nominal: datetime, i: int) -> None:
        async with semaphore:
            fire_id = f"t/f{i}@{nominal.isoformat()}"
            await publish(
                channel,
                ExecutionRequested(
                    execution_id=f"e{i}-{nominal.timestamp()}",
                    fire_id=fire_id,
                    tenant="t",
                    flow_id=f"f{i}",
                    trigger="cron",
                    nominal_time=nominal,
                ),
            )
            await publish(
                channel, StatusEvent.build("tick", "fired", event_id=fire_id, tenant="t", flow="f")
            )

    # Every second's fires, as the scheduler must fire every tick: a second that is not done
    # when the next one falls due keeps going, and the next one starts on time behind it
    # (one semaphore: first come, first published). Waiting for a second to finish before
    # the next boundary would skip the seconds it overran, shedding the load the scheduler
    # has to carry.
    batches: set[asyncio.Future[list[None]]] = set()
    boundary = int(time.time()) + 1
    while True:
        await asyncio.sleep(max(0.0, boundary - time.time()))
        nominal = datetime.fromtimestamp(boundary, UTC)
        batch = asyncio.gather(*(one(nominal, i) for i in range(rate)))
        batches.add(batch)
        batch.add_done_callback(batches.discard)
        boundary += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", default="1000,10000,100000")
    parser.add_argument("--rate", type=int, default=200, help="fires per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--raw-publisher", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_publisher:
        asyncio.run(raw_publisher(args.rate))
        return
    sizes = [int(x) for x in args.flows.split(",")]
    results = []
    with isolated_settings("scheduler") as settings:
        raw_command = [
            sys.executable,
            "-m",
            "bench.scheduler",
            "--raw-publisher",
            "--rate",
            str(args.rate),
        ]
        print("measuring the raw publisher ...", file=sys.stderr)
        raw = asyncio.run(_measure(settings, raw_command, args.seconds))
        for size in sizes:
            print(f"measuring {size} flows ...", file=sys.stderr)
            results.append(
                (size, asyncio.run(measure_scheduler(settings, size, args.rate, args.seconds)))
            )
    base = results[0][1]["cpu_ms_per_1k"]
    rows = [
        [
            f"{size:,}",
            f"{r['fires']:.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['delivered_p99_ms']:.1f}",
            f"{r['cpu_ms_per_1k']:.0f}",
            f"{r['cpu_ms_per_1k'] / raw['cpu_ms_per_1k']:.2f}",
            f"{r['cpu_ms_per_1k'] / base:.2f}",
        ]
        for size, r in results
    ]
    rows.append(
        [
            "raw publisher",
            f"{raw['fires']:.0f}",
            f"{raw['p50_ms']:.1f}",
            f"{raw['p99_ms']:.1f}",
            f"{raw['delivered_p99_ms']:.1f}",
            f"{raw['cpu_ms_per_1k']:.0f}",
            "1.00",
            "-",
        ]
    )
    print_table(
        f"scheduler: {args.rate} fires/s for {args.seconds:.0f}s per size "
        "(late = publish - nominal; delivered = received here - nominal)",
        [
            "flows",
            "fires",
            "late p50 ms",
            "late p99 ms",
            "delivered p99 ms",
            "CPU ms/1k",
            "CPU x raw",
            "CPU x 1k",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
