"""Alembic, driven from code: `deepseek-serve db ...` and the server's auto-migrate both come here.

The migration scripts ship inside the package (storage/migrations/), so an installed wheel can
migrate without an alembic.ini. Migrations run on a connection of our own async engine (Alembic's
sync API on `run_sync`), so the server can migrate inside its running event loop. Concurrent
starters (several workers) are serialised: a named lock on MySQL/MariaDB, a file lock on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MYSQL_LOCK = "deepseek_serve_migrate"


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


@contextlib.asynccontextmanager
async def _migration_lock(engine: AsyncEngine, conn: AsyncConnection, timeout_s: float) -> AsyncIterator[None]:
    if engine.dialect.name in {"mysql", "mariadb"}:
        params = {"n": _MYSQL_LOCK, "t": int(timeout_s)}
        got = (await conn.execute(text("SELECT GET_LOCK(:n, :t)"), params)).scalar()
        if got != 1:
            raise TimeoutError(f"another process holds the migration lock for more than {timeout_s:.0f}s")
        try:
            yield
        finally:
            await conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": _MYSQL_LOCK})
        return
    database = make_url(str(engine.url)).database or ""
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        lock_path = Path(database + ".migrate.lock")
        fd = await asyncio.to_thread(os.open, lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
        return
    yield


async def _run(engine: AsyncEngine, fn: Any, *args: Any, timeout_s: float = 120.0) -> Any:
    async with engine.connect() as lock_conn, _migration_lock(engine, lock_conn, timeout_s), engine.begin() as conn:
        return await conn.run_sync(lambda sync_conn: fn(alembic_config(sync_conn), *args))


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the schema to `revision` (default: the newest)."""
    await _run(engine, command.upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str = "-1") -> None:
    """Downgrade the schema to `revision` (`base` drops every table)."""
    await _run(engine, command.downgrade, revision)


async def current(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
