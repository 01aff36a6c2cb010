"""`OrchestratorClient` as a tenant's service uses it: its own account (provisioned), no
Redis, no Kafka. Starts flows, follows them, waits for them, asks the engine about them,
and gets a typed error for each refusal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractChannel

from orchestrator import store, topology
from orchestrator.accounts import Account, Management, Provisioner, vhost_of
from orchestrator.client import (
    Forbidden,
    OrchestratorClient,
    Paused,
    Quarantined,
    RateLimited,
    UnknownExecution,
    UnknownFlow,
    UnknownTenant,
)
from orchestrator.config import Settings
from orchestrator.store.admission import AdmissionStore
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import wait_for_consumers
from schemas import ExecutionList, ExecutionPage
from tests.integration.helpers import (
    fresh_settings,
    reset_queues,
    status_bindings,
    wait_for_subscriber,
)
from tests.integration.system import System, running_system

pytestmark = pytest.mark.asyncio(loop_scope="session")

FLOWS = [
    {
        "tenant": "acme",
        "id": "chain",
        "overlap": "allow",
        "steps": [
            {"id": "a", "type": "demo.echo"},
            {"id": "b", "type": "demo.sleep", "depends_on": ["a"], "input": {"ms": 300}},
        ],
    },
    {"tenant": "acme", "id": "paused", "steps": [{"id": "a", "type": "demo.echo"}]},
    {
        "tenant": "acme",
        "id": "saga",
        "overlap": "allow",
        "steps": [
            {"id": "a", "type": "demo.echo", "compensation": "demo.echo"},
            {
                "id": "b",
                "type": "demo.sleep",
                "depends_on": ["a"],
                "input": {"ms": 1500},
                "compensation": "demo.echo",
            },
            {"id": "c", "type": "demo.echo", "depends_on": ["b"]},
        ],
    },
    {"tenant": "globex", "id": "chain", "steps": [{"id": "a", "type": "demo.echo"}]},
]


@pytest.fixture
async def acme(
    settings: Settings, channel: AbstractChannel
) -> AsyncIterator[tuple[System, Account]]:
    # A small flow-start budget, so the refusal test reaches the rate limit.
    test_settings = fresh_settings(
        settings, require_auth=True, ingress_burst=8, ingress_rate_per_s=0.2
    )
    management = Management(settings.rabbitmq_management_url)
    provisioner = Provisioner(
        management, vhost_of(str(settings.rabbitmq_url)), settings.account_prefix
    )
    provisioner.revoke_tenant("acme")
    account = provisioner.tenant("acme")
    await reset_queues(channel, "acme")
    await reset_queues(channel, "globex")
    async with running_system(test_settings) as system:
        await system.apply(*FLOWS)
        registry = FlowRegistry(system.redis, store.Keys(test_settings.redis_prefix))
        await registry.set_paused("acme", "paused", True)
        await wait_for_consumers(
            system.connection, *(topology.ingress_queue_name(t) for t in ("acme", "globex"))
        )
        yield system, account
    provisioner.revoke_tenant("acme")
    management.close()


def client_for(settings: Settings, account: Account) -> OrchestratorClient:
    return OrchestratorClient(
        account.amqp_url(str(settings.rabbitmq_url)), account_prefix=settings.account_prefix
    )


async def test_start_follow_and_wait(acme: tuple[System, Account], management: Management) -> None:
    system, account = acme
    async with client_for(system.settings, account) as client:
        assert client.tenant == "acme"
        before = status_bindings(management, system.settings, "acme.chain.#")
        events = client.subscribe("acme.chain.#")
        first = asyncio.ensure_future(anext(events))
        await wait_for_subscriber(management, system.settings, "acme.chain.#", before)
        execution_id = await client.start_flow("acme", "chain", {"x": 1})
        outcome = await client.wait_for(execution_id, timeout=30)
        assert outcome.type == "io.orchestrator.execution.succeeded"
        assert outcome.subject == execution_id
        seen = [await first]
        while seen[-1].type != "io.orchestrator.execution.succeeded":
            seen.append(await anext(events))
        mine = [e for e in seen if e.subject == execution_id]
        sequences = [e.sequence_number for e in mine if e.sequence_number is not None]
        assert sequences == sorted(sequences)  # in order
        await events.aclose()  # type: ignore[attr-defined]

        # Ended before the call: answered from the engine's record, no race.
        again = await client.wait_for(execution_id, timeout=10)
        assert again.id == outcome.id
        view = await client.get_execution(execution_id)
        assert view.found
        assert view.status == "succeeded"
        assert set(view.steps) == {"a", "b"}
        assert view.steps["b"].attempt == 1
        assert view.steps["a"].finished_at is not None
        assert view.steps["a"].output is not None


async def test_each_refusal_raises_its_typed_error(acme: tuple[System, Account]) -> None:
    system, account = acme
    async with client_for(system.settings, account) as client:
        with pytest.raises(UnknownFlow) as unknown:
            await client.start_flow("acme", "nope")
        assert unknown.value.reason == "unknown_flow"
        assert "no flow 'nope'" in unknown.value.detail
        with pytest.raises(Paused):
            await client.start_flow("acme", "paused")
        # Refused by the broker itself: acme's account may start acme's flows only.
        with pytest.raises(Forbidden):
            await client.start_flow("globex", "chain")
        keys = store.Keys(system.settings.redis_prefix)
        await AdmissionStore(system.redis, keys).quarantine("acme", None, 60_000, "test")
        with pytest.raises(Quarantined):
            await client.start_flow("acme", "chain")
        # The budget (8 at once) runs out: each request above counted.
        refusals = []
        for _ in range(10):
            try:
                await client.start_flow("acme", "chain")
            except (Quarantined, RateLimited) as exc:
                refusals.append(exc.reason)
        assert "quarantined" in refusals
        assert refusals[-1] == "rate_limited"


async def test_a_view_of_another_tenants_execution_is_not_found(
    acme: tuple[System, Account],
) -> None:
    system, account = acme
    operator_url = str(system.settings.rabbitmq_url)  # guest: an operator account in tests
    async with OrchestratorClient(operator_url) as operator:
        # Nobody takes flow starts of a tenant without flows (nothing routes them).
        with pytest.raises(UnknownTenant):
            await operator.start_flow("ghost", "x")
        globex_execution = await operator.start_flow("globex", "chain")
        await operator.wait_for(globex_execution, timeout=30, tenant="globex")
    async with client_for(system.settings, account) as client:
        view = await client.get_execution(globex_execution, tenant="acme")
        assert not view.found


async def test_a_durable_subscriber_stopped_for_10_s_misses_nothing(
    acme: tuple[System, Account], management: Management
) -> None:
    system, account = acme
    pattern = "acme.chain.execution.succeeded"
    async with client_for(system.settings, account) as client:
        before = status_bindings(management, system.settings, pattern)
        events = client.subscribe(pattern, queue="billing")
        first = asyncio.ensure_future(anext(events))
        await wait_for_subscriber(management, system.settings, pattern, before)
        started = [await client.start_flow("acme", "chain")]
        assert (await first).subject == started[0]
        await events.aclose()  # type: ignore[attr-defined]
    # Away for 10 s while executions end.
    async with client_for(system.settings, account) as client:
        started += [await client.start_flow("acme", "chain") for _ in range(3)]
    # the wait is the behaviour under test: the durable subscriber is away for 10 s while
    # its events are published
    await asyncio.sleep(10)
    async with client_for(system.settings, account) as client:
        events = client.subscribe("acme.chain.execution.succeeded", queue="billing")
        # The event the first loop left with was never acked (the loop did not ask for the
        # next one): at least once, it comes first, then the three of the time away.
        got = [(await asyncio.wait_for(anext(events), 30)).subject for _ in range(4)]
        assert got[0] == started[0]
        assert set(got[1:]) == set(started[1:])
        await events.aclose()  # type: ignore[attr-defined]
        await client.unsubscribe("billing")


async def test_cancel_mid_dag_compensates_completed_steps_and_ends_cancelled(
    acme: tuple[System, Account], management: Management
) -> None:
    system, account = acme
    async with client_for(system.settings, account) as client:
        before = status_bindings(management, system.settings, "acme.saga.#")
        events = client.subscribe("acme.saga.#")
        first = asyncio.ensure_future(anext(events))
        await wait_for_subscriber(management, system.settings, "acme.saga.#", before)
        execution_id = await client.start_flow("acme", "saga")
        seen = [await asyncio.wait_for(first, 30)]
        while not (seen[-1].type.endswith("step.dispatched") and seen[-1].data["step_id"] == "b"):
            seen.append(await asyncio.wait_for(anext(events), 30))
        view = await client.cancel(execution_id, "no longer needed")
        assert view.status == "cancelling"  # b is still running
        assert view.cancellation is not None
        assert view.cancellation["reason"] == "no longer needed"
        outcome = await client.wait_for(execution_id, timeout=30)
        assert outcome.type == "io.orchestrator.execution.cancelled"
        while seen[-1].type != "io.orchestrator.execution.cancelled":
            seen.append(await asyncio.wait_for(anext(events), 30))
        await events.aclose()  # type: ignore[attr-defined]
        mine = [e.type.removeprefix("io.orchestrator.") for e in seen if e.subject == execution_id]
        terminal = [
            t
            for t in mine
            if t.split(".")[-1] in ("succeeded", "failed", "compensated", "cancelled")
            and t.startswith("execution.")
        ]
        assert terminal == ["execution.cancelled"]  # exactly one terminal event
        assert mine.index("execution.cancelling") < mine.index("execution.cancelled")
        view = await client.get_execution(execution_id)
        assert view.status == "cancelled"
        assert {k: s.status for k, s in view.steps.items()} == {
            "a": "compensated",
            "b": "compensated",  # it was in flight, finished, then was undone
            "c": "cancelled",  # never started
        }
        # A second cancel changes nothing and says so.
        again = await client.cancel(execution_id)
        assert again.status == "cancelled"
        assert again.cancellation == view.cancellation


async def test_executions_of_other_tenants_cannot_be_cancelled_or_listed(
    acme: tuple[System, Account],
) -> None:
    system, account = acme
    async with OrchestratorClient(str(system.settings.rabbitmq_url)) as operator:
        globex_execution = await operator.start_flow("globex", "chain")
        await operator.wait_for(globex_execution, timeout=30, tenant="globex")
        everyone = await operator.list_executions()
        assert globex_execution in {i.execution_id for i in everyone.items}
        # An operator may name no tenant at all.
        assert (await operator.get_execution(globex_execution)).tenant == "globex"
    async with client_for(system.settings, account) as client:
        acme_execution = await client.start_flow("acme", "chain")
        await client.wait_for(acme_execution, timeout=30)
        with pytest.raises(UnknownExecution):
            await client.cancel(globex_execution)
        page = await client.list_executions()
        assert {i.tenant for i in page.items} == {"acme"}
        assert acme_execution in {i.execution_id for i in page.items}
        succeeded = await client.list_executions(flow="chain", state="succeeded", limit=1)
        assert [i.execution_id for i in succeeded.items] == [acme_execution]  # newest first
        # The broker refuses a tenant account asking about every tenant (`query._`).
        with pytest.raises(Forbidden):
            await client._ask(ExecutionList(query_id="q-x"), "query._", ExecutionPage)
        assert (await client.get_execution(acme_execution)).found  # and the client goes on
