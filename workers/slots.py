"""A worker's step slots: `regular` for the work queue, plus `reserved` for the express lane.

Normal steps run in at most `regular` slots. An express step (the fair order's next step for a
tenant with nothing running) may take any free slot, reserved or not, and when none is free it
takes the first one that frees, ahead of any normal step waiting: it is the step the dispatcher
judged next, and a newly active tenant should not wait a whole step behind a busy one.

`alone()` is for a step suspected of crashing its worker: it waits until nothing else runs,
keeps every other step out while it runs, and takes its turn before steps that arrive later.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class SlotPool:
    def __init__(self, regular: int, reserved: int = 0) -> None:
        if regular < 1 or reserved < 0:
            raise ValueError("a worker needs at least one regular slot")
        self.regular = regular
        self.total = regular + reserved
        self.running = 0
        self.running_regular = 0
        self._express_waiting = 0
        self._alone = False
        self._alone_waiting = 0
        self._changed = asyncio.Condition()

    def _free(self, express: bool) -> bool:
        if self._alone or self._alone_waiting or self.running >= self.total:
            return False
        if express:
            return True
        return self.running_regular < self.regular and not self._express_waiting

    @asynccontextmanager
    async def slot(self, *, express: bool = False) -> AsyncIterator[None]:
        async with self._changed:
            self._express_waiting += express
            try:
                await self._changed.wait_for(lambda: self._free(express))
            finally:
                self._express_waiting -= express
                if express:  # normal steps held back for it may go now
                    self._changed.notify_all()
            self.running += 1
            self.running_regular += not express
        try:
            yield
        finally:
            async with self._changed:
                self.running -= 1
                self.running_regular -= not express
                self._changed.notify_all()

    @asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._changed:
            self._alone_waiting += 1
            try:
                await self._changed.wait_for(lambda: self.running == 0 and not self._alone)
            finally:
                self._alone_waiting -= 1
            self._alone = True
            self.running += 1
        try:
            yield
        finally:
            async with self._changed:
                self._alone = False
                self.running -= 1
                self._changed.notify_all()
