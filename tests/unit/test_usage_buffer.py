"""The usage buffer while a batch is in flight: a full buffer drops the oldest *unsent* events,
never the batch being sent and never the newest; a failed batch goes back in front, in order;
a sent batch leaves the buffer, and nothing else does.

Kafka is a fake here: this is about the buffer's bookkeeping, not the producer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable

import pytest
from prometheus_client import REGISTRY

import workers.usage
from orchestrator.testing import wait_until
from schemas import UsageEvent
from tests.factories import cpu_usage
from workers.usage import UsageReporter

DROPPED_METRIC = "orchestrator_usage_events_dropped_total"


class FakeKafka:
    """`send` hands back a future the test settles: sends hang until `succeed` or `fail`."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, asyncio.Future[None]]] = []
        self.sent: list[str] = []
        self.auto = False  # settle every send at once (to let the reporter stop)

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None
    ) -> asyncio.Future[None]:
        event_id = json.loads(value)["event_id"]
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.auto:
            future.set_result(None)
            self.sent.append(event_id)
        else:
            self.pending.append((event_id, future))
        return future

    def in_flight(self) -> list[str]:
        return [event_id for event_id, _ in self.pending]

    def succeed(self) -> None:
        for event_id, future in self.pending:
            future.set_result(None)
            self.sent.append(event_id)
        self.pending.clear()

    def fail(self) -> None:
        for _, future in self.pending:
            future.set_exception(ConnectionError("kafka is down"))
        self.pending.clear()

    async def stop(self) -> None:
        return None


def dropped_total() -> float:
    return REGISTRY.get_sample_value(DROPPED_METRIC) or 0.0


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    await wait_until(condition, timeout_s=timeout_s, every_s=0.001)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers.usage, "BATCH", 2)
    monkeypatch.setattr(workers.usage, "RETRY_S", 0.05)


def reporter_with(kafka: FakeKafka, buffer_limit: int) -> UsageReporter:
    reporter = UsageReporter(["127.0.0.1:1"], "usage-test", buffer_limit=buffer_limit)

    async def ready() -> FakeKafka:
        return kafka

    reporter._producer = kafka
    reporter._producer_ready = ready  # type: ignore[method-assign]
    return reporter


Namer = Callable[[Iterable[UsageEvent | str]], list[str]]


def named(count: int) -> tuple[list[UsageEvent], Namer]:
    """`count` events e0, e1, ... and a function naming events (or their ids) in order."""
    events = [cpu_usage("acme", 0.1, n) for n in range(count)]
    names = {event.event_id: f"e{n}" for n, event in enumerate(events)}

    def name(items: Iterable[UsageEvent | str]) -> list[str]:
        return [names[item if isinstance(item, str) else item.event_id] for item in items]

    return events, name


async def stop(reporter: UsageReporter, kafka: FakeKafka) -> None:
    kafka.auto = True
    kafka.succeed()
    await reporter.stop(timeout_s=2.0)


@pytest.mark.usefixtures("small_batches")
async def test_overflow_during_a_send_drops_the_oldest_unsent_and_spares_the_batch() -> None:
    kafka = FakeKafka()
    reporter = reporter_with(kafka, buffer_limit=3)
    events, name = named(7)
    before = dropped_total()
    try:
        reporter.report(events[0])
        reporter.report(events[1])
        await reporter.start()
        await until(lambda: len(kafka.pending) == 2)
        assert name(kafka.in_flight()) == ["e0", "e1"]

        for event in events[2:]:  # five more while e0, e1 are in flight; room for three
            reporter.report(event)
        await settle()

        # e2, e3 are the oldest *unsent* events: only they go. The batch is untouched.
        assert dropped_total() - before == 2, "only the two oldest unsent events are dropped"
        assert name(reporter.buffer) == ["e4", "e5", "e6"]
        assert name(kafka.in_flight()) == ["e0", "e1"]

        kafka.succeed()  # e0, e1 acknowledged: exactly they leave, e4..e6 are still to send
        await until(lambda: len(kafka.pending) == 2)
        assert name(kafka.sent) == ["e0", "e1"]
        assert name(kafka.in_flight()) == ["e4", "e5"]
        kafka.succeed()
        await until(lambda: len(kafka.pending) == 1)
        kafka.succeed()
        await until(lambda: not reporter.buffer and not kafka.pending)
        await settle()

        assert name(kafka.sent) == ["e0", "e1", "e4", "e5", "e6"]
        assert dropped_total() - before == 2
        assert reporter.dropped == 2
    finally:
        await stop(reporter, kafka)


@pytest.mark.usefixtures("small_batches")
async def test_a_failed_batch_goes_back_in_front_in_order() -> None:
    kafka = FakeKafka()
    reporter = reporter_with(kafka, buffer_limit=4)
    events, name = named(7)
    before = dropped_total()
    try:
        reporter.report(events[0])
        reporter.report(events[1])
        await reporter.start()
        await until(lambda: len(kafka.pending) == 2)
        reporter.report(events[2])
        reporter.report(events[3])
        await settle()
        assert dropped_total() - before == 0  # four events, room for four

        kafka.fail()
        await settle()  # the reporter now waits RETRY_S before trying again
        assert name(reporter.buffer) == ["e0", "e1", "e2", "e3"], "the batch is back in front"
        assert dropped_total() - before == 0

        await until(lambda: len(kafka.pending) == 2)  # the retry sends the same batch first
        assert name(kafka.in_flight()) == ["e0", "e1"]

        # Three more during the retry: the buffer (e2, e3 and these) holds four, so the oldest
        # unsent one, e2, goes; e0 and e1, in flight, stay.
        for event in events[4:]:
            reporter.report(event)
        await settle()
        assert dropped_total() - before == 1, "only e2 is dropped, not the batch in flight"
        assert name(reporter.buffer) == ["e3", "e4", "e5", "e6"]
        assert name(kafka.in_flight()) == ["e0", "e1"]

        # The retry fails too: e0, e1 come back in front, now the oldest of six: they go.
        kafka.fail()
        await settle()
        assert name(reporter.buffer) == ["e3", "e4", "e5", "e6"]
        assert dropped_total() - before == 3

        await until(lambda: len(kafka.pending) == 2)
        assert name(kafka.in_flight()) == ["e3", "e4"]
        kafka.succeed()
        await until(lambda: len(kafka.pending) == 2)
        kafka.succeed()
        await until(lambda: not reporter.buffer and not kafka.pending)
        await settle()

        assert name(kafka.sent) == ["e3", "e4", "e5", "e6"]
        assert dropped_total() - before == 3
        assert reporter.dropped == 3
    finally:
        await stop(reporter, kafka)
