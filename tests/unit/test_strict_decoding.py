"""`orchestrator.amqp.decode` accepts exactly what the published JSON Schemas accept: no
coercion ("1" for an int, a Unix number for a date-time), no NaN or Infinity anywhere, no body
over 1 MiB, no message whose properties the frame reader could not decode. And the rejection
path (status event, safe text) cannot fail, whatever the message's properties hold."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import amqp
from orchestrator.amqp import InvalidMessage, decode
from schemas import MESSAGES, Message, StatusEvent
from tests.factories import sample

MAX_BODY_BYTES = 1024 * 1024
MESSAGE_ID = re.compile(r"[\x21-\x7e]{1,256}")
PRINTABLE_ASCII = set(string.printable) - set("\t\n\r\x0b\x0c")


@dataclass
class Incoming:
    """What decode and the rejection path read of an aio-pika IncomingMessage."""

    body: bytes
    content_type: str | None = "application/json"
    type: str | None = None
    headers: dict[str, Any] | None = None
    message_id: str | None = "m-1"
    user_id: str | None = None


def document(message_type: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(sample(message_type).to_bytes())
    return loaded


def incoming(message_type: str, body: bytes, **properties: Any) -> Incoming:
    return Incoming(body=body, type=message_type, **properties)


def refused(message_type: str, body: bytes, **properties: Any) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        decode(incoming(message_type, body, **properties), MESSAGES[message_type])  # type: ignore[arg-type]
    return info.value


def mutated(message_type: str, change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = document(message_type)
    change(doc)
    return json.dumps(doc).encode()  # Python's json writes NaN / Infinity, as a publisher might


def unix(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


@pytest.mark.parametrize("message_type", sorted(MESSAGES))
def test_the_samples_decode(message_type: str) -> None:
    """The baseline: every case below differs from a message that decodes by one field."""
    message = sample(message_type)
    decoded = decode(incoming(message_type, message.to_bytes()), MESSAGES[message_type])  # type: ignore[arg-type]
    assert decoded == message


# ---------------------------------------------------------------------------- no coercion
INT_FIELDS = [
    ("step.task", "attempt"),
    ("step.result", "attempt"),
    ("usage", "attempt"),
    ("usage", "bytes_in"),
    ("control.penalty", "concurrency_cap"),
]


@pytest.mark.parametrize(("message_type", "field"), INT_FIELDS)
def test_an_int_sent_as_a_string_is_refused(message_type: str, field: str) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc[field] = str(doc[field] if doc[field] is not None else 3)

    error = refused(message_type, mutated(message_type, change))
    assert error.reason == "schema_violation"
    assert field in error.detail


def test_a_bool_sent_as_a_string_is_refused() -> None:
    def change(doc: dict[str, Any]) -> None:
        doc.update(outcome="failed", output=None, error={"type": "E", "retryable": "true"})

    error = refused("step.result", mutated("step.result", change))
    assert error.reason == "schema_violation"
    assert "error.retryable" in error.detail


DATE_TIME_FIELDS = [
    ("flow.start.requested", "requested_at"),
    ("execution.requested", "nominal_time"),
    ("execution.requested", "requested_at"),
    ("step.task", "deadline"),
    ("step.task", "enqueued_at"),
    ("step.result", "started_at"),
    ("step.result", "finished_at"),
    ("usage", "started_at"),
    ("status", "time"),
    ("control.penalty", "issued_at"),
    ("control.quarantine", "expires_at"),
    ("control.release", "issued_at"),
]


@pytest.mark.parametrize("as_float", [False, True], ids=["int", "float"])
@pytest.mark.parametrize(("message_type", "field"), DATE_TIME_FIELDS)
def test_a_date_time_sent_as_a_unix_number_is_refused(
    message_type: str, field: str, as_float: bool
) -> None:
    """The same instant as a number: only the number's type is wrong."""

    def change(doc: dict[str, Any]) -> None:
        seconds = unix(doc[field])
        doc[field] = seconds if as_float else int(seconds)

    error = refused(message_type, mutated(message_type, change))
    assert error.reason == "schema_violation"
    assert field in error.detail


@pytest.mark.parametrize(
    "text",
    [
        "1774748000",
        "2026-03-29",
        "2026-03-29T01:30Z",
        "2026-03-29 01:30:00Z",
        "2026-13-01T00:00:00Z",
    ],
)
@pytest.mark.parametrize(("message_type", "field"), DATE_TIME_FIELDS)
def test_a_date_time_that_is_not_rfc3339_is_refused(
    message_type: str, field: str, text: str
) -> None:
    """Text pydantic alone would read as a date-time (a Unix time in a string, no seconds)."""

    def change(doc: dict[str, Any]) -> None:
        doc[field] = text

    error = refused(message_type, mutated(message_type, change))
    assert error.reason == "schema_violation"
    assert field in error.detail


# ---------------------------------------------------------------------------- no NaN / Infinity
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
NON_FINITE_IDS = ["NaN", "Infinity", "-Infinity"]

FLOAT_FIELDS = [
    ("step.task", "timeout_s"),
    ("step.task", "cost_estimate"),
    ("step.result", "cpu_s"),
    ("usage", "wall_s"),
    ("usage", "cpu_s"),
    ("control.penalty", "weight_factor"),
    ("control.penalty", "rate_per_s"),
]


@pytest.mark.parametrize("value", NON_FINITE, ids=NON_FINITE_IDS)
@pytest.mark.parametrize(("message_type", "field"), FLOAT_FIELDS)
def test_non_finite_floats_are_refused(message_type: str, field: str, value: float) -> None:
    error = refused(message_type, mutated(message_type, lambda doc: doc.update({field: value})))
    assert error.reason == "schema_violation"
    assert field in error.detail


PAYLOAD_FIELDS = [
    ("flow.start.requested", "input"),
    ("execution.requested", "input"),
    ("step.task", "input"),
    ("step.result", "output"),
    ("status", "data"),
]
PLACES: dict[str, Callable[[float], dict[str, Any]]] = {
    "top": lambda v: {"x": v},
    "list": lambda v: {"ok": 1, "xs": [1.5, v]},
    "nested": lambda v: {"a": {"b": [{"c": v}]}},
}


@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("value", NON_FINITE, ids=NON_FINITE_IDS)
@pytest.mark.parametrize(("message_type", "field"), PAYLOAD_FIELDS)
def test_non_finite_numbers_in_payloads_are_refused(
    message_type: str, field: str, value: float, place: str
) -> None:
    body = mutated(message_type, lambda doc: doc.update({field: PLACES[place](value)}))
    error = refused(message_type, body)
    assert error.reason == "schema_violation"
    assert field in error.detail


# ---------------------------------------------------------------------------- size, properties
def padded(message: Message, size: int) -> bytes:
    """A valid message, made `size` bytes long with insignificant whitespace."""
    body = message.to_bytes()
    return body[:-1] + b" " * (size - len(body)) + body[-1:]


@pytest.mark.parametrize("message_type", sorted(MESSAGES))
def test_a_body_over_one_mib_is_too_large(message_type: str) -> None:
    body = padded(sample(message_type), MAX_BODY_BYTES + 1)
    assert json.loads(body)  # valid JSON, a valid message: refused for its size alone
    error = refused(message_type, body)
    assert error.reason == "too_large"


@pytest.mark.parametrize("message_type", ["step.task", "status"])
def test_a_body_of_exactly_one_mib_is_decoded(message_type: str) -> None:
    message = sample(message_type)
    body = padded(message, MAX_BODY_BYTES)
    decoded = decode(incoming(message_type, body), MESSAGES[message_type])  # type: ignore[arg-type]
    assert decoded == message


@pytest.mark.parametrize("message_type", sorted(MESSAGES))
def test_properties_the_frame_reader_could_not_decode_are_refused(message_type: str) -> None:
    body = sample(message_type).to_bytes()
    headers = {"orch-bad-properties": "message_id,timestamp"}
    error = refused(message_type, body, headers=headers, message_id=None)
    assert error.reason == "bad_properties"
    assert "message_id" in error.detail


@pytest.mark.parametrize("message_type", sorted(MESSAGES))
def test_malformed_json_is_malformed(message_type: str) -> None:
    body = sample(message_type).to_bytes()[:-1]
    assert refused(message_type, body).reason == "malformed_json"


# ---------------------------------------------------------------------------- safe text
def printable_ascii(text: str) -> bool:
    return all(char in PRINTABLE_ASCII for char in text)


ANY_VALUE = st.one_of(
    st.none(),
    st.text(),
    st.binary(),
    st.integers(),
    st.floats(),
    st.lists(st.text(), max_size=5),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=5),
)


@given(value=ANY_VALUE, limit=st.integers(min_value=1, max_value=400))
def test_safe_text_is_bounded_printable_ascii(value: object, limit: int) -> None:
    text = amqp.safe_text(value, limit)
    assert isinstance(text, str)
    assert len(text) <= limit
    assert printable_ascii(text), text


@given(content_type=st.text().filter(lambda t: t != "application/json"))
def test_a_bad_content_type_is_reported_in_printable_ascii(content_type: str) -> None:
    error = refused("step.task", sample("step.task").to_bytes(), content_type=content_type)
    assert error.reason == "bad_content_type"
    assert printable_ascii(error.detail), error.detail


@given(message_type=st.text().filter(lambda t: t not in MESSAGES))
def test_a_wrong_message_type_is_reported_in_printable_ascii(message_type: str) -> None:
    message = Incoming(body=sample("step.task").to_bytes(), type=message_type)
    with pytest.raises(InvalidMessage) as info:
        decode(message, MESSAGES["step.task"])  # type: ignore[arg-type]
    assert info.value.reason == "wrong_message_type"
    assert printable_ascii(info.value.detail), info.value.detail


@given(key=st.text(min_size=1).filter(lambda k: k not in document("step.task")))
def test_a_schema_violation_is_reported_in_printable_ascii(key: str) -> None:
    """The error names the unknown field, whatever characters the field's name has."""
    error = refused("step.task", mutated("step.task", lambda doc: doc.update({key: 1})))
    assert error.reason == "schema_violation"
    assert printable_ascii(error.detail), error.detail
    assert len(error.detail) <= amqp.MAX_DETAIL_CHARS


# ---------------------------------------------------------------------------- rejection events
ANY_ID = st.one_of(
    st.none(),
    st.text(),
    st.text(min_size=300, max_size=300),
    st.from_regex(r"[\x21-\x7e]{1,256}", fullmatch=True),
    st.sampled_from(["", " ", "has space", "ünïcödé", "tab\there", "x" * 300, "fq.acme"]),
)
ANY_QUEUE = st.one_of(
    st.text(max_size=255),
    st.text(max_size=200).map(lambda s: "fq." + s),
    st.sampled_from(["fq.acme", "fq.", "fq.Acme", "fq.a.b", "engine.results", "fq.ü"]),
)
ANY_TENANT = st.one_of(st.none(), st.text(max_size=70), st.sampled_from(["acme", "b-2", "Acme"]))


def check_event(event: object) -> StatusEvent:
    assert isinstance(event, StatusEvent)
    assert MESSAGE_ID.fullmatch(event.id), event.id
    assert event.entity_state == ("message", "rejected")
    again = StatusEvent.model_validate_json(event.to_bytes(), strict=True)
    assert again == event
    return event


@settings(max_examples=300, deadline=None)
@given(
    queue=ANY_QUEUE,
    message_id=ANY_ID,
    user_id=ANY_TENANT,
    body=st.binary(max_size=200),
    reason=st.text(),
    detail=st.text(max_size=2000),
    tenant=ANY_TENANT,
    flow=ANY_TENANT,
)
def test_a_rejection_event_can_always_be_built(
    *,
    queue: str,
    message_id: str | None,
    user_id: str | None,
    body: bytes,
    reason: str,
    detail: str,
    tenant: str | None,
    flow: str | None,
) -> None:
    message = Incoming(body=body, message_id=message_id, user_id=user_id)
    event = check_event(
        amqp.rejection_event(queue, message, reason, detail, tenant=tenant, flow=flow)  # type: ignore[arg-type]
    )
    assert event.to_bytes()
    # A redelivered copy is announced under the same id.
    copy = Incoming(body=body, message_id=message_id, user_id=user_id)
    assert amqp.rejection_event(queue, copy, reason, detail).id == event.id  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(queue=ANY_QUEUE, message_id=ANY_ID, user_id=ANY_TENANT, body=st.binary(max_size=200))
def test_rejecting_a_message_never_fails_on_its_properties(
    queue: str, message_id: str | None, user_id: str | None, body: bytes
) -> None:
    """reject_invalid announces (publish) and dead-letters: both stubbed, what matters is
    that building the announcement never raises, whatever the message's id or user is."""
    published: list[object] = []

    async def publish(channel: object, message: object, **_: object) -> None:
        published.append(message)

    async def dead_letter(*_: object, **__: object) -> None:
        return None

    message = Incoming(body=body, message_id=message_id, user_id=user_id)
    error = InvalidMessage("schema_violation", "attempt: Input should be a valid integer")
    with (
        mock.patch.object(amqp, "publish", publish),
        mock.patch.object(amqp, "dead_letter", dead_letter),
    ):
        run(amqp.reject_invalid(object(), message, queue, error))  # type: ignore[arg-type]
    assert len(published) == 1
    check_event(published[0])


def run(coroutine: Any) -> None:
    """Drives a coroutine that never waits (its awaits are stubs) to its end."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise AssertionError("the coroutine waited on something")


@pytest.mark.parametrize("message_type", sorted(MESSAGES))
def test_schema_version_true_is_not_the_integer_1(message_type: str) -> None:
    """`true == 1` in Python; pydantic's Literal[1] took it even in strict mode."""
    key = "schemaversion" if message_type == "status" else "schema_version"

    def change(doc: dict[str, Any]) -> None:
        doc[key] = True

    error = refused(message_type, mutated(message_type, change))
    assert error.reason == "schema_violation"
