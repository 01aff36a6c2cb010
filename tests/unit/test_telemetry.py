"""Log context binds once and shows on every line inside the block."""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs

from orchestrator.telemetry import bound_context, configure_logging


def test_bound_context_adds_ids_to_every_line() -> None:
    configure_logging("INFO", "json")
    log = structlog.get_logger("test")
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        with bound_context(tenant="acme", flow="daily-sync", execution=None):
            log.info("step.started")
        log.info("outside")
    assert logs[0]["tenant"] == "acme"
    assert logs[0]["flow"] == "daily-sync"
    assert "execution" not in logs[0]
    assert "tenant" not in logs[1]
