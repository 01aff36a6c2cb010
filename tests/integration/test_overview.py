"""The live views' data (orchestrator.overview, `orchestrator top`) against a running system:
weights and shares, what the dispatcher served, executions per second, DLQ depths as the
broker counts them, and a quarantine with its expiry."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from typing import Any

import pytest
from aio_pika import Message
from aio_pika.abc import AbstractChannel

from orchestrator import topology
from orchestrator.accounts import Management, vhost_of
from orchestrator.amqp import publish
from orchestrator.config import Settings
from orchestrator.operator import Operator
from orchestrator.overview import Overview, gather
from orchestrator.testing import process_env, wait_for_consumers, wait_until
from schemas import FlowStartRequested
from tests.integration.helpers import fresh_settings, purged, reset_queues
from tests.integration.system import running_system

pytestmark = pytest.mark.asyncio(loop_scope="session")

TENANTS = {"ova": 3.0, "ovb": 1.0}


def _flow(tenant: str) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "id": "work",
        "overlap": "allow",
        "steps": [{"id": "a", "type": "demo.sleep", "input": {"ms": 40}}],
    }


async def _until(settings: Settings, redis: Any, check: Any, wait_s: float = 40) -> Overview:
    """The first overview `check` accepts; the last one gathered if none does (for the
    caller's asserts)."""
    last: list[Overview] = []

    async def accepted() -> Overview | None:
        last[:] = [await gather(settings, redis)]
        return last[0] if check(last[0]) else None

    with contextlib.suppress(TimeoutError):
        return await wait_until(accepted, timeout_s=wait_s, every_s=0.5, what="the overview")
    return last[0]


async def test_overview_shows_weights_shares_rates_dlqs_and_quarantines(
    settings: Settings, channel: AbstractChannel
) -> None:
    test_settings = fresh_settings(settings)
    for tenant in TENANTS:
        await reset_queues(channel, tenant)
    dlq = await purged(channel, topology.EXECUTIONS_QUEUE + topology.DLQ_SUFFIX)
    async with running_system(test_settings, concurrency=2) as system:
        await system.apply(*(_flow(t) for t in TENANTS))
        async with Operator(test_settings) as operator:
            for tenant, weight in TENANTS.items():
                await operator.set_weight(tenant, weight)
            await wait_for_consumers(
                system.connection, *(topology.ingress_queue_name(t) for t in TENANTS)
            )
            for n in range(60):
                for tenant in TENANTS:
                    await publish(
                        channel,
                        FlowStartRequested(
                            tenant=tenant, flow_id="work", idempotency_key=f"ov-{n}-{uuid.uuid4()}"
                        ),
                    )
            # Both tenants backlogged: the served shares follow the weights.
            busy = await _until(
                test_settings,
                system.redis,
                lambda o: sum(t.completed for t in o.tenants if t.tenant in TENANTS) >= 40,
            )
            rows = {t.tenant: t for t in busy.tenants if t.tenant in TENANTS}
            assert rows["ova"].weight == 3.0
            assert rows["ovb"].weight == 1.0
            assert busy.dispatcher is not None
            assert rows["ova"].served_share > rows["ovb"].served_share
            assert rows["ova"].dwell_p99_ms is not None
            assert busy.workers
            assert busy.workers[0]["concurrency"] == 2

            # Executions per second: what the engine counted.
            rated = await _until(
                test_settings, system.redis, lambda o: o.executions_per_s.get("succeeded", 0) > 0
            )
            assert rated.executions_per_s["succeeded"] > 0
            assert rated.executions_per_s.get("started", 0) > 0

            # A dead letter: the overview's depth is the broker's.
            await channel.default_exchange.publish(
                Message(b"not json", content_type="application/json"),
                routing_key=topology.EXECUTIONS_QUEUE,
            )
            # (The management API's counts lag by seconds: a purge just before shows late.)
            name = dlq.name
            dead = await _until(test_settings, system.redis, lambda o: o.dlqs.get(name) == 1)
            with Management(test_settings.rabbitmq_management_url) as management:
                depths = management.queue_depths(vhost_of(str(test_settings.rabbitmq_url)))
            assert dead.dlqs[name] == depths[name] == 1

            # A quarantine: state and expiry, and no share of the weights.
            await operator.quarantine("ovb", minutes=5, reason="test")
            held = await _until(
                test_settings,
                system.redis,
                lambda o: any(t.tenant == "ovb" and t.state == "quarantined" for t in o.tenants),
            )
            ovb = next(t for t in held.tenants if t.tenant == "ovb")
            assert ovb.state == "quarantined"
            assert ovb.until is not None
            assert ovb.reason == "test"
            assert ovb.weight_share == 0.0

            # `orchestrator top --once` prints the same tenants.
            shown = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "orchestrator", "top", "--once"],
                env=process_env(test_settings, COLUMNS="160"),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert shown.returncode == 0, shown.stderr
            assert "ova" in shown.stdout
            assert "quarantined" in shown.stdout
            await operator.release("ovb")
    await dlq.purge()
