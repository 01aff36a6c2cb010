"""What the benchmarks share: an isolated vhost, percentiles, process CPU, table printing."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import subprocess
import sys
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from rich import box
from rich.console import Console
from rich.table import Table

from orchestrator.accounts import Management
from orchestrator.config import Settings, load_settings
from orchestrator.testing import process_env


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def cpu_seconds(pid: int | None) -> float:
    """A process's CPU time so far (user + system), from /proc; NaN where there is none."""
    try:
        return float("nan") if pid is None else process_cpu_s(pid)
    except OSError:
        return float("nan")


def broker_pid() -> int | None:
    """The local RabbitMQ node's Erlang VM, if it runs on this host (it does under
    scripts/infra): its CPU per step is the price of the dispatcher's extra hop."""
    found = subprocess.run(
        ["pgrep", "-f", "beam.smp.*rabbit"], capture_output=True, text=True, check=False
    ).stdout.split()
    return int(found[0]) if found else None


def run_queue_wait(pid: int | None) -> float:
    """Seconds a process's threads spent runnable but waiting for a core (schedstat): how much
    the other processes on the host held it back."""
    if pid is None:
        return float("nan")
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError), open(path) as stat:  # a thread may end meanwhile
            total += int(stat.read().split()[1])
    return total / 1e9


def host_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host so far, over all cores, from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def redis_pid() -> int | None:
    found = subprocess.run(
        ["pgrep", "-x", "redis-server"], capture_output=True, text=True, check=False
    ).stdout.split()
    return int(found[0]) if found else None


class CostMeter:
    """What a run cost, per unit of work: CPU ms of each process (the roles given, the broker's
    Erlang VM and redis-server when they run on this host), Redis commands, and messages the
    broker took in (published) and handed out (delivered) in the run's vhost."""

    def __init__(self, settings: Settings, pids: dict[str, int]) -> None:
        self.settings = settings
        self.pids: dict[str, int | None] = {**pids, "broker": broker_pid(), "redis": redis_pid()}

    def _redis_commands(self) -> int:
        import redis

        client = redis.Redis.from_url(str(self.settings.redis_url))
        try:
            return int(client.info("stats")["total_commands_processed"])
        finally:
            client.close()

    def _messages(self) -> tuple[int, int]:
        vhost = urllib.parse.urlsplit(str(self.settings.rabbitmq_url)).path.lstrip("/")
        with Management(self.settings.rabbitmq_management_url) as management:
            stats = (management.call("GET", f"/vhosts/{vhost}") or {}).get("message_stats", {})
        return int(stats.get("publish", 0)), int(stats.get("deliver_get", 0))

    def start(self) -> None:
        self.cpu = {role: cpu_seconds(pid) for role, pid in self.pids.items()}
        self.commands = self._redis_commands()
        self.counted = self._messages()

    def stop(self, units: int) -> dict[str, float]:
        """Per unit: `cpu_ms.<role>` and `redis_commands`, from now back to `start`."""
        cpu = {role: cpu_seconds(pid) - self.cpu[role] for role, pid in self.pids.items()}
        out = {f"cpu_ms.{role}": seconds * 1000 / units for role, seconds in cpu.items()}
        out["redis_commands"] = (self._redis_commands() - self.commands) / units
        return out

    def messages(self, units: int) -> dict[str, float]:
        """Per unit: `published` and `delivered` by the broker. Its counters are sampled
        every 5 s: call this that long after the run."""
        published, delivered = self._messages()
        return {
            "published": (published - self.counted[0]) / units,
            "delivered": (delivered - self.counted[1]) / units,
        }


def management(settings: Settings) -> Management:
    return Management(settings.rabbitmq_management_url)


@contextmanager
def isolated_settings(name: str) -> Iterator[Settings]:
    """Settings of this run's own: a fresh RabbitMQ vhost, Redis prefix, usage topic and
    violations app id; all of it removed afterwards (the vhost with every queue in it, the
    Redis keys, and every Kafka topic named after the run), so benches leave nothing behind
    and nothing of theirs reaches another instance on the same brokers."""
    base = load_settings()
    run = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    quoted = urllib.parse.quote(run, safe="")
    with management(base) as api:
        api.call("PUT", f"/vhosts/{quoted}", {})
        user = base.rabbitmq_url.username or "guest"
        permissions = {"configure": ".*", "write": ".*", "read": ".*"}
        api.call("PUT", f"/permissions/{quoted}/{user}", permissions)
    url = str(base.rabbitmq_url).rstrip("/")
    if url.count("/") > 2:
        url = url.rsplit("/", 1)[0]
    settings = base.model_copy(
        update={
            "rabbitmq_url": f"{url}/{quoted}",
            "redis_prefix": f"bench:{run}:",
            # Benches that need several topics name them after this one (`topic_of`).
            "usage_topic": f"{run}.usage",
            "violations_app_id": run,
        }
    )
    try:
        yield settings
    finally:
        with management(base) as api:
            api.call("DELETE", f"/vhosts/{quoted}")
        _delete_redis_prefix(settings)
        _delete_kafka_topics(settings, run)


def topic_of(settings: Settings, label: str) -> str:
    """A usage topic of the run's own (removed with it), for a scenario that needs a fresh
    one."""
    return f"{settings.usage_topic}.{label}"


def _delete_redis_prefix(settings: Settings) -> None:
    import redis

    client = redis.Redis.from_url(str(settings.redis_url))
    try:
        batch = []
        for key in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


def _delete_kafka_topics(settings: Settings, prefix: str) -> None:
    """Every topic whose name starts with the run's (usage topics, their DLQs, the violations
    app's changelogs). In a thread of its own: the caller's event loop may be running."""

    async def delete() -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_servers)
        await admin.start()
        try:
            topics = [t for t in await admin.list_topics() if t.startswith(prefix)]
            if topics:
                await admin.delete_topics(topics)
        finally:
            await admin.close()

    def run() -> None:
        try:
            asyncio.run(delete())
        except Exception as exc:  # reported, not fatal: the run's figures stand
            print(f"could not delete the run's Kafka topics: {exc!r}", file=sys.stderr)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)


def env_for(settings: Settings) -> dict[str, str]:
    return process_env(settings)


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A table on stdout (rich), right-aligned figures, whole however wide."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for header in headers:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=400).print(table)  # never wrapped: the output is read and diffed
