"""Helpers shared by CLI commands: settings with flag overrides, clean fatal errors."""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def settings_from_cli(**overrides: object) -> Settings:
    """Settings from env/.env, with non-None CLI flags taking precedence; exits with a clear message."""
    from deepseek_serve.config import SettingsError, load_settings

    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        fail(str(exc))
