"""Scale figures: CPU per execution with more replicas, and what executions cost in memory.

    python -m bench.scale [--executions 2000] [--in-flight 10000] [--finished 5000]

* replicas: the same burst of single-step executions through 1 engine + 1 worker (4 slots)
  and through 2 engines + 2 workers (2 slots each: the same slots), one dispatcher (its
  lease makes it one by design); CPU ms per execution of every process and of the broker and
  Redis, summed per role. Work that spreads keeps the total flat; a ratio well above 1 would
  mean something is serialised through one process or repeated per replica.
* memory: Redis bytes per in-flight execution (10,000 started executions whose one step
  sleeps, most of them queued for the 4 slots) and per finished one, by key kind; and the RSS
  of every process with those executions in flight.

Ratios within the run, not absolute figures: the host is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from datetime import UTC, datetime

import redis.asyncio as aioredis

from bench.common import CostMeter, isolated_settings, print_table
from bench.engine import Harness
from orchestrator import store
from orchestrator.config import Settings
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import spawn, stop_all
from schemas import FlowDefinition

HOLD = {"id": "hold", "steps": [{"id": "a", "type": "demo.sleep", "input": {"ms": 600_000}}]}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def used_memory(redis: aioredis.Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def replicas(settings: Settings, engines: int, workers: int, count: int) -> dict[str, float]:
    """CPU ms per single-step execution, summed per role, over a burst of `count`."""
    harness = Harness(settings)
    await harness.setup()
    slots = str(4 // workers)
    processes = {f"engine{i}": spawn(settings, "engine") for i in range(engines)}
    processes["dispatcher"] = spawn(settings, "dispatcher")
    for i in range(workers):
        processes[f"worker{i}"] = spawn(settings, "worker", "--concurrency", slots)
    try:
        await asyncio.sleep(4)
        await harness.batch("single", 50, sequential=False)  # warm-up
        meter = CostMeter(settings, {name: p.pid for name, p in processes.items()})
        meter.start()
        _, elapsed = await harness.batch("single", count, sequential=False)
        cost = meter.stop(count)
    finally:
        stop_all(list(processes.values()))
        await harness.connection.close()
    per_role: dict[str, float] = collections.defaultdict(float)
    for key, value in cost.items():
        if key.startswith("cpu_ms."):
            per_role[key.removeprefix("cpu_ms.").rstrip("0123456789")] += value
    per_role["total"] = sum(v for k, v in per_role.items())
    per_role["executions/s"] = count / elapsed
    return per_role


async def kinds(redis: aioredis.Redis, prefix: str, sample: int = 200) -> dict[str, float]:
    """Bytes (MEMORY USAGE) per key kind, summed over a sample of each kind and scaled to
    the kind's key count: where the bytes are."""
    keys: dict[str, list[str]] = collections.defaultdict(list)
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        name = str(key).removeprefix(prefix)
        kind = name.split(":", 1)[0]
        if kind == "exec" and name.count(":") > 1:
            kind = "exec:" + name.rsplit(":", 1)[1]
        keys[kind].append(str(key))
    out = {}
    for kind, names in keys.items():
        sampled = names[:sample]
        sizes = [await redis.memory_usage(k) or 0 for k in sampled]
        out[kind] = sum(sizes) / len(sampled) * len(names)
    return out


async def memory(settings: Settings, in_flight: int, finished: int) -> list[list[str]]:
    redis = store.connect(settings)
    keys = store.Keys(settings.redis_prefix)
    await FlowRegistry(redis, store.Keys(settings.redis_prefix)).apply(
        [FlowDefinition.model_validate({"tenant": "bench", "overlap": "allow", **HOLD})],
        datetime.now(UTC),
    )
    harness = Harness(settings)
    await harness.setup()
    processes = {
        "engine": spawn(settings, "engine"),
        "dispatcher": spawn(settings, "dispatcher"),
        "worker": spawn(settings, "worker", "--concurrency", "4"),
    }
    rows: list[list[str]] = []
    try:
        await asyncio.sleep(4)
        rss_idle = {name: rss_mb(p.pid) for name, p in processes.items()}
        # Finished first (the hold executions would keep the slots busy).
        before = await used_memory(redis)
        await harness.batch("single", finished, sequential=False)
        await asyncio.sleep(1)
        finished_bytes = (await used_memory(redis) - before) / finished
        by_kind_finished = await kinds(redis, settings.redis_prefix)

        print(f"starting {in_flight} executions that stay in flight ...", file=sys.stderr)
        before = await used_memory(redis)
        for chunk in range(0, in_flight, 1000):
            await asyncio.gather(
                *(harness.request("hold") for _ in range(min(1000, in_flight - chunk)))
            )
        deadline = time.monotonic() + 600
        while await redis.hlen(keys.live) < in_flight and time.monotonic() < deadline:  # noqa: ASYNC110 - polls Redis
            await asyncio.sleep(1)
        live = await redis.hlen(keys.live)
        await asyncio.sleep(2)
        in_flight_bytes = (await used_memory(redis) - before) / max(live, 1)
        rss_busy = {name: rss_mb(p.pid) for name, p in processes.items()}
        by_kind = await kinds(redis, settings.redis_prefix)
    finally:
        stop_all(list(processes.values()))
        await harness.connection.close()
        await redis.aclose()
    rows.append(["Redis bytes per finished execution (used_memory delta)", f"{finished_bytes:.0f}"])
    rows.append([f"Redis bytes per in-flight execution ({live:,} live)", f"{in_flight_bytes:.0f}"])
    for kind, total in sorted(by_kind_finished.items(), key=lambda kv: -kv[1]):
        rows.append(
            [
                f"  after the finished run: {kind} keys, bytes per execution",
                f"{total / finished:.0f}",
            ]
        )
    for kind, total in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        if kind in ("exec", "exec:outbox", "live", "timers"):
            rows.append(
                [f"  in flight: {kind} keys, bytes per execution", f"{total / max(live, 1):.0f}"]
            )
    for name in processes:
        rows.append(
            [
                f"RSS MB of {name}: idle -> {live:,} in flight",
                f"{rss_idle[name]:.0f} -> {rss_busy[name]:.0f}",
            ]
        )
    return rows


async def run(args: argparse.Namespace) -> None:
    results: dict[str, dict[str, float]] = {}
    for label, engines, workers in (("1 engine, 1 worker", 1, 1), ("2 engines, 2 workers", 2, 2)):
        with isolated_settings("scale") as settings:
            print(f"replicas: {label} ...", file=sys.stderr)
            results[label] = await replicas(settings, engines, workers, args.executions)
    one, two = results.values()
    roles = ["engine", "dispatcher", "worker", "broker", "redis", "total", "executions/s"]
    print_table(
        f"CPU ms per single-step execution, by role ({args.executions} executions, 4 slots)",
        ["role", *results, "ratio"],
        [[r, f"{one[r]:.2f}", f"{two[r]:.2f}", f"{two[r] / one[r]:.2f}"] for r in roles],
    )
    with isolated_settings("scale-memory") as settings:
        print("memory ...", file=sys.stderr)
        rows = await memory(settings, args.in_flight, args.finished)
    print_table("memory", ["what", "figure"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=10_000)
    parser.add_argument("--finished", type=int, default=5000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
