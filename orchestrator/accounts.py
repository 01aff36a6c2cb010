"""Who may do what on the broker: tenant accounts and one service account per process type,
as data, and their provisioning through the RabbitMQ management HTTP API.

RabbitMQ enforces all of it, so a tenant holding its own AMQP login cannot reach another
tenant's work whatever it sends:

* vhost permissions (`configure`, `write`, `read`: regexes over exchange and queue names)
  say which objects an account may declare, publish to / bind, and consume / bind from;
* topic permissions (per topic exchange: regexes over routing keys) say which keys it may
  publish with (`write`) and bind with (`read`);
* `user_id` on a published message must equal the publishing account (the broker checks it),
  so the scheduler knows who sent a flow-start request.

Names: every account starts with `ORCH_ACCOUNT_PREFIX` (`orchestrator.`), tenant T's is
`<prefix>tenant.T`, a service's `<prefix><role>`. Tenant ids are slugs (no dots), so no tenant
account can collide with a service account.

The exchanges themselves are declared by the operator (`orchestrator topology apply`, also
run by `accounts provision`); a service declares only its own queues, so no service account
may delete an exchange, and none but the operator's may touch another service's queues.
"""

from __future__ import annotations

import re
import secrets
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import redis

from orchestrator import topology

Role = Literal["scheduler", "engine", "dispatcher", "worker", "violations", "operator"]
ROLES: tuple[Role, ...] = ("scheduler", "engine", "dispatcher", "worker", "violations", "operator")
DEFAULT_PREFIX = "orchestrator."

# Status queues a tenant may declare and consume: `status.<tenant>.<name>`.
STATUS_QUEUE_PREFIX = "status."
NAME = r"[A-Za-z0-9_.:-]{1,200}"
NOTHING = "^$"
ANYTHING = ".*"

# Per tenant account: connections and channels it may hold (user limits, RabbitMQ 3.10+).
TENANT_MAX_CONNECTIONS = 20
TENANT_MAX_CHANNELS = 100
# An operator policy over every status queue: its tenant cannot lift it. A status queue
# nobody consumes for an hour is deleted, and none holds more than 100,000 events.
STATUS_QUEUE_POLICY = {
    "pattern": r"^status\.",
    "apply-to": "queues",
    "priority": 10,
    "definition": {"max-length": 100_000, "expires": 3_600_000},
}


def status_queue_name(tenant: str, name: str) -> str:
    """A tenant's own status queue (the only queues its account may declare)."""
    return f"{STATUS_QUEUE_PREFIX}{tenant}.{name}"


def _alt(*patterns: str) -> str:
    return "^(" + "|".join(patterns) + ")$"


def _q(name: str) -> str:
    return re.escape(name)


@dataclass(frozen=True)
class Permissions:
    """What one account may do in the vhost. `topics` maps a topic exchange to the
    (write, read) routing-key regexes; an exchange not listed is not restricted by key (its
    vhost permissions still apply)."""

    configure: str
    write: str
    read: str
    topics: dict[str, tuple[str, str]] = field(default_factory=dict)
    tags: str = ""


def tenant_permissions(tenant: str) -> Permissions:
    """A tenant may publish flow-start requests for itself, and declare, bind and consume its
    own status queues, bound only with its own keys. Nothing else."""
    own = _q(f"{STATUS_QUEUE_PREFIX}{tenant}.") + NAME
    return Permissions(
        configure=_alt(own),
        write=_alt(_q(topology.COMMANDS), own),
        read=_alt(_q(topology.STATUS), own),
        topics={
            topology.COMMANDS: (
                _alt(
                    _q(topology.flow_start_key(tenant)),
                    _q(topology.query_key(tenant)),
                    _q(topology.cancel_key(tenant)),
                ),
                NOTHING,
            ),
            topology.STATUS: (NOTHING, "^" + _q(f"{tenant}.")),
            topology.CONTROL: (NOTHING, NOTHING),
        },
    )


def _queues(*names: str) -> str:
    """Queues by name pattern (already regex), each with its DLQ."""
    return "|".join(f"(?:{n})(\\.dlq)?" for n in names)


SLUG = r"[a-z0-9_-]+"
_EXCHANGE = {
    "commands": _q(topology.COMMANDS),
    "steps": _q(topology.STEPS),
    "work": _q(topology.WORK),
    "status": _q(topology.STATUS),
    "control": _q(topology.CONTROL),
    "dlx": _q(topology.DEAD_LETTERS),
}
_INGRESS = _q(topology.INGRESS_QUEUE_PREFIX) + SLUG
_FQ = _q(topology.TENANT_QUEUE_PREFIX) + SLUG
_ENGINE = _alt(
    _q(topology.EXECUTIONS_QUEUE),
    _q(topology.RESULTS_QUEUE),
    _q(topology.QUERIES_QUEUE),
    _q(topology.CANCELS_QUEUE),
)[1:-1]
_DISPATCHER = "|".join((_q(topology.CONTROL_QUEUE), _q(topology.COMPLETIONS_QUEUE)))
_WORK = r"work\." + r"[a-z0-9_-]+(\.express)?"


def _x(*names: str) -> list[str]:
    return [_EXCHANGE[n] for n in names]


def service_permissions(role: Role) -> Permissions:
    """Least privilege per process type. Every service may publish status events and the
    DLQ copies of what it rejects; beyond that each publishes only its own outputs."""
    status_only = {topology.STATUS: (ANYTHING, NOTHING)}
    if role == "scheduler":
        mine = _queues(_INGRESS)
        return Permissions(
            configure=_alt(mine),
            write=_alt(*_x("commands", "status", "dlx"), mine),
            read=_alt(*_x("commands", "dlx"), mine),
            topics={
                topology.COMMANDS: (
                    _alt(r"execution\.requested"),
                    _alt(r"flow\.start\." + SLUG),
                ),
                topology.CONTROL: (NOTHING, NOTHING),
                **status_only,
            },
        )
    if role == "engine":
        mine = _queues(_ENGINE, _FQ)
        return Permissions(
            configure=_alt(mine),
            # amq.default: answers to queries go to the asker's reply_to queue.
            write=_alt(*_x("steps", "status", "dlx"), r"amq\.default", mine),
            read=_alt(*_x("commands", "steps", "dlx"), mine),
            topics={
                topology.COMMANDS: (
                    NOTHING,
                    _alt(r"execution\.requested", r"step\.result", r"query\.\*", r"cancel\.\*"),
                ),
                topology.CONTROL: (NOTHING, NOTHING),
                **status_only,
            },
        )
    if role == "dispatcher":
        mine = _queues(_FQ, _DISPATCHER)
        return Permissions(
            configure=_alt(mine),
            write=_alt(*_x("work", "status", "dlx"), mine),
            read=_alt(*_x("commands", "steps", "control", "dlx"), mine),
            topics={
                topology.COMMANDS: (NOTHING, _alt(r"step\.result")),
                topology.CONTROL: (NOTHING, ANYTHING),
                **status_only,
            },
        )
    if role == "worker":
        mine = _queues(_WORK)
        return Permissions(
            configure=_alt(mine),
            write=_alt(*_x("commands", "status", "dlx"), mine),
            read=_alt(*_x("work", "dlx"), mine),
            topics={
                topology.COMMANDS: (_alt(r"step\.result"), NOTHING),
                topology.CONTROL: (NOTHING, NOTHING),
                **status_only,
            },
        )
    if role == "violations":
        return Permissions(
            configure=NOTHING,
            write=_alt(*_x("control", "status")),
            read=NOTHING,
            topics={
                topology.COMMANDS: (NOTHING, NOTHING),
                topology.CONTROL: (_alt(r"(penalty|quarantine|release)\." + SLUG), NOTHING),
                **status_only,
            },
        )
    # The operator: topology, flow starts for any tenant, control commands, DLQ inspection
    # and replay. The management tag lets `orchestrator` read queue depths over HTTP.
    return Permissions(configure=ANYTHING, write=ANYTHING, read=ANYTHING, tags="management")


# ---------------------------------------------------------------- Redis ACL
# Workers run tenants' step code, so theirs is the account worth narrowing: only the worker
# registry and the poison markers, never tenant state (weights, penalties, quarantines).
# Every other service works across the keyspace of its deployment (its prefix). Nobody but
# the Redis administrator may run @dangerous commands (FLUSHALL, KEYS, CONFIG, ACL, ...).
REDIS_KEYS: dict[Role, tuple[str, ...]] = {
    "worker": ("workers", "worker:*", "returned:*", "alone:*"),
}


def redis_rules(role: Role, key_prefix: str) -> list[str]:
    """ACL SETUSER rules (after `reset on >secret`) for a service's Redis account."""
    patterns = REDIS_KEYS.get(role, ("*",))
    return [
        *(f"~{key_prefix}{pattern}" for pattern in patterns),
        "resetchannels",
        "+@all",
        "-@dangerous",
        "+info",  # health checks read the server version
    ]


def tenant_user(tenant: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}tenant.{tenant}"


def service_user(role: Role, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}{role}"


def tenant_of_user(user: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    """The tenant an account belongs to, or None for any other account."""
    head = f"{prefix}tenant."
    return user[len(head) :] if user.startswith(head) else None


def new_secret() -> str:
    return secrets.token_urlsafe(24)


class ManagementError(Exception):
    """The management API refused or failed a call; the message says which and why."""


class Management:
    """The parts of the RabbitMQ management HTTP API that provisioning needs (httpx)."""

    def __init__(self, url: str, timeout_s: float = 15.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ManagementError(f"not an http(s) management URL: {_redact(url)}")
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/api"
        auth = (
            urllib.parse.unquote(parts.username or "guest"),
            urllib.parse.unquote(parts.password or "guest"),
        )
        self.client = httpx.Client(base_url=self.base, auth=auth, timeout=timeout_s)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Management:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, body: object | None = None) -> Any:
        try:
            response = self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ManagementError(f"management API at {self.base}: {exc}") from None
        if response.status_code == 404 and method == "DELETE":
            return None
        if response.status_code >= 400:
            raise ManagementError(
                f"{method} {path}: HTTP {response.status_code} {response.text[:300]}"
            )
        return response.json() if response.content else None

    # ------------------------------------------------------------------ users
    def user_exists(self, user: str) -> bool:
        try:
            self.call("GET", f"/users/{_p(user)}")
        except ManagementError as exc:
            if "HTTP 404" in str(exc):
                return False
            raise
        return True

    def put_user(self, user: str, password: str, tags: str = "") -> None:
        self.call("PUT", f"/users/{_p(user)}", {"password": password, "tags": tags})

    def delete_user(self, user: str) -> None:
        self.call("DELETE", f"/users/{_p(user)}")

    def grant(self, vhost: str, user: str, permissions: Permissions) -> None:
        """Sets the account's vhost and topic permissions, replacing any it had."""
        self.call(
            "PUT",
            f"/permissions/{_p(vhost)}/{_p(user)}",
            {
                "configure": permissions.configure,
                "write": permissions.write,
                "read": permissions.read,
            },
        )
        self.call("DELETE", f"/topic-permissions/{_p(vhost)}/{_p(user)}")
        for exchange, (write, read) in sorted(permissions.topics.items()):
            self.call(
                "PUT",
                f"/topic-permissions/{_p(vhost)}/{_p(user)}",
                {"exchange": exchange, "write": write, "read": read},
            )

    def limit_user(self, user: str, limits: dict[str, int]) -> None:
        for name, value in limits.items():
            self.call("PUT", f"/user-limits/{_p(user)}/{name}", {"value": value})

    def put_operator_policy(self, vhost: str, name: str, policy: dict[str, Any]) -> None:
        self.call("PUT", f"/operator-policies/{_p(vhost)}/{_p(name)}", policy)

    def users(self) -> list[dict[str, Any]]:
        found = self.call("GET", "/users")
        return found if isinstance(found, list) else []

    def queue(self, vhost: str, name: str) -> dict[str, Any]:
        """One queue as the broker describes it (arguments, type, counts)."""
        found = self.call("GET", f"/queues/{_p(vhost)}/{_p(name)}")
        if not isinstance(found, dict):
            raise ManagementError(f"no queue {name!r} in vhost {vhost!r}")
        return found

    def queue_depths(self, vhost: str) -> dict[str, int]:
        """Every queue of the vhost and the messages in it (ready and unacked; the API's
        counts lag by a few seconds)."""
        found = self.call("GET", f"/queues/{_p(vhost)}?columns=name,messages") or []
        return {str(q["name"]): int(q.get("messages") or 0) for q in found}

    def close_connections(self, user: str, reason: str) -> int:
        """Closes every open connection of `user`; returns how many."""
        found = self.call("GET", "/connections?columns=name,user")
        names = [c["name"] for c in found or [] if c.get("user") == user]
        for name in names:
            self.client.request("DELETE", f"/connections/{_p(name)}", headers={"X-Reason": reason})
        return len(names)


@dataclass(frozen=True)
class Account:
    user: str
    password: str
    permissions: Permissions

    def amqp_url(self, base_url: str) -> str:
        """`base_url` (any amqp URL of the broker and vhost) with this account's login."""
        return with_login(base_url, self.user, self.password)


def with_login(url: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    netloc = (
        f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@{host}"
        + (f":{parts.port}" if parts.port else "")
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def vhost_of(amqp_url: str) -> str:
    path = urllib.parse.urlsplit(amqp_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def user_of(amqp_url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).username or "guest")


class Provisioner:
    """Creates, rotates and revokes accounts in one vhost."""

    def __init__(self, management: Management, vhost: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.management = management
        self.vhost = vhost
        self.prefix = prefix

    def _put(self, user: str, permissions: Permissions, password: str | None) -> Account:
        secret = password or new_secret()
        self.management.put_user(user, secret, permissions.tags)
        self.management.grant(self.vhost, user, permissions)
        return Account(user, secret, permissions)

    def tenant(self, tenant: str, password: str | None = None) -> Account:
        """Creates (or re-creates, with a new secret) tenant T's account."""
        user = tenant_user(tenant, self.prefix)
        account = self._put(user, tenant_permissions(tenant), password)
        self.management.limit_user(
            user, {"max-connections": TENANT_MAX_CONNECTIONS, "max-channels": TENANT_MAX_CHANNELS}
        )
        self.management.put_operator_policy(self.vhost, "orchestrator-status", STATUS_QUEUE_POLICY)
        return account

    def tenant_exists(self, tenant: str) -> bool:
        return self.management.user_exists(tenant_user(tenant, self.prefix))

    def revoke_tenant(self, tenant: str) -> bool:
        """Deletes the account and closes its open connections."""
        user = tenant_user(tenant, self.prefix)
        if not self.management.user_exists(user):
            return False
        self.management.delete_user(user)
        self.management.close_connections(user, "account revoked")
        return True

    def rotate_tenant(self, tenant: str, *, keep_connections: bool = False) -> Account:
        """A new secret for an existing account; open connections are closed unless kept, so
        the old secret stops working everywhere at once."""
        user = tenant_user(tenant, self.prefix)
        if not self.management.user_exists(user):
            raise ManagementError(f"tenant {tenant!r} has no account ({user})")
        account = self.tenant(tenant)
        if not keep_connections:
            self.management.close_connections(user, "secret rotated")
        return account

    def service(self, role: Role, password: str | None = None) -> Account:
        return self._put(service_user(role, self.prefix), service_permissions(role), password)

    def revoke_service(self, role: Role) -> bool:
        user = service_user(role, self.prefix)
        if not self.management.user_exists(user):
            return False
        self.management.delete_user(user)
        return True


class RedisAccounts:
    """Redis ACL users, one per service, through an administrator's connection (sync
    client: provisioning is a command, not a service). `ACL SAVE` persists them when the
    server has an aclfile; otherwise they live until the server restarts (docs/security.md)."""

    def __init__(self, admin_url: str) -> None:
        self.client = redis.Redis.from_url(admin_url)

    def put(self, user: str, password: str, rules: list[str]) -> None:
        self.client.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", user, "reset", "on", f">{password}", *rules
        )

    def delete(self, user: str) -> None:
        self.client.execute_command("ACL", "DELUSER", user)  # type: ignore[no-untyped-call]

    def save(self) -> bool:
        """Persists the ACL when the server has an aclfile; False when it has none."""
        try:
            self.client.execute_command("ACL", "SAVE")  # type: ignore[no-untyped-call]
        except redis.ResponseError:
            return False
        return True

    def close(self) -> None:
        self.client.close()


def with_redis_login(url: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    netloc = (
        f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@{host}"
        + (f":{parts.port}" if parts.port else "")
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _p(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
