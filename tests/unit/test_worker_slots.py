"""The worker's slot pool: normal steps stay within their slots, express steps take any free
slot and are first in line for the next one."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.slots import SlotPool


async def hold(
    pool: SlotPool, *, express: bool, log: list[str], name: str, gate: asyncio.Event
) -> None:
    async with pool.slot(express=express):
        log.append(name)
        await gate.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_normal_steps_use_only_the_regular_slots() -> None:
    pool = SlotPool(regular=2, reserved=1)
    log: list[str] = []
    gate = asyncio.Event()
    tasks = [
        asyncio.create_task(hold(pool, express=False, log=log, name=f"n{i}", gate=gate))
        for i in range(3)
    ]
    await settle()
    assert log == ["n0", "n1"]  # the reserved slot stays free for the express lane
    express = asyncio.create_task(hold(pool, express=True, log=log, name="x", gate=gate))
    await settle()
    assert log == ["n0", "n1", "x"]
    gate.set()
    await asyncio.gather(*tasks, express)
    assert log[-1] == "n2"


async def test_express_takes_the_next_free_slot_ahead_of_waiting_normal_steps() -> None:
    pool = SlotPool(regular=1, reserved=1)
    log: list[str] = []
    first, rest = asyncio.Event(), asyncio.Event()
    running = [
        asyncio.create_task(hold(pool, express=False, log=log, name="n0", gate=first)),
        asyncio.create_task(hold(pool, express=True, log=log, name="x0", gate=rest)),
    ]
    await settle()
    waiting_normal = asyncio.create_task(hold(pool, express=False, log=log, name="n1", gate=rest))
    await settle()
    waiting_express = asyncio.create_task(hold(pool, express=True, log=log, name="x1", gate=rest))
    await settle()
    assert log == ["n0", "x0"]
    first.set()  # a regular slot frees: the express step takes it, the normal one waits on
    await settle()
    assert log == ["n0", "x0", "x1"]
    rest.set()
    await asyncio.gather(*running, waiting_normal, waiting_express)
    assert log[-1] == "n1"


async def test_a_cancelled_express_waiter_does_not_hold_back_normal_steps() -> None:
    pool = SlotPool(regular=1, reserved=0)
    log: list[str] = []
    gate, never = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(hold(pool, express=False, log=log, name="n0", gate=gate))
    await settle()
    express = asyncio.create_task(hold(pool, express=True, log=log, name="x", gate=never))
    normal = asyncio.create_task(hold(pool, express=False, log=log, name="n1", gate=never))
    await settle()
    express.cancel()
    await settle()
    gate.set()
    await settle()
    assert log == ["n0", "n1"]
    normal.cancel()
    await asyncio.gather(running, normal, express, return_exceptions=True)
    assert pool.running == 0


def test_needs_a_regular_slot() -> None:
    with pytest.raises(ValueError, match="regular slot"):
        SlotPool(regular=0, reserved=2)


@settings(max_examples=60, deadline=None)
@given(
    regular=st.integers(1, 4),
    reserved=st.integers(0, 2),
    steps=st.lists(st.tuples(st.booleans(), st.integers(0, 3)), min_size=1, max_size=25),
)
def test_limits_hold_and_every_step_runs(
    regular: int, reserved: int, steps: list[tuple[bool, int]]
) -> None:
    async def scenario() -> None:
        pool = SlotPool(regular, reserved)
        peak = {"all": 0, "regular": 0}
        done: list[int] = []

        async def step(i: int, express: bool, ticks: int) -> None:
            async with pool.slot(express=express):
                peak["all"] = max(peak["all"], pool.running)
                peak["regular"] = max(peak["regular"], pool.running_regular)
                for _ in range(ticks):
                    await asyncio.sleep(0)
                done.append(i)

        await asyncio.gather(*(step(i, e, t) for i, (e, t) in enumerate(steps)))
        assert sorted(done) == list(range(len(steps)))
        assert peak["all"] <= regular + reserved
        assert peak["regular"] <= regular
        assert pool.running == pool.running_regular == 0

    asyncio.run(scenario())


async def test_a_suspect_runs_alone_and_before_later_steps() -> None:
    pool = SlotPool(2, 1)
    order: list[str] = []
    release_first = asyncio.Event()

    async def step(name: str, hold: asyncio.Event | None = None) -> None:
        async with pool.slot():
            order.append(f"{name}+")
            if hold is not None:
                await hold.wait()
            order.append(f"{name}-")

    async def suspect() -> None:
        async with pool.alone():
            assert pool.running == 1
            order.append("alone+")
            await asyncio.sleep(0)
            order.append("alone-")

    first = asyncio.create_task(step("first", release_first))
    await asyncio.sleep(0)
    alone = asyncio.create_task(suspect())
    await asyncio.sleep(0)
    later = asyncio.create_task(step("later"))
    # the wait is the behaviour under test: nothing else may start meanwhile
    await asyncio.sleep(0.01)
    assert order == ["first+"]  # the suspect waits for the running step; later waits behind it
    release_first.set()
    await asyncio.gather(first, alone, later)
    assert order == ["first+", "first-", "alone+", "alone-", "later+", "later-"]
