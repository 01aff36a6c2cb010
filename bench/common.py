"""What the benchmarks share: an isolated vhost, percentiles, process CPU, table printing."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

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
