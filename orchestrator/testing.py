"""Running real `orchestrator` processes, as tests and benchmarks do: spawned with the
environment of a `Settings` (its brokers, Redis prefix, usage topic, accounts), stopped with
SIGTERM, killed like production would kill them. For users testing their own step handlers
against real brokers as much as for this project's suites and benches.

`ORCH_TEST_PROCESS_LOG=PATH` sends the spawned processes' logs there (debugging a test);
`ORCH_TEST_PROCESS_LOG_LEVEL` sets their level (default WARNING)."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, overload

import aiormq
import yaml
from aio_pika.abc import AbstractConnection
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from orchestrator import store, topology
from orchestrator.config import Settings
from schemas import UsageEvent

T = TypeVar("T")


@overload
async def wait_until(
    check: Callable[[], Awaitable[T]],
    *,
    timeout_s: float = ...,
    every_s: float = ...,
    what: str = ...,
) -> T: ...


@overload
async def wait_until(
    check: Callable[[], T],
    *,
    timeout_s: float = ...,
    every_s: float = ...,
    what: str = ...,
) -> T: ...


async def wait_until(
    check: Callable[[], Awaitable[T] | T],
    *,
    timeout_s: float = 30.0,
    every_s: float = 0.05,
    what: str = "the condition",
) -> T:
    """Asks `check` (plain or async) every `every_s` until it answers something true, and
    returns that answer: tests wait for a condition, not for a time that usually suffices.
    TimeoutError, naming `what` and the last answer, if it does not hold within `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        answer = check()
        if inspect.isawaitable(answer):
            answer = await answer
        if answer:
            return answer
        if loop.time() >= deadline:
            raise TimeoutError(f"{what} did not hold within {timeout_s} s (last: {answer!r})")
        await asyncio.sleep(every_s)


async def consumers(connection: AbstractConnection, queue: str) -> int:
    """How many consumers `queue` has now (a passive declare), 0 while it does not exist: on a
    channel of its own, which a missing queue closes."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return 0
    finally:
        if not channel.is_closed:
            await channel.close()
    return declared.declaration_result.consumer_count or 0


async def wait_for_consumers(
    connection: AbstractConnection, *queues: str, timeout_s: float = 30.0
) -> None:
    """Until each of `queues` has a consumer: a service that consumes it has started."""
    for queue in queues:

        async def consumed(name: str = queue) -> bool:
            return await consumers(connection, name) > 0

        await wait_until(consumed, timeout_s=timeout_s, what=f"a consumer on {queue}")


async def wait_for_pipeline(
    settings: Settings,
    connection: AbstractConnection,
    tenants: tuple[str, ...] = (),
    *,
    timeout_s: float = 30.0,
) -> None:
    """Until the processes of `spawn_pipeline` (or `running_system`) work: a dispatcher holds
    the lease, a worker is registered, the engine consumes its queues and the scheduler the
    ingress of each of `tenants` (registered ones: it consumes no other)."""
    redis = store.connect(settings)
    keys = store.Keys(settings.redis_prefix)

    async def leading() -> bool:
        return bool(await redis.exists(keys.dispatcher_lease))

    async def registered() -> bool:
        return bool(await redis.scard(keys.workers))

    try:
        await wait_until(leading, timeout_s=timeout_s, what="a dispatcher holding the lease")
        await wait_until(registered, timeout_s=timeout_s, what="a registered worker")
    finally:
        await redis.aclose()
    await wait_for_consumers(
        connection,
        topology.EXECUTIONS_QUEUE,
        topology.RESULTS_QUEUE,
        *(topology.ingress_queue_name(tenant) for tenant in tenants),
        timeout_s=timeout_s,
    )


async def wait_for_violations(settings: Settings, timeout_s: float = 60.0) -> None:
    """Until a violations consumer runs on the usage topic of `settings`: it created the topic,
    joined its group and started its tick timer (the group leader's ticks, every
    ORCH_VIOLATIONS_TICK_S, are records of the topic: its end offsets grow)."""
    topic = settings.usage_topic
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_servers)
    await admin.start()
    await consumer.start()
    records = 0

    async def ticking() -> bool:
        nonlocal records
        (described,) = await admin.describe_topics([topic])
        if described["error_code"] or not described["partitions"]:
            return False  # not created yet
        partitions = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
        seen, records = records, sum((await consumer.end_offsets(partitions)).values())
        return 0 < seen < records  # records arriving, not a topic somebody wrote to once

    try:
        await wait_until(
            ticking, timeout_s=timeout_s, every_s=0.25, what="the violations consumer ticking"
        )
    finally:
        await consumer.stop()
        await admin.close()


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "ORCH_RABBITMQ_URL": str(settings.rabbitmq_url),
        "ORCH_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "ORCH_REDIS_URL": str(settings.redis_url),
        "ORCH_REDIS_PREFIX": settings.redis_prefix,
        "ORCH_USAGE_TOPIC": settings.usage_topic,
        "ORCH_REQUIRE_AUTH": str(settings.require_auth).lower(),
        "ORCH_ACCOUNT_PREFIX": settings.account_prefix,
        "ORCH_RABBITMQ_MANAGEMENT_URL": settings.rabbitmq_management_url,
        "ORCH_LOG_LEVEL": os.environ.get("ORCH_TEST_PROCESS_LOG_LEVEL", "WARNING"),
        **extra,
    }


def _log_target() -> Any:
    """Where spawned processes log: nowhere, or ORCH_TEST_PROCESS_LOG when debugging a test."""
    path = os.environ.get("ORCH_TEST_PROCESS_LOG")
    return subprocess.DEVNULL if not path else open(path, "ab")


def spawn(settings: Settings, *args: str, **extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own CLI, with our own arguments
        [sys.executable, "-m", "orchestrator", *args],
        env=process_env(settings, **extra),
        stdout=subprocess.DEVNULL,
        stderr=_log_target(),
    )


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def spawn_pipeline(settings: Settings, concurrency: int = 4) -> list[subprocess.Popen[bytes]]:
    """Every process a flow passes through: engine, dispatcher, worker, scheduler."""
    return [
        spawn(settings, "engine"),
        spawn(settings, "dispatcher"),
        spawn(settings, "worker", "--concurrency", str(concurrency)),
        spawn(settings, "scheduler"),
    ]


def violations_env(directory: Path, policy: dict[str, Any], app_id: str) -> dict[str, str]:
    """The environment of a violations consumer with its own policy file, consumer group and
    data directory (under `directory`)."""
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return {
        "ORCH_VIOLATIONS_APP_ID": app_id,
        "ORCH_VIOLATIONS_POLICY": str(path),
        "ORCH_VIOLATIONS_DATA_DIR": str(directory / "violations"),
    }


def cpu_usage(
    tenant: str, cpu_s: float, n: int, *, finished: datetime | None = None, flow: str = "f"
) -> UsageEvent:
    """A succeeded demo.cpu attempt that burnt `cpu_s` and ended at `finished` (default now);
    `n` numbers the execution, the event id is unique."""
    end = finished or datetime.now(UTC)
    return UsageEvent(
        event_id=f"{tenant}-{uuid.uuid4().hex[:10]}-{n}:s:1",
        tenant=tenant,
        flow_id=flow,
        execution_id=f"{tenant}-{n}",
        step_id="s",
        step_type="demo.cpu",
        attempt=1,
        worker_id="test",
        outcome="succeeded",
        wall_s=cpu_s,
        cpu_s=cpu_s,
        started_at=end - timedelta(seconds=cpu_s),
        finished_at=end,
    )
