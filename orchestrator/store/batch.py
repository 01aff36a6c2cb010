"""Redis calls of concurrent handlers, sent together: one pipeline per event-loop turn.

An engine holds many deliveries at once (its prefetch), and each handler makes the same few
calls (read a state, run a commit script, finish a flush). Sent one by one, every call costs a
socket write, a read, a timeout context and a pooled connection. `Batcher` queues the calls
made during one turn of the event loop and sends them as one pipeline (not a transaction: each
call keeps its own atomicity, e.g. a script), so under load N handlers cost one round trip per
step instead of N. Alone, a call waits for nothing: the batch goes out at the end of the
current turn.

Scripts are called by SHA; a server that lost them (restarted, flushed) gets them loaded again
and the calls that missed are repeated once.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

MAX_BATCH = 500


@dataclass
class _Call:
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    script: str | None = None  # its source, for a call by SHA


@dataclass
class Batcher:
    redis: aioredis.Redis
    _pending: list[_Call] = field(default_factory=list)
    _scheduled: bool = False
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def call(self, *args: Any) -> Any:
        """Any Redis command, e.g. `await batcher.call("GET", key)`."""
        return await self._enqueue(_Call(args, asyncio.get_running_loop().create_future()))

    async def script(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA of `source` (loaded on first use, and again if the server lost it)."""
        sha = _sha(source)
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        future = asyncio.get_running_loop().create_future()
        return await self._enqueue(_Call(command, future, source))

    async def _enqueue(self, call: _Call) -> Any:
        self._pending.append(call)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_pending)
        return await call.future

    def _send_pending(self) -> None:
        self._scheduled = False
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            task = asyncio.ensure_future(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._pipeline([call.args for call in batch])
            missing = [c for c, r in zip(batch, results, strict=True) if _no_script(r)]
            if missing:
                for source in {c.script for c in missing if c.script is not None}:
                    await self.redis.script_load(source)
                again = await self._pipeline([c.args for c in missing])
                retried = dict(zip(map(id, missing), again, strict=True))
                results = [retried.get(id(c), r) for c, r in zip(batch, results, strict=True)]
        except Exception as exc:  # the connection failed: every call of the batch did
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)
            return
        except BaseException:  # cancelled (the process stops): so are its callers' waits
            for call in batch:
                call.future.cancel()
            raise
        for call, result in zip(batch, results, strict=True):
            if call.future.done():
                continue  # its caller was cancelled
            if isinstance(result, Exception):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The commands written at once on one pooled connection, their replies read in
        order: what redis-py's pipeline sends, without its per-call machinery (a third of a
        one-command round trip's CPU). An error reply is that command's result; a failure
        of the connection drops it (half read, it cannot go back to the pool) and fails all."""
        pool = self.redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(connection.pack_commands(commands))
            results: list[Any] = []
            for command in commands:
                try:
                    reply = await connection.read_response()
                except ResponseError as exc:
                    results.append(exc)
                    continue
                callback = self.redis.response_callbacks.get(str(command[0]).upper())
                results.append(callback(reply) if callback is not None else reply)
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        return results


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis names scripts so


def _no_script(result: Any) -> bool:
    return isinstance(result, NoScriptError) or (
        isinstance(result, Exception) and str(result).startswith("NOSCRIPT")
    )
