"""Fairness benchmark: the same workers and workload under three strategies, in one run.

    python -m bench.fairness [--slots 4] [--scenarios balanced,weighted,...] [--repeat N]

Strategies:
* fifo  - one shared queue (what Celery does): tasks go straight to work.default;
* rr    - RabbitMQ round-robin over per-tenant queues: the worker consumes fq.<tenant> directly;
* fair  - this dispatcher: fq.<tenant> -> weighted SFQ -> work.default.

Every scenario runs on a fresh `orchestrator worker --concurrency SLOTS` (and, for `fair`, a
fresh `orchestrator dispatcher`). Steps are `demo.sleep` (cost = slot time), except in
heavy-cpu (`demo.cpu`, shares also in CPU seconds). Printed per scenario and strategy:
quiet-tenant dwell (enqueue -> start) p50/p99, worst served-share/weight and Jain's index of
weight-normalised service (over the period when every tenant was backlogged), makespan and
throughput, and the ratios to FIFO; and what the run cost the host: CPU per step of the worker,
the dispatcher and the broker, the time per step the worker waited for a core (runnable, not
running: what the other processes took from it), and how busy the host's cores were. With
--repeat N the strategies take turns and each figure is the median of N runs (the ratios to
FIFO: of each run's ratio to the FIFO run of its turn), except the dwell percentiles, which
are over all N runs' samples.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer

from bench.common import (
    broker_pid,
    cpu_seconds,
    host_busy,
    isolated_settings,
    percentile,
    print_table,
    run_queue_wait,
    topic_of,
)
from orchestrator import store, topology
from orchestrator.amqp import connect, open_channel, publish
from orchestrator.config import Settings
from orchestrator.kafka import ensure_topics
from orchestrator.store.tenants import TenantStore
from orchestrator.testing import spawn, stop_all
from schemas import StepResult, StepTask, UsageEvent

TENANTS = ("a", "b", "c")


@dataclass
class Arrival:
    at: float  # seconds after the start
    tenant: str
    ms: int
    flow: str = "f"
    step: str = "demo.sleep"


@dataclass
class Scenario:
    name: str
    weights: dict[str, float]
    arrivals: list[Arrival]
    quiet: tuple[str, ...]  # whose dwell is reported
    backlogged: tuple[str, ...] = TENANTS  # whose shares are compared


def burst(
    tenant: str,
    count: int,
    ms: int,
    *,
    at: float = 0.0,
    flows: int = 1,
    step: str = "demo.sleep",
) -> list[Arrival]:
    return [Arrival(at, tenant, ms, f"f{i % flows}", step) for i in range(count)]


def trickle(
    tenant: str, every_s: float, until_s: float, ms: int, start_s: float = 0.0
) -> list[Arrival]:
    count = int((until_s - start_s) / every_s)
    return [Arrival(start_s + i * every_s, tenant, ms) for i in range(count)]


def quiet_pair() -> list[Arrival]:
    return trickle("b", 0.1, 3.1, 20, start_s=0.1) + trickle("c", 0.1, 3.1, 20, start_s=0.1)


def scenarios() -> dict[str, Scenario]:
    even = {t: 1.0 for t in TENANTS}
    return {
        "balanced": Scenario(
            "balanced", even, [a for t in TENANTS for a in burst(t, 150, 20)], ("c",)
        ),
        "weighted": Scenario(
            "weighted 5:3:2",
            {"a": 5, "b": 3, "c": 2},
            [a for t in TENANTS for a in burst(t, 250, 20)],
            ("c",),
        ),
        # The quiet tenants arrive while the noisy one is backlogged: from 0.1 s on (at 0 they
        # would race the noisy tenant's first publishes), the same arrivals with and without
        # the noise. The noisy tenant asks for 15 slot-seconds at once (25x the quiet
        # tenants' rate, more than the workers can do in the quiet tenants' 3 s) in 50 ms
        # steps: it saturates the worker slots, which fairness divides, without saturating
        # this 2-core host's CPU, which the broker needs for everyone alike.
        "noisy": Scenario(
            "noisy neighbour",
            even,
            burst("a", 300, 50) + quiet_pair(),
            ("b", "c"),
            ("a",),
        ),
        # The same demand as 600 steps of 20 ms: on a 2-core host running the broker, the
        # dispatcher and the workers, this saturates the CPU as well (FIFO reaches ~140 of the
        # 200 steps/s the slots could do), and every hop's latency grows with it.
        "noisy-flood": Scenario(
            "noisy, CPU-bound host",
            even,
            burst("a", 600, 20) + quiet_pair(),
            ("b", "c"),
            ("a",),
        ),
        # 100x by rate: the noisy tenant publishes 200 steps/s of 30 ms for 6 s (1.5x what
        # the slots can run, so its backlog grows throughout) while each quiet tenant
        # publishes 2/s. The host's CPU is not the bottleneck here (that is noisy-flood).
        "noisy-100x": Scenario(
            "noisy, 100x rate",
            even,
            trickle("a", 0.005, 6.1, 30, start_s=0.1)
            + trickle("b", 0.5, 6.1, 20, start_s=0.1)
            + trickle("c", 0.5, 6.1, 20, start_s=0.35),
            ("b", "c"),
            ("a",),
        ),
        "quiet-alone": Scenario("quiet, no noise", even, quiet_pair(), ("b", "c"), ()),
        "sybil": Scenario(
            "sybil (30 flows)",
            even,
            burst("a", 400, 20, flows=30) + burst("b", 400, 20),
            ("b",),
            ("a", "b"),
        ),
        "heavy": Scenario(
            "heavy steps (10x)", even, burst("a", 60, 100) + burst("b", 600, 10), ("b",), ("a", "b")
        ),
        # The same with steps that burn CPU: shares measured in CPU seconds (from the workers'
        # usage events), while the dispatcher charges slot time.
        "heavy-cpu": Scenario(
            "heavy CPU steps (10x)",
            even,
            burst("a", 40, 100, step="demo.cpu") + burst("b", 400, 10, step="demo.cpu"),
            ("b",),
            ("a", "b"),
        ),
        "idle-return": Scenario(
            "idle-return",
            even,
            burst("a", 500, 20) + burst("b", 100, 20, at=1.5),
            ("b",),
            ("a", "b"),
        ),
        "trickle": Scenario(
            "trickle", even, [a for t in TENANTS for a in trickle(t, 0.05, 3.0, 10)], TENANTS, ()
        ),
    }


@dataclass
class Run:
    tasks: dict[str, tuple[str, float, float]] = field(
        default_factory=dict
    )  # id -> tenant, weight, enq
    results: list[StepResult] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # id -> CPU seconds (usage events)
    process_cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds
    process_wait: dict[str, float] = field(default_factory=dict)  # role -> run-queue seconds
    host_busy: float = float("nan")  # share of all cores' time busy during the run


class CpuMeter:
    """CPU seconds spent since it was made (start-up not counted) by each role's process and
    the broker, and the share of the host's cores that were busy."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {**pids, "broker": broker_pid()}
        self.started = {role: cpu_seconds(pid) for role, pid in self.pids.items()}
        self.host = host_busy()
        self.waited = {role: run_queue_wait(pid) for role, pid in self.pids.items()}

    def read(self, run: Run) -> None:
        """Fills in `run`'s CPU, run-queue wait and host figures for the time since start."""
        for role, pid in self.pids.items():
            run.process_cpu[role] = cpu_seconds(pid) - self.started[role]
            run.process_wait[role] = run_queue_wait(pid) - self.waited[role]
        busy, total = host_busy()
        run.host_busy = (busy - self.host[0]) / (total - self.host[1])


async def publish_tenant(
    connection: Any,
    *,
    scenario: Scenario,
    strategy: str,
    run: Run,
    tenant: str,
    nonce: str,
    start: float,
) -> None:
    # One publisher (and channel) per tenant: a tenant's burst must not hold back another
    # tenant's arrivals, or the "quiet" tenants would arrive in bursts of their own.
    own = await open_channel(connection)
    arrivals = [(i, a) for i, a in enumerate(scenario.arrivals) if a.tenant == tenant]
    for i, arrival in sorted(arrivals, key=lambda pair: pair[1].at):
        delay = start + arrival.at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        now = datetime.now(UTC)
        task = StepTask(
            task_id=f"{arrival.tenant}-{nonce}-{i}:s:1",
            execution_id=f"{arrival.tenant}-{nonce}-{i}",
            tenant=arrival.tenant,
            flow_id=arrival.flow,
            step_id="s",
            step_type=arrival.step,
            attempt=1,
            input={"ms": arrival.ms},
            timeout_s=60,
            deadline=now + timedelta(seconds=60),
            enqueued_at=now,
        )
        run.tasks[task.task_id] = (
            arrival.tenant,
            scenario.weights.get(arrival.tenant, 1.0),
            now.timestamp(),
        )
        if strategy == "fifo":
            await publish(own, task, exchange=topology.WORK, routing_key="default")
        else:
            await publish(own, task)
    await own.close()


async def read_cpu(settings: Settings, count: int) -> dict[str, float]:
    """CPU seconds per attempt from the workers' usage events (this run's own topic)."""
    consumer = AIOKafkaConsumer(
        settings.usage_topic,
        bootstrap_servers=settings.kafka_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    cpu: dict[str, float] = {}
    deadline = time.monotonic() + 20
    try:
        while len(cpu) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    event = UsageEvent.model_validate_json(record.value or b"")
                    cpu[event.event_id] = event.cpu_s
    finally:
        await consumer.stop()
    return cpu


async def run_one(settings: Settings, scenario: Scenario, strategy: str, slots: int) -> Figures:
    topic = topic_of(settings, uuid.uuid4().hex[:8])
    settings = settings.model_copy(update={"usage_topic": topic})
    # Created up front, as in a deployment: a producer auto-creating it mid-run stalls the
    # host for tens of milliseconds, and that would be measured as dwell.
    await ensure_topics(settings)
    connection = await connect(settings, "bench-fairness")
    channel = await open_channel(connection, prefetch=1000)
    await topology.apply(channel)
    redis = store.connect(settings)
    tenants = TenantStore(redis, store.Keys(settings.redis_prefix))
    for tenant in TENANTS:
        await topology.declare_tenant_queue(channel, tenant)
        await (await channel.get_queue(topology.tenant_queue_name(tenant))).purge()
        await tenants.register(tenant)
        await tenants.set_config(tenant, weight=scenario.weights.get(tenant, 1.0))
    for name in (
        topology.work_queue_name("default"),
        topology.RESULTS_QUEUE,
        topology.COMPLETIONS_QUEUE,
    ):
        await (await channel.get_queue(name)).purge()
    run = Run()
    done = asyncio.Event()
    total = len(scenario.arrivals)

    async def on_result(message: Any) -> None:
        run.results.append(StepResult.model_validate_json(message.body))
        if len(run.results) >= total:
            done.set()

    results = await channel.get_queue(topology.RESULTS_QUEUE)
    await results.consume(on_result, no_ack=True)
    processes = []
    roles = []
    if strategy == "fair":
        processes.append(spawn(settings, "dispatcher"))
        roles.append("dispatcher")
        worker_args = ["worker", "--concurrency", str(slots)]
    elif strategy == "rr":
        worker_args = ["worker", "--concurrency", str(slots)]
        for tenant in TENANTS:
            worker_args += ["--queue", topology.tenant_queue_name(tenant)]
    else:
        worker_args = ["worker", "--concurrency", str(slots)]
    processes.append(spawn(settings, *worker_args))
    roles.append("worker")
    await asyncio.sleep(3.0)
    meter = CpuMeter(dict(zip(roles, (p.pid for p in processes), strict=True)))
    nonce = uuid.uuid4().hex[:6]  # attempt ids are never reused: the dispatcher drops repeats
    try:
        start = time.time()
        await asyncio.gather(
            *(
                publish_tenant(
                    connection,
                    scenario=scenario,
                    strategy=strategy,
                    run=run,
                    tenant=tenant,
                    nonce=nonce,
                    start=start,
                )
                for tenant in sorted({a.tenant for a in scenario.arrivals})
            )
        )
        await asyncio.wait_for(done.wait(), 600)
        meter.read(run)
    finally:
        stop_all(processes)
        await connection.close()
        await redis.aclose()
    if any(a.step == "demo.cpu" for a in scenario.arrivals):
        run.cpu = await read_cpu(settings, len(run.results))
    return measure(scenario, run, start)


def shares(scenario: Scenario, served: dict[str, float]) -> tuple[float, float]:
    """Worst served-share/weight and Jain's index of weight-normalised service."""
    if len(scenario.backlogged) < 2 or not sum(served.values()):
        return float("nan"), float("nan")
    total_cost = sum(served.values())
    total_weight = sum(scenario.weights.get(t, 1.0) for t in scenario.backlogged)
    ratios = [
        (served[t] / total_cost) / (scenario.weights.get(t, 1.0) / total_weight)
        for t in scenario.backlogged
    ]
    normalised = [served[t] / scenario.weights.get(t, 1.0) for t in scenario.backlogged]
    jain = sum(normalised) ** 2 / (len(normalised) * sum(x * x for x in normalised))
    return min(ratios), jain


@dataclass
class Figures:
    dwell: list[float]  # quiet tenants' enqueue -> start, seconds
    figures: dict[str, float]


def measure(scenario: Scenario, run: Run, start: float) -> Figures:
    dwell: list[float] = []
    last_start: dict[str, float] = defaultdict(float)
    for result in run.results:
        tenant, _, enqueued = run.tasks[result.task_id]
        begun = result.started_at.timestamp()
        last_start[tenant] = max(last_start[tenant], begun)
        if tenant in scenario.quiet:
            dwell.append(begun - enqueued)
    # The comparison window: from the last backlogged tenant's first arrival until the first of
    # them runs out of work.
    window_start = max(
        (min(v[2] for v in run.tasks.values() if v[0] == t) for t in scenario.backlogged),
        default=start,
    )
    window_end = min((last_start[t] for t in scenario.backlogged), default=start)
    served: dict[str, float] = defaultdict(float)
    cpu: dict[str, float] = defaultdict(float)
    for result in run.results:
        tenant = run.tasks[result.task_id][0]
        begun = result.started_at.timestamp()
        if tenant in scenario.backlogged and window_start <= begun <= window_end:
            served[tenant] += (result.finished_at - result.started_at).total_seconds()
            cpu[tenant] += run.cpu.get(result.task_id, 0.0)
    worst, jain = shares(scenario, served)
    cpu_worst, _ = shares(scenario, cpu) if run.cpu else (float("nan"), float("nan"))
    finished = max(r.finished_at.timestamp() for r in run.results)
    makespan = finished - start
    return Figures(
        dwell,
        {
            "worst": worst,
            "cpu_worst": cpu_worst,
            "jain": jain,
            "makespan": makespan,
            "throughput": len(run.results) / makespan,
            # What each process cost per step (start-up excluded): the dispatcher's CPU is the
            # price of fairness, taken from the broker and workers when they share a host.
            "worker_ms": run.process_cpu.get("worker", float("nan")) * 1000 / len(run.results),
            "dispatcher_ms": (
                run.process_cpu.get("dispatcher", float("nan")) * 1000 / len(run.results)
            ),
            "broker_ms": run.process_cpu.get("broker", float("nan")) * 1000 / len(run.results),
            "worker_wait_ms": (
                run.process_wait.get("worker", float("nan")) * 1000 / len(run.results)
            ),
            "host_busy": run.host_busy * 100,
        },
    )


def median_runs(
    settings: Settings, scenario: Scenario, strategies: list[str], slots: int, repeat: int
) -> dict[str, dict[str, float]]:
    """Per strategy, each figure is the median over `repeat` runs (the machines are shared and
    noisy), but the dwell percentiles are taken over the samples of all runs pooled: one run
    has 60 quiet steps, so its own "p99" is its slowest step, whatever stalled the host then.
    The strategies take turns (fifo, rr, fair, fifo, ...), so a slow spell of the host weighs
    on all of them rather than on whichever ran through it."""
    runs: dict[str, list[Figures]] = {strategy: [] for strategy in strategies}
    for attempt in range(repeat):
        for strategy in strategies:
            print(f"{scenario.name}: {strategy} ({attempt + 1}/{repeat}) ...", file=sys.stderr)
            runs[strategy].append(asyncio.run(run_one(settings, scenario, strategy, slots)))
    summary = {}
    for strategy, done in runs.items():
        pooled = [sample for run in done for sample in run.dwell]
        summary[strategy] = {
            "dwell_p50": percentile(pooled, 50) * 1000,
            "dwell_p99": percentile(pooled, 99) * 1000,
            **{key: statistics.median(run.figures[key] for run in done) for key in done[0].figures},
        }
        if "fifo" in runs:  # paired: each run against the FIFO run of the same turn
            for key in ("makespan", "throughput"):
                summary[strategy][f"{key}_vs_fifo"] = statistics.median(
                    run.figures[key] / fifo.figures[key]
                    for run, fifo in zip(done, runs["fifo"], strict=True)
                )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--scenarios", default=",".join(scenarios()))
    parser.add_argument("--strategies", default="fifo,rr,fair")
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; medians are shown")
    args = parser.parse_args()
    chosen = [scenarios()[name] for name in args.scenarios.split(",")]
    rows = []
    with isolated_settings("fairness") as settings:
        for scenario in chosen:
            figures = median_runs(
                settings, scenario, args.strategies.split(","), args.slots, args.repeat
            )
            fifo = figures.get("fifo")
            for strategy, m in figures.items():
                rows.append(
                    [
                        scenario.name,
                        strategy,
                        f"{m['dwell_p50']:.0f}",
                        f"{m['dwell_p99']:.0f}",
                        f"{m['worst']:.2f}",
                        f"{m['cpu_worst']:.2f}",
                        f"{m['jain']:.3f}",
                        f"{m['makespan']:.2f}",
                        f"{m['throughput']:.0f}",
                        f"{m['makespan_vs_fifo']:.2f}" if fifo else "-",
                        f"{m['throughput_vs_fifo']:.2f}" if fifo else "-",
                        f"{m['worker_ms']:.1f}",
                        f"{m['dispatcher_ms']:.1f}" if strategy == "fair" else "-",
                        f"{m['broker_ms']:.1f}",
                        f"{m['worker_wait_ms']:.1f}",
                        f"{m['host_busy']:.0f}",
                    ]
                )
    print_table(
        f"fairness ({args.slots} worker slots, {args.repeat} runs per cell: medians, dwell "
        "percentiles over all runs' samples; dwell = enqueue -> start of quiet tenants' steps)",
        [
            "scenario",
            "strategy",
            "quiet dwell p50 ms",
            "p99 ms",
            "worst share/weight",
            "CPU share/weight",
            "Jain",
            "makespan s",
            "steps/s",
            "makespan/FIFO",
            "steps/s / FIFO",
            "worker CPU ms/step",
            "dispatcher CPU ms/step",
            "broker CPU ms/step",
            "worker waited for CPU ms/step",
            "host CPU busy %",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
