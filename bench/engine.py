"""Engine benchmark: end-to-end latency and single-step throughput, next to the broker ceiling.

    python -m bench.engine [--light 50] [--heavy 200] [--throughput 1000]

Runs a real `orchestrator engine` and a real `orchestrator worker --concurrency 4`.
* latency: ExecutionRequested published -> first step started (the worker's start time) and
  -> execution succeeded, for a 3-step chain of demo.echo; "light" runs one execution at a
  time, "heavy" publishes a burst at once;
* throughput: a burst of single-step executions, executions completed per second;
* raw ceiling (same run): aio-pika publish -> consume -> ack through one quorum queue,
  messages per second. One execution is three queue hops (request, task, result) plus its
  status events, so ~1/3 of the ceiling would be a perfect engine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika

from bench.common import CostMeter, isolated_settings, percentile, print_table
from orchestrator import store, topology
from orchestrator.amqp import connect, open_channel, publish
from orchestrator.config import Settings
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import spawn, stop_all
from schemas import ExecutionRequested, FlowDefinition, StatusEvent

CHAIN = {
    "id": "chain",
    "steps": [
        {"id": "a", "type": "demo.echo"},
        {"id": "b", "type": "demo.echo", "depends_on": ["a"]},
        {"id": "c", "type": "demo.echo", "depends_on": ["b"]},
    ],
}
SINGLE = {"id": "single", "steps": [{"id": "a", "type": "demo.echo"}]}


class Harness:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started: dict[str, float] = {}
        self.first_step: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.finished = asyncio.Event()
        self.expect = 0

    async def setup(self) -> None:
        redis = store.connect(self.settings)
        flows = [
            FlowDefinition.model_validate({"tenant": "bench", "overlap": "allow", **d})
            for d in (CHAIN, SINGLE)
        ]
        await FlowRegistry(redis, store.Keys(self.settings.redis_prefix)).apply(
            flows, datetime.now(UTC)
        )
        await redis.aclose()
        self.connection = await connect(self.settings, "bench-engine")
        self.channel = await open_channel(self.connection, prefetch=1000)
        await topology.apply(self.channel)
        feed = await self.channel.declare_queue(exclusive=True)
        await feed.bind(topology.STATUS, routing_key="bench.#")
        await feed.consume(self._on_status, no_ack=True)

    async def _on_status(self, message: Any) -> None:
        event = StatusEvent.model_validate_json(message.body)
        subject = event.subject or ""
        if event.type.endswith("step.started") and subject not in self.first_step:
            self.first_step[subject] = datetime.fromisoformat(
                str(event.data["started_at"])
            ).timestamp()
        elif event.type.endswith("execution.succeeded"):
            self.done[subject] = time.time()
            if len(self.done) >= self.expect:
                self.finished.set()

    async def request(self, flow_id: str) -> str:
        execution_id = str(uuid.uuid4())
        self.started[execution_id] = time.time()
        await publish(
            self.channel,
            ExecutionRequested(
                execution_id=execution_id,
                fire_id=f"bench/{flow_id}#{execution_id}",
                tenant="bench",
                flow_id=flow_id,
                trigger="manual",
            ),
        )
        return execution_id

    async def batch(self, flow_id: str, count: int, sequential: bool) -> tuple[list[str], float]:
        self.done.clear()
        self.first_step.clear()
        self.finished.clear()
        self.expect = count
        began = time.time()
        ids = []
        if sequential:
            for _ in range(count):
                before = len(self.done)
                self.expect = before + 1
                self.finished.clear()
                ids.append(await self.request(flow_id))
                await asyncio.wait_for(self.finished.wait(), 60)
        else:
            ids = await asyncio.gather(*(self.request(flow_id) for _ in range(count)))
            await asyncio.wait_for(self.finished.wait(), 600)
        return list(ids), time.time() - began

    def latencies(self, ids: list[str]) -> tuple[list[float], list[float]]:
        first = [self.first_step[i] - self.started[i] for i in ids if i in self.first_step]
        total = [self.done[i] - self.started[i] for i in ids if i in self.done]
        return first, total


async def raw_ceiling(settings: Settings, count: int) -> float:
    """Messages per second through one quorum queue: confirmed publish, consume, ack."""
    connection = await connect(settings, "bench-raw")
    channel = await open_channel(connection, prefetch=256)
    queue = await channel.declare_queue(
        "bench.raw", durable=True, arguments={"x-queue-type": "quorum"}
    )
    received = 0
    done = asyncio.Event()

    async def on_message(message: Any) -> None:
        nonlocal received
        await message.ack()
        received += 1
        if received >= count:
            done.set()

    await queue.consume(on_message)
    semaphore = asyncio.Semaphore(64)
    body = b"x" * 400

    async def one() -> None:
        async with semaphore:
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key="bench.raw",
            )

    began = time.time()
    await asyncio.gather(*(one() for _ in range(count)))
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.time() - began
    await connection.close()
    return count / elapsed


async def run(args: argparse.Namespace) -> None:
    with isolated_settings("engine") as settings:
        print("measuring the raw ceiling ...", file=sys.stderr)
        ceiling = await raw_ceiling(settings, args.throughput * 3)
        harness = Harness(settings)
        await harness.setup()
        processes = [
            spawn(settings, "engine"),
            spawn(settings, "dispatcher"),
            spawn(settings, "worker", "--concurrency", "4"),
        ]
        try:
            await asyncio.sleep(3)
            await harness.batch("single", 20, sequential=False)  # warm-up
            rows = []
            for label, count, sequential in (
                ("light", args.light, True),
                ("heavy", args.heavy, False),
            ):
                print(f"measuring {label} latency ...", file=sys.stderr)
                ids, _ = await harness.batch("chain", count, sequential)
                first, total = harness.latencies(ids)
                how = "one by one" if sequential else "at once"
                rows.append(
                    [
                        f"3-step chain, {label} ({count} {how})",
                        f"{percentile(first, 50) * 1000:.0f}",
                        f"{percentile(first, 99) * 1000:.0f}",
                        f"{percentile(total, 50) * 1000:.0f}",
                        f"{percentile(total, 99) * 1000:.0f}",
                    ]
                )
            print("measuring throughput ...", file=sys.stderr)
            roles = ("engine", "dispatcher", "worker")
            meter = CostMeter(settings, {r: p.pid for r, p in zip(roles, processes, strict=True)})
            meter.start()
            _, elapsed = await harness.batch("single", args.throughput, sequential=False)
            rate = args.throughput / elapsed
            cost = meter.stop(args.throughput)
            await asyncio.sleep(6)  # the broker's message counters are sampled every 5 s
            cost.update(meter.messages(args.throughput))
        finally:
            stop_all(processes)
            await harness.connection.close()
        print_table(
            "engine latency (ms, from ExecutionRequested published)",
            ["scenario", "first step p50", "first step p99", "done p50", "done p99"],
            rows,
        )
        print_table(
            "throughput (1 engine, 4 worker slots)",
            ["what", "per second", "x ceiling"],
            [
                ["single-step executions", f"{rate:.0f}", f"{rate / ceiling:.3f}"],
                ["raw ceiling: publish->consume->ack, one queue", f"{ceiling:.0f}", "1.000"],
            ],
        )
        print_table(
            "cost per single-step execution (throughput run)",
            ["what", "per execution"],
            [[name, f"{value:.2f}"] for name, value in cost.items()],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--light", type=int, default=50)
    parser.add_argument("--heavy", type=int, default=200)
    parser.add_argument("--throughput", type=int, default=1000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
