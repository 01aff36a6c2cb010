"""What the benchmarks share: an isolated vhost, percentiles, process CPU, table printing."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator.accounts import Management
from orchestrator.config import Settings, load_settings
from tests.integration.processes import process_env


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


def _management(settings: Settings, method: str, path: str, body: object | None = None) -> None:
    parsed = urllib.parse.urlsplit(settings.rabbitmq_management_url)
    base = f"{parsed.scheme}://{parsed.hostname}:{parsed.port or 15672}/api"
    manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    manager.add_password(None, base, parsed.username or "guest", parsed.password or "guest")
    opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(manager))
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"content-type": "application/json"}
    )
    with opener.open(request, timeout=30):
        pass


@contextmanager
def isolated_settings(name: str) -> Iterator[Settings]:
    """Settings pointing at a fresh RabbitMQ vhost and Redis prefix, removed afterwards."""
    base = load_settings()
    vhost = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    quoted = urllib.parse.quote(vhost, safe="")
    _management(base, "PUT", f"/vhosts/{quoted}", {})
    user = base.rabbitmq_url.username or "guest"
    _management(
        base,
        "PUT",
        f"/permissions/{quoted}/{user}",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    url = str(base.rabbitmq_url).rstrip("/")
    if url.count("/") > 2:
        url = url.rsplit("/", 1)[0]
    try:
        yield base.model_copy(
            update={"rabbitmq_url": f"{url}/{quoted}", "redis_prefix": f"bench:{vhost}:"}
        )
    finally:
        _management(base, "DELETE", f"/vhosts/{quoted}")


def env_for(settings: Settings) -> dict[str, str]:
    return process_env(settings)


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
