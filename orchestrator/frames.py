"""How AMQP frames from the broker are read: so that a bad property costs one message, not a
connection.

aiormq hands every incoming frame to pamqp. pamqp raises on a content header whose properties
it cannot decode (a `message_id` or `type` that is not UTF-8, a timestamp of 2^63 or more, a
header table holding one), and on a `basic.deliver` whose routing key is not UTF-8. aiormq
treats that as a broken connection: it drops it, and every unacked message on it, valid or not,
is redelivered and pushed towards its delivery limit. RabbitMQ accepts such messages from any
publisher, so any publisher could do that to any consumer.

`install()` wraps pamqp's two frame decoders. The normal path is pamqp's own, untouched; only
when it fails does a lenient decoder run: each property is decoded on its own (its length is
known from its type, so a bad one is skipped without losing the rest), and the names of the
properties that could not be decoded go into the header `orch-bad-properties`. The consumer
skeleton (orchestrator.consumer) dead-letters such a message with reason `bad_properties`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pamqp.frame
from pamqp import commands, decode, header
from pamqp.base import Frame

# Names of the properties that could not be decoded, comma-separated. Set only by this module;
# a publisher that sets it itself only gets its own message rejected.
BAD_PROPERTIES_HEADER = "orch-bad-properties"

_Properties = commands.Basic.Properties
_TYPES: dict[str, str] = {name: getattr(_Properties, "_" + name) for name in _Properties.__slots__}
_FIXED_SIZES = {"octet": 1, "short": 2, "long": 4, "longlong": 8, "timestamp": 8}

_installed = False


def _size(amqp_type: str, data: bytes) -> int:
    """Bytes the next value of this type takes; struct.error if the frame is truncated."""
    if amqp_type == "shortstr":
        return 1 + int(struct.unpack_from("B", data)[0])
    if amqp_type in ("longstr", "table"):
        return 4 + int(struct.unpack_from(">I", data)[0])
    return _FIXED_SIZES[amqp_type]


def _checked(name: str, value: Any) -> Any:
    """Values aio-pika converts again when it builds an IncomingMessage: fail here instead."""
    if name == "expiration" and value is not None:
        float(value)  # aio-pika parses it as milliseconds
    if name == "delivery_mode" and value not in (None, 1, 2):
        raise ValueError(f"delivery mode {value}")  # aio-pika's DeliveryMode enum
    return value


def _usable(properties: _Properties) -> None:
    """Raises if aio-pika could not build a message from properties pamqp decoded."""
    _checked("expiration", properties.expiration)
    _checked("delivery_mode", properties.delivery_mode)


def lenient_properties(flags: int, data: bytes) -> tuple[_Properties, list[str]]:
    """Decodes Basic properties one by one; returns them and the names that failed."""
    properties = _Properties()
    bad: list[str] = []
    for name in _Properties.__slots__:
        if not flags & _Properties.flags[name]:
            continue
        amqp_type = _TYPES[name]
        size = _size(amqp_type, data)
        if size > len(data):
            raise struct.error(f"property {name} is truncated")
        try:
            _, value = decode.by_type(data[:size], amqp_type)
            setattr(properties, name, _checked(name, value))
        except Exception:  # any failure of one value only marks that value
            bad.append(name)
        data = data[size:]
    if bad:
        headers = properties.headers if isinstance(properties.headers, dict) else {}
        headers[BAD_PROPERTIES_HEADER] = ",".join(bad)
        properties.headers = headers
    return properties, bad


def _lenient_header(frame_data: bytes) -> header.ContentHeader:
    content_header = header.ContentHeader()
    content_header.class_id, content_header.weight, content_header.body_size = struct.unpack(
        ">HHQ", frame_data[0:12]
    )
    offset, flags = content_header._get_flags(frame_data[12:])  # pamqp's own
    content_header.properties, _ = lenient_properties(flags, frame_data[12 + offset :])
    return content_header


def _short_str(data: bytes) -> tuple[int, str]:
    length = data[0]
    return 1 + length, data[1 : 1 + length].decode("utf-8", errors="replace")


def _lenient_deliver(frame_data: bytes) -> commands.Basic.Deliver:
    """basic.deliver with a routing key (or exchange) that is not UTF-8: undecodable bytes
    become U+FFFD. Our consumers never route on the delivered key, so nothing else changes."""
    data = frame_data[4:]
    used, consumer_tag = _short_str(data)
    data = data[used:]
    (delivery_tag,) = struct.unpack_from(">Q", data)
    redelivered = bool(data[8] & 1)
    data = data[9:]
    used, exchange = _short_str(data)
    data = data[used:]
    _, routing_key = _short_str(data)
    try:
        return commands.Basic.Deliver(
            consumer_tag, delivery_tag, redelivered, exchange, routing_key
        )
    except ValueError:  # pamqp checks exchange names: one it refuses is not ours to route on
        return commands.Basic.Deliver(consumer_tag, delivery_tag, redelivered, "", routing_key)


def install() -> None:
    """Idempotent. Called when orchestrator.amqp is imported, before any connection opens."""
    global _installed  # noqa: PLW0603 - a process-wide hook into pamqp, installed once
    if _installed:
        return
    strict_header: Callable[[bytes], header.ContentHeader] = pamqp.frame._unmarshal_header_frame
    strict_method: Callable[[bytes], Frame] = pamqp.frame._unmarshal_method_frame

    def unmarshal_header(frame_data: bytes) -> header.ContentHeader:
        try:
            content_header = strict_header(frame_data)
            _usable(content_header.properties)
        except Exception:  # OverflowError escapes pamqp's own handling too
            return _lenient_header(frame_data)
        return content_header

    def unmarshal_method(frame_data: bytes) -> Frame:
        try:
            return strict_method(frame_data)
        except Exception:
            if frame_data[0:4] == struct.pack(">I", commands.Basic.Deliver.index):
                return _lenient_deliver(frame_data)
            raise

    pamqp.frame._unmarshal_header_frame = unmarshal_header
    pamqp.frame._unmarshal_method_frame = unmarshal_method
    _installed = True
