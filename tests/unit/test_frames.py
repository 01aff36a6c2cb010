"""Frames from the broker whose properties pamqp cannot decode: the frame reader must hand
back the frame with the bad properties as None and named in `orch-bad-properties` (one
message rejected), never raise (which would drop the connection and every unacked message).

The frames are built byte by byte here, the way a broker would pass on a publisher's bytes:
pamqp's own encoder would refuse to write most of them."""

from __future__ import annotations

import struct
from typing import Any

import pamqp.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands, header

import orchestrator.amqp  # noqa: F401 - installs the lenient frame decoders

Properties = commands.Basic.Properties
BAD = "orch-bad-properties"
FRAME_METHOD, FRAME_HEADER, FRAME_END = 1, 2, b"\xce"
TOO_LATE = 2**63  # no datetime holds it: pamqp raises decoding it


def shortstr(value: bytes) -> bytes:
    assert len(value) <= 255
    return bytes([len(value)]) + value


def table(*fields: bytes) -> bytes:
    inner = b"".join(fields)
    return struct.pack(">I", len(inner)) + inner


def int_field(name: bytes, value: int) -> bytes:
    return shortstr(name) + b"I" + struct.pack(">i", value)


def str_field(name: bytes, value: bytes) -> bytes:
    return shortstr(name) + b"S" + struct.pack(">I", len(value)) + value


def timestamp_field(name: bytes, value: int) -> bytes:
    return shortstr(name) + b"T" + struct.pack(">Q", value)


def encoded_properties(values: dict[str, bytes]) -> tuple[int, bytes]:
    """Property flags and values, in the order (and with the bits) of Basic.Properties."""
    flags, data = 0, b""
    for name in Properties.__slots__:
        if name in values:
            flags |= Properties.flags[name]
            data += values[name]
    return flags, data


def frame(frame_type: int, payload: bytes, channel: int = 1) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + FRAME_END


def content_header_frame(values: dict[str, bytes], body_size: int = 42) -> bytes:
    flags, data = encoded_properties(values)
    return frame(FRAME_HEADER, struct.pack(">HHQH", 60, 0, body_size, flags) + data)


def unmarshal_header(raw: bytes) -> header.ContentHeader:
    consumed, channel, decoded = pamqp.frame.unmarshal(raw)
    assert consumed == len(raw)
    assert channel == 1
    assert isinstance(decoded, header.ContentHeader)
    assert decoded.body_size == 42
    return decoded


def bad_names(properties: Any) -> set[str]:
    headers = properties.headers or {}
    return set(headers[BAD].split(",")) if BAD in headers else set()


GOOD = {
    "content_type": shortstr(b"application/json"),
    "delivery_mode": b"\x02",
    "correlation_id": shortstr(b"corr-1"),
    "user_id": shortstr(b"acme"),
    "app_id": shortstr(b"tests"),
}


def check_good_intact(properties: Any) -> None:
    expected = {
        "content_type": "application/json",
        "delivery_mode": 2,
        "correlation_id": "corr-1",
        "user_id": "acme",
        "app_id": "tests",
    }
    for name, value in expected.items():
        assert getattr(properties, name) == value, name


def test_a_valid_header_decodes_as_before() -> None:
    decoded = unmarshal_header(
        content_header_frame(
            {
                **GOOD,
                "message_id": shortstr(b"m-1"),
                "message_type": shortstr(b"step.task"),
                "timestamp": struct.pack(">Q", 1_774_748_000),
                "headers": table(int_field(b"n", 5)),
            }
        )
    )
    properties = decoded.properties
    check_good_intact(properties)
    assert properties.message_id == "m-1"
    assert properties.message_type == "step.task"
    assert properties.timestamp is not None
    assert properties.headers == {"n": 5}


def test_a_message_id_that_is_not_utf8() -> None:
    decoded = unmarshal_header(
        content_header_frame({**GOOD, "message_id": shortstr(b"\xff\xfeid")})
    )
    properties = decoded.properties
    assert properties.message_id is None
    assert bad_names(properties) == {"message_id"}
    check_good_intact(properties)


def test_a_type_that_is_not_utf8_keeps_a_good_message_id() -> None:
    decoded = unmarshal_header(
        content_header_frame(
            {**GOOD, "message_id": shortstr(b"m-1"), "message_type": shortstr(b"\xc3\x28")}
        )
    )
    properties = decoded.properties
    assert properties.message_type is None
    assert properties.message_id == "m-1"
    assert bad_names(properties) == {"message_type"}
    check_good_intact(properties)


def test_a_timestamp_of_two_to_the_63() -> None:
    decoded = unmarshal_header(
        content_header_frame(
            {**GOOD, "message_id": shortstr(b"m-1"), "timestamp": struct.pack(">Q", TOO_LATE)}
        )
    )
    properties = decoded.properties
    assert properties.timestamp is None
    assert properties.message_id == "m-1"
    assert bad_names(properties) == {"timestamp"}
    check_good_intact(properties)


def test_a_header_table_holding_a_timestamp_of_two_to_the_63() -> None:
    headers = table(int_field(b"n", 5), timestamp_field(b"when", TOO_LATE))
    decoded = unmarshal_header(
        content_header_frame({**GOOD, "headers": headers, "message_id": shortstr(b"m-1")})
    )
    properties = decoded.properties
    # The table cannot be decoded, so none of it is kept; only our marker is there.
    assert properties.headers == {BAD: "headers"}
    assert properties.message_id == "m-1"
    check_good_intact(properties)


def test_a_non_numeric_expiration_next_to_another_bad_property() -> None:
    """aio-pika parses the expiration as a number when it builds the message: a value it
    cannot parse is marked like one pamqp cannot decode. (RabbitMQ itself refuses to route
    such an expiration; it is checked here whenever a frame is decoded leniently.)"""
    decoded = unmarshal_header(
        content_header_frame(
            {
                **GOOD,
                "expiration": shortstr(b"abc"),
                "message_id": shortstr(b"m-1"),
                "timestamp": struct.pack(">Q", TOO_LATE),
            }
        )
    )
    properties = decoded.properties
    assert properties.expiration is None
    assert properties.timestamp is None
    assert properties.message_id == "m-1"
    assert bad_names(properties) == {"expiration", "timestamp"}
    check_good_intact(properties)


def test_every_bad_property_at_once_keeps_the_good_ones_and_a_good_header_table() -> None:
    decoded = unmarshal_header(
        content_header_frame(
            {
                **GOOD,
                "headers": table(int_field(b"n", 5), str_field(b"s", b"text")),
                "expiration": shortstr(b"abc"),
                "message_id": shortstr(b"\x80"),
                "timestamp": struct.pack(">Q", 2**64 - 1),
                "message_type": shortstr(b"\xed\xa0\x80"),  # an encoded surrogate
                "reply_to": shortstr(b"reply-q"),
                "content_encoding": shortstr(b"\xfe"),
            }
        )
    )
    properties = decoded.properties
    bad = {"content_encoding", "expiration", "message_id", "timestamp", "message_type"}
    assert bad_names(properties) == bad
    for name in bad:
        assert getattr(properties, name) is None, name
    assert properties.headers == {
        "n": 5,
        "s": "text",
        BAD: ",".join(name for name in Properties.__slots__ if name in bad),
    }
    assert properties.reply_to == "reply-q"
    check_good_intact(properties)


def test_lenient_properties_names_what_failed() -> None:
    from orchestrator.frames import lenient_properties

    flags, data = encoded_properties(
        {
            "content_type": shortstr(b"application/json"),
            "message_id": shortstr(b"\xff"),
            "timestamp": struct.pack(">Q", TOO_LATE),
            "app_id": shortstr(b"tests"),
        }
    )
    properties, bad = lenient_properties(flags, data)
    assert bad == ["message_id", "timestamp"]
    assert properties.content_type == "application/json"
    assert properties.app_id == "tests"
    assert properties.message_id is None
    assert properties.timestamp is None
    assert properties.headers == {BAD: "message_id,timestamp"}


def test_lenient_properties_refuses_a_truncated_frame() -> None:
    """A property whose length runs past the frame is a broken frame, not a bad value."""
    from orchestrator.frames import lenient_properties

    flags, data = encoded_properties({"message_id": shortstr(b"\xff" * 10)})
    with pytest.raises(struct.error):
        lenient_properties(flags, data[:5])


def deliver_frame(routing_key: bytes, exchange: bytes = b"orchestrator.tasks") -> bytes:
    arguments = (
        shortstr(b"ctag-1")
        + struct.pack(">Q", 7)
        + b"\x01"  # redelivered
        + shortstr(exchange)
        + shortstr(routing_key)
    )
    return frame(FRAME_METHOD, struct.pack(">I", commands.Basic.Deliver.index) + arguments)


def test_a_deliver_with_a_routing_key_that_is_not_utf8() -> None:
    raw = deliver_frame(b"acme.\xff\xfe.task")
    consumed, channel, method = pamqp.frame.unmarshal(raw)
    assert consumed == len(raw)
    assert channel == 1
    assert isinstance(method, commands.Basic.Deliver)
    assert method.consumer_tag == "ctag-1"
    assert method.delivery_tag == 7
    assert method.redelivered is True
    assert method.exchange == "orchestrator.tasks"
    assert method.routing_key is not None
    assert "\ufffd" in method.routing_key
    assert method.routing_key.startswith("acme.")
    assert method.routing_key.endswith(".task")


@settings(max_examples=300, deadline=None)
@given(
    message_id=st.binary(max_size=255),
    message_type=st.binary(max_size=255),
    timestamp=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_no_message_id_type_or_timestamp_makes_the_reader_raise(
    message_id: bytes, message_type: bytes, timestamp: int
) -> None:
    decoded = unmarshal_header(
        content_header_frame(
            {
                **GOOD,
                "message_id": shortstr(message_id),
                "timestamp": struct.pack(">Q", timestamp),
                "message_type": shortstr(message_type),
            }
        )
    )
    properties = decoded.properties
    check_good_intact(properties)
    bad = bad_names(properties)
    for name, raw in (("message_id", message_id), ("message_type", message_type)):
        if name in bad:
            assert getattr(properties, name) is None
        else:
            assert getattr(properties, name) == raw.decode("utf-8")


@settings(max_examples=200, deadline=None)
@given(routing_key=st.binary(max_size=255))
def test_no_routing_key_makes_the_reader_raise(routing_key: bytes) -> None:
    _, _, method = pamqp.frame.unmarshal(deliver_frame(routing_key))
    assert isinstance(method, commands.Basic.Deliver)
    assert method.routing_key == routing_key.decode("utf-8", errors="replace")
