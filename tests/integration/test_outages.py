"""Redis outages under real processes (through a TCP proxy that the test cuts): nothing exits,
ticks fire again once Redis answers, and work in flight ends exactly once afterwards."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from orchestrator import store, topology
from orchestrator.accounts import Management
from orchestrator.amqp import publish
from orchestrator.config import Settings
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import process_env, wait_for_pipeline, wait_until
from schemas import FlowDefinition, FlowStartRequested
from tests.faults import TcpProxy
from tests.integration.helpers import (
    body,
    drain,
    forget_redis,
    fresh_settings,
    purged,
    reset_queues,
    terminal_states,
    wait_for_connections,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

OUTAGE_S = 6.0


def _start(
    settings: Settings, redis_url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return _logged([*args], process_env(settings, ORCH_REDIS_URL=redis_url, **(env or {})))


LOGS: dict[int, Any] = {}


def _logged(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """stderr to a file, not a pipe: nobody reads a pipe while the test runs, and a process
    whose pipe is full blocks on its next log line (and then never stops)."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - read and closed by _log_of
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    LOGS[process.pid] = log
    return process


def _log_of(process: subprocess.Popen[bytes]) -> str:
    log = LOGS.pop(process.pid, None)
    if log is None:
        return ""
    log.seek(0)
    text = log.read().decode(errors="replace")
    log.close()
    return text


def _stop(processes: list[subprocess.Popen[bytes]]) -> list[tuple[int, str]]:
    """SIGTERM, then each one's exit code and the tail of its stderr."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    results = []
    for process in processes:
        try:
            code = process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        err = _log_of(process)
        results.append((code, err[-2000:]))
    return results


async def test_schedulers_ride_out_a_redis_outage(
    settings: Settings, channel: AbstractChannel, management: Management
) -> None:
    test_settings = fresh_settings(settings)
    executions = await purged(channel, topology.EXECUTIONS_QUEUE)
    redis = store.connect(test_settings)
    registry = FlowRegistry(redis, store.Keys(test_settings.redis_prefix))
    flows = [
        FlowDefinition.model_validate(
            {
                "tenant": "acme",
                "id": f"every-second-{i}",
                "cron": "* * * * * *",
                "overlap": "allow",
                "steps": [{"id": "a", "type": "demo.echo"}],
            }
        )
        for i in range(20)
    ]
    host = test_settings.redis_url.host or "127.0.0.1"
    received: list[Any] = []
    async with TcpProxy(host, test_settings.redis_url.port or 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        replicas = [_start(test_settings, url, "scheduler", "--no-ingress") for _ in range(2)]
        try:
            await wait_for_connections(management, test_settings, "orchestrator-scheduler", 2)
            await registry.apply(flows, datetime.now(UTC))
            received.extend(await drain(executions, settle_s=3.0))
            proxy.cut()
            # the wait is the behaviour under test: Redis stays away this long
            await asyncio.sleep(OUTAGE_S)
            proxy.restore()
            restored_at = datetime.now(UTC)
            # Every second from shortly after Redis answered again must fire, for every flow:
            # waited for (a loaded machine fires them late, not never), up to a generous bound.
            first = restored_at.replace(microsecond=0) + timedelta(seconds=3)
            seconds = [first + timedelta(seconds=offset) for offset in range(6)]
            expected = [
                f"{flow.tenant}/{flow.id}@{at:%Y-%m-%dT%H:%M:%S}.000Z"
                for flow in flows
                for at in seconds
            ]
            deadline = time.monotonic() + 40.0
            while time.monotonic() < deadline:
                received.extend(await drain(executions, settle_s=0.3))
                fired = {m.message_id for m in received}
                if all(fire_id in fired for fire_id in expected):
                    break
            alive = [replica.poll() is None for replica in replicas]
        finally:
            results = _stop(replicas)
            await forget_redis(redis, test_settings)
    received.extend(await drain(executions, settle_s=0.5))

    assert alive == [True, True], results
    assert [code for code, _ in results] == [0, 0], results
    fire_ids = Counter(m.message_id for m in received)
    missing = [fire_id for fire_id in expected if fire_id not in fire_ids]
    assert missing == [], f"{len(missing)} ticks never fired after the outage: {missing[:5]}"


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
async def test_executions_in_flight_through_a_redis_outage_end_exactly_once(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel, fault: str
) -> None:
    """`cut`: Redis goes down (connections reset). `blackhole`: Redis vanishes without a reset,
    so the calls in flight get no answer, ever; the processes must give up on those
    connections (their Redis timeout) and carry on with new ones."""
    test_settings = fresh_settings(settings)
    await reset_queues(channel)
    await topology.declare_ingress_queue(channel, "acme")
    await purged(channel, topology.ingress_queue_name("acme"))
    redis = store.connect(test_settings)
    flow = FlowDefinition.model_validate(
        {
            "tenant": "acme",
            "id": "chain",
            "overlap": "allow",
            "steps": [
                {"id": "a", "type": "demo.sleep", "input": {"ms": 200}},
                {"id": "b", "type": "demo.echo", "depends_on": ["a"]},
            ],
        }
    )
    await FlowRegistry(redis, store.Keys(test_settings.redis_prefix)).apply(
        [flow], datetime.now(UTC)
    )
    feed = await channel.declare_queue(exclusive=True)
    await feed.bind(topology.STATUS, routing_key="acme.chain.#")
    host = test_settings.redis_url.host or "127.0.0.1"
    keys = [f"outage-{i}-{uuid.uuid4().hex[:6]}" for i in range(40)]
    events: list[dict[str, Any]] = []
    async with TcpProxy(host, test_settings.redis_url.port or 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        timeout = {"ORCH_REDIS_TIMEOUT_S": "2"}
        processes = [
            _start(test_settings, url, "scheduler", env=timeout),
            _start(test_settings, url, "engine", env=timeout),
            _start(test_settings, url, "dispatcher", env=timeout),
            _start(test_settings, url, "worker", "--concurrency", "4", env=timeout),
        ]
        try:
            await wait_for_pipeline(test_settings, amqp, ("acme",))
            for i, key in enumerate(keys):
                await publish(
                    channel, FlowStartRequested(tenant="acme", flow_id="chain", idempotency_key=key)
                )
                if i == 15:
                    proxy.cut() if fault == "cut" else proxy.blackhole()
                if i == 30:
                    # the wait is the behaviour under test: Redis stays away this long
                    await asyncio.sleep(OUTAGE_S)
                    proxy.restore()
                # the wait is the behaviour under test: flow starts spread over the outage
                await asyncio.sleep(0.1)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                events.extend(body(m) for m in await drain(feed, settle_s=0.5))
                if len(terminal_states(events)) >= len(keys):
                    break
            events.extend(body(m) for m in await drain(feed, settle_s=2.0))
            alive = [process.poll() is None for process in processes]
        finally:
            results = _stop(processes)
            await forget_redis(redis, test_settings)

    assert alive == [True] * 4, results
    accepted = {
        e["data"]["execution_id"]
        for e in events
        if e["type"] == "io.orchestrator.flow_start.accepted"
    }
    assert len(accepted) == len(keys)
    terminals = terminal_states(events)
    assert set(terminals) == accepted, f"stuck: {accepted - set(terminals)}"
    wrong = {
        execution: states for execution, states in terminals.items() if states != ["succeeded"]
    }
    history = {
        execution: [(e["type"], e.get("data")) for e in events if e.get("subject") == execution]
        for execution in wrong
    }
    assert wrong == {}, (history, [err[-3000:] for _, err in results])


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    except httpx.HTTPError:  # not listening (yet, or any more)
        return 0, {}
    return response.status_code, response.json()


async def _until_ready_is(port: int, status: int, wait_s: float = 30) -> dict[str, Any]:
    async def answered() -> tuple[dict[str, Any]] | None:
        code, answer = await asyncio.to_thread(_readyz, port)
        return (answer,) if code == status else None

    (answer,) = await wait_until(
        answered, timeout_s=wait_s, every_s=0.3, what=f"/readyz answering {status}"
    )
    return answer


async def test_not_ready_during_an_outage_and_exit_69_past_the_limit(
    settings: Settings, unused_tcp_port_factory: Any
) -> None:
    test_settings = fresh_settings(settings)
    host = test_settings.redis_url.host or "127.0.0.1"
    async with TcpProxy(host, test_settings.redis_url.port or 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        port = unused_tcp_port_factory()
        engine = _logged(
            ["engine"],
            process_env(
                test_settings,
                ORCH_REDIS_URL=url,
                ORCH_METRICS_PORT=str(port),
                ORCH_OUTAGE_LIMIT_S="6",
            ),
        )
        try:
            await _until_ready_is(port, 200)
            proxy.cut()  # a short outage: not ready, then ready again, still running
            answer = await _until_ready_is(port, 503)
            assert "redis" in answer["failing"]
            # the wait is the behaviour under test: a short outage (well under the limit)
            await asyncio.sleep(1.0)
            proxy.restore()
            await _until_ready_is(port, 200)
            assert engine.poll() is None
            proxy.cut()  # longer than the limit: it gives up, and says why
            code = await asyncio.to_thread(engine.wait, 60)
        finally:
            if engine.poll() is None:
                engine.kill()
            err = _log_of(engine)
    assert code == 69, err[-2000:]
    assert "process.outage_limit" in err


async def test_a_scheduler_started_during_a_redis_outage_waits_then_takes_flow_starts(
    settings: Settings, channel: AbstractChannel
) -> None:
    """Its first look at the registered tenants (to consume their ingress) fails: the
    process stays up and consumes them once Redis answers."""
    test_settings = fresh_settings(settings)
    await reset_queues(channel)
    redis = store.connect(test_settings)
    flow = FlowDefinition.model_validate(
        {
            "tenant": "acme",
            "id": "late",
            "overlap": "allow",
            "steps": [{"id": "a", "type": "demo.echo"}],
        }
    )
    await FlowRegistry(redis, store.Keys(test_settings.redis_prefix)).apply(
        [flow], datetime.now(UTC)
    )
    feed = await channel.declare_queue(exclusive=True)
    await feed.bind(topology.STATUS, routing_key="acme.late.flow_start.accepted")
    host = test_settings.redis_url.host or "127.0.0.1"
    async with TcpProxy(host, test_settings.redis_url.port or 6379) as proxy:
        proxy.cut()
        scheduler = _start(test_settings, f"redis://127.0.0.1:{proxy.port}/0", "scheduler")
        try:
            # the wait is the behaviour under test: the scheduler must stay up through 4 s of
            # an outage that began before it started
            await asyncio.sleep(4.0)
            alive = scheduler.poll() is None
            proxy.restore()
            request = FlowStartRequested(tenant="acme", flow_id="late", idempotency_key="k1")
            await publish(channel, request)  # ingress.acme exists (reset_queues declared it)
            accepted = await drain(feed, settle_s=0.0)
            deadline = time.monotonic() + 30
            while not accepted and time.monotonic() < deadline:
                accepted = await drain(feed, settle_s=0.5)
        finally:
            results = _stop([scheduler])
            await forget_redis(redis, test_settings)
    assert alive, results
    assert [body(m)["data"]["idempotency_key"] for m in accepted] == ["k1"], results
