"""Step types for tests only: `orchestrator worker --steps tests.poison_steps` loads them.

Each appends the worker's pid to the file named by its `log` input (when given) before it does
anything else, so a test sees every delivery that started running, even one its worker did
not survive.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from workers.runtime import StepContext, step


def _log_run(ctx: StepContext) -> None:
    path = ctx.input.get("log")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()} {ctx.task.task_id}\n")


@step("test.crash")
async def crash(ctx: StepContext) -> dict[str, Any]:
    """Ends its worker process at once, as kill -9 or the OOM killer would (exit code 137)."""
    _log_run(ctx)
    os._exit(137)


@step("test.sleep")
async def sleep(ctx: StepContext) -> dict[str, Any]:
    """Logs that it started, then sleeps `ms` milliseconds (default 100)."""
    _log_run(ctx)
    # the wait is the behaviour under test: the step's work
    await asyncio.sleep(float(ctx.input.get("ms", 100)) / 1000)
    return {"slept_ms": ctx.input.get("ms", 100), "pid": os.getpid()}
