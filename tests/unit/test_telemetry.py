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


def test_metrics_endpoint_serves_prometheus_text() -> None:
    import socket

    import httpx
    from prometheus_client import CollectorRegistry, Counter

    from orchestrator.telemetry import start_metrics_server

    registry = CollectorRegistry()
    Counter("probe_total", "a probe", registry=registry).inc(3)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert start_metrics_server(0, registry) is None  # 0 disables
    assert start_metrics_server(port, registry) == port
    assert "probe_total 3.0" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def test_a_flood_of_library_log_lines_is_rate_limited() -> None:
    """During a Kafka outage aiokafka logged thousands of lines a second; one per kind of
    message every interval goes through, the next one says how many were held back."""
    import logging

    from orchestrator.telemetry import RateLimit

    now = [0.0]
    limit = RateLimit(interval_s=10.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, msg, None, None)

    passed = [limit.filter(record("Unable connect to %s")) for _ in range(5000)]
    assert passed.count(True) == 1
    assert limit.filter(record("another kind of line"))  # counted apart
    now[0] = 10.5
    again = record("Unable connect to %s")
    assert limit.filter(again)
    assert "4999 similar lines suppressed" in str(again.msg)


def test_library_log_handlers_get_the_rate_limit() -> None:
    import logging

    from orchestrator.telemetry import RateLimit

    configure_logging("INFO", "json")
    handlers = logging.getLogger().handlers
    assert handlers
    assert all(any(isinstance(f, RateLimit) for f in h.filters) for h in handlers)
