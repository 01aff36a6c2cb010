"""The violations consumer: a faust-streaming app over `orchestrator.usage`.

Usage events are aggregated per tenant and per flow in tumbling windows (`Book`, over faust
tables backed by changelog topics). The consumer appends a tick record to every partition of
the usage topic every `ORCH_VIOLATIONS_TICK_S`; when a tick passes a window's end + grace, the
window is final and is judged against the tenant's plan (`policy`): warn, penalty or
quarantine by the escalation ladder. Commands go to `orchestrator.control` with confirms,
status events `tenant.warned|penalized|quarantined|released` to `orchestrator.status`, and
each violation to the tenant's record in Redis (`orchestrator tenants show`). Punishments run
out by Redis expiry; the consumer announces each expiry with a ReleaseCommand and a
`tenant.released` event.

Everything a window decides is published (and confirmed) before the window is marked closed,
so a consumer killed in between decides it again after the restart — the same decision with
the same ids, which the dispatcher applies once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError
from tenacity import RetryCallState

from orchestrator import kafka
from orchestrator.amqp import connect, open_channel, publish
from orchestrator.config import Settings
from orchestrator.cron import CronSchedule
from orchestrator.outage import retrying
from orchestrator.store import Keys
from orchestrator.store.flows import FlowRegistry
from orchestrator.store.tenants import TenantStore
from orchestrator.telemetry import get_logger
from orchestrator.violations import policy
from orchestrator.violations.book import Book, Expired
from schemas import Message, ReleaseCommand, StatusEvent, UsageEvent

log = get_logger(__name__)

STATES = {"warn": "warned", "penalty": "penalized", "quarantine": "quarantined"}
INTERVALS_REFRESH_S = 30.0
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0
BATCH_MAX = 2_000
BATCH_WITHIN_S = 0.05

EVENTS = Counter(
    "orchestrator_usage_events_total",
    "Usage events read by the violations consumer, by outcome",
    ["outcome"],
)
DECISIONS = Counter(
    "orchestrator_violations_total", "Violations acted on", ["tenant", "rule", "action"]
)
LAG = Gauge(
    "orchestrator_usage_lag_seconds",
    "Age of the latest usage record read (append time to now), by partition: consumer lag",
    ["partition"],
)
JUDGED = Histogram(
    "orchestrator_violations_judged_seconds",
    "Window end to its judgement published",
    buckets=(0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30),
)


class Staged(MutableMapping[str, Any]):
    """A faust table seen through a write-back cache: the events of one batch read and write
    here, and `flush` sends each changed key to the changelog once, on the partition the
    batch came from (faust would take it from the "current event"). A crash before or during
    a flush is safe: every entry carries the offset of the last record it includes, so a
    replayed record is applied only where it is missing."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self._changed: dict[str, Any] = {}  # None: deleted

    def __getitem__(self, key: str) -> Any:
        value = self._changed[key] if key in self._changed else self.table.data.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._changed[key] = value

    def __delitem__(self, key: str) -> None:
        if self.get(key) is None:
            raise KeyError(key)
        self._changed[key] = None

    def __iter__(self) -> Iterator[str]:
        keys = {*self.table.data.keys(), *self._changed}
        return iter(sorted(k for k in keys if self.get(k) is not None))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def flush(self, partition: int) -> None:
        for key, value in self._changed.items():
            if value is None:
                self.table.data.pop(key, None)
                self.table.send_changelog(partition, key, None, value_serializer="raw")
            else:
                self.table.data[key] = value
                self.table.send_changelog(partition, key, value)
        self._changed.clear()


class ViolationsConsumer:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        connection: AbstractRobustConnection | None,
        *,
        app_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.connection = connection
        self.app_id = app_id or settings.violations_app_id
        self.policy_path = Path(settings.violations_policy)
        self.policy = policy.load_policy(self.policy_path)  # PolicyError: the CLI says why
        self._policy_stamp = self._stamp()
        keys = Keys(settings.redis_prefix)
        self.tenants = TenantStore(redis, keys)
        self.flows = FlowRegistry(redis, keys)
        self.intervals: dict[str, dict[str, float]] = {}
        self._channel: AbstractChannel | None = None
        self._stop = asyncio.Event()
        self.book: Book | None = None
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ process
    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        partitions = await kafka.ensure_topics(self.settings)
        app = self.build_app(partitions)
        await app.start()  # returns once partitions are assigned and tables recovered
        self.ready.set()
        log.info("violations.started", app=self.app_id, partitions=partitions)
        try:
            await stop.wait()
        finally:
            await app.stop()
            log.info("violations.stopped", app=self.app_id)

    def build_app(self, partitions: int) -> faust.App:
        settings = self.settings
        datadir = settings.violations_data_dir / self.app_id
        datadir.mkdir(parents=True, exist_ok=True)
        static: dict[str, Any] = {}
        if settings.violations_instance_id:
            static["consumer_group_instance_id"] = settings.violations_instance_id
        app = faust.App(
            self.app_id,
            broker=[f"kafka://{server}" for server in settings.kafka_servers],
            store="memory://",  # state is rebuilt from the changelog topics at start
            web_enabled=False,
            autodiscover=False,
            datadir=str(datadir),
            topic_replication_factor=settings.kafka_replication,
            topic_partitions=partitions,  # tables are co-partitioned with the usage topic
            table_standby_replicas=0,
            consumer_auto_offset_reset="earliest",
            broker_commit_interval=1.0,
            broker_session_timeout=10.0,
            broker_heartbeat_interval=1.0,
            broker_rebalance_timeout=10.0,
            stream_wait_empty=True,
            **static,
        )
        usage = app.topic(
            settings.usage_topic, key_serializer="raw", value_serializer="raw", partitions=None
        )
        dlq = app.topic(kafka.dlq_topic(settings), key_serializer="raw", value_serializer="raw")
        changelog = {"segment.ms": "600000", "min.cleanable.dirty.ratio": "0.1"}

        tables = {
            name: Staged(app.Table(name, default=None, extra_topic_configs=changelog))
            for name in ("windows", "totals", "cursors", "offences", "active")
        }
        self.book = Book(
            self.policy,
            grace_s=settings.violations_grace_s,
            late_s=settings.violations_late_s,
            **tables,
        )

        @app.agent(usage, name="judge")
        async def judge(stream: Any) -> None:
            # In batches: a table key changed by many events of a batch is written to its
            # changelog once (per-event writes cost more than everything else together).
            async for batch in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
                for partition in sorted({event.message.partition for event in batch}):
                    for event in batch:
                        message = event.message
                        if message.partition != partition:
                            continue
                        appended_ms = int(message.timestamp * 1000)
                        if event.key == kafka.TICK_KEY:
                            await self._on_tick(partition, appended_ms)
                        else:
                            await self._on_usage(event, dlq, appended_ms)
                    for staged in tables.values():
                        staged.flush(partition)
                last = batch[-1].message
                LAG.labels(str(last.partition)).set(max(0.0, time.time() - last.timestamp))

        @app.task  # type: ignore[untyped-decorator]
        async def intervals_at_start() -> None:
            await self._refresh_intervals_safely()

        @app.timer(interval=INTERVALS_REFRESH_S)  # type: ignore[untyped-decorator]
        async def intervals() -> None:
            await self._refresh_intervals_safely()

        @app.timer(interval=settings.violations_tick_s, on_leader=True)  # type: ignore[untyped-decorator]
        async def tick() -> None:
            for partition in range(partitions):
                await usage.send(key=kafka.TICK_KEY, value=b"{}", partition=partition)

        return app

    # ------------------------------------------------------------------ inputs
    async def _on_usage(self, event: Any, dlq: Any, appended_ms: int) -> None:
        assert self.book is not None
        message = event.message
        try:
            usage = UsageEvent.model_validate_json(event.value)
        except ValidationError as exc:
            await self._reject(event, dlq, exc)
            return
        outcome = self.book.add(
            usage, partition=message.partition, offset=message.offset, appended_ms=appended_ms
        )
        EVENTS.labels(outcome).inc()

    async def _reject(self, event: Any, dlq: Any, exc: ValidationError) -> None:
        """Bad input: to `<usage topic>.dlq` with the reason in its headers, plus a
        `message.rejected` status event; the consumer goes on."""
        EVENTS.labels("rejected").inc()
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}"
            for e in exc.errors(include_url=False)[:5]
        )[:1000]
        message = event.message
        where = f"{message.topic}/{message.partition}/{message.offset}"
        log.warning("violations.rejected", record=where, detail=detail)
        await dlq.send(
            key=event.key,
            value=event.value,
            headers={"orch-reason": b"invalid_usage_event", "orch-detail": detail.encode()},
        )
        await self._publish(
            StatusEvent.build(
                "message",
                "rejected",
                event_id=f"rejected:{where}",
                data={"topic": message.topic, "reason": "invalid_usage_event", "detail": detail},
            )
        )

    async def _on_tick(self, partition: int, appended_ms: int) -> None:
        assert self.book is not None
        self._maybe_reload()
        now = appended_ms / 1000
        for window in self.book.due(partition, appended_ms):
            # Punishments run from this tick, so a window decided late (records flushed after
            # a Kafka outage) costs its tenant what it would have on time; a warning older
            # than the look-back is not worth announcing.
            decisions = [
                d
                for d in self.book.decide(window, self.intervals, decided_at=now)
                if d.expires_at is not None or d.window_end + self.policy.lookback_s > now
            ]
            for decision in decisions:
                await self._announce(decision)
            self.book.closed(window, decisions)
            if decisions:
                JUDGED.observe(max(0.0, now - window.start - window.size))
                if window.amended:
                    log.warning(
                        "violations.corrected",
                        window_start=window.start,
                        tenants=sorted({d.tenant for d in decisions}),
                    )
        self.book.purge(partition, appended_ms)
        for expired in self.book.expired(partition, appended_ms):
            await self._release(expired)
            self.book.released(expired)

    # ------------------------------------------------------------------ outputs
    async def _announce(self, decision: policy.Decision) -> None:
        command = policy.to_command(decision)
        if command is not None:
            await self._publish(command)
        figures: dict[str, object] = {
            "rule": decision.rule,
            "measured": round(decision.measured, 6),
            "limit": decision.limit,
            "reason": decision.reason,
            "offences": decision.offences,
            "window_start": _iso(decision.window_start),
            "window_s": decision.window_s,
            "action": decision.action,
            "command_id": decision.command_id,
            "expires_at": None if decision.expires_at is None else _iso(decision.expires_at),
        }
        await self._publish(
            StatusEvent.build(
                "tenant",
                STATES[decision.action],
                event_id=decision.command_id,
                tenant=decision.tenant,
                flow=decision.flow,
                data=figures,
            )
        )
        await self._retry(
            "record",
            lambda: self.tenants.record_violation(
                decision.tenant, decision.window_start, {**figures, "flow": decision.flow}
            ),
        )
        DECISIONS.labels(decision.tenant, decision.rule, decision.action).inc()
        log.info(
            "violations.decided",
            tenant=decision.tenant,
            flow=decision.flow,
            rule=decision.rule,
            action=decision.action,
            measured=decision.measured,
            command_id=decision.command_id,
        )

    async def _release(self, expired: Expired) -> None:
        release_id = policy.release_id(expired.command_id)
        await self._publish(
            ReleaseCommand(
                command_id=release_id,
                tenant=expired.tenant,
                flow_id=expired.flow,
                rule="expired",
                reason=f"{expired.command_id} ran out",
                releases="penalty" if expired.kind == "penalty" else "quarantine",
            )
        )
        await self._publish(
            StatusEvent.build(
                "tenant",
                "released",
                event_id=release_id,
                tenant=expired.tenant,
                flow=expired.flow,
                data={"released": expired.kind, "command_id": expired.command_id},
            )
        )
        log.info("violations.released", tenant=expired.tenant, command_id=expired.command_id)

    async def _publish(self, message: Message) -> None:
        async def once() -> None:
            if self.connection is None:  # run as a faust worker: connect on first use
                self.connection = await connect(self.settings, "orchestrator-violations")
            if self._channel is None or self._channel.is_closed:
                self._channel = await open_channel(self.connection)
            await publish(self._channel, message)

        await self._retry(message.message_type, once)

    async def _retry(self, what: str, action: Any) -> None:
        """Keeps trying: an event the agent gives up on would be skipped (faust commits past
        a crashed agent's event), so the stream waits for the broker instead."""

        def say(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            wait_s = state.next_action.sleep if state.next_action else None
            log.warning("violations.retrying", what=what, error=str(error), in_s=wait_s)

        async for attempt in retrying(
            self._stop, first_s=RETRY_FIRST_S, max_s=RETRY_MAX_S, before_sleep=say
        ):
            with attempt:
                await action()

    # ------------------------------------------------------------------ policy and flows
    def _stamp(self) -> float:
        try:
            return self.policy_path.stat().st_mtime
        except OSError:
            return 0.0

    def _maybe_reload(self) -> None:
        """A changed policy file applies from the next window decided; an invalid one is
        reported and the current policy stays."""
        stamp = self._stamp()
        if stamp == self._policy_stamp:
            return
        self._policy_stamp = stamp
        try:
            self.policy = policy.load_policy(self.policy_path)
        except policy.PolicyError as exc:
            log.error("violations.policy_invalid", error=str(exc))  # noqa: TRY400 - no traceback
            return
        if self.book is not None:
            self.book.policy = self.policy
        log.info("violations.policy_reloaded", path=str(self.policy_path))

    async def _refresh_intervals_safely(self) -> None:
        try:
            await self._refresh_intervals()
        except Exception as exc:  # keep the last known intervals
            log.warning("violations.intervals_failed", error=str(exc))

    async def _refresh_intervals(self) -> None:
        """Each scheduled flow's interval (seconds between its next two fires)."""
        now = datetime.now(UTC)
        intervals: dict[str, dict[str, float]] = {}
        for definition in await self.flows.list():
            if definition.cron is None:
                continue
            schedule = CronSchedule(definition.cron, definition.timezone)
            first = schedule.next_after(now)
            second = schedule.next_after(first) if first else None
            if first and second:
                intervals.setdefault(definition.tenant, {})[definition.id] = (
                    second - first
                ).total_seconds()
        self.intervals = intervals


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()
