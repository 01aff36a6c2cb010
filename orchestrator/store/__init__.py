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
    )
    return aioredis.Redis(connection_pool=pool)


class Keys:
    """Every Redis key the orchestrator writes, under one configurable prefix.

    A flow is addressed as the member `<tenant>/<flow>` (slugs contain no `/`).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.flows = f"{prefix}flows"  # set of members
        self.due = f"{prefix}due"  # zset member -> fire-at (epoch ms, jitter included)
        self.nominal = f"{prefix}nominal"  # hash member -> nominal fire time (epoch ms)
        self.buffered_index = f"{prefix}buffered"  # set of members with a waiting execution
        self.workers = f"{prefix}workers"  # set of worker ids (the registry's index)
        # Registered tenants: those with flows (or configuration). Only they have queues.
        self.tenants = f"{prefix}tenants"
        # The leading dispatcher's last-minute summary (JSON, expiring), for the live views.
        self.dispatcher_stats = f"{prefix}stats:dispatcher"

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
