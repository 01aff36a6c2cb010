"""How every process logs and exposes metrics: structlog set up once, Prometheus on demand."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """JSON lines when not on a TTY (collectors parse them), pretty output on a TTY.

    Context bound with `bound_context` (tenant, flow, execution) appears on every line.
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (aio-pika, aiokafka, faust) log through the standard library; keep them quiet
    # unless asked, and on the same stream.
    logging.basicConfig(level=max(logging.getLevelName(level), logging.WARNING), stream=sys.stderr)


@contextmanager
def bound_context(**values: str | None) -> Iterator[None]:
    """Binds tenant/flow/execution ids to every log line inside the block (contextvars)."""
    present = {key: value for key, value in values.items() if value is not None}
    with structlog.contextvars.bound_contextvars(**present):
        yield


def start_metrics_server(port: int, registry: CollectorRegistry = REGISTRY) -> int | None:
    """Serves `/metrics` on `port` (0 = disabled). Returns the port it serves on."""
    if port <= 0:
        return None
    start_http_server(port, addr="0.0.0.0", registry=registry)  # noqa: S104 - scraped from outside
    return port


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
