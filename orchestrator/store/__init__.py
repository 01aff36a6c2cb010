"""State in Redis: flow registry, due index, leases, idempotency keys, tenant state."""

from __future__ import annotations

import redis.asyncio as aioredis

from orchestrator.config import Settings

# Connections per process. A blocking pool makes a burst of concurrent ticks wait for a free
# connection instead of failing with "Too many connections".
MAX_CONNECTIONS = 128
POOL_TIMEOUT_S = 30

# Leases held by an owner id: only the owner may extend (KEYS[1], ARGV owner, ttl ms) or
# release (KEYS[1], ARGV owner) its lease; anybody else's call is a no-op returning 0.
EXTEND_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def connect(settings: Settings) -> aioredis.Redis:
    """One client (a connection pool) per process; strings in, strings out."""
    pool = aioredis.BlockingConnectionPool.from_url(
        str(settings.redis_url),
        decode_responses=True,
        health_check_interval=30,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_TIMEOUT_S,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    return aioredis.Redis(connection_pool=pool)


class Keys:
    """Every Redis key the orchestrator writes, under one configurable prefix: the one place
    that names them (services build none of their own).

    A flow is addressed as the member `<tenant>/<flow>` (slugs contain no `/`).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        # scheduler
        self.flows = f"{prefix}flows"  # set of members
        self.due = f"{prefix}due"  # zset member -> fire-at (epoch ms, jitter included)
        self.nominal = f"{prefix}nominal"  # hash member -> nominal fire time (epoch ms)
        self.buffered_index = f"{prefix}buffered"  # set of members with a waiting execution
        # workers
        self.workers = f"{prefix}workers"  # set of worker ids (the registry's index)
        # tenants: registered ones (with flows or configuration); only they have queues
        self.tenants = f"{prefix}tenants"
        self.quarantined_flows = f"{prefix}quarantined-flows"  # index of flow quarantines
        # engine
        self.timers = f"{prefix}timers"  # zset "<execution>|<kind>|<step>|<attempt>" -> due ms
        self.live = f"{prefix}live"  # hash execution id -> flow member (running executions)
        # dispatcher
        self.dispatcher_lease = f"{prefix}dispatcher:leader"
        # The leading dispatcher's last-minute summary (JSON, expiring), for the live views.
        self.dispatcher_stats = f"{prefix}stats:dispatcher"

    # ---------------------------------------------------------------- tenants
    def tenant_config(self, tenant: str) -> str:
        """Hash: weight, concurrency cap, rate."""
        return f"{self.prefix}tenant:{tenant}"

    def penalty(self, tenant: str) -> str:
        """The penalty in force (JSON), expiring with it."""
        return f"{self.prefix}penalty:{tenant}"

    def command(self, command_id: str) -> str:
        """A control command applied (replays are no-ops)."""
        return f"{self.prefix}command:{command_id}"

    def violations(self, tenant: str) -> str:
        """Zset of the tenant's last violations (for operators)."""
        return f"{self.prefix}violations:{tenant}"

    # ---------------------------------------------------------------- engine
    def execution(self, execution_id: str) -> str:
        return f"{self.prefix}exec:{execution_id}"

    def outbox(self, execution_id: str) -> str:
        return f"{self.prefix}exec:{execution_id}:outbox"

    @property
    def outbox_pattern(self) -> str:
        return f"{self.prefix}exec:*:outbox"

    def outbox_owner(self, key: str) -> str:
        """The execution id of an outbox key."""
        return key.removeprefix(f"{self.prefix}exec:").removesuffix(":outbox")

    def flush_lock(self, execution_id: str) -> str:
        return f"{self.prefix}exec:{execution_id}:flush"

    def definition(self, digest: str) -> str:
        """A flow definition as finished executions refer to it (by the sha1 of its JSON)."""
        return f"{self.prefix}flowdef:{digest}"

    def execution_index(self, tenant: str) -> str:
        """A tenant's executions by start time (ms), for listing; trimmed to the state TTL."""
        return f"{self.prefix}executions:{tenant}"

    def breaker(self, tenant: str, step_type: str) -> str:
        """One breaker per (tenant, step type): a tenant's failing steps hold back its own
        steps of that type only, never another tenant's."""
        return f"{self.prefix}breaker:{tenant}:{step_type}"

    def probe(self, tenant: str, step_type: str) -> str:
        return f"{self.prefix}breaker:{tenant}:{step_type}:probe"

    # ---------------------------------------------------------------- dispatcher, workers
    def dispatched(self, task_id: str) -> str:
        """Marker: this attempt was released to a work queue (a redelivered copy is dropped)."""
        return f"{self.prefix}dispatched:{task_id}"

    def returned(self, task_id: str) -> str:
        """How often a worker gave this attempt back while draining (not a crash)."""
        return f"{self.prefix}returned:{task_id}"

    def alone(self, task_id: str) -> str:
        """Marker: a suspected poison attempt runs alone on its worker."""
        return f"{self.prefix}alone:{task_id}"

    def execution_counts(self, second: int) -> str:
        """Executions that reached each state in one second (a hash, expiring): the live
        views' executions per second, summed over engine replicas."""
        return f"{self.prefix}stats:executions:{second}"

    def worker(self, worker_id: str) -> str:
        """A worker's heartbeat entry; it expires when the worker stops beating."""
        return f"{self.prefix}worker:{worker_id}"

    def flow(self, member: str) -> str:
        return f"{self.prefix}flow:{member}"

    def claim(self, member: str) -> str:
        return f"{self.prefix}claim:{member}"

    def running(self, member: str) -> str:
        return f"{self.prefix}running:{member}"

    def buffered(self, member: str) -> str:
        return f"{self.prefix}buffered:{member}"

    def idempotency(self, member: str, key_digest: str) -> str:
        return f"{self.prefix}idem:{member}:{key_digest}"

    def ingress_rate(self, tenant: str) -> str:
        """The tenant's flow-start token bucket (expires when full again)."""
        return f"{self.prefix}ingress-rate:{tenant}"

    def quarantine(self, tenant: str, flow: str | None = None) -> str:
        target = tenant if flow is None else f"{tenant}/{flow}"
        return f"{self.prefix}quarantine:{target}"


def member(tenant: str, flow: str) -> str:
    return f"{tenant}/{flow}"


def split_member(value: str) -> tuple[str, str]:
    tenant, _, flow = value.partition("/")
    return tenant, flow
