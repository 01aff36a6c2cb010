"""What time it is: the system clock in production, a hand-driven one in tests."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (intervals, leases, rates)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """Time moves only when a test calls `advance`; sleepers wake when their time has come."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._elapsed = 0.0
        self._changed = asyncio.Event()

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._elapsed

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._elapsed += seconds
        self._changed.set()

    def set(self, when: datetime) -> None:
        self._now = when
        self._changed.set()

    async def sleep(self, seconds: float) -> None:
        wake_at = self._now + timedelta(seconds=seconds)
        while self._now < wake_at:
            self._changed.clear()
            # Real time passes too, a little, so a loop that sleeps 0 s cannot spin the CPU.
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=0.05)
            except TimeoutError:
                return


def to_ms(when: datetime) -> int:
    return round(when.timestamp() * 1000)


def from_ms(ms: int | float | str) -> datetime:
    return datetime.fromtimestamp(float(ms) / 1000, tz=UTC)
