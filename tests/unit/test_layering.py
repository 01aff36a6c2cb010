"""The layering of docs/architecture.md ("The house"), checked on the source: a module imports
only from its own layer or below. Pure cores import no adapter, adapters no service, services
no entry point; `workers` never imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PURE, ADAPTER, SERVICE, ENTRY = 1, 2, 3, 4

LAYERS: dict[str, int] = {
    # pure cores: no I/O, time as a value or an injected clock
    "schemas": PURE,
    "orchestrator.clock": PURE,
    "orchestrator.config": PURE,
    "orchestrator.coalesce": PURE,
    "orchestrator.cron": PURE,
    "orchestrator.flowfiles": PURE,
    "orchestrator.frames": PURE,
    "orchestrator.topology": PURE,
    "orchestrator.scheduler.ticks": PURE,
    "orchestrator.engine.machine": PURE,
    "orchestrator.engine.views": PURE,
    "orchestrator.dispatcher.fairness": PURE,
    "orchestrator.dispatcher.ledger": PURE,
    "orchestrator.violations.policy": PURE,
    "orchestrator.violations.book": PURE,
    # adapters: brokers, Redis, logs, traces
    "orchestrator.store": ADAPTER,
    "orchestrator.amqp": ADAPTER,
    "orchestrator.consumer": ADAPTER,
    "orchestrator.kafka": ADAPTER,
    "orchestrator.outage": ADAPTER,
    "orchestrator.telemetry": ADAPTER,
    "orchestrator.tracing": ADAPTER,
    "orchestrator.accounts": ADAPTER,
    "orchestrator.health": ADAPTER,
    "orchestrator.dlq": ADAPTER,
    # services
    "orchestrator.scheduler": SERVICE,
    "orchestrator.engine": SERVICE,
    "orchestrator.dispatcher": SERVICE,
    "orchestrator.violations": SERVICE,
    "workers": SERVICE,
    # entry points
    "orchestrator": ENTRY,
}


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of `module`."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        found = LAYERS.get(".".join(parts[:end]))
        if found is not None:
            return found
    return 0  # the standard library or a third-party package


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    """Modules imported at module level or in functions; `from a import b` counts as `a.b`
    when b is a module (so `from orchestrator import topology` is orchestrator.topology)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                base = ROOT / Path(*candidate.split("."))
                is_module = base.with_suffix(".py").exists() or (base / "__init__.py").exists()
                found.append(candidate if is_module else node.module)
    return found


SOURCES = sorted(
    p for package in ("orchestrator", "workers", "schemas") for p in (ROOT / package).rglob("*.py")
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_from_a_higher_layer(path: Path) -> None:
    module = module_of(path)
    mine = layer_of(module)
    upward = [
        imported
        for imported in imports(path)
        if layer_of(imported) > mine and not imported.startswith(module + ".")
    ]
    assert not upward, f"{module} (layer {mine}) imports {upward}"


def test_workers_do_not_import_the_cli() -> None:
    for path in (ROOT / "workers").rglob("*.py"):
        cli = [m for m in imports(path) if m.startswith("orchestrator.cli") or m.endswith("_cli")]
        assert not cli, f"{path} imports {cli}"


def test_the_table_knows_every_package() -> None:
    """A new package must be placed in a layer, not fall through to the default."""
    for path in SOURCES:
        assert layer_of(module_of(path)) > 0, module_of(path)
