"""The `deepseek-serve` command. Each sub-module adds its commands with `register(app)`."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="deepseek-serve",
    help="Serve small DeepSeek chat models: chat, generate, serve an OpenAI-compatible API, manage keys.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# one line per command module; heavy imports stay inside the command functions.
_COMMAND_MODULES = ("generate", "model", "bench", "serve", "db", "keys", "usage")

for _name in _COMMAND_MODULES:
    importlib.import_module(f"deepseek_serve.cli.{_name}").register(app)


def main() -> None:
    app()
