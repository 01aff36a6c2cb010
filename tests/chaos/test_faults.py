"""Steady load on two replicas of every process while faults come one after another: kill -9
of each process type in turn (a supervisor restarts it), then a restart of RabbitMQ, of
Redis (AOF) and of Kafka. Every flow start the client got confirmed must reach exactly one
terminal event (counted per execution), none may be stuck, no process may exit on its own,
and nothing may be left in any DLQ. Prints the recovery time of each fault.

`pytest tests/chaos --long` runs the soak: three rounds of faults under four times the load,
with a 120 s Kafka outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from redis import exceptions as redis_exceptions

from orchestrator import store, topology
from orchestrator.amqp import open_channel, publish
from orchestrator.config import Settings
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import (
    spawn,
    violations_env,
    wait_for_pipeline,
    wait_for_violations,
    wait_until,
)
from schemas import FlowDefinition, FlowStartRequested
from tests.integration.helpers import body, fresh_settings, reset_queues

pytestmark = pytest.mark.asyncio(loop_scope="session")

INFRA = Path(__file__).resolve().parents[2] / "scripts" / "infra"
TERMINAL = ("execution.succeeded", "execution.failed", "execution.compensated")
POLICY = {
    "window_s": 10,
    "default_plan": "p",
    "plans": {
        "p": {
            "limits": {"max_error_rate": 0.9, "min_steps_for_error_rate": 1000},
            "ladder": [{"action": "warn"}],
        }
    },
}


@dataclass
class Fleet:
    """Two replicas of each process type; a killed one is restarted at once, as systemd would.
    An exit we did not cause is recorded."""

    settings: Settings
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    killed: set[int] = field(default_factory=set)
    exits: list[tuple[str, int]] = field(default_factory=list)

    def start(self, name: str) -> None:
        kind, _, index = name.partition("-")
        args: list[str] = [kind]
        extra = dict(self.env)
        if kind == "worker":
            args += ["--concurrency", "4"]
        if kind == "violations":
            extra["ORCH_VIOLATIONS_INSTANCE_ID"] = f"{self.env['ORCH_VIOLATIONS_APP_ID']}-{index}"
            extra["ORCH_VIOLATIONS_DATA_DIR"] = f"{self.env['ORCH_VIOLATIONS_DATA_DIR']}/{index}"
        self.processes[name] = spawn(self.settings, *args, **extra)

    def kill(self, name: str) -> None:
        process = self.processes[name]
        self.killed.add(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        self.start(name)

    def check(self) -> None:
        for name, process in list(self.processes.items()):
            code = process.poll()
            if code is not None and process.pid not in self.killed:
                self.exits.append((name, code))
                self.start(name)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()


@dataclass
class Client:
    """A service starting flows: each request is retried until the broker confirms it, so
    every key in `confirmed` is one the system owes an execution."""

    connection: AbstractRobustConnection
    requested_at: dict[str, float] = field(default_factory=dict)
    confirmed: list[str] = field(default_factory=list)
    channel: AbstractChannel | None = None

    async def start_flow(self, key: str) -> None:
        self.requested_at[key] = time.monotonic()
        request = FlowStartRequested(tenant="acme", flow_id="chain", idempotency_key=key)
        while True:
            try:
                if self.channel is None or self.channel.is_closed:
                    self.channel = await open_channel(self.connection)
                await asyncio.wait_for(publish(self.channel, request), 10)
            except Exception:  # the broker is away: the client keeps trying
                self.channel = None
                # the wait is the behaviour under test: the client's pause between retries
                await asyncio.sleep(0.5)
            else:
                self.confirmed.append(key)
                return


@dataclass
class Feed:
    """Status events from a durable queue (they survive the RabbitMQ restart too)."""

    connection: AbstractRobustConnection
    name: str
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    channel: AbstractChannel | None = None
    copies: int = 0

    async def declare(self) -> None:
        channel = await self._channel()
        queue = await channel.declare_queue(
            self.name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(topology.STATUS, routing_key="acme.chain.#")

    async def _channel(self) -> AbstractChannel:
        if self.channel is None or self.channel.is_closed:
            self.channel = await self.connection.channel()
        return self.channel

    async def pump(self) -> None:
        try:
            queue = await (await self._channel()).get_queue(self.name, ensure=False)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                self.events.append((time.monotonic(), body(message)))
        except Exception:  # the broker is away: read on later
            self.channel = None

    def execution_of(self) -> dict[str, str]:
        """idempotency key -> execution id, from the accepted events."""
        return {
            e["data"]["idempotency_key"]: e["data"]["execution_id"]
            for _, e in self.events
            if e["type"] == "io.orchestrator.flow_start.accepted"
        }

    def terminals(self) -> dict[str, list[tuple[float, str]]]:
        """Terminal events per execution, every distinct event counted (a second terminal
        state shows as two). A redelivered copy of the same event (same CloudEvents id: the
        broker delivers at least once, subscribers deduplicate on the id) is not a second
        state; `copies` counts those."""
        ended: dict[str, list[tuple[float, str]]] = {}
        seen: set[str] = set()
        self.copies = 0
        for at, event in self.events:
            kind = event["type"].removeprefix("io.orchestrator.")
            if kind not in TERMINAL:
                continue
            if event["id"] in seen:
                self.copies += 1
                continue
            seen.add(event["id"])
            ended.setdefault(event["subject"], []).append((at, kind.split(".")[1]))
        return ended


def infra(action: str, broker: str) -> None:
    subprocess.run([str(INFRA), action, broker], check=True, capture_output=True, timeout=300)


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_every_execution_ends_once_through_kills_and_broker_restarts(
    settings: Settings,
    channel: AbstractChannel,
    amqp: AbstractRobustConnection,
    tmp_path: Path,
    long_run: bool,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    rounds, rate, kafka_down_s = (3, 16.0, 120.0) if long_run else (1, 4.0, 10.0)
    test_settings = fresh_settings(settings, usage_topic=f"test.usage.chaos.{suffix}")
    env = violations_env(tmp_path, POLICY, f"test-chaos-{suffix}")
    await reset_queues(channel)
    redis = store.connect(test_settings)
    flow = FlowDefinition.model_validate(
        {
            "tenant": "acme",
            "id": "chain",
            "overlap": "allow",
            "steps": [
                {"id": "a", "type": "demo.sleep", "input": {"ms": 100}},
                {"id": "b", "type": "demo.echo", "depends_on": ["a"]},
            ],
        }
    )
    await FlowRegistry(redis, store.Keys(test_settings.redis_prefix)).apply(
        [flow], datetime.now(UTC)
    )
    feed = Feed(amqp, f"test-chaos-feed-{suffix}")
    await feed.declare()
    fleet = Fleet(test_settings, env)
    kinds = ("scheduler", "engine", "dispatcher", "worker", "violations")
    for kind in kinds:
        for index in (1, 2):
            fleet.start(f"{kind}-{index}")
    client = Client(amqp)
    faults: list[tuple[str, float, float]] = []  # (fault, began, ended)
    stop_load = asyncio.Event()

    async def load() -> None:
        n = 0
        while not stop_load.is_set():
            n += 1
            await client.start_flow(f"chaos-{suffix}-{n}")
            # the wait is the behaviour under test: the load's rate
            await asyncio.sleep(1 / rate)

    async def watch() -> None:
        while True:
            fleet.check()
            await feed.pump()
            await asyncio.sleep(0.25)  # poll interval of the watcher, which runs throughout

    async def fault(name: str, action: Any, settle_s: float = 8.0) -> None:
        began = time.monotonic()
        await action()
        faults.append((name, began, time.monotonic()))
        # the wait is the behaviour under test: the system recovers under load for this long
        # before the next fault
        await asyncio.sleep(settle_s)
        print(f"[chaos] {name}: {progress()}", flush=True)

    def progress() -> str:
        executions = feed.execution_of()
        ended = feed.terminals()
        open_ = [k for k in client.confirmed if executions.get(k) not in ended]
        return (
            f"{len(client.confirmed)} confirmed, {len(executions)} accepted, "
            f"{len(ended)} ended, {len(open_)} open, {len(fleet.exits)} exits {fleet.exits[:3]}"
        )

    async def kill(name: str) -> None:
        fleet.kill(name)

    async def kill_leader() -> None:
        leader = await _retried(lambda: redis.get(f"{test_settings.redis_prefix}dispatcher:leader"))
        leader = leader or ""
        pid = int(leader.split(":")[1]) if leader.count(":") == 2 else -1
        names = [n for n, p in fleet.processes.items() if n.startswith("dispatcher")]
        name = next((n for n in names if fleet.processes[n].pid == pid), names[0])
        fleet.kill(name)

    def outage(broker: str, down_s: float) -> Any:
        async def action() -> None:
            await asyncio.to_thread(infra, "stop", broker)
            # the wait is the behaviour under test: the broker stays away this long
            await asyncio.sleep(down_s)
            await asyncio.to_thread(infra, "start", broker)

        return action

    watcher = asyncio.create_task(watch())
    loader = asyncio.create_task(load())
    try:
        # Everything connected, the first executions done.
        await wait_for_pipeline(test_settings, amqp, ("acme",))
        await wait_for_violations(test_settings)
        await wait_until(feed.terminals, timeout_s=60, what="the first executions done")
        for round_ in range(rounds):
            tag = f" (round {round_ + 1})" if rounds > 1 else ""
            for kind in ("scheduler", "engine", "worker"):
                await fault(f"kill -9 {kind}{tag}", lambda k=kind: kill(f"{k}-1"))
            await fault(f"kill -9 dispatcher leader{tag}", kill_leader)
            await fault(f"kill -9 violations{tag}", lambda: kill("violations-1"))
            await fault(f"restart rabbitmq{tag}", outage("rabbitmq", 5.0), settle_s=15.0)
            await fault(f"restart redis{tag}", outage("redis", 3.0), settle_s=10.0)
            await fault(f"restart kafka{tag}", outage("kafka", kafka_down_s), settle_s=10.0)
        stop_load.set()
        await loader
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            executions = feed.execution_of()
            ended = feed.terminals()
            if all(k in executions and executions[k] in ended for k in client.confirmed):
                break
            await asyncio.sleep(1.0)  # poll interval: executions still open
        print(f"[chaos] drained: {progress()}", flush=True)
        # the wait is the behaviour under test: a duplicate terminal event would arrive now,
        # and none must
        await asyncio.sleep(3.0)
        await feed.pump()
        exits = list(fleet.exits)
    finally:
        stop_load.set()
        loader.cancel()
        watcher.cancel()
        await asyncio.gather(loader, watcher, return_exceptions=True)
        fleet.stop()
        for broker in ("rabbitmq", "redis", "kafka"):  # whatever an error left stopped
            with contextlib.suppress(Exception):
                await asyncio.to_thread(infra, "start", broker)
        leftovers = await _dead_letters(amqp)
        with contextlib.suppress(Exception):
            cleanup = await amqp.channel()
            await cleanup.queue_delete(feed.name)

        async def forget() -> None:
            async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
                await redis.delete(key)

        await _retried(forget)
        await redis.aclose()

    executions = feed.execution_of()
    ended = feed.terminals()
    missing = [k for k in client.confirmed if k not in executions]
    stuck = [k for k in client.confirmed if k in executions and executions[k] not in ended]
    not_once = {
        executions[k]: [state for _, state in ended[executions[k]]]
        for k in client.confirmed
        if k in executions and executions[k] in ended and len(ended[executions[k]]) != 1
    }
    failed = [
        k
        for k in client.confirmed
        if k in executions and ended.get(executions[k], [(0, "")])[0][1] != "succeeded"
    ]
    print(f"\nchaos: {len(client.confirmed)} flow starts confirmed, {len(executions)} accepted")
    print(f"{'fault':<34} {'outage s':>9} {'recovered after s':>18}")
    for name, began, finished in faults:
        recovery = _recovery(began, finished, client, executions, ended)
        shown = f"{recovery:.1f}" if recovery is not None else "-"
        print(f"{name:<34} {finished - began:>9.1f} {shown:>18}")
    print(
        f"lost {len(missing)}, stuck {len(stuck)}, not exactly once {len(not_once)}, "
        f"not succeeded {len(failed)}, process exits {len(exits)}, in DLQs {leftovers}; "
        f"redelivered copies of terminal events {feed.copies}"
    )
    assert exits == [], f"processes exited on their own: {exits}"
    assert missing == [], f"{len(missing)} confirmed flow starts never accepted: {missing[:5]}"
    assert stuck == [], f"{len(stuck)} executions never ended: {stuck[:5]}"
    assert not_once == {}, f"executions without exactly one terminal event: {not_once}"
    assert failed == [], f"{len(failed)} executions did not succeed: {failed[:5]}"
    assert leftovers == {}, f"messages left in DLQs: {leftovers}"


async def _retried(action: Any) -> Any:
    """The test's own Redis calls: a pooled connection that died with the Redis restart fails
    once before the client reconnects."""
    for attempt in range(5):
        try:
            return await action()
        except (OSError, ConnectionError, TimeoutError, redis_exceptions.RedisError):
            if attempt == 4:
                raise
            await asyncio.sleep(1.0)  # retry pause: the client reconnects meanwhile
    return None


def _recovery(
    began: float,
    finished: float,
    client: Client,
    executions: dict[str, str],
    ended: dict[str, list[tuple[float, str]]],
) -> float | None:
    """Seconds from the fault until the first execution requested after it began ended after
    the fault was over (for a broker restart: once the broker was back)."""
    times = [
        ended[executions[key]][0][0]
        for key, at in client.requested_at.items()
        if at >= began and key in executions and executions[key] in ended
    ]
    times = [t for t in times if t >= finished]
    return min(times) - began if times else None


async def _dead_letters(amqp: AbstractRobustConnection) -> dict[str, list[str]]:
    """Reasons of whatever is in a DLQ of the topology (or acme's fair queue's DLQ)."""
    found: dict[str, list[str]] = {}
    channel = await amqp.channel()
    names = [q.name for q in topology.TOPOLOGY.queues if q.name.endswith(topology.DLQ_SUFFIX)]
    names.append(topology.tenant_queue_name("acme") + topology.DLQ_SUFFIX)
    for name in names:
        try:
            queue = await channel.get_queue(name, ensure=False)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                reason = (message.headers or {}).get("orch-reason", "<broker: delivery limit>")
                found.setdefault(name, []).append(str(reason))
        except aio_pika.exceptions.AMQPError as exc:
            found.setdefault(name, []).append(f"unreadable: {exc!r}")
            channel = await amqp.channel()
    return found
