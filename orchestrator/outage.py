"""Whether this process's brokers answer, since when they do not, and when to give up.

A process rides out an outage of Redis, RabbitMQ or Kafka: its consumers hold their messages
and retry with capped backoff, its loops log one warning and wait. It is *not ready*
(`/readyz`) meanwhile. Only an outage longer than `ORCH_OUTAGE_LIMIT_S` ends it, with
`EXIT_OUTAGE`, so a supervisor can tell "gave up on a broker" from a crash.

One tracker per process (like the Prometheus registry): every part of a process reports to
`OUTAGES`, the watchdog in `orchestrator.process` reads it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aio_pika.exceptions
import aiormq.exceptions
import redis.exceptions
from prometheus_client import Counter, Gauge
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential

from orchestrator.clock import Clock
from orchestrator.telemetry import get_logger

log = get_logger(__name__)

# sysexits.h EX_UNAVAILABLE: "a service is unavailable". Restart me later, I am not broken.
EXIT_OUTAGE = 69

OUTAGE_ACTIVE = Gauge(
    "orchestrator_outage_active", "1 while a dependency does not answer", ["dependency"]
)
OUTAGE_TOTAL = Counter("orchestrator_outages_total", "Outages seen, by dependency", ["dependency"])

_REDIS_TRANSIENT = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
)
_AMQP_TRANSIENT = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPError,
)


def dependency_of(exc: BaseException) -> str | None:  # noqa: PLR0911 - one answer per kind
    """The broker whose failure `exc` is, or None when it is not a broker failure (a bug)."""
    if isinstance(exc, _REDIS_TRANSIENT):
        return "redis"
    if isinstance(exc, redis.exceptions.RedisError):
        return None  # WRONGTYPE, script errors: our bug, not an outage
    if isinstance(exc, _AMQP_TRANSIENT):
        return "rabbitmq"
    if isinstance(exc, (TimeoutError, ConnectionError, OSError)):
        return "network"
    if type(exc).__module__.startswith(("aiokafka", "kafka")):
        return "kafka"
    if isinstance(exc, RuntimeError) and _raised_in(exc, ("/aio_pika/", "/aiormq/")):
        # aio-pika reports a connection that is reconnecting as RuntimeError ("Connection
        # was not opened", "... closed"): a RabbitMQ outage, not our bug.
        return "rabbitmq"
    return None


def _raised_in(exc: BaseException, paths: tuple[str, ...]) -> bool:
    """Whether the innermost frame of `exc`'s traceback is in one of these packages."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    return any(path in filename for path in paths)


class OutageExceeded(Exception):
    def __init__(self, dependency: str, seconds: float) -> None:
        super().__init__(f"{dependency} has not answered for {seconds:.0f}s")
        self.dependency = dependency
        self.seconds = seconds


class Outages:
    """Failing dependencies and since when (monotonic). Logs once per outage, not per error."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.since: dict[str, float] = {}
        self.last_error: dict[str, str] = {}

    def failed(self, dependency: str, error: BaseException | str) -> None:
        self.last_error[dependency] = repr(error) if isinstance(error, BaseException) else error
        if dependency not in self.since:
            self.since[dependency] = self.clock()
            OUTAGE_ACTIVE.labels(dependency).set(1)
            OUTAGE_TOTAL.labels(dependency).inc()
            log.warning("outage.started", dependency=dependency, error=self.last_error[dependency])

    def recovered(self, dependency: str) -> None:
        started = self.since.pop(dependency, None)
        if started is not None:
            OUTAGE_ACTIVE.labels(dependency).set(0)
            log.warning(
                "outage.ended", dependency=dependency, seconds=round(self.clock() - started, 1)
            )

    def recovered_all(self) -> None:
        for dependency in list(self.since):
            self.recovered(dependency)

    @property
    def ready(self) -> bool:
        return not self.since

    def longest(self) -> tuple[str, float] | None:
        if not self.since:
            return None
        dependency = min(self.since, key=self.since.__getitem__)
        return dependency, self.clock() - self.since[dependency]

    def check(self, limit_s: float, critical: frozenset[str] | None = None) -> None:
        """Raises OutageExceeded when a dependency the process cannot work without (all of
        them unless `critical` says) has been down longer than `limit_s`."""
        now = self.clock()
        for dependency, since in sorted(self.since.items(), key=lambda item: item[1]):
            if critical is not None and dependency not in critical:
                continue
            if now - since > limit_s:
                raise OutageExceeded(dependency, now - since)


OUTAGES = Outages()


async def sleep_unless(stop: asyncio.Event, seconds: float, clock: Clock | None = None) -> bool:
    """Sleeps `seconds` (on `clock`, when given: a test's ManualClock) or until `stop` is
    set; True when stopped. The one such idiom."""
    if stop.is_set():
        return True
    if clock is not None:
        sleeper = asyncio.ensure_future(clock.sleep(seconds))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for future in (sleeper, stopper):
            future.cancel()
        return stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


def retrying(
    stop: asyncio.Event,
    *,
    first_s: float,
    max_s: float,
    retry_on: Callable[[BaseException], bool] = lambda _: True,
    before_sleep: Callable[[RetryCallState], None] | None = None,
) -> AsyncRetrying:
    """Tries until it works (`async for attempt in retrying(...): with attempt: ...`):
    waits `first_s`, doubling up to `max_s`, between tries; an error `retry_on` refuses is
    raised at once, and once `stop` is set the last error is raised (tenacity)."""

    async def pause(seconds: float) -> None:
        await sleep_unless(stop, seconds)

    return AsyncRetrying(
        retry=retry_if_exception(retry_on),
        wait=wait_exponential(multiplier=first_s, max=max_s),
        stop=lambda _: stop.is_set(),
        sleep=pause,
        before_sleep=before_sleep,
        reraise=True,
    )
