"""Every contract round-trips through JSON and refuses bad input with a message naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import MESSAGES, FlowDefinition, StatusEvent, StepResult, message_model
from schemas.common import MAX_PAYLOAD_BYTES, SLUG_PATTERN
from schemas.flows import topological_order
from tests.factories import flow, flow_document, sample


@pytest.mark.parametrize("message_type", sorted(MESSAGES))
def test_every_message_round_trips_through_json(message_type: str) -> None:
    message = sample(message_type)
    decoded = message_model(message_type).from_bytes(message.to_bytes())
    assert decoded == message
    assert decoded.message_id() == message.message_id()


@pytest.mark.parametrize("message_type", sorted(MESSAGES))
def test_every_message_refuses_unknown_fields(message_type: str) -> None:
    body = json.loads(sample(message_type).to_bytes())
    body["surprise"] = 1
    with pytest.raises(ValidationError) as info:
        message_model(message_type).model_validate(body)
    assert info.value.errors()[0]["loc"] == ("surprise",)
    assert info.value.errors()[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize("message_type", sorted(MESSAGES))
def test_every_message_carries_a_schema_version(message_type: str) -> None:
    body = json.loads(sample(message_type).to_bytes())
    assert body.get("schema_version", body.get("schemaversion")) == 1


def test_flow_definition_round_trips() -> None:
    definition = flow()
    assert FlowDefinition.model_validate_json(definition.model_dump_json()) == definition


def _error_locations(document: dict[str, Any]) -> list[tuple[str | int, ...]]:
    with pytest.raises(ValidationError) as info:
        FlowDefinition.model_validate(document)
    return [tuple(error["loc"]) for error in info.value.errors()]


def _messages(document: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        FlowDefinition.model_validate(document)
    return str(info.value)


def test_unknown_field_is_named() -> None:
    assert _error_locations(flow_document(owner="bob")) == [("owner",)]


def test_wrong_type_is_named() -> None:
    assert _error_locations(flow_document(max_parallel="many")) == [("max_parallel",)]


def test_oversize_input_is_named() -> None:
    chunks = MAX_PAYLOAD_BYTES // 1000 + 1
    big = {f"k{i}": "x" * 1000 for i in range(chunks)}
    assert _error_locations(flow_document(input=big)) == [("input",)]
    assert "limit is" in _messages(flow_document(input=big))
    one_huge_string = {"blob": "x" * (MAX_PAYLOAD_BYTES + 1)}
    assert _error_locations(flow_document(input=one_huge_string))[0][0] == "input"


def test_bad_cron_is_named() -> None:
    assert _error_locations(flow_document(cron="61 * * * *")) == [("cron",)]
    assert _error_locations(flow_document(cron="* * *")) == [("cron",)]
    assert "expected 5 or 6" in _messages(flow_document(cron="* * *"))


def test_bad_timezone_is_named() -> None:
    assert _error_locations(flow_document(timezone="Mars/Olympus")) == [("timezone",)]
    assert "IANA" in _messages(flow_document(timezone="Mars/Olympus"))


def test_cyclic_dag_is_named_with_the_cycle() -> None:
    steps = [
        {"id": "a", "type": "demo.echo", "depends_on": ["c"]},
        {"id": "b", "type": "demo.echo", "depends_on": ["a"]},
        {"id": "c", "type": "demo.echo", "depends_on": ["b"]},
    ]
    assert _error_locations(flow_document(steps=steps)) == [("steps",)]
    assert "cycle" in _messages(flow_document(steps=steps))


def test_unknown_dependency_and_duplicate_steps_are_refused() -> None:
    assert "unknown step" in _messages(
        flow_document(steps=[{"id": "a", "type": "demo.echo", "depends_on": ["zz"]}])
    )
    duplicate = [{"id": "a", "type": "demo.echo"}, {"id": "a", "type": "demo.sleep"}]
    assert "unique" in _messages(flow_document(steps=duplicate))


@pytest.mark.parametrize("field", ["tenant", "id"])
def test_dotted_ids_are_refused(field: str) -> None:
    assert _error_locations(flow_document(**{field: "acme.eu"})) == [(field,)]


def test_dotted_step_id_is_refused() -> None:
    steps = [{"id": "a.b", "type": "demo.echo"}]
    assert _error_locations(flow_document(steps=steps)) == [("steps", 0, "id")]


def test_wildcards_and_upper_case_are_not_slugs() -> None:
    for bad in ("*", "#", "Acme", "-acme", "acme-", "", "a" * 65, "_"):
        assert _error_locations(flow_document(tenant=bad)) == [("tenant",)], bad


@given(st.from_regex(SLUG_PATTERN, fullmatch=True))
def test_every_slug_is_one_routing_key_word(slug: str) -> None:
    assert not set(slug) & {".", "*", "#"}
    assert not slug.startswith("_")


def test_topological_order_puts_dependencies_first() -> None:
    definition = flow()
    order = topological_order(definition.steps)
    for step in definition.steps:
        for dependency in step.depends_on:
            assert order.index(dependency) < order.index(step.id)


def test_failed_result_needs_an_error() -> None:
    body = json.loads(sample(StepResult.message_type).to_bytes())
    body["outcome"] = "failed"
    with pytest.raises(ValidationError, match="must carry an error"):
        StepResult.model_validate(body)


def test_status_event_is_a_valid_cloudevent_with_routing_key() -> None:
    event = sample(StatusEvent.message_type)
    assert isinstance(event, StatusEvent)
    parsed = JSONFormat().read(CloudEvent, event.to_bytes())
    assert parsed.get_type() == "io.orchestrator.execution.succeeded"
    assert parsed.get_source() == "/tenants/acme/flows/daily-sync"
    assert parsed.get_extension("sequence") == "000000000007"
    assert event.routing_key == "acme.daily-sync.execution.succeeded"


def test_status_event_refuses_unknown_types() -> None:
    with pytest.raises(ValidationError, match="unknown status type"):
        StatusEvent.build("execution", "exploded", event_id="x")


def test_tenant_wide_status_uses_placeholder_words() -> None:
    event = StatusEvent.build(
        "tenant",
        "released",
        event_id="p1",
        tenant="acme",
        data={"released": "penalty", "command_id": "c1"},
    )
    assert event.routing_key == "acme._.tenant.released"
    assert event.source == "/tenants/acme"
