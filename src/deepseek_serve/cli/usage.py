"""`deepseek-serve usage summary`: requests and tokens per key, day and model."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from deepseek_serve.cli._common import fail, settings_from_cli
from deepseek_serve.cli.db import DatabaseUrlOpt, run_db
from deepseek_serve.cli.keys import MAX_KEY_ID

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from deepseek_serve.storage.usage import UsageRow

usage_app = typer.Typer(help="Usage accounting.", no_args_is_help=True)
console = Console()


def _since(value: str) -> datetime:
    from deepseek_serve.storage.retention import parse_since

    try:
        return parse_since(value)
    except ValueError as exc:
        fail(f"invalid --since: {exc}")


@usage_app.command("summary")
def summary(
    group_by: Annotated[str, typer.Option(help="comma list of day, model, key, endpoint")] = "day,model,key",
    key_id: Annotated[int | None, typer.Option(min=1, max=MAX_KEY_ID, help="only this key")] = None,
    since: Annotated[str | None, typer.Option(help="7d, 12h or an ISO date (UTC)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Requests and tokens, grouped (default: per day, model and key; newest day first)."""
    from deepseek_serve.storage.db import create_session_factory
    from deepseek_serve.storage.usage import GROUP_BY_FIELDS, UsageRepository

    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUP_BY_FIELDS]
    if unknown:
        fail(f"unknown --group-by field(s) {unknown}; valid: {list(GROUP_BY_FIELDS)}")
    settings = settings_from_cli(database_url=database_url)
    since_dt = _since(since) if since else None

    async def work(engine: AsyncEngine) -> list[UsageRow]:
        repo = UsageRepository(engine, create_session_factory(engine))
        return await repo.summary(group_by=groups, key_id=key_id, since=since_dt)

    rows = run_db(settings, work, auto_migrate=True)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows]))
        return
    columns = [c for c in ("day", "model", "key", "endpoint") if c in groups]
    table = Table(*columns, "requests", "prompt", "completion", "cached", "reasoning", "total", "errors")
    for r in rows:
        key = str(r.key_id) if r.key_id is not None else "anonymous"
        values = {"day": r.day, "model": r.model, "key": key, "endpoint": r.endpoint}
        table.add_row(
            *(str(values[c]) for c in columns),
            str(r.requests),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            str(r.cached_tokens),
            str(r.reasoning_tokens),
            str(r.total_tokens),
            str(r.errors),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(usage_app, name="usage")
