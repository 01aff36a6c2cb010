"""The non-Python client (examples/node-client, Node + amqplib + ajv), written from
schemas/asyncapi.yaml alone, against a running system with a provisioned tenant account:
it starts a flow, validates every status event against the document's schemas, and ends
with the execution's outcome; a refusal ends it with exit 1 and the reason."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aio_pika.abc import AbstractChannel

from orchestrator import topology
from orchestrator.accounts import Account, Management, Provisioner, vhost_of
from orchestrator.config import Settings
from orchestrator.testing import wait_for_consumers
from tests.conftest import IN_CI
from tests.integration.helpers import fresh_settings, reset_queues
from tests.integration.system import System, running_system

pytestmark = pytest.mark.asyncio(loop_scope="session")

EXAMPLE = Path(__file__).parents[2] / "examples" / "node-client"
SCRIPT = EXAMPLE / "start-and-follow.mjs"


def _node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if IN_CI:
            pytest.fail(
                "node and npm are needed (CI=true makes this an error): .ci/run installs them"
            )
        pytest.skip("node or npm missing")
    if not (EXAMPLE / "node_modules").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, check=True, capture_output=True
        )
    return node


@pytest.fixture
async def tenant(
    settings: Settings, channel: AbstractChannel
) -> AsyncIterator[tuple[System, Account]]:
    node = _node()
    assert node
    management = Management(settings.rabbitmq_management_url)
    provisioner = Provisioner(
        management, vhost_of(str(settings.rabbitmq_url)), settings.account_prefix
    )
    provisioner.revoke_tenant("nodejs")
    account = provisioner.tenant("nodejs")
    await reset_queues(channel, "nodejs")
    async with running_system(fresh_settings(settings, require_auth=True)) as system:
        await system.apply(
            {
                "tenant": "nodejs",
                "id": "chain",
                "overlap": "allow",
                "steps": [
                    {"id": "a", "type": "demo.echo"},
                    {"id": "b", "type": "demo.echo", "depends_on": ["a"]},
                ],
            },
            {
                "tenant": "nodejs",
                "id": "broken",
                "steps": [
                    {
                        "id": "a",
                        "type": "demo.fail",
                        "input": {"times": 99},
                        "retry": {"max_attempts": 2, "initial_backoff_s": 0.1},
                    }
                ],
            },
        )
        # The scheduler declares the tenant's ingress, and consumes it.
        await wait_for_consumers(system.connection, topology.ingress_queue_name("nodejs"))
        yield system, account
    provisioner.revoke_tenant("nodejs")
    management.close()


async def run_example(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    node = _node()
    return await asyncio.to_thread(
        subprocess.run,
        [node, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={"AMQP_URL": url, "TIMEOUT_S": "60", "PATH": "/usr/bin:/bin"},
        timeout=90,
        check=False,
    )


async def test_node_client_starts_a_flow_and_follows_it_to_success(
    tenant: tuple[System, Account],
) -> None:
    system, account = tenant
    url = account.amqp_url(str(system.settings.rabbitmq_url))
    done = await run_example(url, "nodejs", "chain", '{"x": 1}')
    assert done.returncode == 0, (done.stdout, done.stderr)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    kinds = [e["type"].removeprefix("io.orchestrator.") for e in events]
    assert kinds[0] == "flow_start.accepted"
    assert kinds[-1] == "execution.succeeded"
    assert kinds.count("step.succeeded") == 2
    execution_id = events[0]["data"]["execution_id"]
    assert {e.get("subject") for e in events[1:]} == {execution_id}
    sequences = [int(e["sequence"]) for e in events[1:]]
    assert sequences == sorted(sequences)


async def test_node_client_reports_failure_and_refusal(tenant: tuple[System, Account]) -> None:
    system, account = tenant
    url = account.amqp_url(str(system.settings.rabbitmq_url))
    failed = await run_example(url, "nodejs", "broken")
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    last = json.loads(failed.stdout.splitlines()[-1])
    assert last["type"] == "io.orchestrator.execution.failed"
    refused = await run_example(url, "nodejs", "no-such-flow")
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert "refused: unknown_flow" in refused.stderr


async def test_the_asyncapi_document_passes_the_asyncapi_parser() -> None:
    """The AsyncAPI project's own parser (spec schema and rules) finds no error."""
    node = _node()
    checked = await asyncio.to_thread(
        subprocess.run,
        [node, str(EXAMPLE / "validate-asyncapi.mjs")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "valid AsyncAPI 3" in checked.stdout
