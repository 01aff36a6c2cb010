"""Service accounts (`orchestrator accounts provision`): every process type runs with its own
RabbitMQ account and does its job — a tenant-signed flow start runs to its end through the
scheduler, engine, dispatcher and worker, each on its own account, with authentication
required — while each account is refused by the broker what is not its job."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import ChannelAccessRefused
from redis import exceptions as redis_exceptions

from orchestrator import store, topology
from orchestrator.accounts import Management, Provisioner, Role, vhost_of
from orchestrator.accounts_cli import env_file, provision_services, read_env_url, service_env
from orchestrator.amqp import publish, to_amqp
from orchestrator.config import Settings
from orchestrator.testing import spawn, stop_all, wait_for_consumers
from schemas import FlowStartRequested
from tests.factories import sample
from tests.integration.helpers import (
    ECHO_CHAIN,
    drain,
    fresh_settings,
    register_flows,
    reset_queues,
    status_feed,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

Attempt = Callable[[AbstractChannel], Awaitable[Any]]


def publishing(message_type: str, exchange: str, key: str) -> Attempt:
    async def attempt(channel: AbstractChannel) -> None:
        target = (
            await channel.get_exchange(exchange, ensure=False)
            if exchange
            else channel.default_exchange
        )
        await target.publish(to_amqp(sample(message_type, "acme")), routing_key=key)

    return attempt


def consuming(queue: str) -> Attempt:
    async def attempt(channel: AbstractChannel) -> None:
        async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.nack()

        await (await channel.get_queue(queue, ensure=False)).consume(ignore)

    return attempt


CONTROL = publishing("control.quarantine", topology.CONTROL, "quarantine.acme")
EXECUTION = publishing("execution.requested", topology.COMMANDS, "execution.requested")
RESULT = publishing("step.result", topology.COMMANDS, "step.result")
TASK_TO_WORK = publishing("step.task", topology.WORK, topology.DEFAULT_POOL)
TASK_TO_FQ = publishing("step.task", topology.STEPS, "acme")
FLOW_START = publishing("flow.start.requested", topology.COMMANDS, "flow.start.acme")

# What each service account must not do (its job is proven by the flow running).
FORBIDDEN: dict[Role, dict[str, Attempt]] = {
    "scheduler": {
        "publish a control command": CONTROL,
        "publish a step result": RESULT,
        "release a step to workers": TASK_TO_WORK,
        "consume the engine's queue": consuming(topology.EXECUTIONS_QUEUE),
    },
    "engine": {
        "publish a control command": CONTROL,
        "request an execution": EXECUTION,
        "publish a step result": RESULT,
        "release a step to workers": TASK_TO_WORK,
        "consume a work queue": consuming(topology.work_queue_name(topology.DEFAULT_POOL)),
    },
    "dispatcher": {
        "publish a control command": CONTROL,
        "request an execution": EXECUTION,
        "publish a step result": RESULT,
        "consume the engine's results": consuming(topology.RESULTS_QUEUE),
    },
    "worker": {
        "publish a control command": CONTROL,
        "request an execution": EXECUTION,
        "start a flow": FLOW_START,
        "publish into a fair queue": TASK_TO_FQ,
        "consume a tenant's ingress": consuming(topology.ingress_queue_name("acme")),
    },
    "violations": {
        "request an execution": EXECUTION,
        "publish a step result": RESULT,
        "release a step to workers": TASK_TO_WORK,
        "consume control commands": consuming(topology.CONTROL_QUEUE),
    },
}


async def _refusals(accounts_dir: Path) -> None:
    """Each service account, refused by the broker what is not its job."""
    for role, attempts in FORBIDDEN.items():
        url = read_env_url(env_file(accounts_dir, role))
        assert url is not None
        connection = await aio_pika.connect(url)
        try:
            for what, attempt in attempts.items():
                probe = await connection.channel(publisher_confirms=True)
                with pytest.raises(ChannelAccessRefused):
                    await attempt(probe)
                print(f"[accounts] {role} may not {what}: refused")
        finally:
            await connection.close()


async def _redis_refusals(accounts_dir: Path, prefix: str) -> None:
    """Workers run tenants' code: their Redis account reaches only the worker registry and
    poison markers, not tenant state. No service account may run dangerous commands."""
    worker = aioredis.from_url(service_env(accounts_dir, "worker")["ORCH_REDIS_URL"])
    try:
        await worker.set(f"{prefix}returned:probe", "1", ex=10)  # its own keys: allowed
        for key in (f"{prefix}quarantine:acme", f"{prefix}tenant:acme", f"{prefix}flows"):
            with pytest.raises(redis_exceptions.NoPermissionError):
                await worker.delete(key)
    finally:
        await worker.aclose()
    for role in ("scheduler", "engine", "dispatcher", "violations"):
        client = aioredis.from_url(service_env(accounts_dir, role)["ORCH_REDIS_URL"])
        try:
            with pytest.raises(redis_exceptions.NoPermissionError):
                await client.flushall()
            with pytest.raises(redis_exceptions.NoPermissionError):
                await client.set("another-deployment:key", "1")
        finally:
            await client.aclose()


@pytest.mark.timeout(240)
async def test_each_service_account_does_its_job_and_nothing_else(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel, tmp_path: Path
) -> None:
    test_settings = fresh_settings(settings, require_auth=True)
    accounts_dir = tmp_path / "accounts"
    provision_services(test_settings, accounts_dir, redis_acl=True)
    assert (env_file(accounts_dir, "scheduler").stat().st_mode & 0o777) == 0o600
    # Provisioning again keeps the secrets the running processes use.
    before = service_env(accounts_dir, "engine")
    provision_services(test_settings, accounts_dir, redis_acl=True)
    assert service_env(accounts_dir, "engine") == before
    assert set(before) == {"ORCH_RABBITMQ_URL", "ORCH_REDIS_URL"}

    management = Management(settings.rabbitmq_management_url)
    provisioner = Provisioner(
        management, vhost_of(str(settings.rabbitmq_url)), settings.account_prefix
    )
    provisioner.revoke_tenant("acme")
    tenant = provisioner.tenant("acme")
    await reset_queues(channel)
    redis = store.connect(test_settings)
    await register_flows(redis, test_settings, ECHO_CHAIN)
    feed = await status_feed(channel, "acme.chain.execution.*")
    roles: list[Role] = ["scheduler", "engine", "dispatcher", "worker"]
    processes = [spawn(test_settings, role, **service_env(accounts_dir, role)) for role in roles]
    tenant_connection = await aio_pika.connect(tenant.amqp_url(str(settings.rabbitmq_url)))
    try:
        tenant_channel = await tenant_connection.channel(publisher_confirms=True)
        deadline = time.monotonic() + 60
        keys = [f"svc-{n}" for n in range(3)]
        # Until the scheduler has declared acme's ingress and consumes it.
        await wait_for_consumers(amqp, topology.ingress_queue_name("acme"), timeout_s=60)
        for key in keys:
            request = FlowStartRequested(tenant="acme", flow_id="chain", idempotency_key=key)
            await publish(tenant_channel, request, user_id=tenant.user)
        succeeded: set[str] = set()
        while len(succeeded) < len(keys) and time.monotonic() < deadline:
            for message in await drain(feed, settle_s=0.3):
                event = json.loads(message.body)
                if event["type"].endswith("execution.succeeded"):
                    succeeded.add(event["subject"])
        assert len(succeeded) == len(keys), f"{len(succeeded)} of {len(keys)} executions ended"
        assert [p.poll() for p in processes] == [None] * len(processes)

        # The violations consumer's job is its commands (its Kafka side needs no account).
        violations = await aio_pika.connect(str(read_env_url(env_file(accounts_dir, "violations"))))
        try:
            await publish(
                await violations.channel(publisher_confirms=True), sample("control.penalty", "acme")
            )
        finally:
            await violations.close()

        await _refusals(accounts_dir)
        await _redis_refusals(accounts_dir, test_settings.redis_prefix)
    finally:
        await tenant_connection.close()
        stop_all(processes)
        provisioner.revoke_tenant("acme")
        admin = aioredis.from_url(str(settings.redis_url))
        for role in (*roles, "violations", "operator"):
            provisioner.revoke_service(role)
            await admin.execute_command("ACL", "DELUSER", f"{settings.account_prefix}{role}")
        await admin.aclose()
        management.close()
        async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
            await redis.delete(key)
        await redis.aclose()
