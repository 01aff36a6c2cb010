"""Violations consumer benchmark: ingest rate and detection latency, next to raw aiokafka.

    python -m bench.violations [--events 20000] [--windows 8] [--background 200]

1. Ingest: the same pre-filled usage topic read three ways in one run: a raw aiokafka
   consumer (records only), raw aiokafka + pydantic validation of each UsageEvent, and the
   violations app (faust agent, tables with changelogs, window bookkeeping).
2. Detection: with `--background` usage events/s from 50 small tenants flowing, a hog sends a
   burst of CPU-heavy events at a random moment of each window; latency = the violating event
   produced -> its PenaltyCommand delivered from RabbitMQ. Judging happens when a window is
   final (end + grace), so the latency includes the rest of the window; the time from the
   window's end to the command is the consumer's own delay.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import isolated_settings, percentile, print_table
from orchestrator import kafka, store, topology
from orchestrator.amqp import connect, open_channel
from orchestrator.config import Settings
from orchestrator.testing import cpu_usage
from orchestrator.violations.service import EVENTS, ViolationsConsumer
from schemas import UsageEvent

WINDOW = 2
GRACE = 0.5
TENANTS = [f"t{i:02d}" for i in range(50)]


def write_policy(path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "window_s": WINDOW,
                "default_plan": "standard",
                "plans": {
                    "standard": {
                        "limits": {"max_cpu_share": 0.5, "min_cpu_s": 1.0},
                        "ladder": [{"action": "penalty", "minutes": 1}],
                    }
                },
            }
        )
    )
    return path


async def prefill(settings: Settings, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_servers, linger_ms=5)
    await producer.start()
    try:
        batch = []
        for n in range(count):
            tenant = TENANTS[n % len(TENANTS)]
            batch.append(
                producer.send(
                    settings.usage_topic,
                    cpu_usage(tenant, 0.001, n).to_bytes(),
                    key=tenant.encode(),
                )
            )
            if len(batch) >= 1000:
                await asyncio.gather(*(await asyncio.gather(*batch)))
                batch.clear()
        await asyncio.gather(*(await asyncio.gather(*batch)))
    finally:
        await producer.stop()


async def raw_rate(settings: Settings, count: int, validate: bool) -> float:
    consumer = AIOKafkaConsumer(
        settings.usage_topic,
        bootstrap_servers=settings.kafka_servers,
        group_id=f"bench-raw-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen = 0
    first = last = 0.0
    try:
        while seen < count:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for records in batches.values():
                for record in records:
                    if record.key == b"\x00tick":
                        continue
                    if validate:
                        UsageEvent.model_validate_json(record.value or b"")
                    seen += 1
                    first = first or time.perf_counter()
            last = time.perf_counter()
    finally:
        await consumer.stop()
    return (seen - 1) / (last - first)


def applied() -> float:
    """Usage events the app has read (its own counter; cheap enough to poll)."""
    return sum(
        sample.value
        for metric in EVENTS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


async def app_rate(count: int, before: float) -> float:
    first = last = 0.0
    while applied() - before < count:
        if not first and applied() > before:
            first = time.perf_counter()
        await asyncio.sleep(0.02)
    last = time.perf_counter()
    return (count - 1) / (last - first)


async def detection(
    settings: Settings, channel: Any, windows: int, background: float
) -> tuple[list[float], list[float]]:
    commands = await channel.declare_queue(exclusive=True)
    await commands.bind(topology.CONTROL, routing_key="#")
    arrivals: dict[str, float] = {}

    async def on_command(message: Any) -> None:
        arrivals[str(message.message_id)] = time.time()

    await commands.consume(on_command, no_ack=True)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_servers, linger_ms=5)
    await producer.start()
    stop = asyncio.Event()

    async def noise() -> None:
        n = 0
        while not stop.is_set():
            tenant = random.choice(TENANTS)
            await producer.send(
                settings.usage_topic, cpu_usage(tenant, 0.001, n).to_bytes(), key=tenant.encode()
            )
            n += 1
            await asyncio.sleep(1 / background)

    background_task = asyncio.create_task(noise())
    violated: dict[str, float] = {}
    try:
        for _ in range(windows):
            now = time.time()
            start = (now // WINDOW + 1) * WINDOW
            await asyncio.sleep(start - now + random.uniform(0.1, WINDOW - 0.4))
            for n in range(3):
                await producer.send_and_wait(
                    settings.usage_topic, cpu_usage("hog", 1.0, n).to_bytes(), key=b"hog"
                )
            violated[f"penalty:cpu_share:hog:{int(start)}"] = time.time()
        await asyncio.sleep(WINDOW + GRACE + 3)
    finally:
        stop.set()
        await background_task
        await producer.stop()
    latency = [arrivals[c] - at for c, at in violated.items() if c in arrivals]
    after_end = [
        arrivals[c] - (int(c.rsplit(":", 1)[1]) + WINDOW) for c in violated if c in arrivals
    ]
    missing = len(violated) - len(latency)
    if missing:
        print(f"warning: {missing} of {len(violated)} violations not detected")
    return latency, after_end


async def run(settings: Settings, args: argparse.Namespace) -> None:
    await kafka.ensure_topics(settings)
    print(f"prefilling {args.events} usage events ...")
    await prefill(settings, args.events)
    raw = await raw_rate(settings, args.events, validate=False)
    decoded = await raw_rate(settings, args.events, validate=True)
    redis = store.connect(settings)
    connection = await connect(settings, "bench-violations")
    channel = await open_channel(connection)
    await topology.apply(channel)
    consumer = ViolationsConsumer(settings, redis, connection)
    stop = asyncio.Event()
    before = applied()
    task = asyncio.create_task(consumer.run(stop))
    try:
        ingest = await asyncio.wait_for(app_rate(args.events, before), 600)
        await asyncio.wait_for(consumer.ready.wait(), 60)
        latency, after_end = await detection(settings, channel, args.windows, args.background)
    finally:
        stop.set()
        await task
        await connection.close()
        await redis.aclose()
    print_table(
        f"ingest ({args.events} usage events, 1 partition)",
        ["reader", "events/s", "vs raw aiokafka"],
        [
            ["raw aiokafka consumer", f"{raw:.0f}", "1.00"],
            ["raw aiokafka + pydantic decode", f"{decoded:.0f}", f"{decoded / raw:.2f}"],
            ["violations app (faust)", f"{ingest:.0f}", f"{ingest / raw:.2f}"],
        ],
    )
    print_table(
        f"detection ({args.windows} windows of {WINDOW} s, grace {GRACE} s, "
        f"{args.background:.0f} background events/s)",
        ["measure", "p50 ms", "p99 ms"],
        [
            [
                "violating event -> command on RabbitMQ",
                f"{percentile(latency, 50) * 1000:.0f}",
                f"{percentile(latency, 99) * 1000:.0f}",
            ],
            [
                "window end -> command (the consumer's own delay)",
                f"{percentile(after_end, 50) * 1000:.0f}",
                f"{percentile(after_end, 99) * 1000:.0f}",
            ],
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--background", type=float, default=200.0)
    args = parser.parse_args()
    with isolated_settings("violations") as base, tempfile.TemporaryDirectory() as tmp:
        settings = base.model_copy(
            update={
                "violations_policy": write_policy(Path(tmp) / "policy.yaml"),
                "violations_data_dir": Path(tmp) / "data",
                "violations_grace_s": GRACE,
                "violations_tick_s": 0.1,
                "log_level": "WARNING",
            }
        )
        asyncio.run(run(settings, args))


if __name__ == "__main__":
    main()
