"""The violations consumer with real Kafka, RabbitMQ and Redis: detect, punish, escalate,
release, leave small tenants alone, survive kill -9 without a second punishment."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from aiokafka import AIOKafkaProducer

from orchestrator import store, topology
from orchestrator.config import Settings
from orchestrator.store.tenants import TenantStore
from orchestrator.testing import process_env, spawn, stop_all, wait_for_violations
from orchestrator.violations.service import ViolationsConsumer
from tests.factories import cpu_usage
from tests.integration.helpers import body, drain, fresh_settings, status_feed

pytestmark = pytest.mark.asyncio(loop_scope="session")

WINDOW = 3


def write_policy(path: Path, penalty_s: float = 8.0, quarantine_s: float = 4.0) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "window_s": WINDOW,
                "lookback_s": 600,
                "default_plan": "standard",
                "plans": {
                    "standard": {
                        "limits": {"max_cpu_share": 0.5, "min_cpu_s": 1.0},
                        "ladder": [
                            {"action": "penalty", "minutes": penalty_s / 60, "weight_factor": 0.5},
                            {"action": "quarantine", "minutes": quarantine_s / 60},
                        ],
                    }
                },
            }
        )
    )
    return path


async def next_window_start() -> float:
    """Sleeps until just after a window boundary; returns that window's start."""
    now = time.time()
    start = (now // WINDOW + 1) * WINDOW
    # the wait is the behaviour under test: what follows happens in a window of its own
    await asyncio.sleep(start - now + 0.05)
    return start


class Rig:
    def __init__(self, settings: Settings, control: AbstractQueue, status: AbstractQueue) -> None:
        self.settings = settings
        self.control = control
        self.status = status
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_servers)

    async def send(self, tenant: str, cpu_s: float, count: int) -> None:
        for n in range(count):
            event = cpu_usage(tenant, cpu_s, n)
            await self.producer.send_and_wait(
                self.settings.usage_topic, event.to_bytes(), key=tenant.encode()
            )

    async def commands(self, wait_s: float, until: int = 1) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + wait_s
        while len(found) < until and time.monotonic() < deadline:
            found += [
                {**body(m), "type": m.type, "at": time.time()}
                for m in await drain(self.control, settle_s=0.05)
            ]
        return found


async def control_feed(channel: AbstractChannel) -> AbstractQueue:
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(topology.CONTROL, routing_key="#")
    return queue


def violations_settings(settings: Settings, tmp_path: Path, **extra: Any) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return fresh_settings(
        settings,
        usage_topic=f"test.usage.{suffix}",
        violations_app_id=f"test-violations-{suffix}",
        violations_policy=write_policy(tmp_path / "policy.yaml"),
        violations_data_dir=tmp_path / "data",
        violations_grace_s=0.5,
        violations_tick_s=0.2,
        **extra,
    )


@pytest.fixture
async def rig(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel, tmp_path: Path
) -> AsyncIterator[Rig]:
    test_settings = violations_settings(settings, tmp_path)
    redis = store.connect(test_settings)
    consumer = ViolationsConsumer(test_settings, redis, amqp)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.wait_for(consumer.ready.wait(), 60)
    rig = Rig(
        test_settings, await control_feed(channel), await status_feed(channel, "*.*.tenant.*")
    )
    await rig.producer.start()
    yield rig
    await rig.producer.stop()
    stop.set()
    await asyncio.wait_for(task, 30)
    async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
        await redis.delete(key)
    await redis.aclose()


async def test_over_share_is_penalised_then_quarantined_then_released(rig: Rig) -> None:
    start = await next_window_start()
    await rig.send("hog", 0.5, 6)  # 3 of 3.4 CPU seconds: 88 %
    await rig.send("calm", 0.2, 2)
    (penalty,) = await rig.commands(wait_s=WINDOW + 4)
    assert penalty["type"] == "control.penalty"
    assert penalty["tenant"] == "hog"
    assert penalty["rule"] == "cpu_share"
    assert penalty["command_id"] == f"penalty:cpu_share:hog:{int(start)}"
    assert penalty["at"] <= start + WINDOW + 2, "not within window + 2 s"

    start = await next_window_start()  # a repeat offence
    await rig.send("hog", 0.5, 6)
    await rig.send("calm", 0.2, 2)
    found = await rig.commands(wait_s=WINDOW + 4)
    quarantine = next(c for c in found if c["type"] == "control.quarantine")
    assert quarantine["command_id"] == f"quarantine:cpu_share:hog:{int(start)}"

    # The quarantine (4 s) and the penalty (8 s) run out: each is announced and released.
    releases = await rig.commands(wait_s=12, until=2)
    released = {c["command_id"] for c in releases if c["type"] == "control.release"}
    assert released == {f"release:{penalty['command_id']}", f"release:{quarantine['command_id']}"}
    states = [m.routing_key for m in await drain(rig.status, settle_s=0.2)]
    assert states.count("hog._.tenant.penalized") == 1
    assert states.count("hog._.tenant.quarantined") == 1
    assert states.count("hog._.tenant.released") == 2
    assert not any(s.startswith("calm.") for s in states)

    redis = store.connect(rig.settings)
    shown = await TenantStore(redis, store.Keys(rig.settings.redis_prefix)).describe("hog")
    await redis.aclose()
    assert [v["action"] for v in shown["last_violations"]] == ["quarantine", "penalty"]
    assert shown["last_violations"][0]["measured"] > 0.5


async def test_a_small_tenant_with_a_big_share_of_little_is_left_alone(rig: Rig) -> None:
    await next_window_start()
    await rig.send("tiny", 0.1, 5)  # 100 % of 0.5 CPU seconds: under the 1 s floor
    assert await rig.commands(wait_s=WINDOW + 3) == []


async def test_bad_usage_records_go_to_the_dlq_and_the_consumer_goes_on(rig: Rig) -> None:
    await rig.producer.send_and_wait(rig.settings.usage_topic, b'{"tenant": 1}', key=b"x")
    start = await next_window_start()
    await rig.send("hog", 0.5, 6)
    (penalty,) = await rig.commands(wait_s=WINDOW + 4)
    assert penalty["command_id"] == f"penalty:cpu_share:hog:{int(start)}"


async def test_kill_9_mid_window_still_catches_it_once(
    settings: Settings, channel: AbstractChannel, tmp_path: Path
) -> None:
    test_settings = violations_settings(
        settings, tmp_path, violations_instance_id=f"test-{uuid.uuid4().hex[:6]}"
    )
    env = {"ORCH_USAGE_TOPIC": test_settings.usage_topic}
    env |= {
        "ORCH_VIOLATIONS_APP_ID": test_settings.violations_app_id,
        "ORCH_VIOLATIONS_POLICY": str(test_settings.violations_policy),
        "ORCH_VIOLATIONS_DATA_DIR": str(test_settings.violations_data_dir),
        "ORCH_VIOLATIONS_GRACE_S": "0.5",
        "ORCH_VIOLATIONS_TICK_S": "0.2",
        "ORCH_VIOLATIONS_INSTANCE_ID": str(test_settings.violations_instance_id),
    }
    rig = Rig(
        test_settings, await control_feed(channel), await status_feed(channel, "*.*.tenant.*")
    )
    await rig.producer.start()
    first = spawn(test_settings, "violations", **env)
    second = None
    try:
        await wait_for_violations(test_settings)  # joined the group, tables recovered
        # The window is long enough for a restart inside it: 3 s would close during it.
        start = await next_window_start()
        await rig.send("hog", 0.5, 4)
        await rig.send("calm", 0.2, 1)
        # the wait is the behaviour under test: killed once the first process applied (and
        # partly committed) the events, the moment the restart must survive
        await asyncio.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        second = spawn(test_settings, "violations", **env)
        await rig.send("hog", 0.5, 2)  # the rest of the window, while nobody consumes
        found = await rig.commands(wait_s=40)
        assert [c["command_id"] for c in found] == [f"penalty:cpu_share:hog:{int(start)}"]
        # Every event counted once across the kill: none lost, none replayed twice.
        assert "(3.0 of 3.2 s)" in found[0]["reason"], found[0]["reason"]
        more = await rig.commands(wait_s=3)
        assert more == [], "a second punishment for the same window"
    finally:
        await rig.producer.stop()
        stop_all([p for p in (first, second) if p is not None])


async def test_a_changed_policy_applies_from_the_next_window(rig: Rig) -> None:
    policy = Path(rig.settings.violations_policy)
    relaxed = yaml.safe_load(policy.read_text())
    relaxed["plans"]["standard"]["limits"]["max_cpu_share"] = 0.95
    policy.write_text(yaml.safe_dump(relaxed))
    await next_window_start()
    await rig.send("hog", 0.5, 6)  # 88 %: over the old limit, under the new one
    await rig.send("calm", 0.2, 2)
    assert await rig.commands(wait_s=WINDOW + 3) == []
    policy.write_text("plans: {}\n")  # invalid: reported, and the last good policy stays
    start = await next_window_start()
    await rig.send("hog", 0.5, 10)  # 100 %
    (penalty,) = await rig.commands(wait_s=WINDOW + 4)
    assert penalty["command_id"] == f"penalty:cpu_share:hog:{int(start)}"


async def test_runs_as_a_plain_faust_worker(
    settings: Settings, channel: AbstractChannel, tmp_path: Path
) -> None:
    test_settings = violations_settings(settings, tmp_path)
    env = process_env(
        test_settings,
        ORCH_VIOLATIONS_APP_ID=test_settings.violations_app_id,
        ORCH_VIOLATIONS_POLICY=str(test_settings.violations_policy),
        ORCH_VIOLATIONS_DATA_DIR=str(test_settings.violations_data_dir),
        ORCH_VIOLATIONS_GRACE_S="0.5",
        ORCH_VIOLATIONS_TICK_S="0.2",
    )
    command = [sys.executable, "-m", "faust", "-A", "orchestrator.violations.worker"]
    worker = subprocess.Popen(
        [*command, "worker", "-l", "warn", "--without-web"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rig = Rig(
        test_settings, await control_feed(channel), await status_feed(channel, "*.*.tenant.*")
    )
    await rig.producer.start()
    try:
        await wait_for_violations(test_settings)  # joined the group, tables recovered
        start = await next_window_start()
        await rig.send("hog", 0.5, 6)
        (penalty,) = await rig.commands(wait_s=WINDOW + 4)
        assert penalty["command_id"] == f"penalty:cpu_share:hog:{int(start)}"
    finally:
        await rig.producer.stop()
        stop_all([worker])
