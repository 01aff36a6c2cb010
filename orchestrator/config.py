"""Where every process gets its configuration: `ORCH_*` environment variables, read once."""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AmqpDsn, Field, RedisDsn, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ORCH_"
_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$")


class ConfigError(Exception):
    """Invalid configuration; the message names each bad `ORCH_*` variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    rabbitmq_url: AmqpDsn = AmqpDsn("amqp://guest:guest@localhost:5672/")
    rabbitmq_management_url: str = "http://guest:guest@localhost:15672/"
    kafka_bootstrap: str = "localhost:9092"
    redis_url: RedisDsn = RedisDsn("redis://localhost:6379/0")
    # Every Redis key starts with this, so several deployments (or test runs) share one Redis.
    redis_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{0,64}$")] = "orch:"
    usage_topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = "orchestrator.usage"
    # Partitions of the usage topic when we create it. The violations consumer compares a
    # tenant's usage with the total of its partition, so one partition (one active consumer,
    # others standing by) gives shares of the whole platform.
    usage_partitions: Annotated[int, Field(ge=1, le=1000)] = 1
    kafka_replication: Annotated[int, Field(ge=1, le=10)] = 1

    # Scheduler. A tick later than the grace counts as missed (downtime) and goes through the
    # flow's catch-up policy; within it, every tick fires even when the scheduler is busy.
    misfire_grace_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    # How long one replica may hold a due tick before another may take it over. Short, so a
    # killed replica delays its in-flight ticks by seconds only; a publish takes milliseconds.
    tick_claim_lease_s: Annotated[float, Field(gt=0, le=600)] = 3.0
    # Ticks of one round fired at once (a round claims up to 1,000 due ticks): a burst of
    # simultaneous ticks shares round trips (admission scripts batched, publishes and their
    # confirms overlapping) instead of queueing behind a few slots. A replica killed mid-round
    # re-fires at most this many ticks (same ids: consumers drop the copies).
    scheduler_concurrency: Annotated[int, Field(ge=1, le=10_000)] = 1000
    # Overlap protection: the running lease of a flow expires this long after the engine's last
    # heartbeat, so a crashed owner never blocks a flow forever.
    running_lease_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    idempotency_ttl_s: Annotated[int, Field(ge=60, le=30 * 86_400)] = 86_400
    # Engine. A step type whose attempts failed this many times in a row opens its circuit
    # breaker: steps of that type wait (instead of burning retries) for the cool-down.
    breaker_threshold: Annotated[int, Field(ge=1, le=1000)] = 5
    breaker_cooldown_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    engine_prefetch: Annotated[int, Field(ge=1, le=10_000)] = 64
    # Dispatcher: at most this fraction of the live worker slots is released ahead into the
    # work queues (the dispatcher sizes it from the measured round trip; see dispatcher.md).
    # Each such step keeps a slot from idling, and is one a newly active tenant may wait behind.
    dispatcher_headroom: Annotated[float, Field(ge=0, le=4)] = 1.0
    # Violations consumer: the policy file (reloaded when it changes), how late (broker append
    # time after the window's end) a usage event may be and still count, and how often the
    # consumer ticks (closes windows, announces expiries).
    violations_policy: Path = Path("policy.yaml")
    violations_grace_s: Annotated[float, Field(ge=0, le=300)] = 1.0
    violations_tick_s: Annotated[float, Field(gt=0, le=60)] = 0.25
    # A usage record that reaches Kafka after its window was judged (workers flushing their
    # buffers after a Kafka outage) amends the window for this long after its end: it is
    # judged again, and a violation it shows is decided then. Later records are ignored.
    violations_late_s: Annotated[float, Field(ge=0, le=86_400)] = 600.0
    violations_app_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,100}$")] = (
        "orchestrator-violations"
    )
    violations_data_dir: Path = Path(".violations")
    # Kafka static group membership: a replacement process with the same id takes over at once
    # instead of waiting for the dead one's session to time out. Unique per live process.
    violations_instance_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,100}$")] | None = None
    # Finished executions stay readable in Redis this long (status, outputs), then expire.
    execution_ttl_s: Annotated[int, Field(ge=60, le=90 * 86_400)] = 7 * 86_400
    # Flow-start requests must carry an AMQP user_id (RabbitMQ checks it is the publishing
    # account's): a tenant account starts its own flows, an operator account anybody's.
    require_auth: bool = True
    # Every account's name starts with this (orchestrator.accounts): tenant T's account is
    # `<prefix>tenant.T`, the operator's `<prefix>operator`.
    account_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{0,64}$")] = "orchestrator."
    # More accounts that may start any tenant's flows (comma-separated), besides the operator.
    # `guest` is RabbitMQ's default administrator (it may only log in from localhost), so a
    # development broker works unprovisioned; a production broker has no guest.
    operator_users: str = "guest"
    # Flow starts per tenant: a burst this large, then this many a second (0: unlimited).
    # Beyond it, requests are refused with reason `rate_limited` (announced, not queued).
    ingress_rate_per_s: Annotated[float, Field(ge=0, le=1_000_000)] = 100.0
    ingress_burst: Annotated[int, Field(ge=1, le=10_000_000)] = 1_000
    # Flow-start requests of one tenant a scheduler replica handles at once (the prefetch of
    # each tenant's ingress queue): small, so a flooding tenant holds a small share of the
    # replica while another tenant's request is handled at once.
    ingress_prefetch: Annotated[int, Field(ge=1, le=1000)] = 4

    # A process rides out broker outages (consumers hold their messages and retry, loops wait)
    # and exits with code 69 (EX_UNAVAILABLE) only when one lasts longer than this.
    outage_limit_s: Annotated[float, Field(gt=0, le=86_400)] = 120.0
    # A Redis call with no answer for this long fails (and its connection is dropped): a
    # connection whose peer vanished without a reset would otherwise wait forever.
    redis_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    # 0 disables the Prometheus endpoint.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    # Traces (OpenTelemetry) of every hop: none, console (spans as JSON on stdout), or otlp
    # (OTLP over HTTP, configured by the standard OTEL_EXPORTER_OTLP_* variables).
    traces: Literal["none", "console", "otlp"] = "none"

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        servers = [part.strip() for part in value.split(",") if part.strip()]
        bad = [server for server in servers if not _HOST_PORT.match(server)]
        if not servers or bad:
            raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return ",".join(servers)

    @property
    def operator_accounts(self) -> frozenset[str]:
        extra = {u.strip() for u in self.operator_users.split(",") if u.strip()}
        return frozenset({f"{self.account_prefix}operator", *extra})

    @property
    def kafka_servers(self) -> list[str]:
        return self.kafka_bootstrap.split(",")


def load_settings(**overrides: object) -> Settings:
    """Reads the environment now (never at import time) and explains what is wrong."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            problems.append(f"{ENV_PREFIX}{field.upper()}: {error['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def instance_id() -> str:
    """This process among its replicas: `<host>:<pid>:<random>` (leases and claims name their
    holder so; operators read the pid from it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
