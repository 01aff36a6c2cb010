"""Measuring one step attempt (CPU, wall, memory, bytes) and shipping it to Kafka.

The reporter never blocks or fails a step: events go into a bounded buffer that a background
task sends in batches; while Kafka is down the buffer holds them (and, when full, drops the
oldest, counting the loss) and the sender keeps retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Awaitable, Generator
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from prometheus_client import Counter, Gauge

from orchestrator.outage import OUTAGES
from orchestrator.telemetry import get_logger
from schemas import UsageEvent

log = get_logger(__name__)
T = TypeVar("T")

BUFFER_LIMIT = 10_000
BATCH = 500
RETRY_S = 1.0
PAGE = os.sysconf("SC_PAGE_SIZE")

USAGE_SENT = Counter("orchestrator_usage_events_sent_total", "Usage events acknowledged by Kafka")
USAGE_DROPPED = Counter(
    "orchestrator_usage_events_dropped_total", "Usage events lost to a full buffer (oldest first)"
)
USAGE_BUFFERED = Gauge("orchestrator_usage_events_buffered", "Usage events waiting for Kafka")
USAGE_SEND_FAILED = Counter(
    "orchestrator_usage_send_failures_total", "Batches of usage events Kafka did not take"
)


_statm: dict[int, int] = {}  # pid -> an open /proc/<pid>/statm (a fork gets its own)


def rss_bytes() -> int:
    """This process's resident memory: one pread of a file kept open (twice per step, so
    opening it each time was a measurable share of a worker's CPU)."""
    pid = os.getpid()
    fd = _statm.get(pid)
    if fd is None:
        fd = _statm[pid] = os.open("/proc/self/statm", os.O_RDONLY)
    return int(os.pread(fd, 128, 0).split()[1]) * PAGE


class Metered:
    """Awaits a coroutine while adding up the CPU time of *its own* steps (thread CPU time
    around each resumption), so concurrent handlers do not inflate each other's figures."""

    def __init__(self, awaitable: Awaitable[T]) -> None:
        self.awaitable = awaitable
        self.cpu_s = 0.0

    def __await__(self) -> Generator[Any, Any, Any]:
        inner = self.awaitable.__await__()
        send_value: Any = None
        throw: BaseException | None = None
        while True:
            started = time.thread_time()
            try:
                yielded = inner.throw(throw) if throw is not None else inner.send(send_value)
            except StopIteration as stop:
                self.cpu_s += time.thread_time() - started
                return stop.value
            finally:
                throw = None
            self.cpu_s += time.thread_time() - started
            try:
                send_value = yield yielded
            except BaseException as exc:  # cancellation and errors go into the handler
                throw = exc
                send_value = None


class UsageReporter:
    def __init__(self, bootstrap: list[str], topic: str, buffer_limit: int = BUFFER_LIMIT) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.buffer: deque[UsageEvent] = deque()
        self.buffer_limit = buffer_limit
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._closing = False
        self.dropped = 0

    def report(self, event: UsageEvent) -> None:
        """Buffers an event; never blocks. A full buffer drops its oldest event (the batch
        being sent is not in the buffer, so only unsent events are ever dropped)."""
        self.buffer.append(event)
        self._trim()
        USAGE_BUFFERED.set(len(self.buffer))
        self._wake.set()

    def _trim(self) -> None:
        while len(self.buffer) > self.buffer_limit:
            self.buffer.popleft()
            USAGE_DROPPED.inc()
            self.dropped += 1

    async def start(self) -> None:
        self._task = asyncio.create_task(self._send_loop())

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Sends what is buffered (within `timeout_s`), then closes the producer."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                self._task.cancel()
                log.warning("usage.unsent_at_stop", events=len(self.buffer))
        if self._producer is not None:
            await self._producer.stop()

    async def _producer_ready(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                linger_ms=20,
                enable_idempotence=True,
                request_timeout_ms=10_000,
            )
            try:
                await producer.start()
            except Exception:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def _send_loop(self) -> None:
        # Connected before the first step: starting a producer (bootstrap, metadata, producer
        # id) in the middle of the first steps would take their time on a busy host.
        with contextlib.suppress(Exception):
            await self._producer_ready()
        while True:
            if not self.buffer:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # Taken out while in flight: events reported meanwhile queue behind it, and a
            # full buffer drops among those (oldest first), never an event already sent.
            batch = [self.buffer.popleft() for _ in range(min(BATCH, len(self.buffer)))]
            try:
                producer = await self._producer_ready()
                futures = [
                    await producer.send(self.topic, e.to_bytes(), key=e.tenant.encode())
                    for e in batch
                ]
                await asyncio.gather(*futures)
            except Exception as exc:
                # Back at the front, in order: the oldest are sent first once Kafka is back,
                # or dropped first if the buffer overflows meanwhile.
                self.buffer.extendleft(reversed(batch))
                self._trim()
                USAGE_BUFFERED.set(len(self.buffer))
                USAGE_SEND_FAILED.inc()
                OUTAGES.failed("kafka", exc)  # one warning per outage, not per batch
                if self._producer is not None:
                    producer, self._producer = self._producer, None
                    with contextlib.suppress(Exception):
                        await producer.stop()
                if self._closing:
                    return
                await asyncio.sleep(RETRY_S)
                continue
            OUTAGES.recovered("kafka")
            USAGE_SENT.inc(len(batch))
            USAGE_BUFFERED.set(len(self.buffer))
