"""A minimal AMQP 0-9-1 publisher that writes content headers byte by byte.

Independent of aio-pika and aiormq on purpose: it can send what no well-behaved client would
(a `message_id` that is not UTF-8, a timestamp of 2^63, a header table that cannot be
decoded), which RabbitMQ accepts and relays to consumers. pamqp builds the method frames only.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import urllib.parse
from dataclasses import dataclass, field

from pamqp import commands, frame

FRAME_END = b"\xce"

# Basic property flag bits, in wire order (AMQP 0-9-1, class basic).
FLAGS = {
    "content_type": 0x8000,
    "content_encoding": 0x4000,
    "headers": 0x2000,
    "delivery_mode": 0x1000,
    "priority": 0x0800,
    "correlation_id": 0x0400,
    "reply_to": 0x0200,
    "expiration": 0x0100,
    "message_id": 0x0080,
    "timestamp": 0x0040,
    "type": 0x0020,
    "user_id": 0x0010,
    "app_id": 0x0008,
    "cluster_id": 0x0004,
}


def shortstr(value: bytes) -> bytes:
    return struct.pack("B", len(value)) + value


def table(entries: dict[bytes, bytes]) -> bytes:
    """A field table from already-encoded values (type tag + bytes)."""
    body = b"".join(shortstr(key) + value for key, value in entries.items())
    return struct.pack(">I", len(body)) + body


@dataclass
class RawProperties:
    """Each value is the property's wire encoding (without flags), set only when present."""

    values: dict[str, bytes] = field(default_factory=dict)

    def set_str(self, name: str, value: bytes) -> RawProperties:
        self.values[name] = shortstr(value)
        return self

    def set_raw(self, name: str, encoded: bytes) -> RawProperties:
        self.values[name] = encoded
        return self

    def encode(self) -> bytes:
        flags = 0
        parts = []
        for name, bit in FLAGS.items():
            if name in self.values:
                flags |= bit
                parts.append(self.values[name])
        return struct.pack(">H", flags) + b"".join(parts)


def properties(
    *,
    content_type: bytes | None = b"application/json",
    message_id: bytes | None = None,
    type_: bytes | None = None,
    timestamp: int | None = None,
    persistent: bool = True,
) -> RawProperties:
    props = RawProperties()
    if content_type is not None:
        props.set_str("content_type", content_type)
    if persistent:
        props.set_raw("delivery_mode", b"\x02")
    if message_id is not None:
        props.set_str("message_id", message_id)
    if timestamp is not None:
        props.set_raw("timestamp", struct.pack(">Q", timestamp))
    if type_ is not None:
        props.set_str("type", type_)
    return props


class RawPublisher:
    """One connection, one channel in confirm mode. `await publish(...)` waits for the ack."""

    def __init__(self, url: str) -> None:
        self.url = urllib.parse.urlsplit(url)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.published = 0
        self.frame_max = 131072

    async def __aenter__(self) -> RawPublisher:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read_frame(self) -> object:
        assert self.reader is not None
        head = await self.reader.readexactly(7)
        size = struct.unpack(">I", head[3:7])[0]
        rest = await self.reader.readexactly(size + 1)
        _, _, value = frame.unmarshal(head + rest)
        return value

    async def _expect(self, kind: type) -> object:
        while True:
            value = await self._read_frame()
            if isinstance(value, kind):
                return value
            if isinstance(value, (commands.Connection.Close, commands.Channel.Close)):
                raise ConnectionError(f"broker closed: {value}")

    def _send(self, channel: int, value: object) -> None:
        assert self.writer is not None
        self.writer.write(frame.marshal(value, channel))  # type: ignore[arg-type]

    async def connect(self) -> None:
        host = self.url.hostname or "localhost"
        self.reader, self.writer = await asyncio.open_connection(host, self.url.port or 5672)
        self.writer.write(b"AMQP\x00\x00\x09\x01")
        await self._expect(commands.Connection.Start)
        user = urllib.parse.unquote(self.url.username or "guest")
        password = urllib.parse.unquote(self.url.password or "guest")
        self._send(
            0,
            commands.Connection.StartOk(
                client_properties={"product": "rawamqp"},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
                locale="en_US",
            ),
        )
        tune = await self._expect(commands.Connection.Tune)
        assert isinstance(tune, commands.Connection.Tune)
        self.frame_max = tune.frame_max or self.frame_max
        self._send(0, commands.Connection.TuneOk(tune.channel_max, self.frame_max, 0))
        vhost = urllib.parse.unquote(self.url.path[1:] if len(self.url.path) > 1 else "/")
        self._send(0, commands.Connection.Open(vhost))
        await self._expect(commands.Connection.OpenOk)
        self._send(1, commands.Channel.Open())
        await self._expect(commands.Channel.OpenOk)
        self._send(1, commands.Confirm.Select())
        await self._expect(commands.Confirm.SelectOk)

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, props: RawProperties
    ) -> None:
        assert self.writer is not None
        self._send(1, commands.Basic.Publish(exchange=exchange, routing_key=routing_key))
        header = struct.pack(">HHQ", 60, 0, len(body)) + props.encode()
        self.writer.write(struct.pack(">BHI", 2, 1, len(header)) + header + FRAME_END)
        chunk = self.frame_max - 8
        for start in range(0, len(body), chunk):
            part = body[start : start + chunk]
            self.writer.write(struct.pack(">BHI", 3, 1, len(part)) + part + FRAME_END)
        await self.writer.drain()
        self.published += 1
        ack = await self._expect(commands.Basic.Ack)
        assert isinstance(ack, commands.Basic.Ack)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
