"""AMQP frames written in one event-loop turn leave in one socket write.

aiormq writes every frame (a publish is three: method, header, body; an ack is one) with its
own `StreamWriter.write`, and asyncio sends each at once when the socket's buffer is empty:
one `send` system call per frame. Profiles of engine, dispatcher and worker under load put
15% of each process in those calls. `CoalescingTransportFactory` (aiormq's documented
`transport_factory` hook) hands aiormq a writer that gathers the frames written during the
current turn of the event loop and sends them together at its end. Nothing waits longer than
that turn; `drain` and `close` send what is gathered first, so aiormq's flow control and its
closing handshake see every byte.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

# How long frames gather before they leave. aiormq publishes one frame per event-loop turn on
# a channel (a lock per publish), so a turn alone gathers little; a fraction of a millisecond
# gathers the publishes, acks and confirms of a busy process, and is nothing next to a hop's
# latency (milliseconds).
WINDOW_S = 0.0003


class CoalescingWriter:
    """A StreamWriter whose `write` sends at the end of the event-loop turn."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_later(WINDOW_S, self._send)
        self._pending.append(bytes(data))

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def _send(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self._writer.is_closing():
            self._writer.write(data)

    async def drain(self) -> None:
        self._send()
        await self._writer.drain()

    def close(self) -> None:
        self._send()
        self._writer.close()

    def __getattr__(self, name: str) -> Any:  # transport, is_closing, wait_closed, ...
        return getattr(self._writer, name)


class CoalescingTransportFactory(TransportFactory):
    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        base = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await base.create(url, **kwargs)
        return reader, CoalescingWriter(writer)  # type: ignore[return-value]


class CoalescingRobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection on a coalescing transport (`connection_class=`)."""

    def __init__(self, url: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        # Handed to aiormq.Connection on every (re)connect.
        self.kwargs["transport_factory"] = CoalescingTransportFactory()
