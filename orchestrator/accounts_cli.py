"""`orchestrator accounts ...` and the account commands of `orchestrator tenants ...`: broker
accounts provisioned through the RabbitMQ management API (orchestrator.accounts)."""

from __future__ import annotations

import asyncio
import os
import re
import urllib.parse
from pathlib import Path
from typing import Annotated

import typer
from redis import RedisError
from rich.table import Table

from orchestrator import topology
from orchestrator.accounts import (
    ROLES,
    Account,
    Management,
    ManagementError,
    Provisioner,
    RedisAccounts,
    Role,
    new_secret,
    redis_rules,
    user_of,
    vhost_of,
    with_redis_login,
)
from orchestrator.amqp import connect, open_channel
from orchestrator.cliutil import ExitCode, console, err_console, fail, settings_or_exit
from orchestrator.config import Settings
from schemas.common import SLUG_PATTERN

accounts_app = typer.Typer(
    help="Service accounts: one RabbitMQ user per process type, least privilege.",
    no_args_is_help=True,
)

DEFAULT_DIR = Path(".orchestrator/accounts")


def _provisioner(settings: Settings) -> Provisioner:
    try:
        management = Management(settings.rabbitmq_management_url)
    except ManagementError as exc:
        raise fail(str(exc), ExitCode.CONFIG) from None
    return Provisioner(management, vhost_of(str(settings.rabbitmq_url)), settings.account_prefix)


def env_file(directory: Path, role: str) -> Path:
    return directory / f"{role}.env"


def read_env(path: Path) -> dict[str, str]:
    """The variables an account file holds."""
    if not path.exists():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.lstrip().startswith("#"):
            found[name.strip()] = value.strip()
    return found


def read_env_url(path: Path) -> str | None:
    """The ORCH_RABBITMQ_URL an account file holds, if any."""
    return read_env(path).get("ORCH_RABBITMQ_URL")


def write_env(path: Path, role: str, values: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        f"# The {role} account (orchestrator accounts provision). Secret: keep it to the\n"
        f"# {role} processes, e.g. systemd EnvironmentFile=.\n"
        + "".join(f"{name}={value}\n" for name, value in values.items())
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _password_in(url: str | None, user: str) -> str | None:
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    if urllib.parse.unquote(parts.username or "") != user or parts.password is None:
        return None
    return urllib.parse.unquote(parts.password)


async def _apply_topology(settings: Settings) -> int:
    connection = await connect(settings, "orchestrator-accounts")
    async with connection:
        return len(await topology.apply(await open_channel(connection)))


def provision_services(
    settings: Settings, directory: Path, *, rotate: bool = False, redis_acl: bool = False
) -> list[Account]:
    """Creates (or updates) every service account and writes `<directory>/<role>.env`.
    Without `rotate`, secrets already in those files are kept, so running it again changes
    nothing for running processes. With `redis_acl`, each service also gets a Redis ACL user
    of the same name (the administrator's ORCH_REDIS_URL creates them)."""
    provisioner = _provisioner(settings)
    redis_accounts = RedisAccounts(str(settings.redis_url)) if redis_acl else None
    accounts = []
    try:
        with provisioner.management:
            for role in ROLES:
                path = env_file(directory, role)
                known = read_env(path)
                user = f"{settings.account_prefix}{role}"
                keep = None if rotate else _password_in(known.get("ORCH_RABBITMQ_URL"), user)
                account = provisioner.service(role, keep)
                values = {"ORCH_RABBITMQ_URL": account.amqp_url(str(settings.rabbitmq_url))}
                if redis_accounts is not None:
                    redis_keep = None if rotate else _password_in(known.get("ORCH_REDIS_URL"), user)
                    secret = redis_keep or new_secret()
                    redis_accounts.put(user, secret, redis_rules(role, settings.redis_prefix))
                    values["ORCH_REDIS_URL"] = with_redis_login(
                        str(settings.redis_url), user, secret
                    )
                write_env(path, role, values)
                accounts.append(account)
        if redis_accounts is not None:
            redis_accounts.save()
    finally:
        if redis_accounts is not None:
            redis_accounts.close()
    return accounts


@accounts_app.command("provision")
def accounts_provision(
    out: Annotated[Path, typer.Option(help="where the <role>.env files go")] = DEFAULT_DIR,
    rotate: Annotated[bool, typer.Option(help="new secrets for every service account")] = False,
    redis_acl: Annotated[
        bool, typer.Option("--redis-acl", help="also one Redis ACL user per service")
    ] = False,
) -> None:
    """Applies the topology and creates one account per process type (scheduler, engine,
    dispatcher, worker, violations, operator), as the administrator in
    ORCH_RABBITMQ_MANAGEMENT_URL. Each process runs with its `<role>.env`."""
    settings = settings_or_exit()
    try:
        asyncio.run(_apply_topology(settings))
        accounts = provision_services(settings, out, rotate=rotate, redis_acl=redis_acl)
    except (ManagementError, OSError, RedisError) as exc:
        raise fail(f"provisioning failed: {exc}") from None
    for account in accounts:
        console.print(f"{account.user}: {env_file(out, account.user.rsplit('.', 1)[-1])}")


@accounts_app.command("list")
def accounts_list() -> None:
    """The orchestrator's accounts on the broker (services and tenants)."""
    settings = settings_or_exit()
    provisioner = _provisioner(settings)
    try:
        with provisioner.management:
            users = provisioner.management.users()
    except ManagementError as exc:
        raise fail(str(exc)) from None
    table = Table("account", "kind", "tags")
    prefix = settings.account_prefix
    for user in sorted(users, key=lambda u: str(u.get("name"))):
        name = str(user.get("name", ""))
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        kind = "tenant" if rest.startswith("tenant.") else "service"
        tags = user.get("tags") or []
        table.add_row(name, kind, tags if isinstance(tags, str) else ",".join(tags) or "-")
    console.print(table)


def _tenant_arg(tenant: str) -> str:
    if not re.match(SLUG_PATTERN, tenant):
        raise fail(
            f"invalid tenant id {tenant!r}: lowercase letters, digits, - and _", ExitCode.USAGE
        )
    return tenant


def _hand_out(settings: Settings, account: Account, out: Path | None) -> None:
    url = account.amqp_url(str(settings.rabbitmq_url))
    if out is None:
        typer.echo(f"ORCH_RABBITMQ_URL={url}")
        return
    write_env(out, account.user, {"ORCH_RABBITMQ_URL": url})
    console.print(f"{account.user}: secret written to {out} (mode 600)")


def tenants_provision(
    tenant: Annotated[str, typer.Argument(help="tenant id")],
    out: Annotated[
        Path | None, typer.Option(help="write the AMQP URL here (mode 600) instead of printing it")
    ] = None,
) -> None:
    """Creates tenant T's RabbitMQ account: it may start T's flows and follow T's status, and
    nothing else. Prints (or writes) its AMQP URL with the secret."""
    settings = settings_or_exit()
    _tenant_arg(tenant)
    provisioner = _provisioner(settings)
    try:
        with provisioner.management:
            if provisioner.tenant_exists(tenant):
                raise fail(
                    f"tenant {tenant!r} already has an account; "
                    f"`orchestrator tenants rotate-secret {tenant}` gives it a new secret"
                )
            account = provisioner.tenant(tenant)
    except ManagementError as exc:
        raise fail(f"provisioning failed: {exc}") from None
    _hand_out(settings, account, out)


def tenants_rotate_secret(
    tenant: Annotated[str, typer.Argument(help="tenant id")],
    out: Annotated[Path | None, typer.Option(help="write the AMQP URL here (mode 600)")] = None,
    keep_connections: Annotated[
        bool, typer.Option(help="leave connections opened with the old secret open")
    ] = False,
) -> None:
    """A new secret for tenant T's account; its open connections are closed."""
    settings = settings_or_exit()
    _tenant_arg(tenant)
    provisioner = _provisioner(settings)
    try:
        with provisioner.management:
            account = provisioner.rotate_tenant(tenant, keep_connections=keep_connections)
    except ManagementError as exc:
        raise fail(str(exc)) from None
    _hand_out(settings, account, out)


def tenants_revoke(tenant: Annotated[str, typer.Argument(help="tenant id")]) -> None:
    """Deletes tenant T's account and closes its connections (its flows stay registered)."""
    settings = settings_or_exit()
    _tenant_arg(tenant)
    provisioner = _provisioner(settings)
    try:
        with provisioner.management:
            gone = provisioner.revoke_tenant(tenant)
    except ManagementError as exc:
        raise fail(str(exc)) from None
    if not gone:
        raise fail(f"tenant {tenant!r} has no account")
    console.print(f"{tenant}: account revoked")


def service_env(directory: Path, role: Role) -> dict[str, str]:
    """The environment a process of `role` runs with (its account file), or {}."""
    return read_env(env_file(directory, role))


__all__ = ["accounts_app", "err_console", "provision_services", "service_env", "user_of"]
