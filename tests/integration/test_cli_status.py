"""`flows trigger --wait` and `status tail`, as a user runs them against a running system:
the execution id up front, its events, the exit code of how it ended."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from orchestrator import topology
from orchestrator.accounts import Management
from orchestrator.config import Settings
from orchestrator.testing import process_env, wait_for_consumers
from tests.integration.helpers import (
    fresh_settings,
    reset_queues,
    status_bindings,
    wait_for_subscriber,
)
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
        # The scheduler declares acme's ingress, and consumes it.
        await wait_for_consumers(running.connection, topology.ingress_queue_name("acme"))
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
    # A step that outlasts the timeout many times over (acme's ingress exists already), and
    # short enough that the system's stop need not wait long for it.
    steps = [{"id": "a", "type": "demo.sleep", "input": {"ms": 3_000}, "timeout_s": 60}]
    await system.apply({"tenant": "acme", "id": "slow", "steps": steps})
    slow = await run(system.settings, "flows", "trigger", "acme/slow", "--wait", "--timeout", "0.5")
    assert slow.returncode == 124, (slow.stdout, slow.stderr)
    assert "did not end in 0.5 s" in slow.stderr


async def test_status_tail_prints_count_events_as_json_lines(
    system: System, management: Management
) -> None:
    pattern = "acme.ok.execution.*"
    before = status_bindings(management, system.settings, pattern)
    tail = asyncio.create_task(run(system.settings, "status", "tail", pattern, "--count", "2"))
    await wait_for_subscriber(management, system.settings, pattern, before)
    assert (await run(system.settings, "flows", "trigger", "acme/ok")).returncode == 0
    done = await asyncio.wait_for(tail, 60)
    assert done.returncode == 0, done.stderr
    kinds = [json.loads(line)["type"] for line in done.stdout.splitlines()]
    assert kinds == ["io.orchestrator.execution.started", "io.orchestrator.execution.succeeded"]


async def test_executions_list_show_and_cancel(system: System) -> None:
    await system.apply(
        {
            "tenant": "acme",
            "id": "slow",
            "steps": [
                {"id": "a", "type": "demo.sleep", "input": {"ms": 20_000}},
                {"id": "b", "type": "demo.echo", "depends_on": ["a"]},
            ],
        }
    )
    done = await run(system.settings, "flows", "trigger", "acme/ok", "--wait", "--timeout", "30")
    ok_id = done.stdout.splitlines()[0].split("execution ")[1].split()[0]
    started = await run(system.settings, "flows", "trigger", "acme/slow")
    slow_id = started.stdout.split("execution ")[1].split()[0]

    listed = await run(system.settings, "executions", "list", "--tenant", "acme", "--json")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)["items"]
    assert [i["execution_id"] for i in items][:2] == [slow_id, ok_id]  # newest first
    only_ok = await run(
        system.settings, "executions", "list", "--tenant", "acme", "--state", "succeeded", "--json"
    )
    assert {i["flow_id"] for i in json.loads(only_ok.stdout)["items"]} == {"ok"}

    shown = await run(system.settings, "executions", "show", slow_id, "--json")
    view = json.loads(shown.stdout)
    assert view["status"] == "running"
    assert view["steps"]["b"]["depends_on"] == ["a"]
    text = await run(system.settings, "executions", "show", ok_id, "--text")
    assert "succeeded" in text.stdout
    assert "demo.echo" in text.stdout

    cancelled = await run(system.settings, "executions", "cancel", slow_id, "--reason", "test")
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancelling" in cancelled.stdout  # step a is still sleeping
    late = await run(system.settings, "executions", "cancel", ok_id)
    assert late.returncode == 1
    assert "it is succeeded" in late.stderr

    missing = await run(system.settings, "executions", "show", "no-such-execution")
    assert missing.returncode == 1
    assert "no execution no-such-execution" in missing.stderr
    bad = await run(system.settings, "executions", "list", "--since", "yesterday")
    assert bad.returncode == 2
    assert "--since 'yesterday'" in bad.stderr
