"""Bad input on every consuming queue, from a client that is not aio-pika, mixed with valid
traffic: each bad message ends in its queue's DLQ with a reason and is announced; the valid
ones all run; the services' connection is never lost."""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections import Counter
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel

from orchestrator import topology
from orchestrator.amqp import DETAIL_HEADER, QUEUE_HEADER, REASON_HEADER, publish
from orchestrator.config import Settings
from orchestrator.consumer import DROPPED
from orchestrator.testing import wait_until
from schemas import FlowStartRequested
from tests.factories import sample
from tests.integration.helpers import body, drain, fresh_settings, purged
from tests.integration.system import running_system
from tests.rawamqp import RawProperties, RawPublisher, properties, table

pytestmark = pytest.mark.asyncio(loop_scope="session")

FLOW = {
    "tenant": "acme",
    "id": "echo",
    "overlap": "allow",
    "steps": [{"id": "a", "type": "demo.echo"}],
}

# queue -> (exchange, routing key, a valid body for it)
TARGETS: dict[str, tuple[str, str, str]] = {
    topology.ingress_queue_name("acme"): (
        topology.COMMANDS,
        topology.flow_start_key("acme"),
        "flow.start.requested",
    ),
    topology.EXECUTIONS_QUEUE: (
        topology.COMMANDS,
        "execution.requested",
        "execution.requested",
    ),
    topology.RESULTS_QUEUE: (topology.COMMANDS, "step.result", "step.result"),
    topology.QUERIES_QUEUE: (topology.COMMANDS, topology.query_key("acme"), "execution.query"),
    topology.CANCELS_QUEUE: (topology.COMMANDS, topology.cancel_key("acme"), "execution.cancel"),
    topology.CONTROL_QUEUE: (topology.CONTROL, "penalty.acme", "control.penalty"),
    topology.tenant_queue_name("acme"): (topology.STEPS, "acme", "step.task"),
    topology.work_queue_name("default"): (topology.WORK, "default", "step.task"),
    topology.express_queue_name("default"): (topology.WORK, "default.express", "step.task"),
}


def bad_properties() -> dict[str, RawProperties]:
    """Properties the AMQP client library cannot decode (each used to cost a connection)."""
    in_headers = properties().set_raw(
        "headers", table({b"when": b"T" + struct.pack(">Q", 2**64 - 1)})
    )
    return {
        "message_id not UTF-8": properties(message_id=b"\xff\xfe-id"),
        "type not UTF-8": properties(type_=b"\xc3\x28"),
        "timestamp 2^63": properties(timestamp=2**63),
        "timestamp in headers": in_headers,
    }


def bad_ids() -> dict[str, RawProperties]:
    """Message ids that are valid AMQP but not valid event ids (the reject path used them)."""
    return {
        "space": properties(message_id=b"a b"),
        "non-ASCII": properties(message_id="dé-ja".encode()),
        "long": properties(message_id=b"x" * 250),
        "none": properties(message_id=None),
    }


async def _until(check: Any, what: Any, wait_s: float = 90.0) -> None:
    """Until `check` holds; on a timeout the error tells `what` was reached."""
    try:
        await wait_until(check, timeout_s=wait_s, every_s=0.2)
    except TimeoutError:
        raise TimeoutError(f"not reached: {await what()}") from None


class Feed:
    """Every status event seen so far (an exclusive queue bound to `#`)."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.events: list[dict[str, Any]] = []

    async def pump(self) -> None:
        self.events.extend(body(message) for message in await drain(self.queue, settle_s=0.0))

    def accepted(self) -> list[str]:
        return [
            e["data"]["execution_id"]
            for e in self.events
            if e["type"] == "io.orchestrator.flow_start.accepted"
        ]

    def terminals(self) -> dict[str, list[str]]:
        """Terminal states per execution, every one counted (a duplicate shows as two)."""
        ended: dict[str, list[str]] = {}
        for event in self.events:
            kind = event["type"].removeprefix("io.orchestrator.")
            if kind in ("execution.succeeded", "execution.failed", "execution.compensated"):
                ended.setdefault(event["subject"], []).append(kind.split(".")[1])
        return ended

    async def progress(self) -> str:
        ended = self.terminals()
        missing = [e for e in self.accepted() if e not in ended]
        kinds = Counter(e["type"] for e in self.events)
        return f"{len(self.accepted())} accepted, not ended: {missing[:5]}; events {kinds}"

    async def all_ended(self, count: int) -> bool:
        await self.pump()
        accepted = self.accepted()
        return len(accepted) >= count and all(e in self.terminals() for e in accepted)


async def test_bad_messages_on_every_queue_cost_nothing_else(
    settings: Settings, channel: AbstractChannel
) -> None:
    test_settings = fresh_settings(settings)
    await topology.declare_tenant_queue(channel, "acme")
    await topology.declare_ingress_queue(channel, "acme")
    dlqs = [name + topology.DLQ_SUFFIX for name in TARGETS]
    for name in [*TARGETS, *dlqs, topology.COMPLETIONS_QUEUE]:
        await purged(channel, name)
    status = await channel.declare_queue(exclusive=True)
    await status.bind(topology.STATUS, routing_key="#")
    feed = Feed(status)
    dropped_before = DROPPED.labels(topology.COMPLETIONS_QUEUE, "bad_properties")._value.get()

    async with running_system(test_settings) as system:
        await system.apply(FLOW)

        async def start() -> None:
            key = f"valid-{uuid.uuid4().hex}"
            request = FlowStartRequested(tenant="acme", flow_id="echo", idempotency_key=key)
            await publish(channel, request)

        # A first valid execution registers the tenant (and its fair queue's consumer).
        await start()
        await _until(lambda: feed.all_ended(1), feed.progress)
        started = 1
        async with RawPublisher(str(test_settings.rabbitmq_url)) as raw:
            for exchange, key, message_type in TARGETS.values():
                valid_body = sample(message_type).to_bytes()
                for props in bad_properties().values():
                    await raw.publish(exchange, key, valid_body, props)
                    await start()  # valid traffic in between
                    started += 1
                for props in bad_ids().values():
                    await raw.publish(exchange, key, b"{not json", props)
        expected_per_queue = len(bad_properties()) + len(bad_ids())

        dead: dict[str, list[Any]] = {queue: [] for queue in TARGETS}

        async def all_dead_lettered() -> bool:
            # Read, not counted: a quorum queue's declare-ok count lags behind.
            for queue, letters in dead.items():
                letters.extend(await drain(await channel.get_queue(queue + ".dlq"), 0.0))
            return all(len(letters) >= expected_per_queue for letters in dead.values())

        async def dead_counts() -> dict[str, int]:
            return {queue: len(letters) for queue, letters in dead.items()}

        await _until(all_dead_lettered, dead_counts)
        await _until(lambda: feed.all_ended(started), feed.progress)
        # the wait is the behaviour under test: a duplicate terminal event would come now,
        # and none must
        await asyncio.sleep(1.0)
        await feed.pump()
        assert system.reconnects == [], "a bad message cost the services their connection"

    # Every valid execution ran, and ended exactly once.
    ended = feed.terminals()
    assert len(feed.accepted()) == started
    assert all(ended[e] == ["succeeded"] for e in feed.accepted()), ended
    # Every bad message is in the DLQ of the queue it was sent to, with a reason, and nothing
    # else is: no valid message was dead-lettered.
    for queue in TARGETS:
        letters = dead[queue] + await drain(await channel.get_queue(queue + topology.DLQ_SUFFIX))
        reasons = Counter(message.headers[REASON_HEADER] for message in letters)
        assert reasons == {"bad_properties": 4, "malformed_json": 4}, (queue, reasons)
        assert {message.headers[QUEUE_HEADER] for message in letters} == {queue}
        assert all(message.headers[DETAIL_HEADER] for message in letters)
    # Bad copies of step results on the completions queue (consumed without acks) are dropped,
    # counted and announced instead.
    dropped = DROPPED.labels(topology.COMPLETIONS_QUEUE, "bad_properties")._value.get()
    assert dropped - dropped_before == 4
    rejected = [e for e in feed.events if e["type"].endswith(".rejected")]
    per_queue = Counter(event["data"]["queue"] for event in rejected)
    for queue in [*TARGETS, topology.COMPLETIONS_QUEUE]:
        assert per_queue[queue] >= expected_per_queue, per_queue
