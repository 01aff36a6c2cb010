"""Fair ingress benchmark: tenant B's flow-start latency while tenant A floods requests.

    python -m bench.ingress [--flood 10000] [--probes 100] [--rate 20]

A real `orchestrator scheduler` process admits flow-start requests. B publishes `--probes`
requests at `--rate`/s and measures each one from its publish to its
`flow_start.accepted` status event. First B alone (the baseline, same run), then B again
while A publishes `--flood` requests as fast as the broker confirms them. Each tenant's
requests wait in its own ingress queue (ingress.<tenant>), so A's flood delays only A.

Run twice: with the default per-tenant rate limit (A's requests beyond its burst are refused
`rate_limited` at once) and with the limit off (every one of A's requests is admitted), so
the table shows the fairness of the queues themselves and of the limit on top.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from bench.common import env_for, isolated_settings, percentile, print_table
from orchestrator import store, topology
from orchestrator.amqp import connect, open_channel, publish
from orchestrator.config import Settings, load_settings
from orchestrator.store.flows import FlowRegistry
from schemas import FlowDefinition, FlowStartRequested


def _flow(tenant: str, flow: str) -> FlowDefinition:
    return FlowDefinition.model_validate(
        {
            "tenant": tenant,
            "id": flow,
            "overlap": "allow",
            "steps": [{"id": "a", "type": "demo.echo"}],
        }
    )


class Feed:
    """B's accept times by idempotency key."""

    def __init__(self) -> None:
        self.accepted_at: dict[str, float] = {}

    async def on_event(self, message: AbstractIncomingMessage) -> None:
        event = json.loads(message.body)
        if event["type"].endswith("flow_start.accepted"):
            key = (event.get("data") or {}).get("idempotency_key")
            self.accepted_at.setdefault(str(key), time.monotonic())
        await message.ack()


async def _probe(
    settings: Settings, feed: Feed, tag: str, count: int, rate: float
) -> tuple[list[float], list[float]]:
    """B's latencies (ms): publish -> flow_start.accepted, and publish -> the broker's
    confirm (the broker's own share, which no scheduler can make shorter)."""
    connection = await connect(settings, "bench-ingress-b")
    confirms: list[float] = []
    async with connection:
        channel = await open_channel(connection)
        sent: dict[str, float] = {}
        for n in range(count):
            key = f"{tag}-{n}"
            sent[key] = time.monotonic()
            await publish(
                channel, FlowStartRequested(tenant="b", flow_id="probe", idempotency_key=key)
            )
            confirms.append((time.monotonic() - sent[key]) * 1000)
            await asyncio.sleep(1 / rate)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(k in feed.accepted_at for k in sent):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    accepted = [
        (feed.accepted_at[k] - at) * 1000 for k, at in sent.items() if k in feed.accepted_at
    ]
    return accepted, confirms


async def _flood(settings: Settings, count: int, tag: str) -> None:
    """A's requests, published as fast as the broker confirms them (in windows of 500), from
    a process of its own so the flood does not slow down B's measuring."""
    connection = await connect(settings, "bench-ingress-a")
    async with connection:
        channel = await open_channel(connection)
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    publish(
                        channel,
                        FlowStartRequested(
                            tenant="a", flow_id="flood", idempotency_key=f"{tag}-{n}"
                        ),
                    )
                    for n in range(start, min(count, start + 500))
                )
            )


def _start_flood(settings: Settings, count: int, tag: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.ingress", "--flood-only", str(count), "--tag", tag],
        env=env_for(settings),
    )


async def _outcomes(channel: AbstractChannel, queue: str, expected: int) -> Counter[str]:
    """A's flow_start events, counted by outcome (accepted, or the refusal's reason)."""
    found: Counter[str] = Counter()
    source = await channel.get_queue(queue)
    deadline = time.monotonic() + 120
    while sum(found.values()) < expected and time.monotonic() < deadline:
        message = await source.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.2)
            continue
        event = json.loads(message.body)
        accepted = event["type"].endswith("accepted")
        found["accepted" if accepted else str(event["data"].get("reason"))] += 1
    return found


def _start_scheduler(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "scheduler"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _scenario(
    settings: Settings, label: str, rate_per_s: float, args: argparse.Namespace
) -> list[list[str]]:
    scheduler = _start_scheduler({**env_for(settings), "ORCH_INGRESS_RATE_PER_S": str(rate_per_s)})
    feed = Feed()
    connection = await connect(settings, "bench-ingress-feed")
    try:
        channel = await open_channel(connection, prefetch=2000)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(topology.STATUS, routing_key="b.*.flow_start.*")
        await queue.consume(feed.on_event)
        flood_feed = await channel.declare_queue(exclusive=True)
        await flood_feed.bind(topology.STATUS, routing_key="a.*.flow_start.*")
        # Both tenants' ingress queues exist once the scheduler is up.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                await channel.get_queue(topology.ingress_queue_name("b"))
                await channel.get_queue(topology.ingress_queue_name("a"))
                break
            except Exception:
                channel = await open_channel(connection, prefetch=2000)
                await asyncio.sleep(0.5)
        await _probe(settings, feed, f"{label}-warm", 20, args.rate)
        alone, alone_confirm = await _probe(
            settings, feed, f"{label}-alone", args.probes, args.rate
        )
        began = time.monotonic()
        flood = _start_flood(settings, args.flood, f"{label}-flood")
        await asyncio.sleep(0.5)  # the flood is under way
        during, during_confirm = await _probe(
            settings, feed, f"{label}-during", args.probes, args.rate
        )
        await asyncio.to_thread(flood.wait, 300)
        flood_s = time.monotonic() - began
        outcomes = await _outcomes(channel, flood_feed.name, args.flood)
    finally:
        await connection.close()
        scheduler.send_signal(signal.SIGTERM)
        scheduler.wait(timeout=30)
    base_p50, base_p99 = percentile(alone, 50), percentile(alone, 99)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    rows = [
        [
            label,
            "B alone",
            f"{len(alone)}",
            f"{base_p50:.1f}",
            f"{base_p99:.1f}",
            "1.00",
            f"{percentile(alone_confirm, 99):.1f}",
            "-",
        ],
        [
            label,
            f"B while A floods {args.flood}",
            f"{len(during)}",
            f"{percentile(during, 50):.1f}",
            f"{percentile(during, 99):.1f}",
            f"{percentile(during, 99) / base_p99:.2f}",
            f"{percentile(during_confirm, 99):.1f}",
            f"published in {flood_s:.1f} s; {summary}",
        ],
    ]
    return rows


async def main(args: argparse.Namespace) -> None:
    rows: list[list[str]] = []
    for label, rate in (("rate limit on (100/s, burst 1000)", 100.0), ("rate limit off", 0.0)):
        with isolated_settings("ingress") as isolated:
            settings = isolated.model_copy(update={"require_auth": False})
            connection = await connect(settings, "bench-ingress-setup")
            async with connection:
                await topology.apply(await open_channel(connection))
            redis = store.connect(settings)
            try:
                await FlowRegistry(redis, store.Keys(settings.redis_prefix)).apply(
                    [_flow("a", "flood"), _flow("b", "probe")], datetime.now(UTC)
                )
                rows += await _scenario(settings, label, rate, args)
            finally:
                async for key in redis.scan_iter(match=f"{settings.redis_prefix}*"):
                    await redis.delete(key)
                await redis.aclose()
    print_table(
        "Flow-start latency of tenant B (publish -> flow_start.accepted), ms",
        [
            "scheduler",
            "B's requests",
            "n",
            "p50",
            "p99",
            "p99 x alone",
            "broker confirm p99",
            "A's flood",
        ],
        rows,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=10_000)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--flood-only", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="flood", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.flood_only is not None:  # the flooding process
        asyncio.run(_flood(load_settings(), arguments.flood_only, arguments.tag))
    else:
        asyncio.run(main(arguments))
