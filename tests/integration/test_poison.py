"""Poison steps with real processes: a step that kills its worker every time it runs costs at
most POISON_CRASHES worker deaths per attempt, then fails with reason `poison` (long before the
step's deadline); a worker killed once mid-step is not poison, the step is redelivered and
succeeds.

The worker runs under a supervisor loop in the test that restarts it whenever it dies, as
systemd (Restart=always) or Kubernetes would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue

from orchestrator import store, topology
from orchestrator.accounts import Management
from orchestrator.config import Settings
from orchestrator.store.flows import FlowRegistry
from orchestrator.testing import spawn, stop_all, wait_until
from schemas import FlowDefinition
from tests.integration.helpers import (
    body,
    drain,
    fresh_settings,
    get_one,
    purged,
    request_execution,
    reset_queues,
)
from workers.runtime import POISON_CRASHES

pytestmark = pytest.mark.asyncio(loop_scope="session")

# The repository root, so that worker processes can import `tests.poison_steps` from whatever
# directory pytest runs in (and this checkout's code, not another one's).
ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "compensated")
# Generous for a loaded 2-core machine (each crash costs a worker restart, ~1-3 s), and far
# below the step deadline (120 s + the engine's grace) that a broken detection would wait for.
WAIT_S = 90.0
STEP_TIMEOUT_S = 120.0


def _execution_state(event: dict[str, Any]) -> str | None:
    prefix = "io.orchestrator.execution."
    return event["type"].removeprefix(prefix) if event["type"].startswith(prefix) else None


class Supervisor:
    """Keeps one worker process running: restarts it each time it dies, counts the deaths."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.exit_codes: list[int] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.current = self._spawn()
        self._task: asyncio.Task[None] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        process = spawn(
            self.settings,
            "worker",
            "--steps",
            "tests.poison_steps",
            "--concurrency",
            "2",
            PYTHONPATH=path,
        )
        self.processes.append(process)
        return process

    def __repr__(self) -> str:
        return f"Supervisor(exit_codes={self.exit_codes})"

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            code = self.current.poll()
            if code is not None:
                self.exit_codes.append(code)
                self.current = self._spawn()
            await asyncio.sleep(0.05)  # poll interval of the supervisor, which runs throughout

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        stop_all(self.processes)


async def _prepare(settings: Settings, channel: AbstractChannel, flow: dict[str, Any]) -> Any:
    await reset_queues(channel)
    await purged(channel, topology.express_queue_name(topology.DEFAULT_POOL))
    redis = store.connect(settings)
    definition = FlowDefinition.model_validate({"tenant": "acme", "overlap": "allow", **flow})
    await FlowRegistry(redis, store.Keys(settings.redis_prefix)).apply(
        [definition], datetime.now(UTC)
    )
    return redis


async def _cleanup(redis: Any, settings: Settings, channel: AbstractChannel) -> None:
    # A step left behind must not crash the workers of later tests.
    await reset_queues(channel)
    await purged(channel, topology.express_queue_name(topology.DEFAULT_POOL))
    async for key in redis.scan_iter(match=f"{settings.redis_prefix}*"):
        await redis.delete(key)
    await redis.aclose()


def _exit_codes(processes: dict[str, subprocess.Popen[bytes]]) -> dict[str, int | None]:
    return {name: process.poll() for name, process in processes.items()}


async def _ready(
    management: Management,
    vhost: str,
    processes: dict[str, subprocess.Popen[bytes]],
    workers: Supervisor,
) -> None:
    """Waits until the engine, the leading dispatcher and a worker consume their queues (no
    fixed sleep: a loaded machine may take a while to start three Python processes). Asks the
    management API: RabbitMQ 3.x reports no consumers of a quorum queue in declare-ok."""
    queues = (
        topology.EXECUTIONS_QUEUE,
        topology.RESULTS_QUEUE,
        topology.COMPLETIONS_QUEUE,
        topology.work_queue_name(topology.DEFAULT_POOL),
        topology.express_queue_name(topology.DEFAULT_POOL),
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        exited = {name: code for name, code in _exit_codes(processes).items() if code is not None}
        assert not exited, f"exited before the test began: {exited}"
        assert workers.exit_codes == [], f"the worker died before the test began: {workers}"
        counts = {}
        for name in queues:
            queue = await asyncio.to_thread(management.queue, vhost, name)
            consumers = queue.get("consumers")
            counts[name] = consumers if isinstance(consumers, int) else 0
        if all(counts.values()):
            return
        assert loop.time() < deadline, f"not consumed after {WAIT_S}s: {counts}"
        await asyncio.sleep(0.5)  # poll interval: not every queue is consumed yet


async def _until_terminal(
    feed: AbstractQueue,
    execution_id: str,
    wait_s: float,
    processes: dict[str, subprocess.Popen[bytes]],
) -> list[dict[str, Any]]:
    """The execution's status events up to its first terminal one, then whatever follows
    within a few seconds (a second terminal event would be among those)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    events: list[dict[str, Any]] = []
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(
                f"no terminal event within {wait_s}s; seen: {[e['type'] for e in events]}; "
                f"exit codes: {_exit_codes(processes)}"
            )
        try:
            event = body(await get_one(feed, wait_s=remaining))
        except TimeoutError:
            continue
        if event["subject"] != execution_id:
            continue
        events.append(event)
        if _execution_state(event) in TERMINAL:
            break
    events.extend(
        e
        for e in (body(m) for m in await drain(feed, settle_s=3.0))
        if e["subject"] == execution_id
    )
    return events


def _of(events: list[dict[str, Any]], suffix: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == f"io.orchestrator.{suffix}"]


async def test_step_that_kills_its_worker_fails_as_poison(
    settings: Settings,
    channel: AbstractChannel,
    management: Management,
    vhost: str,
    tmp_path: Path,
) -> None:
    test_settings = fresh_settings(settings)
    runs = tmp_path / "runs.log"
    flow = {
        "id": "poison",
        "steps": [
            {
                "id": "a",
                "type": "test.crash",
                "input": {"log": str(runs)},
                "timeout_s": STEP_TIMEOUT_S,
                "retry": {"max_attempts": 2, "initial_backoff_s": 0.2, "jitter": 0},
            }
        ],
    }
    redis = await _prepare(test_settings, channel, flow)
    feed = await channel.declare_queue(exclusive=True)
    await feed.bind(topology.STATUS, routing_key="acme.poison.#")
    processes = {
        "engine": spawn(test_settings, "engine"),
        "dispatcher": spawn(test_settings, "dispatcher"),
    }
    workers = Supervisor(test_settings)
    try:
        workers.start()
        await _ready(management, vhost, processes, workers)
        execution_id = await request_execution(channel, "poison")
        events = await _until_terminal(feed, execution_id, WAIT_S, processes)

        terminal = [e for e in events if _execution_state(e) in TERMINAL]
        assert [_execution_state(e) for e in terminal] == ["failed"], terminal
        failure = terminal[0]["data"]["failure"]
        assert failure["step_id"] == "a"
        assert failure["error"]["reason"] == "poison", failure
        assert failure["error"]["type"] == "PoisonStep"

        # Both attempts ran, each poisoned in turn (the first one retried, not final).
        dispatched = [e for e in _of(events, "step.dispatched") if e["data"]["kind"] == "action"]
        attempts = len(dispatched)
        assert [e["data"]["attempt"] for e in dispatched] == [1, 2]
        retrying = _of(events, "step.retrying")
        assert [e["data"]["error"]["reason"] for e in retrying] == ["poison"]

        # Every worker death was the step's doing, and no attempt cost more than the limit:
        # it was run POISON_CRASHES times (each a crash), then reported instead of run again.
        assert set(workers.exit_codes) <= {137}, workers.exit_codes
        crashes = len(workers.exit_codes)
        assert crashes <= POISON_CRASHES * attempts, (crashes, attempts)
        assert crashes == POISON_CRASHES * attempts, (crashes, attempts)
        # Per attempt, from the step's own log of every run it started (the pid, the task):
        ran = Counter(line.split()[1] for line in runs.read_text().splitlines())
        assert ran == {e["data"]["task_id"]: POISON_CRASHES for e in dispatched}, ran
        # The third delivery of each attempt was reported, not run: that worker lives on.
        assert workers.current.poll() is None
    finally:
        await workers.stop()
        stop_all(list(processes.values()))
        await _cleanup(redis, test_settings, channel)


async def test_one_crash_is_not_poison(
    settings: Settings,
    channel: AbstractChannel,
    management: Management,
    vhost: str,
    tmp_path: Path,
) -> None:
    test_settings = fresh_settings(settings)
    runs = tmp_path / "runs.log"
    flow = {
        "id": "once",
        "steps": [
            {
                "id": "a",
                "type": "test.sleep",
                "input": {"ms": 3000, "log": str(runs)},
                "timeout_s": STEP_TIMEOUT_S,
                # A single attempt: were one crash taken for poison, the execution would fail.
                "retry": {"max_attempts": 1},
            }
        ],
    }
    redis = await _prepare(test_settings, channel, flow)
    feed = await channel.declare_queue(exclusive=True)
    await feed.bind(topology.STATUS, routing_key="acme.once.#")
    processes = {
        "engine": spawn(test_settings, "engine"),
        "dispatcher": spawn(test_settings, "dispatcher"),
    }
    workers = Supervisor(test_settings)
    try:
        workers.start()
        await _ready(management, vhost, processes, workers)
        execution_id = await request_execution(channel, "once")
        # The step has started running in the first worker: kill that worker mid-step.
        await wait_until(
            lambda: runs.exists() and runs.read_text().strip(),
            timeout_s=WAIT_S,
            what="the step started",
        )
        victim = workers.current
        assert runs.read_text().split()[0] == str(victim.pid)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)

        events = await _until_terminal(feed, execution_id, WAIT_S, processes)
        terminal = [e for e in events if _execution_state(e) in TERMINAL]
        assert [_execution_state(e) for e in terminal] == ["succeeded"], terminal
        # The same attempt was redelivered and run to the end by the restarted worker.
        assert _of(events, "step.retrying") == []
        assert [e["data"]["attempt"] for e in _of(events, "step.started")] == [1]
        assert workers.exit_codes == [-signal.SIGKILL]
        ran = [line.split()[0] for line in runs.read_text().splitlines()]
        assert len(ran) == 2, ran
        assert ran[0] == str(victim.pid)
        assert ran[1] != ran[0]
        assert terminal[0]["data"]["outputs"]["a"]["pid"] == int(ran[1])
    finally:
        await workers.stop()
        stop_all(list(processes.values()))
        await _cleanup(redis, test_settings, channel)


async def test_a_step_that_shared_a_worker_with_a_poison_step_is_not_blamed(
    settings: Settings,
    channel: AbstractChannel,
    management: Management,
    vhost: str,
    tmp_path: Path,
) -> None:
    """beta's step runs when acme's poison step kills their shared worker, twice over. Each
    worker death redelivers both; only the step that killed a worker while running alone is
    poison. beta's single attempt must succeed."""
    test_settings = fresh_settings(settings)
    runs = tmp_path / "runs.log"
    crash = {
        "id": "poison",
        "steps": [
            {
                "id": "a",
                "type": "test.crash",
                "input": {"log": str(runs)},
                "timeout_s": STEP_TIMEOUT_S,
                "retry": {"max_attempts": 1},
            }
        ],
    }
    redis = await _prepare(test_settings, channel, crash)
    await reset_queues(channel, "beta")
    calm = FlowDefinition.model_validate(
        {
            "tenant": "beta",
            "id": "calm",
            "overlap": "allow",
            "steps": [
                {
                    "id": "a",
                    "type": "test.sleep",
                    "input": {"ms": 3000, "log": str(runs)},
                    "timeout_s": STEP_TIMEOUT_S,
                    "retry": {"max_attempts": 1},
                }
            ],
        }
    )
    await FlowRegistry(redis, store.Keys(test_settings.redis_prefix)).apply(
        [calm], datetime.now(UTC)
    )
    feed = await channel.declare_queue(exclusive=True)
    await feed.bind(topology.STATUS, routing_key="*.*.execution.*")
    processes = {
        "engine": spawn(test_settings, "engine"),
        "dispatcher": spawn(test_settings, "dispatcher"),
    }
    workers = Supervisor(test_settings)
    try:
        workers.start()
        await _ready(management, vhost, processes, workers)
        innocent = await request_execution(channel, "calm", tenant="beta")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        await wait_until(
            lambda: runs.exists() and runs.read_text().strip(),
            timeout_s=WAIT_S,
            what="beta's step started",
        )
        poison = await request_execution(channel, "poison")
        ended: dict[str, list[str]] = {}
        while not {innocent, poison} <= set(ended):
            assert loop.time() < deadline, f"not ended: {ended}, exits {workers.exit_codes}"
            try:
                event = body(await get_one(feed, wait_s=max(0.1, deadline - loop.time())))
            except TimeoutError:
                continue
            state = _execution_state(event)
            if state in TERMINAL:
                ended.setdefault(event["subject"], []).append(state)
                if state == "failed" and event["subject"] == poison:
                    assert event["data"]["failure"]["error"]["reason"] == "poison"
        for message in await drain(feed, settle_s=2.0):
            event = body(message)
            if _execution_state(event) in TERMINAL:
                ended.setdefault(event["subject"], []).append(str(_execution_state(event)))
        assert ended[innocent] == ["succeeded"], (ended, workers.exit_codes)
        assert ended[poison] == ["failed"], ended
        assert len(workers.exit_codes) <= POISON_CRASHES, workers.exit_codes
    finally:
        await workers.stop()
        stop_all(list(processes.values()))
        await reset_queues(channel, "beta")
        await _cleanup(redis, test_settings, channel)
