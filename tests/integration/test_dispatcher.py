"""The fair dispatcher with real brokers and workers: weights, noise, quarantine, failover."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import store, topology
from orchestrator.amqp import publish
from orchestrator.config import Settings
from orchestrator.dispatcher.service import Dispatcher
from orchestrator.store import Keys
from orchestrator.store.tenants import TenantPolicy, TenantStore
from orchestrator.testing import spawn, stop_all, wait_for_consumers, wait_until
from schemas import QuarantineCommand, ReleaseCommand, StepTask
from tests.integration.helpers import (
    body,
    depths,
    drain,
    fresh_settings,
    purged,
    reset_queues,
)
from workers import Worker
from workers import builtin as _builtin  # noqa: F401 - registers demo.* steps

pytestmark = pytest.mark.asyncio(loop_scope="session")

TENANTS = ("ta", "tb", "tc", "noisy", "quiet1", "quiet2")


def task(tenant: str, n: int, ms: int = 20, flow: str = "f") -> StepTask:
    now = datetime.now(UTC)
    return StepTask(
        task_id=f"{tenant}-{n}:s:1",
        execution_id=f"{tenant}-{n}",
        tenant=tenant,
        flow_id=flow,
        step_id="s",
        step_type="demo.sleep",
        attempt=1,
        input={"ms": ms},
        timeout_s=30,
        deadline=now + timedelta(seconds=30),
        enqueued_at=now,
    )


@dataclass
class Rig:
    settings: Settings
    channel: AbstractChannel
    tenants: TenantStore
    results: AbstractQueue
    dispatcher: Dispatcher | None = None  # the in-process one, where a test runs one

    async def enqueue(self, tenant: str, count: int, start: int = 0, ms: int = 20) -> None:
        await asyncio.gather(
            *(publish(self.channel, task(tenant, start + i, ms)) for i in range(count))
        )

    async def completions(self, until: int, wait_s: float = 60) -> list[str]:
        """Tenants of completed steps, in completion order, until `until` of them."""
        order: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while len(order) < until and loop.time() < deadline:
            order += [body(m)["tenant"] for m in await drain(self.results, settle_s=0.05)]
        return order


async def _prepare(settings: Settings, channel: AbstractChannel) -> tuple[Settings, Any, Rig]:
    test_settings = fresh_settings(settings)
    for tenant in TENANTS:
        await reset_queues(channel, tenant)
    redis = store.connect(test_settings)
    tenants = TenantStore(redis, store.Keys(test_settings.redis_prefix))
    for tenant in TENANTS:
        await tenants.register(tenant)
    # Steps an earlier test's dispatcher released ahead (its window) and no worker ran yet
    # would run now and answer too: every test starts with empty work queues.
    for queue in (
        topology.work_queue_name(topology.DEFAULT_POOL),
        topology.express_queue_name(topology.DEFAULT_POOL),
        topology.COMPLETIONS_QUEUE,
    ):
        await purged(channel, queue)
    results = await purged(channel, topology.RESULTS_QUEUE)
    return test_settings, redis, Rig(test_settings, channel, tenants, results)


@pytest.fixture
async def rig(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> AsyncIterator[Rig]:
    test_settings, redis, rig = await _prepare(settings, channel)
    stop = asyncio.Event()
    rig.dispatcher = Dispatcher(test_settings, redis, amqp)
    async with Worker(test_settings, amqp, redis, concurrency=2) as worker:
        tasks = [
            asyncio.create_task(worker.run(stop)),
            asyncio.create_task(rig.dispatcher.run(stop)),
        ]
        await _working(amqp, rig.dispatcher)
        yield rig
        stop.set()
        await asyncio.gather(*tasks)
    for tenant in TENANTS:
        await purged(channel, topology.tenant_queue_name(tenant))
    async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
        await redis.delete(key)
    await redis.aclose()


async def _working(amqp: AbstractRobustConnection, dispatcher: Dispatcher) -> None:
    """Until the dispatcher leads and consumes every tenant's queue, and a worker consumes the
    work queue."""
    await wait_until(lambda: dispatcher.leader, what="the dispatcher leads")
    await wait_for_consumers(
        amqp,
        *(topology.tenant_queue_name(t) for t in TENANTS),
        topology.work_queue_name(topology.DEFAULT_POOL),
    )


def _policy(rig: Rig, tenant: str) -> TenantPolicy | None:
    """What the rig's dispatcher applies to `tenant` now."""
    assert rig.dispatcher is not None
    return rig.dispatcher.ledger.policies.get(tenant)


def _in_flight(rig: Rig, tenant: str) -> int:
    assert rig.dispatcher is not None
    return rig.dispatcher.ledger.per_tenant.get(tenant, 0)


class SlowChannels:
    """A real connection whose channels take `delay_s` to open, as on a loaded host."""

    def __init__(self, connection: AbstractRobustConnection, delay_s: float) -> None:
        self._connection = connection
        self._delay_s = delay_s

    async def channel(self, *args: Any, **kwargs: Any) -> AbstractChannel:
        # the wait is the behaviour under test: a channel open that takes this long
        await asyncio.sleep(self._delay_s)
        return await self._connection.channel(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


async def test_taking_the_lead_survives_a_slow_channel_open(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    """The periodic refresh (every 0.5 s) must not act on a leadership whose channel is still
    opening: it used to, and the new leader died of it right after a takeover."""
    test_settings, redis, rig = await _prepare(settings, channel)
    stop = asyncio.Event()
    slow: Any = SlowChannels(amqp, delay_s=1.2)
    dispatcher = Dispatcher(test_settings, redis, slow)
    async with Worker(test_settings, amqp, redis, concurrency=2) as worker:
        tasks = [
            asyncio.create_task(worker.run(stop)),
            asyncio.create_task(dispatcher.run(stop)),
        ]
        try:
            # Two slow opens, refresh ticks meanwhile: a leader that died of them would not
            # run the steps below.
            await wait_until(lambda: dispatcher.leader, what="the dispatcher leads")
            await rig.enqueue("ta", 5, ms=5)
            assert len(await rig.completions(5, wait_s=20)) == 5
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
        await redis.delete(key)
    await redis.aclose()


async def test_weights_5_3_2_under_full_backlog(rig: Rig) -> None:
    for tenant, weight in (("ta", 5), ("tb", 3), ("tc", 2)):
        await rig.tenants.set_config(tenant, weight=weight)
    # The dispatcher re-reads tenant settings every 0.5 s.
    await wait_until(
        lambda: all(
            (policy := _policy(rig, t)) is not None and policy.weight == w
            for t, w in (("ta", 5), ("tb", 3), ("tc", 2))
        ),
        what="the dispatcher applies the weights",
    )
    for tenant in ("ta", "tb", "tc"):
        await rig.enqueue(tenant, 80)
    order = await rig.completions(100)
    share = Counter(order[10:90])  # steady state: all three backlogged
    assert abs(share["ta"] - 40) <= 5, share
    assert abs(share["tb"] - 24) <= 5, share
    assert abs(share["tc"] - 16) <= 5, share


async def test_noisy_neighbour_does_not_delay_quiet_tenants(rig: Rig) -> None:
    await rig.enqueue("noisy", 500)
    await wait_until(lambda: _in_flight(rig, "noisy"), what="the noisy backlog being served")
    await drain(rig.results, settle_s=0)  # only what completes after the quiet ones arrive
    await rig.enqueue("quiet1", 5)
    await rig.enqueue("quiet2", 5)
    order = await rig.completions(60)
    last_quiet = max(i for i, tenant in enumerate(order) if tenant.startswith("quiet"))
    noisy_meanwhile = sum(1 for tenant in order[: last_quiet + 1] if tenant == "noisy")
    assert sum(1 for tenant in order if tenant.startswith("quiet")) == 10
    # Three backlogged tenants share equally: while the ten quiet steps run, the noisy tenant
    # gets about five. FIFO would run all 500 noisy steps first.
    assert noisy_meanwhile <= 12, order


async def test_quarantine_stops_a_tenant_and_release_resumes_it(rig: Rig) -> None:
    await rig.enqueue("ta", 200)
    await rig.enqueue("tb", 200)
    await rig.completions(10)
    now = datetime.now(UTC)
    await publish(
        rig.channel,
        QuarantineCommand(
            command_id="q-test-1",
            tenant="ta",
            rule="test",
            issued_at=now,
            expires_at=now + timedelta(minutes=5),
        ),
    )
    # Applied, and the steps already in flight finished.
    await wait_until(
        lambda: (
            (policy := _policy(rig, "ta")) is not None
            and policy.quarantined
            and _in_flight(rig, "ta") == 0
        ),
        what="ta quarantined, none of its steps in flight",
    )
    await drain(rig.results, settle_s=0.1)  # their results
    held = await rig.completions(30, wait_s=3)
    assert "ta" not in held, Counter(held)
    assert "tb" in held
    await publish(rig.channel, ReleaseCommand(command_id="r-test-1", tenant="ta", rule="test"))
    await wait_until(
        lambda: (policy := _policy(rig, "ta")) is not None and not policy.quarantined,
        what="ta released",
    )
    resumed = await rig.completions(20)
    assert "ta" in resumed


async def test_a_copy_of_a_released_step_is_dropped(rig: Rig) -> None:
    """A takeover redelivers what the old leader released but had not acked, and the engine
    may publish a step twice after a crash: the dispatched marker drops the second copy."""
    await rig.enqueue("ta", 1)
    assert await rig.completions(1) == ["ta"]
    await rig.enqueue("ta", 1)  # the same attempt id again
    await rig.enqueue("ta", 1, start=1)
    later = [body(m)["task_id"] for m in await drain(rig.results, settle_s=1.0)]
    assert later == ["ta-1:s:1"]


async def test_a_redelivered_copy_of_a_released_step_is_dropped(rig: Rig) -> None:
    """What a dead leader released but had not acked comes back, redelivered, to the next
    leader: the dispatched marker drops it."""
    tenant = "late"  # not registered yet, so no dispatcher consumes its queue
    await reset_queues(rig.channel, tenant)
    released, fresh = task(tenant, 0), task(tenant, 1)
    await publish(rig.channel, released)
    queue = await rig.channel.get_queue(topology.tenant_queue_name(tenant))
    try:
        first = await queue.get(timeout=5)  # the old leader got it,
        marker = f"{store.Keys(rig.settings.redis_prefix).prefix}dispatched:{released.task_id}"
        await rig.tenants.redis.set(marker, "1", ex=600)  # released it,
        await first.nack(requeue=True)  # and died before its ack
        await publish(rig.channel, fresh)
        await rig.tenants.register(tenant)
        later = [body(m)["task_id"] for m in await drain(rig.results, settle_s=1.5)]
        assert later == [fresh.task_id]
    finally:
        await queue.purge()


async def test_killed_active_dispatcher_loses_nothing(
    settings: Settings, channel: AbstractChannel
) -> None:
    test_settings, redis, rig = await _prepare(settings, channel)
    tenants = ("ta", "tb", "tc")
    queues = [
        *(topology.tenant_queue_name(t) for t in tenants),
        *(topology.tenant_queue(t).dlq for t in tenants),
        topology.work_queue_name(topology.DEFAULT_POOL),
        topology.express_queue_name(topology.DEFAULT_POOL),
    ]
    for name in queues:
        await purged(channel, name)
    dispatchers = [spawn(test_settings, "dispatcher") for _ in range(2)]
    worker = spawn(test_settings, "worker", "--concurrency", "4")
    try:
        lease = Keys(test_settings.redis_prefix).dispatcher_lease
        leader = str(await wait_until(lambda: redis.get(lease), what="a dispatcher leads"))
        for tenant in tenants:
            await rig.enqueue(tenant, 100, ms=10)
        # Killed mid-work: once it has released some of the 300 steps, not all.
        await wait_until(lambda: _released(redis, test_settings), what="steps released")
        victim = next(d for d in dispatchers if f":{d.pid}:" in leader)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        seen: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(seen) < 300 and loop.time() < deadline:
            for message in await drain(rig.results, settle_s=0.2):
                seen[body(message)["task_id"]] += 1
        missing = Counter(
            task_id.split("-")[0]
            for task_id in {f"{t}-{i}:s:1" for t in tenants for i in range(100)} - set(seen)
        )
        assert not missing, f"not done: {dict(missing)}; ready: {await depths(channel, queues)}"
    finally:
        stop_all([*dispatchers, worker])
        for tenant in TENANTS:
            await purged(channel, topology.tenant_queue_name(tenant))
        async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
            await redis.delete(key)
        await redis.aclose()


async def _released(redis: Any, settings: Settings) -> bool:
    """Some steps were released: their dispatched markers are written."""
    async for _ in redis.scan_iter(match=Keys(settings.redis_prefix).dispatched("*")):
        return True
    return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, str], float]:
    """Samples of the dispatcher's /metrics by (name, tenant label)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, sample.labels.get("tenant", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_dispatcher_exports_per_tenant_metrics(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    test_settings, redis, rig = await _prepare(settings, channel)
    await rig.tenants.set_config("ta", weight=3)
    port = _free_port()
    dispatcher = spawn(test_settings, "dispatcher", ORCH_METRICS_PORT=str(port))
    worker = spawn(test_settings, "worker", "--concurrency", "2")
    try:
        await wait_for_consumers(
            amqp,
            *(topology.tenant_queue_name(t) for t in ("ta", "tb")),
            topology.work_queue_name(topology.DEFAULT_POOL),
        )
        await rig.enqueue("ta", 12, ms=10)
        await rig.enqueue("tb", 8, ms=10)
        assert len(await rig.completions(20)) == 20

        async def settled() -> dict[tuple[str, str], float] | None:
            """The metrics once the completions reached the dispatcher too."""
            metrics = await asyncio.to_thread(_scrape, port)
            done = all(metrics.get(("orchestrator_in_flight", t)) == 0 for t in ("ta", "tb"))
            return metrics if done else None

        metrics = await wait_until(settled, what="nothing in flight in the dispatcher's metrics")
        assert metrics[("orchestrator_dispatched_total", "ta")] == 12
        assert metrics[("orchestrator_dispatched_total", "tb")] == 8
        assert metrics[("orchestrator_dwell_seconds_count", "ta")] == 12
        assert metrics[("orchestrator_in_flight", "ta")] == 0
        assert metrics[("orchestrator_in_flight", "tb")] == 0
        assert metrics[("orchestrator_cost_served_seconds_total", "tb")] >= 8 * 0.010
        assert metrics[("orchestrator_tenant_weight", "ta")] == 3
        assert metrics[("orchestrator_tenant_quarantined", "ta")] == 0
    finally:
        stop_all([dispatcher, worker])
        async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
            await redis.delete(key)
        await redis.aclose()
