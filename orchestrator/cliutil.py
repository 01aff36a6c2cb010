"""What every `orchestrator` subcommand shares: exit codes, consoles, settings."""

from __future__ import annotations

import sys
from enum import IntEnum

import typer
from rich.console import Console

from orchestrator.config import ConfigError, Settings, load_settings
from orchestrator.telemetry import configure_logging


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # the command ran and found a problem (broker down, stale files)
    USAGE = 2  # bad arguments or input files (typer uses 2 for usage errors too)
    CONFIG = 78  # EX_CONFIG from sysexits.h: an ORCH_* variable is invalid


# Piped output is not cut at 80 columns (rich's default without a terminal): tables stay
# whole for grep and for people reading logs.
PIPED_WIDTH = 200
console = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
err_console = Console(stderr=True, soft_wrap=True)  # error lines stay whole for grep


def settings_or_exit() -> Settings:
    try:
        settings = load_settings()
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(ExitCode.CONFIG) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def fail(message: str, code: ExitCode = ExitCode.FAILURE) -> typer.Exit:
    """Prints `error: message` on stderr; returns the exit to raise."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)
