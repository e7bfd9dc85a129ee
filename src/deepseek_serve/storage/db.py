"""The database engine and session factory, built from settings.

`DS_DATABASE_URL` picks the backend: `mysql+asyncmy://user:pass@host:3306/db` (MySQL 8, MariaDB)
or `sqlite+aiosqlite:///path` (the embedded default under the data folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import QueuePool

from deepseek_serve.contracts import DatabasePoolState

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

SessionFactory = async_sessionmaker[AsyncSession]

# SQLAlchemy's QueuePool default, which the SQLite engine keeps (create_db_engine sets no pool size there)
SQLITE_MAX_OVERFLOW = 10


def create_db_engine(settings: Settings, url: str | None = None) -> AsyncEngine:
    """An async engine for `url` (default: settings.effective_database_url) with the pool settings.

    SQLite: the parent folder is created, WAL journal and foreign keys are switched on, and a
    busy timeout of `db_pool_timeout_s` lets concurrent writers wait instead of failing.
    MySQL/MariaDB: utf8mb4 connections, `db_connect_timeout_s` for connect, pool size, overflow,
    recycle, pre-ping and checkout timeout from settings.
    """
    url = url or settings.effective_database_url
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": settings.db_pool_timeout_s}
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        return engine
    if parsed.get_backend_name() in {"mysql", "mariadb"}:
        query = dict(parsed.query)
        query.setdefault("charset", "utf8mb4")
        url_obj = parsed.set(query=query)
        kwargs["connect_args"] = {"connect_timeout": settings.db_connect_timeout_s}
    else:
        url_obj = parsed
    return create_async_engine(
        url_obj,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_recycle=settings.db_pool_recycle_s,
        pool_pre_ping=settings.db_pool_pre_ping,
        pool_timeout=settings.db_pool_timeout_s,
        **kwargs,
    )


def is_sqlite_url(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def max_overflow_of(settings: Settings, url: str | None = None) -> int:
    """The overflow `create_db_engine(settings, url)` allows its pool."""
    return SQLITE_MAX_OVERFLOW if is_sqlite_url(url or settings.effective_database_url) else settings.db_max_overflow


def pool_state(engine: AsyncEngine, max_overflow: int) -> DatabasePoolState | None:
    """The engine's pool now; None for a pool that does not count connections (in-memory SQLite)."""
    pool = engine.sync_engine.pool
    if not isinstance(pool, QueuePool):
        return None
    return DatabasePoolState(
        size=pool.size(),
        in_use=pool.checkedout(),
        overflow=max(pool.overflow(), 0),
        max_overflow=max_overflow,
    )


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    return async_sessionmaker(engine, expire_on_commit=False)
