"""A Redis lease: at most one owner at a time, renewed while its owner lives.

On redis-py's `Lock` (the owner's id as the token; only the owner extends or releases), plus
what a leader needs that a lock does not track: a local deadline counted from when the renewal
was *asked*, so the holder stops acting before the lease could have passed to anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import LockError, LockNotOwnedError

from orchestrator.clock import Clock
from orchestrator.outage import OUTAGES, sleep_unless


class Lease:
    def __init__(
        self, redis: aioredis.Redis, key: str, owner: str, ttl_s: float, clock: Clock
    ) -> None:
        self.key = key
        self.owner = owner
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = redis.lock(key, timeout=ttl_s, thread_local=False)
        self._until = 0.0  # monotonic deadline of the lease we hold; 0 when we hold none

    async def keep(self) -> bool:
        """Takes the lease, or renews the one held; True while held. A Redis error propagates
        (the caller decides what an outage means) and leaves the lease counted as lost."""
        asked = self.clock.monotonic()
        try:
            held = False
            if self._lock.local.token is not None:  # taken before: renew it if still ours
                with contextlib.suppress(LockNotOwnedError):  # it lapsed (another may hold it)
                    held = await self._lock.reacquire()
                if self._lock.local.token is None:  # `lost` meanwhile: not ours to act on
                    return False
            if not held:
                held = await self._lock.acquire(blocking=False, token=self.owner)
        except Exception:
            self.lost()  # as after any trouble: taken again only once it lapsed
            raise
        # Counted from when we asked: the lease can only have started later than that.
        self._until = asked + self.ttl_s if held else 0.0
        return held

    async def hold(
        self, stop: asyncio.Event, renew_s: float, margin_s: float, changed: Callable[[], None]
    ) -> None:
        """Takes or renews the lease every `renew_s` until `stop`, calling `changed` whenever
        `holding(margin_s)` turns. On its own task, so nothing the holder waits for (a slow
        confirm, a big batch) can let the lease lapse unnoticed. Redis trouble is reported as
        an outage and counts as not holding."""
        while True:
            was = self.holding(margin_s)
            try:
                await self.keep()
            except (aioredis.RedisError, OSError) as exc:
                OUTAGES.failed("redis", exc)
            else:
                OUTAGES.recovered("redis")
            if self.holding(margin_s) != was:
                changed()
            if await sleep_unless(stop, renew_s):
                return

    def holding(self, margin_s: float = 0.0) -> bool:
        """Still ours for more than `margin_s` (a margin for the renewals in flight)."""
        return self.clock.monotonic() < self._until - margin_s

    def lost(self) -> None:
        """The holder gave up acting on the lease (a broker failed under it). It is not
        renewed: it is taken again only once it lapsed, as by anybody else, so a holder in
        trouble does not take straight back what it just let go of (a step-down and a
        take-over seconds apart, while its old channel is still being closed, left a
        dispatcher leading and doing nothing)."""
        self._until = 0.0
        self._lock.local.token = None  # the next `keep` may only acquire, not renew

    async def give_up(self) -> None:
        """Releases the lease if it is still ours, so a standby need not wait for it to lapse."""
        self._until = 0.0
        with contextlib.suppress(LockError, aioredis.RedisError, OSError):
            await self._lock.release()
