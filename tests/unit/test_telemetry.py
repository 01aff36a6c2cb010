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
    import urllib.request

    from prometheus_client import CollectorRegistry, Counter

    from orchestrator.telemetry import start_metrics_server

    registry = CollectorRegistry()
    Counter("probe_total", "a probe", registry=registry).inc(3)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert start_metrics_server(0, registry) is None  # 0 disables
    assert start_metrics_server(port, registry) == port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert "probe_total 3.0" in text
