"""Worker runtime: step handlers registered with `@step`, run by `Worker` with measured usage.

from workers import step

@step("http.request")
async def fetch(ctx):
    ...
    return {"status": 200}
"""

from workers.runtime import StepContext, StepFailed, StepRegistry, Worker, registry, step

__all__ = ["StepContext", "StepFailed", "StepRegistry", "Worker", "registry", "step"]
