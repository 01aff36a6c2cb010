"""Usage accounting through a Kafka outage, every process real: workers keep running steps
while Kafka is stopped and buffer their usage events; when Kafka returns, the backlog is
flushed and judged in the windows its events belong to. A tenant that bursts in the middle
of the outage is judged for its window (a corrective decision: that window was closed
before its records arrived), and one that bursts in the first seconds after Kafka returns
is judged for that window, though the backlog of the outage arrives at the same time.
Each judgement is announced once, however late.

CI stops Kafka for 30 s; `pytest tests/chaos --long` for the 120 s of the acceptance.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from orchestrator import store, topology
from orchestrator.amqp import publish
from orchestrator.config import Settings
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import (
    spawn,
    spawn_pipeline,
    stop_all,
    violations_env,
    wait_for_pipeline,
    wait_for_violations,
)
from schemas import FlowDefinition, FlowStartRequested
from tests.integration.helpers import body, drain, fresh_settings, reset_queues, status_feed

pytestmark = pytest.mark.asyncio(loop_scope="session")

INFRA = Path(__file__).resolve().parents[2] / "scripts" / "infra"
WINDOW = 5
POLICY = {
    "window_s": WINDOW,
    "lookback_s": 600,
    "default_plan": "standard",
    "plans": {
        "standard": {
            "limits": {"max_cpu_share": 0.6, "min_cpu_s": 0.5},
            "ladder": [{"action": "penalty", "minutes": 0.1, "weight_factor": 0.5}],
        }
    },
}


def flows() -> list[FlowDefinition]:
    def cpu_flow(tenant: str, cron: str | None, ms: int) -> FlowDefinition:
        return FlowDefinition.model_validate(
            {
                "tenant": tenant,
                "id": "work",
                "overlap": "allow",
                **({"cron": cron} if cron else {}),
                "steps": [{"id": "burn", "type": "demo.cpu", "input": {"ms": ms}}],
            }
        )

    # calm runs all along (the load the workers buffer through the outage); the two
    # bursters run only when the test starts them.
    return [
        cpu_flow("calm", "* * * * * *", 10),
        cpu_flow("during", None, 250),
        cpu_flow("after", None, 250),
    ]


def infra(action: str, broker: str) -> None:
    subprocess.run([str(INFRA), action, broker], check=True, capture_output=True, timeout=300)


@pytest.mark.timeout(900)
@pytest.mark.slow
async def test_a_burst_during_or_right_after_a_kafka_outage_is_judged_for_its_window(
    settings: Settings,
    amqp: AbstractRobustConnection,
    channel: AbstractChannel,
    tmp_path: Path,
    long_run: bool,
) -> None:
    down_s = 120.0 if long_run else 30.0
    suffix = uuid.uuid4().hex[:8]
    test_settings = fresh_settings(settings, usage_topic=f"test.usage.outage.{suffix}")
    env = violations_env(tmp_path, POLICY, f"test-outage-{suffix}")
    env |= {"ORCH_VIOLATIONS_GRACE_S": "1", "ORCH_VIOLATIONS_TICK_S": "0.5"}
    for tenant in ("calm", "during", "after"):
        await reset_queues(channel, tenant)
    feed = await status_feed(channel, "*.*.tenant.*")
    done = await status_feed(channel, "*.work.execution.succeeded")
    await done.bind(topology.STATUS, routing_key="*.work.step.dispatched")
    redis = store.connect(test_settings)
    processes = [spawn(test_settings, "violations", **env)]

    async def burst(tenant: str, count: int = 8) -> None:
        for n in range(count):
            request = FlowStartRequested(
                tenant=tenant, flow_id="work", idempotency_key=f"{tenant}-{suffix}-{n}"
            )
            await publish(channel, request)

    # execution -> (tenant, when its step was dispatched, when it succeeded), by the events' own
    # times: the step finished in between (the test receives the events later than that)
    spans: dict[str, dict[str, Any]] = {}

    async def watch_done() -> None:
        while True:
            for message in await drain(done, settle_s=0.2):
                event = body(message)
                at = datetime.fromisoformat(event["time"]).timestamp()
                span = spans.setdefault(event["subject"], {"tenant": event["tenant"]})
                span["succeeded" if event["type"].endswith("succeeded") else "dispatched"] = at

    events: list[dict[str, Any]] = []
    watcher = asyncio.create_task(watch_done())
    try:
        # The usage topic exists (and is consumed) before workers report to it.
        await wait_for_violations(test_settings)
        processes += spawn_pipeline(test_settings)
        await wait_for_pipeline(test_settings, amqp)
        await FlowRegistry(redis, store.Keys(test_settings.redis_prefix)).apply(
            flows(), datetime.now(UTC)
        )
        # the wait is the behaviour under test: calm runs for a while before the outage, its
        # usage reaching the consumer (the steady state the outage interrupts)
        await asyncio.sleep(8)

        await asyncio.to_thread(infra, "stop", "kafka")
        stopped_at = time.time()
        # the wait is the behaviour under test: a burst in the middle of a down_s outage
        await asyncio.sleep(down_s / 2)
        during_from = time.time()
        await burst("during")
        await asyncio.sleep(down_s / 2)  # the wait is the behaviour under test: the rest of it
        await asyncio.to_thread(infra, "start", "kafka")
        back_at = time.time()
        await burst("after")  # in the first seconds after Kafka returns
        print(
            f"[outage] kafka down {back_at - stopped_at:.0f} s; bursts at "
            f"+{during_from - stopped_at:.0f} s and +{back_at - stopped_at:.0f} s",
            flush=True,
        )

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            events += [body(m) for m in await drain(feed, settle_s=0.5)]
            judged = {e["tenant"] for e in events if e["type"].endswith("tenant.penalized")}
            if {"during", "after"} <= judged:
                break
        # the wait is the behaviour under test: a second announcement of one judgement would
        # come now, and none must
        await asyncio.sleep(WINDOW + 3)
        events += [body(m) for m in await drain(feed, settle_s=0.5)]
        exits = [(p.args, p.poll()) for p in processes if p.poll() is not None]
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        with contextlib.suppress(Exception):
            await asyncio.to_thread(infra, "start", "kafka")  # whatever an error left stopped
        stop_all(processes)
        async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
            await redis.delete(key)
        await redis.aclose()

    assert exits == [], f"processes exited: {exits}"
    penalties = [e for e in events if e["type"].endswith("tenant.penalized")]
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for event in penalties:
        by_tenant.setdefault(event["tenant"], []).append(event)
    assert "calm" not in by_tenant, by_tenant["calm"]

    for tenant in ("during", "after"):
        assert tenant in by_tenant, f"{tenant} was never judged: {events}"
        ran = [s for s in spans.values() if s["tenant"] == tenant and "succeeded" in s]
        assert ran, f"{tenant}'s burst never ran"
        # Judged for a window its steps finished in, not for when the records arrived.
        windows = {
            start
            for span in ran
            for start in range(
                int(span.get("dispatched", span["succeeded"])) // WINDOW * WINDOW,
                int(span["succeeded"]) + 1,
                WINDOW,
            )
        }
        starts = [
            int(datetime.fromisoformat(e["data"]["window_start"]).timestamp())
            for e in by_tenant[tenant]
        ]
        assert set(starts) <= windows, (tenant, starts, sorted(windows))
        # Once per judgement (a CloudEvents id per window), however late it came.
        ids = [e["id"] for e in by_tenant[tenant]]
        assert len(ids) == len(set(ids)), ids
    during_windows = {
        int(datetime.fromisoformat(e["data"]["window_start"]).timestamp())
        for e in by_tenant["during"]
    }
    assert all(stopped_at < start + WINDOW and start < back_at for start in during_windows), (
        "the mid-outage burst was judged outside the outage",
        during_windows,
        stopped_at,
        back_at,
    )
