"""How every process logs and exposes metrics: structlog set up once, Prometheus on demand."""

from __future__ import annotations

import logging
import sys
import time
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
    # unless asked, and on the same stream. During a broker outage their clients log every
    # failed attempt (aiokafka: thousands of lines a second); one line per kind of message
    # every RATE_LIMIT_S says the same, and our own `outage.started` says it once.
    logging.basicConfig(level=max(logging.getLevelName(level), logging.WARNING), stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RateLimit) for f in handler.filters):
            handler.addFilter(RateLimit())


class RateLimit(logging.Filter):
    """Lets one record per (logger, message template) through every `interval_s`; the next
    one that passes says how many were held back."""

    def __init__(self, interval_s: float = 10.0, clock: Any = None) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock or time.monotonic
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        last = self.seen.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self.seen[key] = (last[0], last[1] + 1)
            return False
        if len(self.seen) > 10_000:  # templates are few; bounded all the same
            self.seen.clear()
        if last is not None and last[1]:
            record.msg = f"{record.msg} [{last[1]} similar lines suppressed]"
        self.seen[key] = (now, 0)
        return True


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
