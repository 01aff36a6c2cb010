"""Tenants isolated by the broker: with the accounts `orchestrator tenants provision` creates,
tenant bob cannot start, read, forge or release alice's work. RabbitMQ refuses each attempt
(or, for a flow-start body naming another tenant, the scheduler does, reason `forbidden`),
while alice's own account starts her flows and follows her status.

One test per attempt, so each refusal is proven on its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelPreconditionFailed
from aiormq.exceptions import AMQPError, ChannelAccessRefused

from orchestrator import store, topology
from orchestrator.accounts import Account, Management, Provisioner, status_queue_name, vhost_of
from orchestrator.amqp import REASON_HEADER, publish, to_amqp
from orchestrator.config import Settings
from orchestrator.scheduler.service import Scheduler
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import wait_for_consumers, wait_until
from schemas import FlowDefinition, FlowStartRequested
from tests.factories import sample
from tests.integration.helpers import body, drain, fresh_settings, get_one, purged

pytestmark = pytest.mark.asyncio(loop_scope="session")

TENANTS = ("alice", "bob")


def flow(tenant: str) -> FlowDefinition:
    return FlowDefinition.model_validate(
        {
            "tenant": tenant,
            "id": "sync",
            "overlap": "allow",
            "steps": [{"id": "a", "type": "demo.echo"}],
        }
    )


@dataclass
class Tenants:
    settings: Settings
    accounts: dict[str, Account]
    connections: dict[str, AbstractConnection]

    async def channel(self, tenant: str) -> AbstractChannel:
        return await self.connections[tenant].channel(publisher_confirms=True)

    def user(self, tenant: str) -> str:
        return self.accounts[tenant].user


@pytest.fixture
async def tenants(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> AsyncIterator[Tenants]:
    """alice and bob with provisioned accounts, their flows registered, a scheduler running
    with authentication required (the default outside tests)."""
    test_settings = fresh_settings(settings, require_auth=True)
    management = Management(settings.rabbitmq_management_url)
    provisioner = Provisioner(
        management, vhost_of(str(settings.rabbitmq_url)), settings.account_prefix
    )
    accounts = {}
    for tenant in TENANTS:
        provisioner.revoke_tenant(tenant)
        accounts[tenant] = provisioner.tenant(tenant)
    redis = store.connect(test_settings)
    await FlowRegistry(redis, store.Keys(test_settings.redis_prefix)).apply(
        [flow(t) for t in TENANTS], datetime.now(UTC)
    )
    for tenant in TENANTS:
        await topology.declare_ingress_queue(channel, tenant)
        for name in (topology.ingress_queue_name(tenant), topology.ingress_queue(tenant).dlq):
            await purged(channel, name)
    await purged(channel, topology.EXECUTIONS_QUEUE)
    stop = asyncio.Event()
    scheduler = Scheduler(test_settings, redis, amqp)
    task = asyncio.create_task(scheduler.run(stop))
    connections = {
        t: await aio_pika.connect(a.amqp_url(str(settings.rabbitmq_url)))
        for t, a in accounts.items()
    }
    await wait_for_consumers(amqp, *(topology.ingress_queue_name(t) for t in TENANTS))
    yield Tenants(test_settings, accounts, connections)
    for connection in connections.values():
        await connection.close()
    stop.set()
    await task
    for tenant in TENANTS:
        provisioner.revoke_tenant(tenant)
    management.close()
    async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
        await redis.delete(key)
    await redis.aclose()


async def refused(
    tenants: Tenants, tenant: str, attempt: Callable[[AbstractChannel], Awaitable[Any]]
) -> str:
    """Runs `attempt` on a fresh channel of the tenant's account; RabbitMQ must refuse it
    (403 ACCESS_REFUSED). Returns the broker's reason."""
    channel = await tenants.channel(tenant)
    with pytest.raises(ChannelAccessRefused) as caught:
        await attempt(channel)  # a publish waits for its confirm: the refusal comes with it
    return str(caught.value)


async def _ignore(message: AbstractIncomingMessage) -> None:
    await message.nack()


def start(tenant: str, key: str) -> FlowStartRequested:
    return FlowStartRequested(tenant=tenant, flow_id="sync", idempotency_key=key)


async def send(
    channel: AbstractChannel, message: Any, exchange: str, routing_key: str, user_id: str | None
) -> None:
    target = (
        await channel.get_exchange(exchange, ensure=False) if exchange else channel.default_exchange
    )
    await target.publish(to_amqp(message, user_id=user_id), routing_key=routing_key)


# ---------------------------------------------------------------- what bob may not do
@pytest.mark.parametrize("signed", [True, False], ids=["with user_id", "without user_id"])
async def test_bob_cannot_start_alices_flow_through_her_ingress(
    tenants: Tenants, signed: bool
) -> None:
    user = tenants.user("bob") if signed else None
    reason = await refused(
        tenants,
        "bob",
        lambda ch: send(ch, start("alice", "b1"), topology.COMMANDS, "flow.start.alice", user),
    )
    assert "flow.start.alice" in reason


@pytest.mark.parametrize("signed", [True, False], ids=["with user_id", "without user_id"])
async def test_bob_naming_alice_in_his_own_request_is_forbidden_by_the_scheduler(
    tenants: Tenants, channel: AbstractChannel, signed: bool
) -> None:
    bob = await tenants.channel("bob")
    user = tenants.user("bob") if signed else None
    await send(bob, start("alice", f"b2-{signed}"), topology.COMMANDS, "flow.start.bob", user)
    dlq = await channel.get_queue(topology.ingress_queue("bob").dlq)
    dead = await get_one(dlq)
    assert dead.headers[REASON_HEADER] == "forbidden"
    executions = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    assert await drain(executions) == []


async def test_an_unsigned_request_is_refused_as_unauthenticated(
    tenants: Tenants, channel: AbstractChannel
) -> None:
    bob = await tenants.channel("bob")
    await send(bob, start("bob", "b3"), topology.COMMANDS, "flow.start.bob", None)
    dead = await get_one(await channel.get_queue(topology.ingress_queue("bob").dlq))
    assert dead.headers[REASON_HEADER] == "unauthenticated"


async def test_bob_cannot_sign_as_alice(tenants: Tenants) -> None:
    bob = await tenants.channel("bob")
    with pytest.raises(ChannelPreconditionFailed):
        await send(
            bob, start("bob", "b4"), topology.COMMANDS, "flow.start.bob", tenants.user("alice")
        )


def _execution() -> Any:
    return sample("execution.requested", "alice")


async def test_bob_cannot_request_an_execution_on_the_commands_exchange(tenants: Tenants) -> None:
    reason = await refused(
        tenants,
        "bob",
        lambda ch: send(
            ch, _execution(), topology.COMMANDS, "execution.requested", tenants.user("bob")
        ),
    )
    assert "execution.requested" in reason


async def test_bob_cannot_publish_to_the_engine_queue_directly(tenants: Tenants) -> None:
    await refused(
        tenants, "bob", lambda ch: send(ch, _execution(), "", topology.EXECUTIONS_QUEUE, None)
    )


@pytest.mark.parametrize(
    ("kind", "tenant"),
    [("quarantine", "alice"), ("release", "bob")],
    ids=["quarantine alice", "release himself"],
)
async def test_bob_cannot_publish_control_commands(
    tenants: Tenants, kind: str, tenant: str
) -> None:
    command = sample(f"control.{kind}", tenant)
    await refused(
        tenants, "bob", lambda ch: send(ch, command, topology.CONTROL, f"{kind}.{tenant}", None)
    )


@pytest.mark.parametrize(
    ("exchange", "key"),
    [
        (topology.STEPS, "alice"),
        (topology.WORK, topology.DEFAULT_POOL),
        ("", topology.work_queue_name(topology.DEFAULT_POOL)),
        ("", topology.tenant_queue_name("alice")),
    ],
    ids=["steps exchange", "work exchange", "work queue", "alice's fair queue"],
)
async def test_bob_cannot_publish_a_step_task(tenants: Tenants, exchange: str, key: str) -> None:
    task = sample("step.task", "alice")
    await refused(tenants, "bob", lambda ch: send(ch, task, exchange, key, None))


async def test_bob_cannot_publish_a_step_result(tenants: Tenants) -> None:
    result = sample("step.result", "alice")
    reason = await refused(
        tenants, "bob", lambda ch: send(ch, result, topology.COMMANDS, "step.result", None)
    )
    assert "step.result" in reason


@pytest.mark.parametrize("key", ["alice.#", "#", "*.sync.#", "alice.sync.execution.succeeded"])
async def test_bob_cannot_bind_to_alices_status(tenants: Tenants, key: str) -> None:
    async def bind(ch: AbstractChannel) -> None:
        queue = await ch.declare_queue(status_queue_name("bob", "feed"), exclusive=True)
        await queue.bind(topology.STATUS, routing_key=key)

    await refused(tenants, "bob", bind)


@pytest.mark.parametrize(
    "queue",
    [
        topology.EXECUTIONS_QUEUE,
        topology.RESULTS_QUEUE,
        topology.CONTROL_QUEUE,
        topology.COMPLETIONS_QUEUE,
        topology.work_queue_name(topology.DEFAULT_POOL),
        topology.tenant_queue_name("alice"),
        topology.ingress_queue_name("alice"),
        topology.ingress_queue_name("bob"),
        topology.EXECUTIONS_QUEUE + topology.DLQ_SUFFIX,
        topology.ingress_queue("bob").dlq,
    ],
)
async def test_bob_cannot_consume_internal_queues_or_dlqs(
    tenants: Tenants, channel: AbstractChannel, queue: str
) -> None:
    await topology.declare_tenant_queue(channel, "alice")

    async def consume(ch: AbstractChannel) -> None:
        target = await ch.get_queue(queue, ensure=False)
        await target.consume(_ignore)

    await refused(tenants, "bob", consume)


@pytest.mark.parametrize(
    "name", [status_queue_name("alice", "feed"), "bob-queue", "fq.bob", ""], ids=str
)
async def test_bob_cannot_declare_queues_outside_his_pattern(tenants: Tenants, name: str) -> None:
    await refused(tenants, "bob", lambda ch: ch.declare_queue(name, exclusive=True))


# ---------------------------------------------------------------- what alice may do
async def test_alice_starts_her_flow_and_follows_her_own_status(
    tenants: Tenants, channel: AbstractChannel
) -> None:
    alice = await tenants.channel("alice")
    feed = await alice.declare_queue(status_queue_name("alice", "feed"), exclusive=True)
    await feed.bind(topology.STATUS, routing_key="alice.#")
    await publish(alice, start("alice", "a1"), user_id=tenants.user("alice"))
    executions = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    started = body(await get_one(executions))
    assert (started["tenant"], started["flow_id"]) == ("alice", "sync")
    event = json.loads((await get_one(feed)).body)
    assert event["type"] == "io.orchestrator.flow_start.accepted"
    assert event["tenant"] == "alice"
    assert event["data"]["execution_id"] == started["execution_id"]


async def test_an_operator_account_may_start_any_tenants_flow(
    tenants: Tenants, channel: AbstractChannel, settings: Settings
) -> None:
    """`flows trigger` under authentication: the operator signs, any tenant's flow starts."""
    provisioner = Provisioner(
        Management(settings.rabbitmq_management_url),
        vhost_of(str(settings.rabbitmq_url)),
        settings.account_prefix,
    )
    operator = provisioner.service("operator")
    connection = await aio_pika.connect(operator.amqp_url(str(settings.rabbitmq_url)))
    try:
        ch = await connection.channel(publisher_confirms=True)
        await publish(ch, start("bob", "op-1"), user_id=operator.user)
        executions = await channel.get_queue(topology.EXECUTIONS_QUEUE)
        assert body(await get_one(executions))["tenant"] == "bob"
    finally:
        await connection.close()
        provisioner.revoke_service("operator")
        provisioner.management.close()


async def test_a_revoked_account_is_disconnected_and_cannot_log_in(
    tenants: Tenants, settings: Settings
) -> None:
    management = Management(settings.rabbitmq_management_url)
    provisioner = Provisioner(
        management, vhost_of(str(settings.rabbitmq_url)), settings.account_prefix
    )
    connection = tenants.connections["bob"]
    assert provisioner.revoke_tenant("bob")
    # RabbitMQ closes the deleted account's connections itself
    await wait_until(
        lambda: not connection.connected.is_set(), what="bob's connection closed by RabbitMQ"
    )
    with pytest.raises((AMQPError, RuntimeError)):
        await connection.channel()
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(tenants.accounts["bob"].amqp_url(str(settings.rabbitmq_url)))
    management.close()


async def test_a_rotated_secret_replaces_the_old_one(tenants: Tenants, settings: Settings) -> None:
    management = Management(settings.rabbitmq_management_url)
    provisioner = Provisioner(
        management, vhost_of(str(settings.rabbitmq_url)), settings.account_prefix
    )
    old = tenants.accounts["alice"]
    new = provisioner.rotate_tenant("alice")
    assert new.password != old.password
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(old.amqp_url(str(settings.rabbitmq_url)))
    connection = await aio_pika.connect(new.amqp_url(str(settings.rabbitmq_url)))
    await connection.close()
    management.close()


async def test_bob_cannot_ask_the_engine_about_alices_executions(tenants: Tenants) -> None:
    query = sample("execution.query", "alice")
    reason = await refused(
        tenants, "bob", lambda ch: send(ch, query, topology.COMMANDS, "query.alice", None)
    )
    assert "query.alice" in reason
