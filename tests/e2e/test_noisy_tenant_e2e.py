"""End to end, every process real: a tenant burning CPU is penalised, then quarantined (its
ticks skipped with reason `quarantined`) while quiet tenants keep running; after the
quarantine runs out it runs again."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from orchestrator import store, topology
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
from schemas import FlowDefinition
from tests.integration.helpers import drain, fresh_settings, reset_queues

pytestmark = pytest.mark.asyncio(loop_scope="session")

POLICY = {
    "window_s": 4,
    "lookback_s": 600,
    "default_plan": "standard",
    "plans": {
        "standard": {
            "limits": {"max_cpu_share": 0.6, "min_cpu_s": 0.5},
            "ladder": [
                {"action": "penalty", "minutes": 0.5, "weight_factor": 0.5},
                {"action": "quarantine", "minutes": 0.15},  # 9 s
            ],
        }
    },
}


def flows() -> list[FlowDefinition]:
    def cpu_flow(tenant: str, flow: str, cron: str, ms: int) -> FlowDefinition:
        return FlowDefinition.model_validate(
            {
                "tenant": tenant,
                "id": flow,
                "cron": cron,
                "overlap": "allow",
                "steps": [{"id": "burn", "type": "demo.cpu", "input": {"ms": ms}}],
            }
        )

    return [
        cpu_flow("hog", "burn", "* * * * * *", 400),  # 0.4 CPU seconds every second
        cpu_flow("calm1", "tick", "* * * * * *", 10),
        cpu_flow("calm2", "tick", "* * * * * *", 10),
    ]


async def test_noisy_tenant_is_punished_automatically_and_comes_back(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    test_settings = fresh_settings(settings, usage_topic=f"test.usage.{suffix}")
    env = violations_env(tmp_path, POLICY, f"test-e2e-{suffix}") | {
        "ORCH_VIOLATIONS_GRACE_S": "0.5"
    }
    for tenant in ("hog", "calm1", "calm2"):
        await reset_queues(channel, tenant)
    feed = await channel.declare_queue(exclusive=True)
    for pattern in ("*.*.tenant.*", "*.*.tick.skipped", "*.*.execution.succeeded"):
        await feed.bind(topology.STATUS, routing_key=pattern)
    redis = store.connect(test_settings)
    processes = [spawn(test_settings, "violations", **env)]
    events: list[tuple[float, str, dict[str, Any]]] = []
    try:
        # The usage topic exists (and is consumed) before workers report to it.
        await wait_for_violations(test_settings)
        processes += spawn_pipeline(test_settings)
        await wait_for_pipeline(test_settings, amqp)
        await FlowRegistry(redis, store.Keys(test_settings.redis_prefix)).apply(
            flows(), datetime.now(UTC)
        )

        def seen(key: str) -> list[float]:
            return [at for at, k, _ in events if k == key]

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            for message in await drain(feed, settle_s=0.2):
                events.append((time.time(), message.routing_key or "", json.loads(message.body)))
            released = seen("hog._.tenant.released")
            quarantined = seen("hog._.tenant.quarantined")
            if (
                quarantined
                and any(at > min(quarantined) + 9 for at in seen("hog.burn.execution.succeeded"))
                and released
            ):
                break

        keys = [k for _, k, _ in events]
        assert "hog._.tenant.penalized" in keys, sorted(set(keys))
        assert "hog._.tenant.quarantined" in keys, sorted(set(keys))
        penalized_at = min(seen("hog._.tenant.penalized"))
        quarantined_at = min(seen("hog._.tenant.quarantined"))
        assert penalized_at < quarantined_at

        # While quarantined, the hog's ticks are skipped (reason quarantined), the quiet
        # tenants' executions go on, and none of them is ever punished.
        skipped = [
            data["data"]["reason"]
            for at, key, data in events
            if key == "hog.burn.tick.skipped" and at > quarantined_at
        ]
        assert "quarantined" in skipped
        for calm in ("calm1", "calm2"):
            during = [
                at
                for at in seen(f"{calm}.tick.execution.succeeded")
                if quarantined_at < at < quarantined_at + 8
            ]
            assert len(during) >= 4, f"{calm} stalled during the quarantine"
        assert not any(k.startswith("calm") and ".tenant." in k for k in keys)

        # The quarantine runs out: the hog is released and runs again.
        assert any(
            data["data"].get("released") == "quarantine"
            for _, key, data in events
            if key == "hog._.tenant.released"
        )
        assert any(at > quarantined_at + 9 for at in seen("hog.burn.execution.succeeded"))
    finally:
        stop_all(processes)
        async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
            await redis.delete(key)
        await redis.aclose()
