"""Alembic environment: migrate on the connection handed in by storage/migrate.py.

Run directly (`alembic -c <ini> -x url=sqlite+aiosqlite:///x.db upgrade head`) it builds its own
async engine from `-x url=` or `DS_DATABASE_URL` settings.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from deepseek_serve.storage.models import Base

target_metadata = Base.metadata


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER TABLE goes through batch copies
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone() -> None:
    from deepseek_serve.config import load_settings
    from deepseek_serve.storage.db import create_db_engine

    url = context.get_x_argument(as_dictionary=True).get("url")
    engine = create_db_engine(load_settings(), url=url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_migrate)
    finally:
        await engine.dispose()


connection = context.config.attributes.get("connection")
if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
elif connection is not None:
    _migrate(connection)
else:
    asyncio.run(_run_standalone())
