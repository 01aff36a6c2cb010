"""How every process logs and exposes metrics: structlog set up once, Prometheus on demand."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server


def configure_logging(level: str = "INFO", fmt: str = "auto", file: Path | None = None) -> None:
    """JSON lines when not on a TTY (collectors parse them), pretty output on a TTY; to
    `file` instead of stderr if given (a live view owns the terminal).

    Context bound with `bound_context` (tenant, flow, execution) appears on every line.
    """
    stream: TextIO = sys.stderr if file is None else file.open("a", buffering=1)
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
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
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    # Libraries (aio-pika, aiokafka, faust) log through the standard library; keep them quiet
    # unless asked, and on the same stream. During a broker outage their clients log every
    # failed attempt (aiokafka: thousands of lines a second); one line per kind of message
    # every RATE_LIMIT_S says the same, and our own `outage.started` says it once.
    # Moving the output to a file replaces the handlers set up for stderr before.
    logging.basicConfig(
        level=max(logging.getLevelName(level), logging.WARNING),
        stream=stream,
        force=file is not None,
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, Transient) for f in handler.filters):
            handler.addFilter(Transient())
        if not any(isinstance(f, RateLimit) for f in handler.filters):
            handler.addFilter(RateLimit())


# What Kafka clients report at ERROR while a broker or consumer group is still starting (or
# moving a partition): they retry by themselves and carry on; an operator has nothing to do.
TRANSIENT_KAFKA = (
    "GroupCoordinatorNotAvailableError",
    "NotCoordinatorForGroupError",
    "CoordinatorNotAvailableError",
    "NodeNotReadyError",
    "LeaderNotAvailableError",
)


class Transient(logging.Filter):
    """Library records about transient Kafka conditions become INFO (shown only at INFO):
    a healthy start prints no alarming line. A lasting outage is reported by our own
    `outage.started` warning, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(("aiokafka", "faust")):
            return True
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        text += record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        if not any(name in text for name in TRANSIENT_KAFKA):
            return True
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger().getEffectiveLevel() <= logging.INFO


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
