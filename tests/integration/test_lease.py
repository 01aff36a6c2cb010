"""The Redis lease (orchestrator.store.lease) against a real Redis: one owner at a time, and a
holder that gave it up in trouble takes it again only once it lapsed."""

from __future__ import annotations

import uuid

import pytest

from orchestrator import store
from orchestrator.clock import SystemClock
from orchestrator.config import Settings
from orchestrator.store.lease import Lease
from orchestrator.testing import wait_until

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_one_owner_and_a_lost_lease_is_taken_again_only_once_it_lapsed(
    settings: Settings,
) -> None:
    redis = store.connect(settings)
    key = f"{settings.redis_prefix}lease:{uuid.uuid4().hex[:8]}"
    a = Lease(redis, key, "a", 0.5, SystemClock())
    b = Lease(redis, key, "b", 0.5, SystemClock())
    try:
        assert await a.keep()
        assert a.holding()
        assert not await b.keep()
        assert await a.keep()  # renewed by its owner
        a.lost()  # a broker failed under the holder: it stops acting on the lease
        assert not a.holding()
        assert not await a.keep()  # not taken straight back while its old key lives

        async def lapsed() -> bool:
            return not await redis.exists(key)

        await wait_until(lapsed, timeout_s=5, what="the lost lease lapsing")
        assert await b.keep()
        await a.give_up()  # not the owner: changes nothing
        assert await redis.get(key) == "b"
        await b.give_up()
        assert not await redis.exists(key)
    finally:
        await redis.delete(key)
        await redis.aclose()
