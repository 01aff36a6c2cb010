"""Fault injection between a process and a broker: a TCP proxy on loopback that can be cut.

Cutting it resets every open connection and turns new ones away at once, which is what a
process sees when its broker goes down; restoring lets connections through again. A
blackhole is the other kind of network failure: no reset, nothing comes back. The open
connections stay open forever and carry nothing (a peer that vanished, a dropped NAT mapping,
a partition TCP has not given up on), and new connections are accepted and go nowhere. Only the
processes pointed at the proxy notice, so one test can take "Redis" away from the processes
under test without touching the Redis every other test uses.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.open = True
        self.dark = False  # a blackhole: bytes are swallowed, nothing is closed
        self._held: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        self.open = False
        for writer in self._writers | self._held:
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()
        self._held.clear()

    def blackhole(self) -> None:
        """From now on every byte in either direction is dropped; nothing is closed. The
        connections open now stay dead after `restore` (as after a real partition)."""
        self.dark = True
        self._held.update(self._writers)

    def restore(self) -> None:
        self.open = True
        self.dark = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        if self.dark:
            self._held.add(writer)  # accepted, and never answered
            task = asyncio.create_task(self._swallow(reader))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                if not self.open:
                    break
                if self.dark or sink in self._held:
                    continue  # swallowed
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                sink.transport.abort()
            self._writers.discard(sink)

    async def _swallow(self, source: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while await source.read(65536):
                pass
