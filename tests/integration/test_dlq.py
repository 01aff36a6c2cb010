"""Dead-letter tools as an operator runs them (`orchestrator dlq ...` in a subprocess),
against real RabbitMQ: show without taking out, replay after the cause is fixed, dry runs,
rate, the replay limit, purge, clear errors, and kill -9 in the middle of a replay."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from orchestrator import store, topology
from orchestrator.amqp import REASON_HEADER, REPLAYS_HEADER, publish
from orchestrator.config import Settings
from orchestrator.dlq import BATCH as REPLAY_WINDOW
from orchestrator.scheduler.service import Scheduler
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import consumers, process_env, wait_for_consumers, wait_until
from schemas import FlowDefinition, FlowStartRequested
from tests.integration.helpers import body, drain, fresh_settings, get_one, purged, status_feed

pytestmark = pytest.mark.asyncio(loop_scope="session")


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "dlq", *args],
        capture_output=True,
        text=True,
        env=process_env(settings, ORCH_LOG_LEVEL="WARNING"),
        timeout=120,
        check=False,
    )


async def cli_async(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, settings, *args)


def flow() -> FlowDefinition:
    return FlowDefinition.model_validate(
        {
            "tenant": "acme",
            "id": "late",
            "overlap": "allow",
            "steps": [{"id": "a", "type": "demo.echo"}],
        }
    )


async def test_a_dead_letter_is_shown_then_replayed_once_its_flow_exists(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    test_settings = fresh_settings(settings)
    redis = store.connect(test_settings)
    await redis.sadd(f"{test_settings.redis_prefix}tenants", "acme")  # acme is registered
    await topology.declare_ingress_queue(channel, "acme")
    ingress = topology.ingress_queue("acme")
    for name in (ingress.name, ingress.dlq, topology.EXECUTIONS_QUEUE):
        await purged(channel, name)
    stop = asyncio.Event()
    scheduler = asyncio.create_task(Scheduler(test_settings, redis, amqp).run(stop))
    feed = await status_feed(channel, "acme.late.flow_start.accepted")
    try:
        await wait_for_consumers(amqp, ingress.name)
        await publish(
            channel, FlowStartRequested(tenant="acme", flow_id="late", idempotency_key="r1")
        )
        dlq_queue = await channel.get_queue(ingress.dlq)

        async def dead_lettered() -> bool:
            probe = await dlq_queue.get(no_ack=False, fail=False)
            if probe is None:
                return False
            await probe.nack(requeue=True)  # hand it back
            return True

        await wait_until(dead_lettered, timeout_s=10, every_s=0.1, what="the request dead-lettered")

        shown = await cli_async(test_settings, "show", ingress.dlq, "--json")
        assert shown.returncode == 0, shown.stderr
        (letter,) = [json.loads(line) for line in shown.stdout.splitlines()]
        assert (letter["reason"], letter["queue"], letter["tenant"]) == (
            "unknown_flow",
            ingress.name,
            "acme",
        )
        again = await cli_async(test_settings, "show", ingress.dlq, "--json")
        assert len(again.stdout.splitlines()) == 1  # show took nothing out

        dry = await cli_async(test_settings, "replay", ingress.dlq, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would have replayed 1" in dry.stdout
        assert (
            len((await cli_async(test_settings, "show", ingress.dlq, "--json")).stdout.splitlines())
            == 1
        )

        # The cause is fixed: the flow exists now. The replay gets the request processed.
        await FlowRegistry(redis, store.Keys(test_settings.redis_prefix)).apply(
            [flow()], datetime.now(UTC)
        )
        replayed = await cli_async(test_settings, "replay", ingress.dlq)
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 1," in replayed.stdout
        accepted = body(await get_one(feed, wait_s=15))
        assert accepted["data"]["idempotency_key"] == "r1"
        assert (await cli_async(test_settings, "show", ingress.dlq, "--json")).stdout == ""
    finally:
        stop.set()
        await scheduler
        async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
            await redis.delete(key)
        await redis.aclose()


async def _fill(channel: AbstractChannel, dlq: str, count: int, replays: int = 0) -> None:
    for n in range(count):
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps({"n": n}).encode(),
                message_id=f"m-{n}",
                headers={REASON_HEADER: "schema_violation", REPLAYS_HEADER: replays},
            ),
            routing_key=dlq,
        )


async def _pair(channel: AbstractChannel) -> tuple[str, str]:
    """A DLQ and a destination of the test's own (classic queues: exact counts)."""
    name = f"test-dlq-{uuid.uuid4().hex[:8]}"
    await channel.declare_queue(f"{name}.dlq", auto_delete=False)
    await channel.declare_queue(f"{name}.dest", auto_delete=False)
    return f"{name}.dlq", f"{name}.dest"


async def _ids(channel: AbstractChannel, queue: str) -> Counter[str]:
    """Message ids of everything in the queue, taken out (consumed: fast for 10,000)."""
    found: Counter[str] = Counter()
    arrived = asyncio.Event()

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        found[message.message_id or ""] += 1
        arrived.set()

    source = await channel.get_queue(queue)
    tag = await source.consume(take, no_ack=True)
    while True:
        arrived.clear()
        try:
            await asyncio.wait_for(arrived.wait(), 1.0)
        except TimeoutError:
            break
    await source.cancel(tag)
    return found


async def test_rate_limit_and_replay_limit(settings: Settings, channel: AbstractChannel) -> None:
    dlq, dest = await _pair(channel)
    await _fill(channel, dlq, 200)
    await _fill(channel, dlq, 1, replays=3)  # replayed three times already: it stays
    began = time.monotonic()
    run = await cli_async(settings, "replay", dlq, "--to", f"queue:{dest}", "--rate", "50")
    elapsed = time.monotonic() - began
    assert run.returncode == 0, run.stderr
    assert elapsed >= 4.0, f"200 messages at 50/s took {elapsed:.1f} s"
    assert "replayed 200," in run.stdout
    assert "1 left in the DLQ, replayed too often already: m-0" in run.stdout
    moved = await _ids(channel, dest)
    assert len(moved) == 200
    assert set(moved.values()) == {1}
    left = await drain(await channel.get_queue(dlq), 0.3)
    assert [(m.message_id, m.headers[REPLAYS_HEADER]) for m in left] == [("m-0", 3)]
    await channel.queue_delete(dlq)
    await channel.queue_delete(dest)


async def test_replayed_copies_count_their_replays(
    settings: Settings, channel: AbstractChannel
) -> None:
    dlq, dest = await _pair(channel)
    await _fill(channel, dlq, 3, replays=1)
    assert (await cli_async(settings, "replay", dlq, "--to", f"queue:{dest}")).returncode == 0
    copies = await drain(await channel.get_queue(dest), 0.3)
    assert [m.headers[REPLAYS_HEADER] for m in copies] == [2, 2, 2]
    await channel.queue_delete(dlq)
    await channel.queue_delete(dest)


async def test_filters_and_purge(settings: Settings, channel: AbstractChannel) -> None:
    dlq, dest = await _pair(channel)
    await _fill(channel, dlq, 3)
    await channel.default_exchange.publish(
        aio_pika.Message(b"{}", message_id="other", headers={REASON_HEADER: "too_large"}),
        routing_key=dlq,
    )
    shown = await cli_async(settings, "show", dlq, "--filter", "reason=too_large", "--json")
    assert [json.loads(line)["message_id"] for line in shown.stdout.splitlines()] == ["other"]
    refused = await cli_async(settings, "purge", dlq)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    purged_run = await cli_async(
        settings, "purge", dlq, "--filter", "reason=schema_violation", "--yes"
    )
    assert purged_run.returncode == 0, purged_run.stderr
    assert "purged 3," in purged_run.stdout
    assert list(await _ids(channel, dlq)) == ["other"]
    await channel.queue_delete(dlq)
    await channel.queue_delete(dest)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("show", "no-such-queue.dlq"), "no queue 'no-such-queue.dlq'"),
        (("show", "engine.executions"), "is not a dead-letter queue"),
        (("show", "engine.executions.dlq", "--filter", "colour=red"), "bad filter key 'colour'"),
        (("show", "engine.executions.dlq", "--filter", "reason"), "expected key=value"),
        (("replay", "engine.executions.dlq", "--to", "nowhere"), "bad --to 'nowhere'"),
    ],
)
async def test_bad_queues_and_filters_are_refused_clearly(
    settings: Settings, channel: AbstractChannel, args: tuple[str, ...], message: str
) -> None:
    run = await cli_async(settings, *args)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert message in run.stderr


@pytest.mark.timeout(300)
async def test_kill_9_mid_replay_loses_nothing(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    """10,000 letters; the replay is killed in the middle: each message is afterwards in the DLQ
    or at its destination, and only copies whose confirm was outstanding exist twice."""
    dlq, dest = await _pair(channel)
    total = 10_000
    letters = [
        aio_pika.Message(json.dumps({"n": n}).encode(), message_id=f"m-{n}") for n in range(total)
    ]
    confirming = await amqp.channel(publisher_confirms=True)
    for start in range(0, total, 500):
        await asyncio.gather(
            *(
                confirming.default_exchange.publish(m, routing_key=dlq)
                for m in letters[start : start + 500]
            )
        )
    replay = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "dlq", "replay", dlq, "--to", f"queue:{dest}"],
        env=process_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Counted on a plain connection: a robust channel's passive declare reports 0 here.
    counter = await aio_pika.connect(str(settings.rabbitmq_url))
    counting = await counter.channel()

    async def a_fifth_moved() -> bool:
        destination = await counting.declare_queue(dest, passive=True)
        return (destination.declaration_result.message_count or 0) >= total // 5

    await wait_until(a_fifth_moved, timeout_s=120, every_s=0.01, what="a fifth replayed")
    replay.send_signal(signal.SIGKILL)
    replay.wait(timeout=10)

    # Its unacked letters return to the DLQ as the broker drops its consumer.
    async def unconsumed() -> bool:
        return await consumers(counter, dlq) == 0

    await wait_until(unconsumed, what="the killed replay's consumer gone")
    await counter.close()
    in_dlq = await _ids(channel, dlq)
    at_dest = await _ids(channel, dest)
    assert total // 5 <= sum(at_dest.values()) < total, "not killed in the middle"
    assert set(in_dlq) | set(at_dest) == {f"m-{n}" for n in range(total)}, "a message was lost"
    twice = set(in_dlq) & set(at_dest)
    print(f"[dlq] killed after {sum(at_dest.values())} moved; {len(twice)} in both places")
    assert len(twice) <= REPLAY_WINDOW  # the copies whose confirms (and acks) were in flight
    assert max(at_dest.values()) == 1
    assert max(in_dlq.values()) == 1
    await confirming.close()
    await channel.queue_delete(dlq)
    await channel.queue_delete(dest)
