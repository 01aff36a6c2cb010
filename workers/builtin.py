"""Built-in step types for demos and tests: demo.sleep, demo.cpu, demo.fail, demo.echo."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from workers.runtime import StepContext, StepFailed, step


@step("demo.echo")
async def echo(ctx: StepContext) -> dict[str, Any]:
    """Returns its input (without the dependencies' outputs) and what it saw of them."""
    own = {k: v for k, v in ctx.input.items() if k != "deps"}
    return {"echo": own, "deps": sorted(ctx.input.get("deps", {})), "step": ctx.task.step_id}


@step("demo.sleep")
async def sleep(ctx: StepContext) -> dict[str, Any]:
    """Sleeps `ms` milliseconds (default 100); records when it ran."""
    started = time.time()
    await asyncio.sleep(float(ctx.input.get("ms", 100)) / 1000)
    return {"slept_ms": ctx.input.get("ms", 100), "started": started, "finished": time.time()}


@step("demo.cpu")
def cpu(ctx: StepContext) -> dict[str, Any]:
    """Burns CPU for `ms` milliseconds (default 50), in a worker thread."""
    budget = float(ctx.input.get("ms", 50)) / 1000
    started = time.thread_time()
    spins = 0
    while time.thread_time() - started < budget:
        spins += sum(range(1000)) and 1
    return {"spins": spins}


@step("demo.fail")
async def fail(ctx: StepContext) -> dict[str, Any]:
    """Fails its first `times` attempts (default: always), then succeeds.
    `retryable: false` makes the failures final."""
    times = int(ctx.input.get("times", 1_000))
    if ctx.task.kind == "action" and ctx.task.attempt <= times:
        raise StepFailed(
            f"demo failure {ctx.task.attempt} of {times}",
            retryable=bool(ctx.input.get("retryable", True)),
            error_type="DemoFailure",
        )
    return {"attempt": ctx.task.attempt}
