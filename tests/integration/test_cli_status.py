"""`flows trigger --wait` and `status tail`, as a user runs them against a running system:
the execution id up front, its events, the exit code of how it ended."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from orchestrator.config import Settings
from tests.integration.helpers import fresh_settings, reset_queues
from tests.integration.processes import process_env
from tests.integration.system import System, running_system

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
async def system(settings: Settings, channel: object) -> AsyncIterator[System]:
    await reset_queues(channel)  # type: ignore[arg-type]
    async with running_system(fresh_settings(settings)) as running:
        await running.apply(
            {"tenant": "acme", "id": "ok", "steps": [{"id": "a", "type": "demo.echo"}]},
            {
                "tenant": "acme",
                "id": "broken",
                "steps": [
                    {
                        "id": "a",
                        "type": "demo.fail",
                        "input": {"times": 99},
                        "retry": {"max_attempts": 1},
                    }
                ],
            },
        )
        await asyncio.sleep(1.5)  # the scheduler declares acme's ingress
        yield running


def orchestrator(
    settings: Settings, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        env=process_env(settings),
        timeout=timeout,
        check=False,
    )


async def run(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(orchestrator, settings, *args)


async def test_trigger_wait_prints_the_events_and_exits_0_on_success(system: System) -> None:
    done = await run(system.settings, "flows", "trigger", "acme/ok", "--wait", "--timeout", "30")
    assert done.returncode == 0, (done.stdout, done.stderr)
    first, *events = done.stdout.splitlines()
    execution_id = first.split("execution ")[1].split()[0]
    kinds = [json.loads(e)["type"] for e in events]  # not a terminal: JSON lines
    assert kinds[0] == "io.orchestrator.flow_start.accepted"
    assert kinds[-1] == "io.orchestrator.execution.succeeded"
    assert all(json.loads(e).get("subject") in (execution_id, None) for e in events)


async def test_trigger_wait_exits_1_when_the_execution_fails(system: System) -> None:
    failed = await run(
        system.settings, "flows", "trigger", "acme/broken", "--wait", "--timeout", "30"
    )
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert json.loads(failed.stdout.splitlines()[-1])["type"] == "io.orchestrator.execution.failed"


async def test_trigger_wait_exits_1_when_the_request_is_refused(system: System) -> None:
    refused = await run(
        system.settings, "flows", "trigger", "acme/nope", "--wait", "--timeout", "30"
    )
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    last = json.loads(refused.stdout.splitlines()[-1])
    assert last["type"] == "io.orchestrator.flow_start.rejected"
    assert last["data"]["reason"] == "unknown_flow"


async def test_trigger_wait_exits_124_on_timeout(system: System) -> None:
    slow = await run(system.settings, "flows", "trigger", "acme/ok", "--wait", "--timeout", "0.1")
    assert slow.returncode == 124, (slow.stdout, slow.stderr)
    assert "did not end in 0.1 s" in slow.stderr


async def test_status_tail_prints_count_events_as_json_lines(system: System) -> None:
    tail = asyncio.create_task(
        run(system.settings, "status", "tail", "acme.ok.execution.*", "--count", "2")
    )
    await asyncio.sleep(2.0)  # tail is subscribed
    assert (await run(system.settings, "flows", "trigger", "acme/ok")).returncode == 0
    done = await asyncio.wait_for(tail, 60)
    assert done.returncode == 0, done.stderr
    kinds = [json.loads(line)["type"] for line in done.stdout.splitlines()]
    assert kinds == ["io.orchestrator.execution.started", "io.orchestrator.execution.succeeded"]
