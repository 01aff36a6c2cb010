"""The circuit breaker is per (tenant, step type): one tenant's failing steps never hold back
another tenant's steps of the same type, and a breaker nobody uses any more expires.

Against the real Redis (the breaker is two Lua scripts). The property test runs its examples
on an event loop of its own (hypothesis drives a plain function), with its own client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orchestrator import store
from orchestrator.config import Settings
from orchestrator.engine.store import ExecutionStore
from tests.integration.helpers import fresh_settings

T = TypeVar("T")

STEP_TYPE = "demo.cpu"
THRESHOLD = 3
# Long enough that no probe key (PX cooldown, in Redis's own clock) expires during a test:
# the breaker's notion of time is the now_ms we pass, Redis's is real time.
COOLDOWN_MS = 60_000
T0 = 1_800_000_000_000


@dataclass
class Runner:
    """An event loop and a Redis client of this module's own, for sync (hypothesis) tests."""

    loop: asyncio.AbstractEventLoop
    redis: aioredis.Redis
    settings: Settings

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(awaitable)

    def store(self) -> tuple[ExecutionStore, str]:
        """A store under a Redis prefix of its own, and that prefix."""
        prefix = fresh_settings(self.settings).redis_prefix
        return ExecutionStore(self.redis, store.Keys(prefix), 3600), prefix

    async def forget(self, prefix: str) -> None:
        async for key in self.redis.scan_iter(match=f"{prefix}*"):
            await self.redis.delete(key)


@pytest.fixture(scope="module")
def runner(settings: Settings) -> Iterator[Runner]:
    loop = asyncio.new_event_loop()
    own = fresh_settings(settings)
    client = store.connect(own)
    try:
        loop.run_until_complete(client.ping())
    except OSError as exc:
        loop.close()
        pytest.skip(f"Redis at {own.redis_url}: {exc}")
    the_runner = Runner(loop, client, own)
    try:
        yield the_runner
    finally:
        loop.run_until_complete(the_runner.forget(own.redis_prefix))
        loop.run_until_complete(client.aclose())
        loop.close()


async def apply(execution_store: ExecutionStore, ops: list[tuple[str, str, int]]) -> list[Any]:
    """Applies (tenant, op, now_ms) in order; op is ok, fail or acquire. Returns each result."""
    results: list[Any] = []
    for tenant, op, now_ms in ops:
        if op == "acquire":
            result = await execution_store.breaker_acquire(tenant, STEP_TYPE, now_ms, COOLDOWN_MS)
        else:
            result = await execution_store.breaker_record(
                tenant,
                STEP_TYPE,
                success=op == "ok",
                now_ms=now_ms,
                threshold=THRESHOLD,
                cooldown_ms=COOLDOWN_MS,
            )
        results.append(result)
    return results


def timeline(steps: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Steps with time deltas, as steps at absolute times (time never goes back)."""
    now, ops = T0, []
    for tenant, op, delta in steps:
        now += delta
        ops.append((tenant, op, now))
    return ops


STEPS = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["ok", "fail", "fail", "acquire"]),  # failures are what open breakers
        st.integers(min_value=0, max_value=40_000),  # cooldown is 60 s: open, then half-open
    ),
    max_size=40,
)


@hypothesis_settings(max_examples=50, deadline=None)
@given(steps=STEPS, end_delta=st.integers(min_value=0, max_value=150_000))
def test_another_tenants_records_never_change_a_tenants_breaker(
    runner: Runner, steps: list[tuple[str, str, int]], end_delta: int
) -> None:
    ops = timeline(steps)
    end = (ops[-1][2] if ops else T0) + end_delta
    ops.append(("b", "acquire", end))
    only_b = [op for op in ops if op[0] == "b"]

    async def example() -> tuple[list[Any], list[Any]]:
        shared, shared_prefix = runner.store()
        alone, alone_prefix = runner.store()
        try:
            everyone = await apply(shared, ops)
            b_alone = await apply(alone, only_b)
        finally:
            await runner.forget(shared_prefix)
            await runner.forget(alone_prefix)
        b_among_all = [result for op, result in zip(ops, everyone, strict=True) if op[0] == "b"]
        return b_among_all, b_alone

    b_among_all, b_alone = runner.run(example())
    # Every result b got (each record and each acquire, the last one included) is what it
    # would have been had tenants a and c never recorded anything.
    assert b_among_all == b_alone


def test_one_tenants_failures_open_its_own_breaker_only(runner: Runner) -> None:
    async def example() -> tuple[int, int, int]:
        execution_store, prefix = runner.store()
        try:
            opened = 0
            for i in range(THRESHOLD):
                opened = await execution_store.breaker_record(
                    "a",
                    STEP_TYPE,
                    success=False,
                    now_ms=T0 + i,
                    threshold=THRESHOLD,
                    cooldown_ms=COOLDOWN_MS,
                )
            now = T0 + THRESHOLD
            a = await execution_store.breaker_acquire("a", STEP_TYPE, now, COOLDOWN_MS)
            b = await execution_store.breaker_acquire("b", STEP_TYPE, now, COOLDOWN_MS)
        finally:
            await runner.forget(prefix)
        return opened, a, b

    opened, a, b = runner.run(example())
    assert opened == T0 + THRESHOLD - 1 + COOLDOWN_MS  # the third failure opened a's breaker
    assert a == opened  # a waits for its cool-down
    assert b == 0  # b's steps of the same type run


def test_breaker_keys_expire(runner: Runner) -> None:
    async def example() -> tuple[list[str], list[int], list[int]]:
        execution_store, prefix = runner.store()
        try:
            ttls_closed: list[int] = []
            ttls_open: list[int] = []
            for i in range(THRESHOLD):
                await execution_store.breaker_record(
                    "a",
                    STEP_TYPE,
                    success=False,
                    now_ms=T0 + i,
                    threshold=THRESHOLD,
                    cooldown_ms=COOLDOWN_MS,
                )
                keys = [key async for key in runner.redis.scan_iter(match=f"{prefix}breaker:*")]
                ttls = [await runner.redis.pttl(key) for key in keys]
                (ttls_open if i == THRESHOLD - 1 else ttls_closed).extend(ttls)
            # The half-open probe the next acquire takes expires too.
            await execution_store.breaker_acquire("a", STEP_TYPE, T0 + COOLDOWN_MS * 2, COOLDOWN_MS)
            keys = [key async for key in runner.redis.scan_iter(match=f"{prefix}breaker:*")]
            ttls_open.extend([await runner.redis.pttl(key) for key in keys])
        finally:
            await runner.forget(prefix)
        return keys, ttls_closed, ttls_open

    keys, ttls_closed, ttls_open = runner.run(example())
    assert len(keys) == 2  # the breaker hash and its probe key
    assert ttls_closed, "a failure writes the breaker"
    for ttl in ttls_closed + ttls_open:
        assert ttl > 0, f"breaker key without an expiry (PTTL {ttl})"
