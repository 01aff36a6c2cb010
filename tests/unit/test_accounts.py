"""The permission table against the topology: every service may declare, bind and consume
exactly the queues the topology says it consumes; tenants only their own status queues and
flow-start key. Regexes are matched the way RabbitMQ matches them (a search, anchored by the
pattern itself)."""

from __future__ import annotations

import re

import pytest

from orchestrator import accounts, topology
from orchestrator.accounts import ROLES, Permissions, service_permissions, tenant_permissions

TOPOLOGY = topology.build_topology(("default", "gpu"))
PER_TENANT = {
    "dispatcher": [topology.tenant_queue("acme")],
    "engine": [topology.tenant_queue("acme")],
    "scheduler": [topology.ingress_queue("acme")],
}


def allows(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None


def owned(role: str) -> list[str]:
    queues = [q for q in TOPOLOGY.queues if q.consumer == role] + PER_TENANT.get(role, [])
    return [n for q in queues for n in ([q.name, q.dlq] if q.dead_letter else [q.name])]


@pytest.mark.parametrize("role", [r for r in ROLES if r != "operator"])
def test_a_service_may_declare_bind_and_consume_its_own_queues_only(role: str) -> None:
    perms = service_permissions(role)  # type: ignore[arg-type]
    mine = owned(role)
    for name in mine:
        assert allows(perms.configure, name), (role, "configure", name)
        assert allows(perms.write, name), (role, "write", name)  # queue.bind needs it
        assert allows(perms.read, name), (role, "read", name)
    others = {n for r in ROLES for n in owned(r) if r != role} - set(mine)
    for name in others:
        assert not allows(perms.configure, name), (role, "configure", name)
        assert not allows(perms.read, name), (role, "read", name)


@pytest.mark.parametrize("role", [r for r in ROLES if r != "operator"])
def test_a_service_may_make_the_bindings_of_its_queues(role: str) -> None:
    """queue.bind needs read on the exchange and, on a topic exchange with topic
    permissions, a binding key the read regex allows (matched literally: `query.*`)."""
    perms = service_permissions(role)  # type: ignore[arg-type]
    mine = set(owned(role))
    per_tenant = [
        topology.Binding(topology.STEPS, "fq.acme", "acme", ()),
        topology.Binding(topology.COMMANDS, "ingress.acme", topology.flow_start_key("acme"), ()),
        topology.Binding(topology.DEAD_LETTERS, "fq.acme.dlq", "fq.acme", ()),
        topology.Binding(topology.DEAD_LETTERS, "ingress.acme.dlq", "ingress.acme", ()),
    ]
    bindings = [b for b in [*TOPOLOGY.bindings, *per_tenant] if b.queue in mine]
    assert bindings or role == "violations"
    for binding in bindings:
        assert allows(perms.read, binding.exchange), (role, binding)
        if binding.exchange in perms.topics:
            _, read = perms.topics[binding.exchange]
            assert allows(read, binding.routing_key), (role, binding)


@pytest.mark.parametrize("role", [r for r in ROLES if r != "operator"])
def test_no_service_may_declare_or_delete_an_exchange(role: str) -> None:
    perms = service_permissions(role)  # type: ignore[arg-type]
    for exchange in TOPOLOGY.exchanges:
        assert not allows(perms.configure, exchange.name), (role, exchange.name)


def test_only_the_violations_consumer_and_the_operator_may_command() -> None:
    may = [r for r in ROLES if allows(service_permissions(r).write, topology.CONTROL)]
    assert sorted(may) == ["operator", "violations"]
    write, _ = service_permissions("violations").topics[topology.CONTROL]
    assert allows(write, "quarantine.acme")
    assert not allows(write, "anything.acme")


@pytest.mark.parametrize(
    ("key", "publisher"),
    [
        ("execution.requested", "scheduler"),
        ("step.result", "worker"),
        ("flow.start.acme", None),  # tenants and the operator only
        ("query.acme", None),
    ],
)
def test_each_command_key_has_one_service_publisher(key: str, publisher: str | None) -> None:
    def may(perms: Permissions) -> bool:
        write, _ = perms.topics.get(topology.COMMANDS, (".*", ".*"))
        return allows(perms.write, topology.COMMANDS) and allows(write, key)

    services = [r for r in ROLES if r != "operator" and may(service_permissions(r))]
    assert services == ([publisher] if publisher else [])


def test_a_tenant_may_publish_its_own_flow_starts_and_read_its_own_status_only() -> None:
    perms = tenant_permissions("acme")
    write, read = perms.topics[topology.COMMANDS]
    assert allows(write, "flow.start.acme")
    for key in ("flow.start.acme2", "flow.start.globex", "flow.start", "execution.requested"):
        assert not allows(write, key), key
    assert read == accounts.NOTHING
    _, status_read = perms.topics[topology.STATUS]
    assert allows(status_read, "acme.#")
    for key in ("#", "*.sync.#", "acme2.#", "globex.sync.execution.succeeded"):
        assert not allows(status_read, key), key
    own = accounts.status_queue_name("acme", "feed")
    assert allows(perms.configure, own)
    assert allows(perms.read, own)
    for name in ("status.acme2.feed", "status.globex.x", "fq.acme", "ingress.acme", "amq.gen-1"):
        assert not allows(perms.configure, name), name
        assert not allows(perms.read, name), name
    for exchange in (topology.CONTROL, topology.STEPS, topology.WORK, topology.DEAD_LETTERS):
        assert not allows(perms.write, exchange), exchange
    assert not allows(perms.write, "amq.default")


def test_account_names_never_collide() -> None:
    assert accounts.tenant_of_user(accounts.tenant_user("acme")) == "acme"
    for role in ROLES:
        assert accounts.tenant_of_user(accounts.service_user(role)) is None
    assert accounts.tenant_of_user("acme") is None
