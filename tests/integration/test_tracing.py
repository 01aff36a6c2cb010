"""One trace per execution: from the client's flow-start request through the scheduler, the
engine's transitions, the dispatcher's release and the worker's steps, every span shares the
trace id the request started (W3C traceparent in the AMQP headers)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from aio_pika.abc import AbstractChannel
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator import topology, tracing
from orchestrator.client import OrchestratorClient
from orchestrator.config import Settings
from orchestrator.testing import wait_for_consumers, wait_until
from tests.integration.helpers import fresh_settings, reset_queues
from tests.integration.system import running_system

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHAIN = {
    "tenant": "acme",
    "id": "traced",
    "overlap": "allow",
    "steps": [
        {"id": "a", "type": "demo.echo"},
        {"id": "b", "type": "demo.sleep", "depends_on": ["a"], "input": {"ms": 50}},
        {"id": "c", "type": "demo.echo", "depends_on": ["b"]},
    ],
}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure("tests", exporter)
    yield exporter
    tracing.configure("tests", "none")


async def test_one_executions_spans_share_one_trace_id(
    settings: Settings, channel: AbstractChannel, spans: InMemorySpanExporter
) -> None:
    test_settings = fresh_settings(settings)
    await reset_queues(channel, "acme")
    async with running_system(test_settings) as system:
        await system.apply(CHAIN)
        await wait_for_consumers(system.connection, topology.ingress_queue_name("acme"))
        async with OrchestratorClient(str(test_settings.rabbitmq_url)) as client:
            with tracing.span("test.request") as _:
                root = tracing.current_traceparent()
                execution_id = await client.start_flow("acme", "traced")
            outcome = await client.wait_for(execution_id, timeout=30, tenant="acme")
        assert outcome.type == "io.orchestrator.execution.succeeded"

        def ours() -> Counter[str]:
            trace_id = int(root.split("-")[1], 16)
            return Counter(
                s.name
                for s in spans.get_finished_spans()
                if s.context is not None and s.context.trace_id == trace_id
            )

        # The last transition's span ends after its publishes: until every span below ended.
        expected = {
            "ingress.acme process": 1,
            "engine.executions process": 1,
            "engine.results process": 3,
            "dispatcher.release": 3,
            "step demo.echo": 2,
            "step demo.sleep": 1,
            "engine.transition": 4,
        }
        await wait_until(
            lambda: all(ours()[name] >= count for name, count in expected.items()),
            what="every span of the execution ended",
        )

    trace_id = int(root.split("-")[1], 16)
    finished = spans.get_finished_spans()
    ours = [s for s in finished if s.context is not None and s.context.trace_id == trace_id]
    names = Counter(s.name for s in ours)
    # Every hop, in the one trace: admission, the engine's start and each step's result, the
    # dispatcher's release and the worker's run of each step.
    assert names["ingress.acme process"] == 1, names
    assert names["engine.executions process"] == 1, names
    assert names["engine.results process"] == 3, names
    assert names["dispatcher.release"] == 3, names
    assert names["step demo.echo"] == 2, names
    assert names["step demo.sleep"] == 1, names
    assert names["engine.transition"] >= 4, names  # the start, and a transition per result
    # Nothing of this execution went into another trace.
    strays = [
        s.name
        for s in finished
        if s.attributes
        and s.attributes.get("orchestrator.execution") == execution_id
        and s.context is not None
        and s.context.trace_id != trace_id
    ]
    assert strays == []
