"""`deepseek-serve db upgrade|downgrade|current|purge`: schema migrations and retention."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console

from deepseek_serve.cli._common import fail, settings_from_cli

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from deepseek_serve.config import Settings

db_app = typer.Typer(help="Database schema (Alembic migrations) and retention.", no_args_is_help=True)
console = Console()
T = TypeVar("T")

DatabaseUrlOpt = Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy URL; default DS_DATABASE_URL")]


def run_db(settings: Settings, work: Callable[[AsyncEngine], Awaitable[T]], *, auto_migrate: bool = False) -> T:
    """Run `work` with a database engine; with `auto_migrate`, upgrade first when the settings say so
    (SQLite by default). Database errors exit with a one-line message, not a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from deepseek_serve.storage import migrate
    from deepseek_serve.storage.db import create_db_engine

    async def main() -> T:
        engine = create_db_engine(settings)
        try:
            if auto_migrate and settings.effective_auto_migrate:
                await migrate.upgrade(engine)
            return await work(engine)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "orig", None) or exc
        fail(f"database {_safe_url(settings.effective_database_url)}: {reason}")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def upgrade(
    revision: Annotated[str, typer.Argument(help="target revision")] = "head", database_url: DatabaseUrlOpt = None
) -> None:
    """Upgrade the schema (default: to the newest revision)."""
    from deepseek_serve.storage import migrate

    settings = settings_from_cli(database_url=database_url)

    async def work(engine: AsyncEngine) -> str | None:
        await migrate.upgrade(engine, revision)
        return await migrate.current(engine)

    console.print(f"database at revision {run_db(settings, work)}")


@db_app.command("downgrade")
def downgrade(
    revision: Annotated[str, typer.Argument(help="target revision; 'base' drops all")] = "-1",
    yes: Annotated[bool, typer.Option("--yes", help="confirm dropping data")] = False,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Downgrade the schema (default: one revision). Dropped tables lose their data: needs --yes."""
    from deepseek_serve.storage import migrate

    if not yes:
        fail("downgrading drops tables and their data; add --yes to confirm")
    settings = settings_from_cli(database_url=database_url)

    async def work(engine: AsyncEngine) -> str | None:
        await migrate.downgrade(engine, revision)
        return await migrate.current(engine)

    console.print(f"database at revision {run_db(settings, work) or 'base (empty)'}")


@db_app.command("current")
def current(database_url: DatabaseUrlOpt = None) -> None:
    """The database's schema revision, and whether it is the newest."""
    from deepseek_serve.storage import migrate

    settings = settings_from_cli(database_url=database_url)
    rev = run_db(settings, migrate.current)
    head = migrate.head_revision()
    state = "up to date" if rev == head else f"behind head {head}: run `deepseek-serve db upgrade`"
    console.print(f"{rev or 'base (empty)'} ({state})")


@db_app.command("purge")
def purge(
    older_than: Annotated[
        str | None, typer.Option("--older-than", help="age such as 90d, 12h, 2w; default DS_RETENTION_DAYS")
    ] = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Delete usage records and conversations (by last update) older than the given age."""
    from datetime import timedelta

    from deepseek_serve.storage.db import create_session_factory
    from deepseek_serve.storage.retention import PurgeResult, parse_duration
    from deepseek_serve.storage.retention import purge as run_purge

    settings = settings_from_cli(database_url=database_url)
    try:
        age = parse_duration(older_than) if older_than else timedelta(days=settings.retention_days)
    except ValueError as exc:
        fail(str(exc))

    async def work(engine: AsyncEngine) -> PurgeResult:
        return await run_purge(create_session_factory(engine), age)

    result = run_db(settings, work)
    console.print(
        f"deleted {result.usage_records} usage records, {result.conversations} conversations "
        f"({result.messages} messages) older than {result.cutoff.isoformat(timespec='seconds')}Z"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
