"""The scheduler against real Redis and RabbitMQ, with a clock the test drives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from orchestrator import store, topology
from orchestrator.clock import ManualClock
from orchestrator.config import Settings
from orchestrator.scheduler.service import Scheduler
from orchestrator.store.admission import AdmissionStore
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import wait_until
from schemas import FlowDefinition
from tests.integration.helpers import body, drain, fresh_settings, purged, status_feed

pytestmark = pytest.mark.asyncio(loop_scope="session")

T0 = datetime(2026, 5, 1, 12, 0, 30, tzinfo=UTC)


def minutely(**overrides: Any) -> FlowDefinition:
    doc: dict[str, Any] = {
        "tenant": "acme",
        "id": "sync",
        "cron": "* * * * *",
        "steps": [{"id": "a", "type": "demo.echo"}],
    }
    doc.update(overrides)
    return FlowDefinition.model_validate(doc)


class Rig:
    """One in-process scheduler on a manual clock, with the queues a test reads."""

    def __init__(self, settings: Settings, connection: AbstractRobustConnection, start: datetime):
        self.settings = settings
        self.redis = store.connect(settings)
        self.clock = ManualClock(start)
        self.scheduler = Scheduler(settings, self.redis, connection, clock=self.clock)
        self.keys = store.Keys(settings.redis_prefix)
        self.registry = FlowRegistry(self.redis, self.keys)
        self.admission = AdmissionStore(self.redis, self.keys)

    async def at(self, when: datetime) -> int:
        self.clock.set(when)
        return await self.scheduler.cron.process_due_once()

    async def close(self) -> None:
        async for key in self.redis.scan_iter(match=f"{self.settings.redis_prefix}*"):
            await self.redis.delete(key)
        await self.redis.aclose()


@pytest.fixture
async def rig(settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel) -> Any:
    rig = Rig(fresh_settings(settings, running_lease_s=60), amqp, T0)
    await purged(channel, topology.EXECUTIONS_QUEUE)
    yield rig
    await rig.close()


async def test_tick_fires_once_with_its_fire_id(rig: Rig, channel: AbstractChannel) -> None:
    executions = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    feed = await status_feed(channel, "acme.sync.tick.*")
    await rig.registry.apply([minutely()], T0)
    assert await rig.at(T0 + timedelta(seconds=29)) == 0  # not due yet
    due = datetime(2026, 5, 1, 12, 1, tzinfo=UTC)
    assert await rig.at(due + timedelta(milliseconds=5)) == 1
    assert await rig.at(due + timedelta(milliseconds=50)) == 0  # already fired

    fired = await drain(executions)
    assert [m.message_id for m in fired] == ["acme/sync@2026-05-01T12:01:00.000Z"]
    assert body(fired[0])["nominal_time"] == "2026-05-01T12:01:00Z"
    assert body(fired[0])["trigger"] == "cron"
    events = await drain(feed)
    assert [m.routing_key for m in events] == ["acme.sync.tick.fired"]
    assert await rig.registry.next_fire("acme", "sync") == int(
        (due + timedelta(minutes=1)).timestamp() * 1000
    )


async def test_fire_times_across_dst_follow_the_rule(rig: Rig, channel: AbstractChannel) -> None:
    executions = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    berlin = minutely(id="berlin", cron="30 2 * * *", timezone="Europe/Berlin", overlap="allow")
    new_york = minutely(
        id="new-york", cron="*/30 * * * *", timezone="America/New_York", overlap="allow"
    )
    start = datetime(2026, 3, 8, 6, 10, tzinfo=UTC)  # New York: 01:10 EST, before the gap
    await rig.registry.apply([new_york], start)
    # New York skips the non-existent 02:00-03:00: 01:30 EST, then 03:00 EDT (07:00 UTC).
    for expected in ("2026-03-08T06:30:00Z", "2026-03-08T07:00:00Z"):
        when = datetime.fromisoformat(expected) + timedelta(milliseconds=1)
        assert await rig.at(when) == 1
        assert [body(m)["nominal_time"] for m in await drain(executions)] == [expected]
    await rig.registry.delete("acme", "new-york")
    # Berlin's 02:30 does not exist on 29 March: it runs at the jump, 03:00 CEST = 01:00 UTC.
    await rig.registry.apply([berlin], datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert await rig.registry.next_fire("acme", "berlin") == int(
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC).timestamp() * 1000
    )
    assert await rig.at(datetime(2026, 3, 29, 1, 0, 0, 3000, tzinfo=UTC)) == 1
    assert [m.message_id for m in await drain(executions)] == [
        "acme/berlin@2026-03-29T01:00:00.000Z"
    ]


async def test_skip_policy_never_runs_two_at_once(rig: Rig, channel: AbstractChannel) -> None:
    executions = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    feed = await status_feed(channel, "acme.sync.tick.*")
    await rig.registry.apply([minutely()], T0)
    first = datetime(2026, 5, 1, 12, 1, tzinfo=UTC)
    await rig.at(first)
    running = body((await drain(executions))[0])["execution_id"]
    for minute in (2, 3):  # the first execution outlasts its interval
        await rig.at(first.replace(minute=minute))
    assert await drain(executions) == []
    events = [body(m) for m in await drain(feed)]
    skipped = [e for e in events if e["type"] == "io.orchestrator.tick.skipped"]
    assert [e["data"]["reason"] for e in skipped] == ["overlap", "overlap"]

    flow = store.member("acme", "sync")
    assert await rig.admission.running(flow) == running
    assert await rig.admission.release_running(flow, running)  # the engine ends it
    await rig.at(first.replace(minute=4))
    assert len(await drain(executions)) == 1


async def test_crashed_owner_lease_expires(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    rig = Rig(fresh_settings(settings, running_lease_s=1), amqp, T0)
    executions = await purged(channel, topology.EXECUTIONS_QUEUE)
    try:
        await rig.registry.apply([minutely()], T0)
        first = datetime(2026, 5, 1, 12, 1, tzinfo=UTC)
        await rig.at(first)
        assert len(await drain(executions)) == 1
        await rig.at(first.replace(minute=2))
        assert await drain(executions) == []  # still leased
        # Nobody heartbeats the lease: its owner is dead, and Redis expires it.
        flow = store.member("acme", "sync")

        async def expired() -> bool:
            return await rig.admission.running(flow) is None

        await wait_until(expired, what="the running lease expired")
        await rig.at(first.replace(minute=3))
        assert len(await drain(executions)) == 1
    finally:
        await rig.close()


async def test_buffer_one_keeps_one_waiting(rig: Rig, channel: AbstractChannel) -> None:
    executions = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    await rig.registry.apply([minutely(overlap="buffer_one")], T0)
    first = datetime(2026, 5, 1, 12, 1, tzinfo=UTC)
    for minute in (1, 2, 3):
        await rig.at(first.replace(minute=minute))
    published = await drain(executions)
    assert len(published) == 1
    flow = store.member("acme", "sync")
    await rig.scheduler.cron.promote_buffered()
    assert await drain(executions) == []  # the first one still runs
    assert await rig.admission.release_running(flow, body(published[0])["execution_id"])
    await rig.scheduler.cron.promote_buffered()
    waiting = await drain(executions)
    assert [body(m)["nominal_time"] for m in waiting] == ["2026-05-01T12:02:00Z"]
    assert await rig.admission.running(flow) == body(waiting[0])["execution_id"]


async def test_paused_and_quarantined_ticks_are_skipped_with_reason(
    rig: Rig, channel: AbstractChannel
) -> None:
    executions = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    feed = await status_feed(channel, "acme.*.tick.skipped")
    await rig.registry.apply([minutely(overlap="allow")], T0)
    await rig.registry.set_paused("acme", "sync", True)
    first = datetime(2026, 5, 1, 12, 1, tzinfo=UTC)
    await rig.at(first)
    await rig.registry.set_paused("acme", "sync", False)
    await rig.admission.quarantine("acme", None, ttl_ms=60_000, reason="cpu_share")
    await rig.at(first.replace(minute=2))
    await rig.admission.release_quarantine("acme", None)
    await rig.admission.quarantine("acme", "sync", ttl_ms=60_000, reason="runtime")
    await rig.at(first.replace(minute=3))
    await rig.admission.release_quarantine("acme", "sync")
    await rig.at(first.replace(minute=4))
    reasons = [body(m)["data"]["reason"] for m in await drain(feed)]
    assert reasons == ["paused", "quarantined", "quarantined"]
    assert [body(m)["nominal_time"] for m in await drain(executions)] == ["2026-05-01T12:04:00Z"]


async def test_downtime_coalesces_recent_ticks_and_skips_old_ones(
    rig: Rig, channel: AbstractChannel
) -> None:
    executions = await channel.get_queue(topology.EXECUTIONS_QUEUE)
    feed = await status_feed(channel, "acme.sync.tick.*")
    await rig.registry.apply(
        [minutely(overlap="allow", catch_up={"window_s": 300, "coalesce": True})], T0
    )
    # Down from 12:00:30 until 12:10:05: ticks 12:01..12:10 are due at once.
    assert await rig.at(datetime(2026, 5, 1, 12, 10, 5, tzinfo=UTC)) == 1
    runs = [body(m) for m in await drain(executions)]
    assert sorted((r["trigger"], r["nominal_time"]) for r in runs) == [
        ("catch_up", "2026-05-01T12:09:00Z"),
        ("cron", "2026-05-01T12:10:00Z"),
    ]
    events = [body(m) for m in await drain(feed)]
    by_type: dict[str, list[str]] = {}
    for event in events:
        by_type.setdefault(event["type"].rsplit(".", 1)[1], []).append(
            event["data"].get("nominal_time")
        )
    assert sorted(by_type["coalesced"]) == [f"2026-05-01T12:0{m}:00.000Z" for m in (6, 7, 8)]
    assert sorted(by_type["skipped"]) == [f"2026-05-01T12:0{m}:00.000Z" for m in (1, 2, 3, 4, 5)]
    assert len(by_type["fired"]) == 2
    assert await rig.registry.next_fire("acme", "sync") == int(
        datetime(2026, 5, 1, 12, 11, tzinfo=UTC).timestamp() * 1000
    )


async def test_reapply_unchanged_is_a_no_op_and_cron_change_reschedules(rig: Rig) -> None:
    assert [r.outcome for r in await rig.registry.apply([minutely()], T0)] == ["created"]
    later = T0 + timedelta(hours=1)
    assert [r.outcome for r in await rig.registry.apply([minutely()], later)] == ["unchanged"]
    assert await rig.registry.next_fire("acme", "sync") == int(
        datetime(2026, 5, 1, 12, 1, tzinfo=UTC).timestamp() * 1000
    )
    described = minutely(description="now documented")
    assert [r.outcome for r in await rig.registry.apply([described], later)] == ["updated"]
    hourly = minutely(cron="0 * * * *")
    assert [r.outcome for r in await rig.registry.apply([hourly], later)] == ["rescheduled"]
    assert await rig.registry.next_fire("acme", "sync") == int(
        datetime(2026, 5, 1, 14, 0, tzinfo=UTC).timestamp() * 1000
    )
    assert len(await rig.registry.list()) == 1
